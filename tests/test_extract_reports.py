"""extract_reports: MIMIC tree and manifest readers, every reject reason, and the stage writing its
artifacts."""

import gzip
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage

from data_contracts.io import read_artifact
from data_contracts.reports import Image, Reject, Report
from tasks.config import DataConfig
from tasks.extract_reports import Config, InputLayoutError, extract
from tests.context import make_test_context, run_direct

from .conftest import REAL_DATA

NAME = "extract_reports"

FINDINGS = "Heart size is normal.  There is a new patchy opacity in the right lower lobe."
IMPRESSION = "Right lower lobe pneumonia.  Follow-up ___ recommended."


def mimic_report(findings: str = FINDINGS, impression: str = IMPRESSION) -> str:
    lines = ["EXAMINATION:  CHEST (PA AND LAT)", "", "INDICATION:  ___ with cough.", ""]
    lines += ["FINDINGS: ", "", findings, "", "IMPRESSION: ", "", impression]
    return "                                 FINAL REPORT\n" + "\n".join(" " + x for x in lines) + "\n"


@pytest.fixture(scope="module")
def radiograph_jpeg(tmp_path_factory) -> bytes:
    """A small real frontal radiograph as JPEG bytes (so decode-mode polarity checks see real anatomy)."""
    image = PILImage.open(REAL_DATA / "images" / "00000001_000.png").resize((96, 80))
    path = tmp_path_factory.mktemp("jpeg") / "r.jpg"
    image.save(path, quality=90)
    return path.read_bytes()


class MimicTree:
    """A hand-made MIMIC-CXR(-JPG) root: report files, JPGs and the two CSVs, written by the tests."""

    def __init__(self, root: Path, jpeg: bytes):
        self.root, self.jpeg = root, jpeg
        self.meta: list[dict] = []
        self.split: list[dict] = []

    def study_dir(self, subject: str) -> Path:
        return self.root / "files" / f"p{subject[:2]}" / f"p{subject}"

    def add_report(self, subject: str, study: str, content: str | bytes | None) -> Path:
        path = self.study_dir(subject) / f"s{study}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is not None:
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def add_image(self, subject, study, dicom, view="PA", split="train", content=None, in_split=True) -> Path:
        path = self.study_dir(subject) / f"s{study}" / f"{dicom}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is not False:
            path.write_bytes(self.jpeg if content is None else content)
        self.meta.append(
            {
                "dicom_id": dicom,
                "subject_id": subject,
                "study_id": study,
                "PerformedProcedureStepDescription": "",
                "ViewPosition": view,
                "Rows": 80,
                "Columns": 96,
                "StudyDate": 21800506,
                "StudyTime": 0,
                "ProcedureCodeSequence_CodeMeaning": "",
                "ViewCodeSequence_CodeMeaning": "",
                "PatientOrientationCodeSequence_CodeMeaning": "",
            }
        )
        if in_split:
            self.split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split})
        return path

    def write_csvs(self) -> Path:
        for name, rows in (("metadata", self.meta), ("split", self.split)):
            with gzip.open(self.root / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt") as f:
                pd.DataFrame(rows).to_csv(f, index=False)
        return self.root


def data(**kwargs) -> DataConfig:
    return DataConfig(**kwargs)


def by_key(rejects: list[Reject]) -> dict[str, Reject]:
    return {r.key: r for r in rejects}


def test_mimic_reader_happy_path_with_view_filter_and_official_split(tmp_path, radiograph_jpeg):
    tree = MimicTree(tmp_path / "mimic", radiograph_jpeg)
    tree.add_report("10000032", "50000001", mimic_report())
    pa_path = tree.add_image("10000032", "50000001", "aaaa0001-0000-0000-0000-000000000001", "PA")
    tree.add_image("10000032", "50000001", "aaaa0001-0000-0000-0000-000000000002", "LATERAL")
    tree.add_report("11000001", "50000002", mimic_report("Lungs are clear.", "No acute process."))
    tree.add_image("11000001", "50000002", "bbbb0002-0000-0000-0000-000000000001", "AP", split="test")
    root = tree.write_csvs()

    out = extract(data(root=str(root), views=["PA", "AP"]), Config(image_workers=2))
    assert out.rejects == []
    assert [r.study_id for r in out.reports] == ["50000001", "50000002"]
    first = out.reports[0]
    assert first.subject_id == "10000032" and first.split == "train"
    assert first.findings == "Heart size is normal. There is a new patchy opacity in the right lower lobe."
    assert first.impression == "Right lower lobe pneumonia. Follow-up ___ recommended."
    assert first.text == first.findings + " " + first.impression
    assert first.source_path == str(root.resolve() / "files/p10/p10000032/s50000001.txt")
    assert [(i.image_id, i.view, i.split) for i in out.images] == [
        ("aaaa0001-0000-0000-0000-000000000001", "PA", "train"),
        ("bbbb0002-0000-0000-0000-000000000001", "AP", "test"),
    ]
    assert out.images[0].path == str(pa_path.resolve()) and Path(out.images[0].path).is_absolute()
    assert (out.images[0].height, out.images[0].width) == (80, 96)

    everything = extract(data(root=str(root), views=[]), Config(image_workers=1))
    assert [i.view for i in everything.images] == ["PA", "LATERAL", "AP"]


def test_mimic_every_bad_input_becomes_a_precise_reject_and_nothing_else_is_lost(tmp_path, radiograph_jpeg):
    tree = MimicTree(tmp_path / "mimic", radiograph_jpeg)
    subject = "12345678"
    reports = {
        "50000010": mimic_report(),  # good, keeps one of its two images
        "50000011": None,  # report file missing
        "50000012": "",  # empty file
        "50000013": b" FINDINGS: Heart size \xff normal.\n",  # not UTF-8
        "50000014": " EXAMINATION:  CHEST\n \n INDICATION:  Cough.\n",  # no findings/impression
        "50000015": mimic_report(),  # its only image is not an image
        "50000016": mimic_report(),  # only a lateral view
        "50000017": mimic_report(),  # image truncated
        "50000018": mimic_report(),  # its only image is missing from the split CSV
    }
    paths = {study: tree.add_report(subject, study, text) for study, text in reports.items()}
    tree.add_image(subject, "50000010", "good")
    tree.add_image(subject, "50000010", "missing", content=False)
    for study in ("50000011", "50000012", "50000013", "50000014"):
        tree.add_image(subject, study, f"img{study}")
    tree.add_image(subject, "50000015", "text", content=b"FINDINGS: this is a text file\n")
    tree.add_image(subject, "50000016", "lat", view="LATERAL")
    tree.add_image(subject, "50000017", "cut", content=radiograph_jpeg[: len(radiograph_jpeg) // 2])
    tree.add_image(subject, "50000010", "nosplit", in_split=False)
    tree.add_image(subject, "50000018", "nosplit2", in_split=False)
    orphan = tree.add_report("19999999", "59999999", mimic_report())  # a report without metadata
    root = tree.write_csvs()

    out = extract(data(root=str(root), views=["PA", "AP"]), Config(image_workers=2))
    assert [r.study_id for r in out.reports] == ["50000010"]
    assert [i.image_id for i in out.images] == ["good"]
    rejects = by_key(out.rejects)
    image_dir = root.resolve() / "files/p12/p12345678"
    expected = {
        "50000011": (paths["50000011"], "report file missing (1 image(s) of the study left out)"),
        "50000012": (paths["50000012"], "empty report file (1 image(s) of the study left out)"),
        "50000013": (
            paths["50000013"],
            "not valid UTF-8: byte 0xff at offset 22 (1 image(s) of the study left out)",
        ),
        "50000014": (
            paths["50000014"],
            "no FINDINGS or IMPRESSION section and no closing paragraph (sections: preamble, examination, "
            "indication) (1 image(s) of the study left out)",
        ),
        "missing": (image_dir / "s50000010/missing.jpg", "study 50000010: file does not exist"),
        "text": (
            image_dir / "s50000015/text.jpg",
            "study 50000015: not an image file (no known image format header)",
        ),
        "50000015": (paths["50000015"], "no usable image: every image of the study was rejected"),
        "cut": (
            image_dir / "s50000017/cut.jpg",
            "study 50000017: truncated JPEG file (no end-of-image marker)",
        ),
        "50000017": (paths["50000017"], "no usable image: every image of the study was rejected"),
        "50000016": (paths["50000016"], "no image with a view in data.views ['AP', 'PA'] (LATERAL x1)"),
        "nosplit": (root / "mimic-cxr-2.0.0-split.csv.gz", "study 50000010: not in split CSV"),
        "nosplit2": (root / "mimic-cxr-2.0.0-split.csv.gz", "study 50000018: not in split CSV"),
        "50000018": (
            paths["50000018"],
            "no image left: every image of the study is missing from mimic-cxr-2.0.0-split.csv.gz or "
            "inconsistent",
        ),
        "59999999": (orphan, "report has no image in mimic-cxr-2.0.0-metadata.csv.gz"),
    }
    assert set(rejects) == set(expected)
    for key, (source, reason) in expected.items():
        assert (rejects[key].source, rejects[key].reason) == (str(Path(source).resolve()), reason), key


def test_full_decode_check_rejects_negative_frontal_images(tmp_path, radiograph_jpeg):
    tree = MimicTree(tmp_path / "mimic", radiograph_jpeg)
    negative = PILImage.eval(
        PILImage.open(REAL_DATA / "images" / "00000001_000.png").resize((96, 80)), lambda v: 255 - v
    )
    neg_path = tmp_path / "neg.jpg"
    negative.save(neg_path, quality=90)
    tree.add_report("10000001", "50000001", mimic_report())
    tree.add_image("10000001", "50000001", "positive")
    tree.add_image("10000001", "50000001", "negative", content=neg_path.read_bytes())
    root = tree.write_csvs()

    header_only = extract(data(root=str(root), check_images=False), Config(image_workers=1))
    assert [i.image_id for i in header_only.images] == ["negative", "positive"]
    decoded = extract(data(root=str(root), check_images=True), Config(image_workers=2))
    assert [i.image_id for i in decoded.images] == ["positive"]
    (reject,) = decoded.rejects
    assert reject.key == "negative" and "looks inverted (spine darker than lungs)" in reject.reason


def test_mimic_layout_errors_name_the_file_and_column(tmp_path, radiograph_jpeg):
    tree = MimicTree(tmp_path / "mimic", radiograph_jpeg)
    tree.root.mkdir(parents=True)
    with pytest.raises(InputLayoutError, match=r"mimic-cxr-2.0.0-metadata.csv.gz: not found"):
        extract(data(root=str(tree.root)), Config())
    tree.add_report("10000001", "50000001", mimic_report())
    tree.add_image("10000001", "50000001", "one")
    tree.write_csvs()
    frame = pd.read_csv(tree.root / "mimic-cxr-2.0.0-split.csv.gz").drop(columns=["split"])
    (tree.root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    frame.to_csv(tree.root / "mimic-cxr-2.0.0-split.csv", index=False)  # plain .csv is accepted too
    with pytest.raises(
        InputLayoutError, match=r"mimic-cxr-2.0.0-split.csv: missing required column\(s\) 'split'"
    ):
        extract(data(root=str(tree.root)), Config())
    with pytest.raises(InputLayoutError, match="data.root must be set"):
        extract(data(root=None), Config())


def test_max_studies_keeps_the_first_studies_in_id_order(tmp_path, radiograph_jpeg):
    tree = MimicTree(tmp_path / "mimic", radiograph_jpeg)
    for study in ("50000003", "50000001", "50000002"):
        tree.add_report("10000001", study, mimic_report())
        tree.add_image("10000001", study, f"img{study}")
    out = extract(data(root=str(tree.write_csvs()), max_studies=2), Config())
    assert [r.study_id for r in out.reports] == ["50000001", "50000002"]


# --------------------------------------------------------------------------- manifest


def write_manifest(folder: Path, rows: list[dict], name="manifest.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_manifest_reader_resolves_paths_parses_sections_and_rejects_bad_rows(tmp_path, radiograph_jpeg):
    folder = tmp_path / "corpus"
    (folder / "img").mkdir(parents=True)
    for name in ("a", "b", "c", "d", "e"):
        (folder / "img" / f"{name}.jpg").write_bytes(radiograph_jpeg)
    (folder / "img" / "notimage.jpg").write_text("hello")
    absolute = (folder / "img" / "e.jpg").resolve()
    rows = [
        {
            "study_id": "s1",
            "image_path": "img/a.jpg",
            "report_text": "FINDINGS: Clear lungs.\nIMPRESSION: Normal.",
            "split": "train",
            "subject_id": "p1",
            "view": "PA",
        },
        {
            "study_id": "s2",
            "image_path": "img/b.jpg",
            "report_text": "No acute process.\n\nHeart normal.",
            "split": "val",
            "subject_id": "p2",
            "view": "ap",
        },
        {
            "study_id": "s1",
            "image_path": "img/c.jpg",
            "report_text": "dup",
            "split": "train",
            "subject_id": "p1",
            "view": "PA",
        },
        {
            "study_id": "s3",
            "image_path": "img/d.jpg",
            "report_text": "Lateral.",
            "split": "test",
            "subject_id": "",
            "view": "LATERAL",
        },
        {
            "study_id": "s4",
            "image_path": str(absolute),
            "report_text": "Effusion.",
            "split": "holdout",
            "subject_id": "",
            "view": "PA",
        },
        {
            "study_id": "s5",
            "image_path": "img/notimage.jpg",
            "report_text": "Text.",
            "split": "test",
            "subject_id": "",
            "view": "PA",
        },
        {
            "study_id": "s6",
            "image_path": "img/e.jpg",
            "report_text": "  ",
            "split": "test",
            "subject_id": "",
            "view": "PA",
        },
        {
            "study_id": "s1",
            "image_path": "img/a.jpg",
            "report_text": "dup again",
            "split": "train",
            "subject_id": "p1",
            "view": "PA",
        },
        {
            "study_id": "",
            "image_path": "img/a.jpg",
            "report_text": "x",
            "split": "train",
            "subject_id": "",
            "view": "PA",
        },
    ]
    manifest = write_manifest(folder, rows)
    out = extract(
        data(source="manifest", manifest=str(manifest), views=["PA", "AP"]), Config(image_workers=2)
    )

    assert [(r.study_id, r.subject_id, r.split) for r in out.reports] == [
        ("s1", "p1", "train"),
        ("s2", "p2", "validate"),
    ]
    assert (out.reports[0].findings, out.reports[0].impression) == ("Clear lungs.", "Normal.")
    assert (out.reports[1].findings, out.reports[1].impression) == ("No acute process. Heart normal.", "")
    assert out.reports[0].source_path == f"{manifest.resolve()}#row 1"
    assert [(i.image_id, i.path, i.view) for i in out.images] == [
        ("s1_a", str((folder / "img" / "a.jpg").resolve()), "PA"),
        ("s2_b", str((folder / "img" / "b.jpg").resolve()), "AP"),  # views upper-cased as in MIMIC
    ]
    src = str(manifest.resolve())
    got = sorted((r.source, r.key, r.reason) for r in out.rejects)
    assert got == sorted(
        [
            (src, "row 3", "duplicate study_id 's1' (first at row 1, kept)"),
            (src, "row 4", "study s3: view 'LATERAL' not in data.views ['AP', 'PA']"),
            (src, "row 5", "study s4: split 'holdout' is not one of train, validate, test"),
            (
                str((folder / "img" / "notimage.jpg").resolve()),
                "s5_notimage",
                "study s5: not an image file (no known image format header)",
            ),
            (f"{src}#row 6", "s5", "no usable image: every image of the study was rejected"),
            (f"{src}#row 7", "s6", "empty report_text (1 image(s) of the study left out)"),
            (src, "row 8", "duplicate study_id 's1' (first at row 1, kept)"),
            (src, "row 9", "empty study_id"),
        ]
    )


def test_manifest_minimal_columns_and_parquet_with_integer_ids(tmp_path, radiograph_jpeg):
    folder = tmp_path / "pq"
    (folder / "x").mkdir(parents=True)
    (folder / "x" / "1.jpg").write_bytes(radiograph_jpeg)
    manifest = write_manifest(
        folder, [{"study_id": 7, "image_path": "x/1.jpg", "report_text": "IMPRESSION: Normal."}], "m.parquet"
    )
    out = extract(data(source="manifest", manifest=str(manifest), views=["PA"]), Config())
    (report,) = out.reports
    assert (report.study_id, report.subject_id, report.split, report.impression) == (
        "7",
        "",
        "train",
        "Normal.",
    )
    (image,) = out.images
    assert (image.image_id, image.view, image.height, image.width) == ("7_1", "", 80, 96)


def test_manifest_missing_required_column_is_an_error_naming_file_and_column(tmp_path):
    manifest = write_manifest(tmp_path, [{"study_id": "s1", "image_path": "a.jpg", "text": "x"}])
    with pytest.raises(InputLayoutError, match=r"manifest.csv: missing required column\(s\) 'report_text'"):
        extract(data(source="manifest", manifest=str(manifest)), Config())
    parquet = write_manifest(tmp_path, [{"study_id": "s1", "report_text": "x"}], "m.parquet")
    with pytest.raises(InputLayoutError, match=r"m.parquet: missing required column\(s\) 'image_path'"):
        extract(data(source="manifest", manifest=str(parquet)), Config())
    with pytest.raises(InputLayoutError, match=r"nope.csv: manifest not found"):
        extract(data(source="manifest", manifest=str(tmp_path / "nope.csv")), Config())


# --------------------------------------------------------------------------- stage


def test_stage_writes_validated_artifacts(tmp_path, radiograph_jpeg):
    tree = MimicTree(tmp_path / "mimic", radiograph_jpeg)
    tree.add_report("10000001", "50000001", mimic_report())
    tree.add_image("10000001", "50000001", "one")
    tree.add_image("10000001", "50000001", "two", content=b"not a jpeg")
    config = SimpleNamespace(data=data(root=str(tree.write_csvs())))
    ctx = make_test_context(tmp_path / "run", config, stage=NAME)
    run_direct(ctx, Config(image_workers=1))

    reports = read_artifact(tmp_path / "run" / NAME / "reports.parquet", Report)
    images = read_artifact(tmp_path / "run" / NAME / "images.parquet", Image)
    rejects = read_artifact(tmp_path / "run" / NAME / "rejects.parquet", Reject)
    assert reports.column("study_id").to_pylist() == ["50000001"]
    assert reports.column("text").to_pylist()[0].startswith("Heart size is normal.")
    assert images.column("image_id").to_pylist() == ["one"]
    assert rejects.column("key").to_pylist() == ["two"]
    assert images.schema.field("height").type == pa.int64()


def test_stage_with_no_usable_study_fails_after_writing_rejects(tmp_path, radiograph_jpeg):
    tree = MimicTree(tmp_path / "mimic", radiograph_jpeg)
    tree.add_report("10000001", "50000001", "")
    tree.add_image("10000001", "50000001", "one")
    config = SimpleNamespace(data=data(root=str(tree.write_csvs())))
    ctx = make_test_context(tmp_path / "run", config, stage=NAME)
    with pytest.raises(InputLayoutError, match="no usable study found.*empty report file"):
        run_direct(ctx, Config())
    rejects = read_artifact(tmp_path / "run" / NAME / ".attempt" / "rejects.parquet", Reject)  # kept apart
    assert rejects.column("key").to_pylist() == ["50000001"]
    assert not (tmp_path / "run" / NAME / "reports.parquet").exists()
    assert not (tmp_path / "run" / NAME / "rejects.parquet").exists()


def test_thread_pool_gives_the_same_result_as_sequential(tmp_path, radiograph_jpeg):
    tree = MimicTree(tmp_path / "mimic", radiograph_jpeg)
    rng = np.random.default_rng(0)
    for k in range(30):
        study = f"5{k:07d}"
        tree.add_report("10000001", study, mimic_report())
        cut = rng.random() < 0.3
        tree.add_image("10000001", study, f"i{k}", content=radiograph_jpeg[:500] if cut else None)
    root = tree.write_csvs()
    one = extract(data(root=str(root)), Config(image_workers=1))
    four = extract(data(root=str(root)), Config(image_workers=4))
    assert one == four
    assert 0 < len(one.rejects) < 30 * 2 and len(one.reports) + len(one.rejects) // 2 == 30


# --------------------------------------------------------------------------- generated corpus


def test_generated_corpus_every_layout_and_the_official_split(small_corpus):
    studies = pd.read_csv(small_corpus / "downstream" / "studies.csv", dtype=str, keep_default_na=False)
    out = extract(
        data(root=str(small_corpus), views=["PA", "AP"], check_images=True), Config(image_workers=2)
    )
    assert out.rejects == []
    reports = {r.study_id: r for r in out.reports}
    assert set(reports) == set(studies["study_id"])
    for row in studies.to_dict("records"):
        report = reports[row["study_id"]]
        assert (report.split, report.subject_id) == (row["split"], row["subject_id"])
        assert report.text and not any(h in report.text for h in ("EXAMINATION", "INDICATION", "COMPARISON"))
        if row["layout"] == "impression_only":
            assert report.findings == "" and report.impression
        elif row["layout"] in ("findings_only", "last_paragraph", "view_header"):
            assert report.findings and (row["layout"] == "view_header" or report.impression == "")
    # One frontal image per study, exactly the one the generator labels for downstream tasks.
    assert {(i.study_id, i.image_id) for i in out.images} == set(
        zip(studies["study_id"], studies["dicom_id"], strict=True)
    )
    assert all(i.view in ("PA", "AP") and Path(i.path).is_file() for i in out.images)
    with_laterals = extract(data(root=str(small_corpus), views=[]), Config(image_workers=2))
    summary = pd.read_json(small_corpus / "summary.json", typ="series")
    assert len(with_laterals.images) == summary["n_images"]
    assert sum(i.view == "LATERAL" for i in with_laterals.images) == summary["n_lateral"]


def test_manifest_excel_csv_with_bom_and_tsv_are_read_and_bad_encoding_is_an_error(tmp_path, radiograph_jpeg):
    (tmp_path / "a.jpg").write_bytes(radiograph_jpeg)
    rows = pd.DataFrame([{"study_id": "s1", "image_path": "a.jpg", "report_text": "Heart, lungs: normal."}])
    rows.to_csv(tmp_path / "excel.csv", index=False, encoding="utf-8-sig")
    rows.to_csv(tmp_path / "tabs.tsv", index=False, sep="\t")
    for name in ("excel.csv", "tabs.tsv"):
        out = extract(data(source="manifest", manifest=str(tmp_path / name)), Config())
        assert [(r.study_id, r.findings) for r in out.reports] == [("s1", "Heart, lungs: normal.")], name
    (tmp_path / "latin1.csv").write_bytes(
        "study_id,image_path,report_text\ns1,a.jpg,Epanchement \xe9\n".encode("latin-1")
    )
    with pytest.raises(InputLayoutError, match=r"latin1.csv: cannot read CSV manifest .*utf-8"):
        extract(data(source="manifest", manifest=str(tmp_path / "latin1.csv")), Config())
    (tmp_path / "m.xlsx").write_bytes(b"PK")
    with pytest.raises(InputLayoutError, match=r"m.xlsx: manifest must be .csv, .csv.gz, .tsv or .parquet"):
        extract(data(source="manifest", manifest=str(tmp_path / "m.xlsx")), Config())


# --------------------------------------------------------------------------- bad paths (reliability #10)

LOOP = "symlink loop (Too many levels of symbolic links)"


def make_loop(path: Path) -> Path:
    """Replace `path` (file or folder) by a symlink to itself: every access fails with ELOOP."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.symlink_to(path)
    return path


def test_mimic_symlink_loops_and_unreadable_folders_are_rejects_and_the_rest_is_extracted(
    tmp_path, radiograph_jpeg, monkeypatch
):
    tree = MimicTree(tmp_path / "mimic", radiograph_jpeg)
    tree.add_report("10000001", "50000001", mimic_report())
    tree.add_image("10000001", "50000001", "good")
    looping_report = make_loop(tree.add_report("10000001", "50000002", mimic_report()))
    tree.add_image("10000001", "50000002", "img2")
    tree.add_report("10000001", "50000003", mimic_report())
    looping_image = make_loop(tree.add_image("10000001", "50000003", "loopimg"))
    tree.add_image("10000001", "50000003", "ok3")
    tree.add_image("11000002", "50000004", "img4", content=False)  # its subject folder loops on itself
    looping_subject = make_loop(tree.study_dir("11000002"))
    tree.add_report("12000003", "50000005", mimic_report())  # an orphan report in a folder we cannot list
    tree.add_report("13000004", "50000006", mimic_report())
    tree.add_image("13000004", "50000006", "good6")
    root = tree.write_csvs().resolve()
    unreadable = root / "files" / "p12"
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = extract(data(root=str(root)), Config(image_workers=2))

    assert [r.study_id for r in out.reports] == ["50000001", "50000003", "50000006"]
    assert [i.image_id for i in out.images] == ["good", "ok3", "good6"]
    got = {(r.source, r.key, r.reason) for r in out.rejects}
    assert got == {
        (
            str(looping_report),
            "50000002",
            f"cannot read report file: {LOOP} (1 image(s) of the study left out)",
        ),
        (str(looping_image), "loopimg", f"study 50000003: {LOOP}"),
        (
            str(looping_subject),
            "p11000002",
            f"cannot list folder: {LOOP} (reports in it are not checked for metadata)",
        ),
        (
            str(looping_subject / "s50000004.txt"),
            "50000004",
            f"cannot read report file: {LOOP} (1 image(s) of the study left out)",
        ),
        (
            str(unreadable),
            "p12",
            "cannot list folder: Permission denied (reports in it are not checked for metadata)",
        ),
    }


def test_manifest_symlink_loop_nul_byte_and_too_long_path_are_row_rejects(tmp_path, radiograph_jpeg):
    folder = tmp_path / "corpus"
    (folder / "img").mkdir(parents=True)
    for name in ("a", "b"):
        (folder / "img" / f"{name}.jpg").write_bytes(radiograph_jpeg)
    make_loop(folder / "img" / "loop.jpg")
    make_loop(folder / "img" / "loopdir")
    long_name = "x" * 4996 + ".jpg"  # one 5,000-character file name
    long_path = "d/" * 2497 + "xy.jpg"  # 5,000 characters in many short folders
    paths = [
        "img/a.jpg",
        "img/loop.jpg",
        "img/a\x00b.jpg",
        long_name,
        long_path,
        "img/loopdir/x.jpg",
        "img/b.jpg",
    ]
    rows = [
        {"study_id": f"s{n}", "image_path": p, "report_text": "FINDINGS: Clear lungs."}
        for n, p in enumerate(paths, start=1)
    ]
    manifest = write_manifest(folder, rows)
    out = extract(data(source="manifest", manifest=str(manifest)), Config(image_workers=2))

    assert [r.study_id for r in out.reports] == ["s1", "s7"]
    assert [Path(i.path).name for i in out.images] == ["a.jpg", "b.jpg"]
    src = str(manifest.resolve())
    assert sorted((r.source, r.key, r.reason) for r in out.rejects) == [
        (src, "row 2", f"study s2: image_path 'img/loop.jpg': {LOOP}"),
        (src, "row 3", "study s3: image_path 'img/a\\x00b.jpg': path contains a NUL byte"),
        (src, "row 4", f"study s4: image_path {long_name[:80]!r}... (5,000 characters): File name too long"),
        (src, "row 5", f"study s5: image_path {long_path[:80]!r}... (5,000 characters): File name too long"),
        (src, "row 6", f"study s6: image_path 'img/loopdir/x.jpg': {LOOP}"),
    ]


# --------------------------------------------------------------------------- unusable images (reliability
# #11)


def test_images_too_small_too_elongated_or_cut_short_are_rejected_in_both_check_modes(
    tmp_path, radiograph_jpeg
):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(radiograph_jpeg)
    PILImage.new("L", (1, 1), 90).save(folder / "dot.jpg")
    PILImage.fromarray(np.linspace(0, 255, 5000).astype(np.uint8)[None, :]).save(folder / "line.jpg")
    PILImage.open(folder / "good.jpg").resize((400, 100)).save(folder / "wide.jpg")
    (folder / "cut.jpg").write_bytes(radiograph_jpeg[: len(radiograph_jpeg) // 3] + b"\xff\xd9")
    with PILImage.open(folder / "cut.jpg") as im:
        im.load()  # Pillow alone accepts it (grey fill)
    names = ["good", "dot", "line", "wide", "cut"]
    rows = [
        {"study_id": f"s{n}", "image_path": f"{name}.jpg", "report_text": "FINDINGS: Clear lungs."}
        for n, name in enumerate(names, start=1)
    ]
    manifest = write_manifest(folder, rows)
    image_reasons = {
        "s2_dot": "study s2: image is 1x1 px (width x height): shorter side 1 px < min_image_side 64",
        "s3_line": "study s3: image is 5000x1 px (width x height): shorter side 1 px < min_image_side 64; "
        "aspect ratio 5000/1 = 5000.00 > max_aspect_ratio 3",
        "s4_wide": "study s4: image is 400x100 px (width x height): aspect ratio 400/100 = 4.00 > "
        "max_aspect_ratio 3",
        "s5_cut": "study s5: truncated JPEG file: the image data stops before the last block (end-of-image "
        "marker re-appended after a cut; it would decode with grey fill)",
    }
    for check_images in (False, True):
        out = extract(
            data(source="manifest", manifest=str(manifest), check_images=check_images),
            Config(image_workers=2),
        )
        assert [i.image_id for i in out.images] == ["s1_good"], check_images
        rejects = by_key(out.rejects)
        for key, reason in image_reasons.items():
            assert rejects[key].reason == reason, (check_images, key)
            assert rejects[key].source == str((folder / f"{key.split('_')[1]}.jpg").resolve())
            study = key.split("_")[0]
            assert rejects[study].reason == "no usable image: every image of the study was rejected"
        assert len(out.rejects) == 2 * len(image_reasons)

    lenient = Config(min_image_side=1, max_aspect_ratio=5000)
    out = extract(data(source="manifest", manifest=str(manifest)), lenient)
    assert [i.image_id for i in out.images] == ["s1_good", "s3_line", "s4_wide"]
    assert [(i.height, i.width) for i in out.images[1:]] == [(1, 5000), (100, 400)]
    assert by_key(out.rejects)["s2_dot"].reason == "study s2: constant image (every pixel = 90)"


def test_a_blank_image_is_rejected_as_constant(tmp_path, radiograph_jpeg):
    """Reliability #17f: an all-black image was accepted as usable. The header check sees it in a sequential
    JPEG (decoded at 1/8 scale); a PNG is decoded only with data.check_images."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(radiograph_jpeg)
    PILImage.new("L", (96, 80), 0).save(folder / "black.jpg")
    PILImage.new("L", (96, 80), 255).save(folder / "white.png")
    names = ["good.jpg", "black.jpg", "white.png"]
    rows = [
        {"study_id": f"s{n}", "image_path": name, "report_text": "FINDINGS: Clear lungs."}
        for n, name in enumerate(names, start=1)
    ]
    manifest = write_manifest(folder, rows)
    for check_images, kept in ((False, ["s1_good", "s3_white"]), (True, ["s1_good"])):
        out = extract(data(source="manifest", manifest=str(manifest), check_images=check_images), Config())
        assert [i.image_id for i in out.images] == kept
        rejects = by_key(out.rejects)
        assert rejects["s2_black"].reason == "study s2: constant image (every pixel = 0)"
        assert rejects["s2_black"].source == str((folder / "black.jpg").resolve())
        assert rejects["s2"].reason == "no usable image: every image of the study was rejected"
    assert rejects["s3_white"].reason == "study s3: constant image (every pixel = 255)"


def test_real_radiographs_pass_the_default_size_and_shape_checks(tmp_path):
    images = sorted((REAL_DATA / "images").iterdir())
    rows = [
        {"study_id": f"s{n}", "image_path": str(path), "report_text": "IMPRESSION: Normal."}
        for n, path in enumerate(images)
    ]
    manifest = write_manifest(tmp_path, rows)
    for check_images in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the MONOCHROME1 fixture is flipped back with a warning
            out = extract(
                data(source="manifest", manifest=str(manifest), check_images=check_images), Config()
            )
        assert out.rejects == [] and len(out.images) == len(images) == 3


# --------------------------------------------------------------------------- huge reports (reliability #12)


def test_a_5mb_report_is_rejected_at_read_time_naming_the_study_and_its_length(tmp_path, radiograph_jpeg):
    huge = mimic_report(findings="Heart size is normal. " * 227_273)  # ~5 MB of plausible text
    assert len(huge) > 5_000_000
    tree = MimicTree(tmp_path / "mimic", radiograph_jpeg)
    tree.add_report("10000001", "50000001", mimic_report())
    tree.add_image("10000001", "50000001", "good")
    big_file = tree.add_report("10000001", "50000002", huge)
    tree.add_image("10000001", "50000002", "big")
    limit = len(mimic_report("Heart size is normal. " * 4_000)) + 1  # just above a 90 KB report
    tree.add_report("10000001", "50000003", mimic_report("Heart size is normal. " * 4_000))
    tree.add_image("10000001", "50000003", "long_but_fine")
    out = extract(data(root=str(tree.write_csvs())), Config(max_report_chars=limit))
    assert [r.study_id for r in out.reports] == ["50000001", "50000003"]
    (reject,) = out.rejects
    assert (reject.source, reject.key) == (str(big_file.resolve()), "50000002")
    assert reject.reason == (
        f"report too long: {big_file.stat().st_size:,} bytes (max_report_chars is {limit:,}) "
        "(1 image(s) of the study left out)"
    )
    # The default limit (100,000 characters) refuses the file by its size, without reading it.
    out = extract(data(root=str(tree.root)), Config())
    assert [r.study_id for r in out.reports] == ["50000001", "50000003"]
    assert by_key(out.rejects)["50000002"].reason.startswith("report too long: 5,")
    # Under 4 bytes per allowed character the file is read and its characters counted.
    small_limit = Config(max_report_chars=len(huge) // 2)
    (reject,) = extract(data(root=str(tree.root)), small_limit).rejects
    assert reject.reason == (
        f"report too long: {len(huge):,} characters (max_report_chars is {len(huge) // 2:,}) "
        "(1 image(s) of the study left out)"
    )

    (tmp_path / "a.jpg").write_bytes(radiograph_jpeg)
    rows = [
        {"study_id": "s1", "image_path": "a.jpg", "report_text": "FINDINGS: Clear lungs."},
        {"study_id": "s2", "image_path": "a.jpg", "report_text": huge},
    ]
    manifest = write_manifest(tmp_path, rows, "m.parquet")
    out = extract(data(source="manifest", manifest=str(manifest)), Config())
    assert [r.study_id for r in out.reports] == ["s1"]
    (reject,) = out.rejects
    assert (reject.source, reject.key) == (f"{manifest.resolve()}#row 2", "s2")
    assert reject.reason == (
        f"report too long: {len(huge):,} characters (max_report_chars is 100,000) (1 image(s) of the study "
        f"left out)"
    )


def test_a_manifest_with_no_rows_says_so(tmp_path):
    """Hostile pass: a header-only manifest said 'most common reasons: []'."""
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("study_id,image_path,report_text\n")
    config = SimpleNamespace(data=data(source="manifest", manifest=str(manifest)))
    ctx = make_test_context(tmp_path / "run", config, stage=NAME)
    with pytest.raises(
        InputLayoutError, match=r"manifest.csv: no study at all in the input \(an empty manifest"
    ):
        run_direct(ctx, Config())


def test_an_excel_manifest_with_bom_and_crlf_reads_like_its_lf_twin(tmp_path, radiograph_jpeg):
    """Reliability #17a: Excel's "CSV UTF-8" writes a BOM and CRLF, also inside quoted multi-line cells. A
    report whose findings are its closing paragraph lost its paragraph break to the "\\r" and was rejected as
    having no FINDINGS; a "FINAL REPORT" title line stayed in the findings."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(radiograph_jpeg)
    closing = (
        " EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  Cough.\n \n Heart size is normal.\n "
        "Lungs are clear.\n"
    )
    titled = "FINAL REPORT\nHeart size is normal.\n\nNo effusion."
    reports = {"s1": mimic_report(), "s2": closing, "s3": titled}

    def write(name: str, line_end: str, bom: bytes) -> Path:
        lines = ["study_id,image_path,report_text"]
        lines += [f'{sid},a.jpg,"{text.replace(chr(10), line_end)}"' for sid, text in reports.items()]
        path = folder / name
        path.write_bytes(bom + line_end.join(lines).encode() + line_end.encode())
        return path

    excel = write("excel.csv", "\r\n", b"\xef\xbb\xbf")
    assert b"\r\n \r\n Heart size" in excel.read_bytes()
    unix = write("unix.csv", "\n", b"")
    texts = {}
    for manifest in (excel, unix):
        out = extract(data(source="manifest", manifest=str(manifest)), Config(image_workers=1))
        assert out.rejects == [], [r.reason for r in out.rejects]
        texts[manifest.name] = [(r.study_id, r.findings, r.impression) for r in out.reports]
    assert texts["excel.csv"] == texts["unix.csv"]
    assert texts["excel.csv"][1:] == [
        ("s2", "Heart size is normal. Lungs are clear.", ""),
        ("s3", "Heart size is normal. No effusion.", ""),
    ]
