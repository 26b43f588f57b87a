"""The generated demo corpus: determinism, MIMIC layout and headers, report format, label/report agreement."""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.synth import SynthConfig, generate_corpus
from models.synth.findings import FINDING_CLASSES, FINDING_KINDS, Finding
from models.synth.images import render_frontal, sample_anatomy
from models.synth.reports import ENTITY_TO_CHEXPERT

METADATA_HEADER = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
CHEXPERT_HEADER = [
    "subject_id",
    "study_id",
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
]
MIT_LCP_HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s")  # MIT-LCP section_parser.py
NEGATION = re.compile(r"\b(no|not|without)\b", re.IGNORECASE)
UNCERTAINTY = re.compile(r"\b(cannot|possible|possibly|questionable|may)\b", re.IGNORECASE)
KIND_WORDS = {  # independent of the generator's matcher: the words a reader would look for
    "opacity": r"opacit",
    "consolidation": r"consolidat",
    "pneumonia": r"pneumonia",
    "effusion": r"effusion",
    "pneumothorax": r"pneumothorax",
    "cardiomegaly": r"cardiomegaly",
    "nodule": r"nodul",
    "mass": r"mass",
    "atelectasis": r"atelectasis",
    "edema": r"edema",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    summary = generate_corpus(SynthConfig(seed=7, n_studies=200, image_size=64), out)
    return out, summary


def read_gz(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="") as handle:
        return list(csv.DictReader(handle))


def header_of(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        return next(csv.reader(handle))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.?])\s+", re.sub(r"\s+", " ", text)) if s.strip()]


def body_text(report: str) -> str:
    """Everything after COMPARISON (findings, impression and unlabelled paragraphs); NOTIFICATION dropped."""
    after = report.split(" COMPARISON:", 1)[1].split("\n", 1)[1]
    return after.split(" NOTIFICATION:", 1)[0]


def asserted_kinds(report: str) -> set[str]:
    """Finding kinds a reader sees asserted: named in a sentence with no negation or uncertainty cue."""
    kinds = set()
    for sentence in sentences(body_text(report)):
        if NEGATION.search(sentence) or UNCERTAINTY.search(sentence):
            continue
        kinds |= {k for k, word in KIND_WORDS.items() if re.search(rf"\b{word}", sentence, re.IGNORECASE)}
    return kinds


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_other_seed_does_not(tmp_path):
    cfg = SynthConfig(seed=3, n_studies=30, image_size=96)
    generate_corpus(cfg, tmp_path / "a")
    generate_corpus(cfg, tmp_path / "b")
    generate_corpus(cfg.model_copy(update={"seed": 4}), tmp_path / "c")
    a, b, c = all_files(tmp_path / "a"), all_files(tmp_path / "b"), all_files(tmp_path / "c")
    assert len(a) >= 30 * 3 + 8  # reports, frontal images, masks, CSVs
    assert a == b
    assert set(a) != set(c)  # other ids


def test_mimic_layout_headers_and_id_formats(corpus):
    root, summary = corpus
    assert header_of(root / "mimic-cxr-2.0.0-metadata.csv.gz") == METADATA_HEADER
    assert header_of(root / "mimic-cxr-2.0.0-split.csv.gz") == ["dicom_id", "study_id", "subject_id", "split"]
    assert header_of(root / "mimic-cxr-2.0.0-chexpert.csv.gz") == CHEXPERT_HEADER
    metadata = read_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert len(metadata) == summary.n_images and summary.n_studies == 200
    for row in metadata:
        assert re.fullmatch(r"1\d{7}", row["subject_id"]) and re.fullmatch(r"5\d{7}", row["study_id"])
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", row["dicom_id"])
        assert row["ViewPosition"] in {"PA", "AP", "LATERAL"} and row["Rows"] == row["Columns"] == "64"
        assert re.fullmatch(r"2[12]\d{6}", row["StudyDate"]) and re.fullmatch(
            r"\d{6}\.\d{3}", row["StudyTime"]
        )
        folder = root / "files" / f"p{row['subject_id'][:2]}" / f"p{row['subject_id']}"
        assert (folder / f"s{row['study_id']}" / f"{row['dicom_id']}.jpg").is_file()
        assert (folder / f"s{row['study_id']}.txt").is_file()
    assert len({r["dicom_id"] for r in metadata}) == len(metadata)
    studies = {r["study_id"] for r in metadata}
    assert len(studies) == 200 and len(list((root / "files").rglob("s*.txt"))) == 200
    views = defaultdict(list)
    for row in metadata:
        views[row["study_id"]].append(row["ViewPosition"])
    assert all(sum(v != "LATERAL" for v in vs) == 1 for vs in views.values())  # one frontal per study
    assert 0 < summary.n_lateral < 200
    per_subject = defaultdict(set)
    for row in metadata:
        per_subject[row["subject_id"]].add(row["study_id"])
    assert max(len(s) for s in per_subject.values()) > 1  # follow-up studies exist


def test_split_is_per_subject_and_covers_all_three(corpus):
    root, _ = corpus
    rows = read_gz(root / "mimic-cxr-2.0.0-split.csv.gz")
    by_subject = defaultdict(set)
    for row in rows:
        by_subject[row["subject_id"]].add(row["split"])
    assert all(len(s) == 1 for s in by_subject.values())
    assert {r["split"] for r in rows} == {"train", "validate", "test"}


def test_report_text_follows_mimic_layout(corpus):
    root, _ = corpus
    for path in (root / "files").rglob("s*.txt"):
        text = path.read_text()
        lines = text.rstrip("\n").split("\n")
        assert lines[0] == " " * 33 + "FINAL REPORT", path
        assert all(line.startswith(" ") and len(line) <= 79 for line in lines), path
        assert all(line.strip() or line == " " for line in lines), (
            f"{path}: blank lines must be a single space"
        )
        assert "___" in text
        headers = MIT_LCP_HEADER.findall(text)
        assert headers[:2] == ["EXAMINATION", "INDICATION"], path


def test_fallback_layouts_exist_in_exact_shares_and_parse_as_intended(corpus):
    root, summary = corpus
    assert summary.layouts == {
        "findings_only": 10,
        "impression_only": 10,
        "last_paragraph": 10,
        "standard": 160,
        "view_header": 10,
    }
    studies = read_csv(root / "downstream" / "studies.csv")
    texts = {p.stem[1:]: p.read_text() for p in (root / "files").rglob("s*.txt")}
    for row in studies:
        headers = set(MIT_LCP_HEADER.findall(texts[row["study_id"]]))
        layout = row["layout"]
        assert ("FINDINGS" in headers) == (layout in {"standard", "findings_only"}), row
        assert ("IMPRESSION" in headers) == (layout in {"standard", "view_header", "impression_only"}), row
        if layout == "view_header":
            assert any(h.startswith("CHEST") or h.endswith("CHEST") for h in headers), headers
        if layout == "last_paragraph":
            last_section = texts[row["study_id"]].split(" COMPARISON:", 1)[1]
            assert "\n \n" in last_section and headers == {"EXAMINATION", "INDICATION", "COMPARISON"}


def test_section_parser_finds_findings_or_impression_in_every_layout(corpus):
    sections = pytest.importorskip("models.text.sections")
    root, _ = corpus
    for path in (root / "files").rglob("s*.txt"):
        parsed = sections.split_sections(path.read_text())
        names = {s.name for s in parsed}
        assert names & {"findings", "impression", "last_paragraph"}, (path, names)


def test_every_asserted_finding_is_labelled_and_every_label_is_asserted(corpus):
    root, _ = corpus
    classes = {r["study_id"]: r for r in read_csv(root / "downstream" / "classes.csv")}
    assert len(classes) == 200
    positives = 0
    for path in (root / "files").rglob("s*.txt"):
        row = classes[path.stem[1:]]
        labelled = {k for k in FINDING_CLASSES if row[k] == "1"}
        assert asserted_kinds(path.read_text()) == labelled, path
        positives += len(labelled)
    assert positives >= 40  # 20% abnormal studies, 1-2 findings each


def test_findings_jsonl_boxes_and_masks_agree_with_classes(corpus):
    root, _ = corpus
    classes = {r["dicom_id"]: r for r in read_csv(root / "downstream" / "classes.csv")}
    boxes = defaultdict(list)
    for row in read_csv(root / "downstream" / "boxes.csv"):
        boxes[row["dicom_id"]].append(row)
    lines = (root / "downstream" / "findings.jsonl").read_text().splitlines()
    assert len(lines) == len(classes)
    for line in lines:
        record = json.loads(line)
        dicom = record["dicom_id"]
        kinds = {f["entity"] for f in record["findings"]}
        assert kinds == {k for k in FINDING_CLASSES if classes[dicom][k] == "1"}
        assert sorted(b["finding"] for b in boxes[dicom]) == sorted(f["entity"] for f in record["findings"])
        mask = np.asarray(Image.open(root / record["mask_path"]))
        assert mask.dtype == np.uint8 and mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        assert mask.any() == bool(kinds)
        for f in record["findings"]:
            x1, y1, x2, y2 = f["box"]
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            assert mask[y1:y2, x1:x2].any()
            spec = FINDING_KINDS[f["entity"]]
            assert f["side"] in spec.sides and f["zone"] in spec.zones and f["severity"] in spec.severities
        image = Image.open(root / record["image_path"])
        assert image.mode == "L" and image.size == (64, 64)


def test_chexpert_labels_follow_the_report(corpus):
    root, _ = corpus
    chexpert = {r["study_id"]: r for r in read_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz")}
    studies = read_csv(root / "downstream" / "studies.csv")
    assert {row[c] for row in chexpert.values() for c in CHEXPERT_HEADER[2:]} == {"1.0", "0.0", "-1.0", ""}
    for row in studies:
        labels = chexpert[row["study_id"]]
        present = {code.split(":")[0] for code in row["findings"].split(";") if code}
        for kind in present:
            assert labels[ENTITY_TO_CHEXPERT[kind]] == "1.0", (row, kind)
        for kind in filter(None, row["uncertain"].split(";")):
            column = ENTITY_TO_CHEXPERT[kind]
            if not any(ENTITY_TO_CHEXPERT[k] == column for k in present):
                assert labels[column] == "-1.0", (row, kind)
        assert (labels["No Finding"] == "1.0") == (not present and not row["uncertain"])


def test_negative_to_positive_mention_ratio_is_about_twenty(corpus):
    root, summary = corpus
    assert 12 <= summary.negative_positive_ratio <= 30
    assert summary.mentions["uncertain"] > 0
    # Independent count with the reader's words and cues: negated vs asserted finding words.
    negative = positive = 0
    for path in (root / "files").rglob("s*.txt"):
        for sentence in sentences(body_text(path.read_text())):
            hits = sum(len(re.findall(rf"\b{w}", sentence, re.IGNORECASE)) for w in KIND_WORDS.values())
            if NEGATION.search(sentence):
                negative += hits
            elif not UNCERTAINTY.search(sentence):
                positive += hits
    assert 10 <= negative / positive <= 30, (negative, positive)


@pytest.mark.parametrize("kind", FINDING_CLASSES)
def test_a_finding_changes_pixels_inside_its_box_more_than_outside(kind):
    rng = np.random.default_rng(11)
    spec = FINDING_KINDS[kind]
    finding = Finding(kind, spec.sides[0], spec.zones[-1], spec.severities[-1])
    anatomy = sample_anatomy(rng)
    plain = render_frontal(anatomy, [], 128, seed=5).pixels.astype(float)
    shown = render_frontal(anatomy, [finding], 128, seed=5)
    diff = np.abs(shown.pixels.astype(float) - plain)
    assert shown.lesions and all(lesion.finding == finding for lesion in shown.lesions)
    inside = np.zeros_like(diff, dtype=bool)
    for lesion in shown.lesions:
        x1, y1, x2, y2 = lesion.box()
        inside[y1:y2, x1:x2] = True
    assert diff[inside].mean() > 4 * max(diff[~inside].mean(), 0.25), kind
    if kind != "pneumothorax":  # every other finding adds density (brighter)
        assert (shown.pixels.astype(float) - plain)[inside].mean() > 2


def test_side_convention_patient_right_is_image_left():
    anatomy = sample_anatomy(np.random.default_rng(2))
    right = render_frontal(anatomy, [Finding("effusion", "right", "base", "large")], 128, seed=1)
    left = render_frontal(anatomy, [Finding("effusion", "left", "base", "large")], 128, seed=1)
    assert right.lesions[0].box()[2] <= 64 < left.lesions[0].box()[0]


def test_448_pixel_images_render_as_uint8():
    anatomy = sample_anatomy(np.random.default_rng(0))
    out = render_frontal(anatomy, [Finding("nodule", "left", "upper", "small")], 448, seed=0)
    assert out.pixels.shape == (448, 448) and out.pixels.dtype == np.uint8
    assert 20 < out.pixels.mean() < 235 and out.pixels.std() > 20  # not blank, not saturated


def test_bad_configs_and_findings_fail_with_clear_messages(tmp_path):
    with pytest.raises(ValueError, match="frac_validate \\+ frac_test > 1"):
        SynthConfig(frac_validate=0.6, frac_test=0.6)
    with pytest.raises(ValueError, match="frac_last_paragraph > 1"):
        SynthConfig(frac_view_header=0.5, frac_last_paragraph=0.6)
    with pytest.raises(ValueError, match="extra"):
        SynthConfig(n_subject=3)
    with pytest.raises(ValueError, match="pneumothorax: side='bilateral'"):
        Finding("pneumothorax", "bilateral", "apex", "small")
    with pytest.raises(ValueError, match="unknown finding kind 'fracture'"):
        Finding("fracture", "left", "upper", "mild")


def test_generator_never_removes_a_folder_it_did_not_write(tmp_path):
    """Reliability #1: `overwrite` replaces only a corpus whose marker lists every file in the folder."""
    small = SynthConfig(n_studies=2, image_size=64)
    user = tmp_path / "mimic"
    (user / "notes").mkdir(parents=True)
    (user / "notes" / "annotations.csv").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="was not written by the corpus generator"):
            generate_corpus(small, user, overwrite=overwrite)
    assert (user / "notes" / "annotations.csv").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["mimic"]  # no partial folder left behind

    ours = tmp_path / "corpus"
    generate_corpus(small, ours)
    with pytest.raises(FileExistsError, match="already holds a generated corpus; use --overwrite"):
        generate_corpus(small, ours)
    assert generate_corpus(small.model_copy(update={"n_studies": 3}), ours, overwrite=True).n_studies == 3
    assert len(list((ours / "files").rglob("s*.txt"))) == 3
    (ours / "files" / "my_notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="files the generator did not write \\(files/my_notes.txt\\)"):
        generate_corpus(small, ours, overwrite=True)
    assert (ours / "files" / "my_notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "mimic"]


def test_a_corpus_size_beyond_the_bound_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="n_studies") as err:
        SynthConfig(n_studies=1_000_001)
    assert "less than or equal to 1000000" in str(err.value)
    assert SynthConfig(n_studies=1_000_000).n_studies == 1_000_000
