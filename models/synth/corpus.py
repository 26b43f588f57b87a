"""Generate the demo corpus: MIMIC-CXR + MIMIC-CXR-JPG layout, CSVs, and downstream labels, from one seed.

Layout written under `out_dir` (REFERENCE.md §4):
    files/pXX/pSUBJECT/sSTUDY.txt                       report (MIMIC-CXR text layout)
    files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg              frontal (PA/AP) and, for some studies, lateral image
    mimic-cxr-2.0.0-{metadata,split,chexpert}.csv.gz    exact MIMIC headers; split is per subject
    downstream/classes.csv                              frontal image -> 0/1 per finding class
    downstream/boxes.csv                                one row per lesion box (pixels, x2/y2 exclusive)
    downstream/masks/DICOM_ID.png                       union of lesion masks, uint8 0/255
    downstream/findings.jsonl                           per frontal image: entity, side, zone, severity, box
    downstream/studies.csv                              per study: split, report layout, findings, doubts
    summary.json                                        CorpusSummary
Same config -> byte-identical files (gzip mtime 0, seeded streams per subject and per study).
The corpus is built in a sibling temporary folder and renamed into place, so a crash never leaves half of it;
`.ecamp-synth.json` (written last) lists every file with its SHA-256 and every folder, and a folder is only
ever replaced when it holds exactly those files, unedited, and those folders.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from data_contracts.files import sha256_file
from models.resources import DEFAULT_ENTITY_LIST
from models.seeds import Seed
from models.synth.findings import FINDING_CLASSES, Finding, sample_findings
from models.synth.images import Anatomy, render_frontal, render_lateral, sample_anatomy
from models.synth.reports import (
    CHEXPERT_COLUMNS,
    LAYOUTS,
    Report,
    ReportStyle,
    StudyContext,
    chexpert_labels,
    entity_matcher,
    mentions,
    polarity_counts,
    write_report,
)
from models.text.entities import load_entity_list

METADATA_COLUMNS = (
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
)
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
CHEXPERT_HEADER = ("subject_id", "study_id", *CHEXPERT_COLUMNS)


class SynthConfig(BaseModel):
    """Size, seed and text/label mix of the generated corpus (defaults: the demo corpus)."""

    model_config = ConfigDict(extra="forbid")

    seed: Seed = 0
    n_studies: int = Field(
        200,
        ge=1,
        le=1_000_000,
        description="studies to generate (~40 ms each at 256 px: 1e6 is ~11 CPU hours)",
    )
    max_studies_per_subject: int = Field(3, ge=1)
    image_size: int = Field(256, ge=64, le=2048)
    jpeg_quality: int = Field(90, ge=50, le=100)
    p_abnormal: float = Field(0.2, ge=0, le=1, description="share of studies with at least one finding")
    max_findings: int = Field(2, ge=1, le=4)
    p_uncertain: float = Field(0.15, ge=0, le=1, description="share of reports doubting an absent finding")
    p_impression_repeat: float = Field(0.3, ge=0, le=1, description="positive restated in IMPRESSION")
    p_lateral: float = Field(0.3, ge=0, le=1, description="share of studies that also have a lateral view")
    p_portable: float = Field(0.25, ge=0, le=1, description="share of frontal views that are AP portable")
    frac_view_header: float = Field(
        0.05, ge=0, le=1, description="FINDINGS titled by the view, e.g. CHEST, PA"
    )
    frac_impression_only: float = Field(0.05, ge=0, le=1)
    frac_findings_only: float = Field(0.05, ge=0, le=1)
    frac_last_paragraph: float = Field(0.05, ge=0, le=1, description="no FINDINGS/IMPRESSION headers at all")
    frac_validate: float = Field(0.1, ge=0, le=1, description="share of subjects in the validate split")
    frac_test: float = Field(0.1, ge=0, le=1, description="share of subjects in the test split")
    entities_path: Path = DEFAULT_ENTITY_LIST

    @model_validator(mode="after")
    def _fractions_fit(self) -> SynthConfig:
        layouts = self.frac_view_header + self.frac_impression_only + self.frac_findings_only
        if layouts + self.frac_last_paragraph > 1:
            raise ValueError(
                "frac_view_header + frac_impression_only + frac_findings_only + frac_last_paragraph > 1"
            )
        if self.frac_validate + self.frac_test > 1:
            raise ValueError("frac_validate + frac_test > 1")
        return self


class CorpusSummary(BaseModel):
    n_subjects: int
    n_studies: int
    n_images: int
    n_lateral: int
    findings: dict[str, int]  # studies showing each finding class
    mentions: dict[str, int]  # entity words written in findings+impression, by polarity
    negative_positive_ratio: float
    layouts: dict[str, int]
    splits: dict[str, int]  # studies per split

    def describe(self) -> str:
        found = ", ".join(f"{k} {v}" for k, v in self.findings.items())
        said = ", ".join(f"{k} {v}" for k, v in self.mentions.items())
        return (
            f"{self.n_studies} studies of {self.n_subjects} subjects, {self.n_images} images "
            f"({self.n_lateral} lateral)\nfindings per class: {found}\nentity mentions: {said} "
            f"(negative:positive = {self.negative_positive_ratio:.1f}:1)\nlayouts: {self.layouts}\n"
            f"splits: {self.splits}"
        )


@dataclass
class _Study:
    subject_id: str
    study_id: str
    index: int
    date: dt.date
    split: str = ""
    layout: str = "standard"
    abnormal: bool = False


# ------------------------------------------------------------------------------------------- ids and plan
def _unique_ints(rng: np.random.Generator, low: int, high: int, n: int) -> list[int]:
    """n distinct integers in [low, high), in draw order (ids must never repeat)."""
    seen: dict[int, None] = {}
    while len(seen) < n:
        for value in rng.integers(low, high, size=n).tolist():
            if len(seen) < n:
                seen.setdefault(value, None)
    return list(seen)


def dicom_id(rng: np.random.Generator) -> str:
    """MIMIC-CXR-JPG image id: five groups of eight hex digits joined by '-'."""
    return "-".join(f"{int(g):08x}" for g in rng.integers(0, 2**32, size=5))


def _plan_studies(cfg: SynthConfig, rng: np.random.Generator) -> tuple[list[str], list[_Study]]:
    """Subjects with 1..max studies each (dated in order), until n_studies studies exist."""
    counts: list[int] = []
    while sum(counts) < cfg.n_studies:
        counts.append(min(int(rng.integers(1, cfg.max_studies_per_subject + 1)), cfg.n_studies - sum(counts)))
    subjects = [str(i) for i in _unique_ints(rng, 10_000_000, 20_000_000, len(counts))]
    study_ids = [str(i) for i in _unique_ints(rng, 50_000_000, 60_000_000, cfg.n_studies)]
    studies: list[_Study] = []
    for subject, count in zip(subjects, counts, strict=True):
        day = dt.date(2110, 1, 1) + dt.timedelta(days=int(rng.integers(0, 80 * 365)))
        for _ in range(count):
            studies.append(_Study(subject, study_ids[len(studies)], len(studies), day))
            day += dt.timedelta(days=int(rng.integers(1, 400)))
    return subjects, studies


def _exact_counts(n: int, fractions: list[float]) -> list[int]:
    """Round fractions of n to counts, giving at least one to every positive fraction while n allows."""
    counts = [round(f * n) for f in fractions]
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0 and sum(counts) < n:
            counts[i] = 1
    while sum(counts) > n:
        counts[counts.index(max(counts))] -= 1
    return counts


def _assign_splits(
    cfg: SynthConfig, subjects: list[str], studies: list[_Study], rng: np.random.Generator
) -> None:
    """Split by subject (no patient in two splits), with at least one subject per non-empty split."""
    n_val, n_test = _exact_counts(len(subjects), [cfg.frac_validate, cfg.frac_test])
    order = rng.permutation(len(subjects)).tolist()
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[subjects[idx]] = "validate" if rank < n_val else "test" if rank < n_val + n_test else "train"
    for study in studies:
        study.split = split_of[study.subject_id]


def _assign_abnormal(cfg: SynthConfig, studies: list[_Study], rng: np.random.Generator) -> None:
    """Exactly round(p_abnormal * n) studies get findings: the mention skew must not swing with the seed."""
    (n_abnormal,) = _exact_counts(len(studies), [cfg.p_abnormal])
    for position in rng.permutation(len(studies))[:n_abnormal].tolist():
        studies[position].abnormal = True


def _assign_layouts(cfg: SynthConfig, studies: list[_Study], rng: np.random.Generator) -> None:
    """Exact, shuffled share of studies per fallback layout, so even a small corpus exercises each one."""
    fractions = [
        cfg.frac_view_header,
        cfg.frac_impression_only,
        cfg.frac_findings_only,
        cfg.frac_last_paragraph,
    ]
    counts = _exact_counts(len(studies), fractions)
    layouts = [name for name, c in zip(LAYOUTS[1:], counts, strict=True) for _ in range(c)]
    layouts += ["standard"] * (len(studies) - len(layouts))
    for study, position in zip(studies, rng.permutation(len(studies)).tolist(), strict=True):
        study.layout = layouts[position]


# ------------------------------------------------------------------------------------------------ writing
def _write_gz_csv(path: Path, header: tuple[str, ...], rows: list[list]) -> None:
    """gzip with mtime 0 and no file name, so the bytes depend on the rows only."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(text.getvalue().encode())


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _metadata_row(study: _Study, dicom: str, view: str, size: int, rng: np.random.Generator) -> list:
    portable = view == "AP"
    procedure = "CHEST (PORTABLE AP)" if portable else "CHEST (PA AND LAT)"
    code = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}[view]
    time = f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    time += f".{int(rng.integers(0, 1000)):03d}"
    orientation = "Recumbent" if portable else "Erect"
    return [
        dicom,
        study.subject_id,
        study.study_id,
        procedure,
        view,
        size,
        size,
        study.date.strftime("%Y%m%d"),
        time,
        procedure,
        code,
        orientation,
    ]


def _study_dir(root: Path, study: _Study) -> Path:
    return root / "files" / f"p{study.subject_id[:2]}" / f"p{study.subject_id}"


def _finding_code(f: Finding) -> str:
    return ":".join([f.kind, f.side or "", f.zone or "", f.severity])


MARKER = ".ecamp-synth.json"  # written last into every corpus; the only licence to replace a folder


class CorpusFolderError(FileExistsError):
    """`out_dir` holds files the generator did not write, or a corpus that may not be replaced."""


def corpus_marker(out_dir: Path) -> dict | None:
    """The marker of a corpus this generator wrote (its config, files and folders), or None."""
    path = Path(out_dir) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict | list) else None


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """Refuse unless `out_dir` is missing or empty, or (with `overwrite`) holds only our own corpus as
    written.

    A user may point the generator at a folder holding real data (their MIMIC copy, notes, annotations), or
    edit a generated report and add a folder of their own to a generated corpus. What the marker does not
    list (a file or a folder, even an empty one), and a listed file whose content is no longer the one
    written (its SHA-256 differs), is theirs: its presence is a refusal, never a deletion. A file the user
    deleted is no loss. A marker without hashes (an older generator's) cannot show edits, so it is refused
    too.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CorpusFolderError(f"{out_dir} is a file, not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    marker = corpus_marker(out_dir)
    if marker is None:
        raise CorpusFolderError(
            f"{out_dir} is not empty and was not written by the corpus generator (no {MARKER}): "
            "refusing to touch it. Choose a new or empty folder."
        )
    if not isinstance(marker["files"], dict) or not isinstance(marker.get("folders"), list):
        raise CorpusFolderError(
            f"{out_dir} was generated by an older corpus generator whose {MARKER} has no file hashes, so "
            f"edits to it cannot be told apart: refusing to replace it. Move it away or delete it yourself."
        )
    written: dict[str, str] = marker["files"]
    ours = set(written) | {MARKER}
    folders = set(marker["folders"])
    theirs, edited = [], []
    for p in sorted(out_dir.rglob("*")):
        rel = p.relative_to(out_dir).as_posix()
        if p.is_dir() and not p.is_symlink():
            if rel not in folders:
                theirs.append(rel + "/")
        elif rel not in ours:
            theirs.append(rel)
        elif rel != MARKER and (not p.is_file() or sha256_file(p) != written[rel]):
            edited.append(rel)
    if theirs:
        raise CorpusFolderError(
            f"{out_dir} holds a generated corpus plus files the generator did not write ({_shown(theirs)}): "
            "refusing to replace it. Move those files away or choose another folder."
        )
    if edited:
        raise CorpusFolderError(
            f"{out_dir} holds a generated corpus with files edited since it was written ({_shown(edited)}): "
            "refusing to replace it. Move the corpus away or choose another folder."
        )
    if not overwrite:
        raise CorpusFolderError(f"{out_dir} already holds a generated corpus; use --overwrite to replace it")


def generate_corpus(cfg: SynthConfig, out_dir: Path, overwrite: bool = False) -> CorpusSummary:
    """Write the whole corpus under `out_dir` (see module docstring) and return its summary.

    Writes only into a missing or empty folder; `overwrite` replaces a corpus this generator wrote (its
    marker lists every file) and nothing else. The corpus is built in a fresh sibling folder and swapped in.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, overwrite)
    matcher = entity_matcher(list(load_entity_list(cfg.entities_path).entities))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        summary = _write_corpus(cfg, tmp, matcher)
        _write_marker(tmp, cfg)
        _swap_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return summary


def _write_marker(root: Path, cfg: SynthConfig) -> None:
    """The generator's manifest of what it wrote: each file's SHA-256 and each folder, so a later
    regeneration can tell the user's edits and additions from its own files (`check_replaceable`)."""
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
    folders = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir())
    marker = {
        "generator": "ecamp synth",
        "config": cfg.model_dump(mode="json"),
        "files": files,
        "folders": folders,
    }
    (root / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`; an old corpus is moved aside first and removed only after the swap."""
    if out_dir.exists():
        check_replaceable(out_dir, overwrite=True)  # re-checked: files may have appeared meanwhile
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "corpus")
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def _write_corpus(cfg: SynthConfig, tmp: Path, matcher: tuple[re.Pattern[str], list[str]]) -> CorpusSummary:
    (tmp / "downstream" / "masks").mkdir(parents=True)
    plan_rng = np.random.default_rng([cfg.seed, 0])
    subjects, studies = _plan_studies(cfg, plan_rng)
    _assign_splits(cfg, subjects, studies, plan_rng)
    _assign_layouts(cfg, studies, plan_rng)
    _assign_abnormal(cfg, studies, plan_rng)
    anatomies: dict[str, Anatomy] = {}
    style = ReportStyle(cfg.p_uncertain, cfg.p_impression_repeat)

    metadata, split_rows, chexpert, classes, boxes, study_rows, jsonl = [], [], [], [], [], [], []
    found_kinds: Counter[str] = Counter()
    said: Counter[str] = Counter()
    previous_subject = ""
    # a progress bar on the terminal (stderr); the stages' logs are untouched
    for study in tqdm(studies, desc="generating studies", unit="study", mininterval=2.0, leave=False):
        rng = np.random.default_rng([cfg.seed, 1, study.index])
        if study.subject_id not in anatomies:
            anatomies[study.subject_id] = sample_anatomy(np.random.default_rng([cfg.seed, 2, study.index]))
        anatomy = anatomies[study.subject_id]
        findings = sample_findings(rng, study.abnormal, cfg.max_findings)
        portable = bool(rng.random() < cfg.p_portable)
        has_lateral = not portable and bool(rng.random() < cfg.p_lateral)
        ctx = StudyContext(
            portable,
            has_lateral,
            study.subject_id == previous_subject,
            "man" if rng.random() < 0.5 else "woman",
        )
        previous_subject = study.subject_id
        report = write_report(findings, ctx, study.layout, rng, style)

        folder = _study_dir(tmp, study)
        (folder / f"s{study.study_id}").mkdir(parents=True, exist_ok=True)
        (folder / f"s{study.study_id}.txt").write_text(report.text)
        found = mentions(report.body, matcher)
        said.update(polarity_counts(found))
        labels = chexpert_labels(found)
        chexpert.append([study.subject_id, study.study_id, *(labels[c] for c in CHEXPERT_COLUMNS)])
        found_kinds.update({f.kind for f in findings})

        frontal = dicom_id(rng)
        view = "AP" if portable else "PA"
        radiograph = render_frontal(anatomy, findings, cfg.image_size, int(rng.integers(2**62)), portable)
        rel = _save_jpeg(tmp, study, frontal, radiograph.pixels, cfg.jpeg_quality)
        views = [(frontal, view)]
        if has_lateral:
            lateral = dicom_id(rng)
            _save_jpeg(
                tmp,
                study,
                lateral,
                render_lateral(anatomy, cfg.image_size, int(rng.integers(2**62))),
                cfg.jpeg_quality,
            )
            views.append((lateral, "LATERAL"))
        for dicom, v in views:
            metadata.append(_metadata_row(study, dicom, v, cfg.image_size, rng))
            split_rows.append([dicom, study.study_id, study.subject_id, study.split])

        mask = np.zeros((cfg.image_size, cfg.image_size), dtype=np.uint8)
        lesions = []
        for lesion in radiograph.lesions:
            mask[lesion.mask] = 255
            box = lesion.box()
            boxes.append([frontal, *box, lesion.finding.kind, lesion.side or ""])
            f = lesion.finding
            lesions.append(
                {
                    "entity": f.kind,
                    "side": f.side,
                    "lesion_side": lesion.side,
                    "zone": f.zone,
                    "severity": f.severity,
                    "box": list(box),
                }
            )
        Image.fromarray(mask).save(tmp / "downstream" / "masks" / f"{frontal}.png")
        kinds = {f.kind for f in findings}
        classes.append(
            [frontal, rel, study.study_id, study.split, *(int(k in kinds) for k in FINDING_CLASSES)]
        )
        jsonl.append(
            {
                "dicom_id": frontal,
                "study_id": study.study_id,
                "subject_id": study.subject_id,
                "split": study.split,
                "image_path": rel,
                "mask_path": f"downstream/masks/{frontal}.png",
                "width": cfg.image_size,
                "height": cfg.image_size,
                "findings": lesions,
            }
        )
        study_rows.append(_study_row(study, report, findings, frontal))

    _write_gz_csv(tmp / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, metadata)
    _write_gz_csv(tmp / "mimic-cxr-2.0.0-split.csv.gz", SPLIT_COLUMNS, split_rows)
    _write_gz_csv(tmp / "mimic-cxr-2.0.0-chexpert.csv.gz", CHEXPERT_HEADER, chexpert)
    down = tmp / "downstream"
    _write_csv(
        down / "classes.csv", ["dicom_id", "image_path", "study_id", "split", *FINDING_CLASSES], classes
    )
    _write_csv(down / "boxes.csv", ["dicom_id", "x1", "y1", "x2", "y2", "finding", "side"], boxes)
    _write_csv(
        down / "studies.csv",
        ["study_id", "subject_id", "split", "layout", "dicom_id", "findings", "uncertain"],
        study_rows,
    )
    (down / "findings.jsonl").write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in jsonl))

    summary = CorpusSummary(
        n_subjects=len(subjects),
        n_studies=len(studies),
        n_images=len(metadata),
        n_lateral=sum(1 for row in metadata if row[4] == "LATERAL"),
        findings={k: found_kinds[k] for k in FINDING_CLASSES},
        mentions={p: said[p] for p in ("negative", "positive", "uncertain", "normal")},
        negative_positive_ratio=round(said["negative"] / max(said["positive"], 1), 3),
        layouts=dict(sorted(Counter(s.layout for s in studies).items())),
        splits=dict(sorted(Counter(s.split for s in studies).items())),
    )
    (tmp / "summary.json").write_text(summary.model_dump_json(indent=2) + "\n")
    return summary


def _save_jpeg(root: Path, study: _Study, dicom: str, pixels: np.ndarray, quality: int) -> str:
    """Save one image in the MIMIC-CXR-JPG tree; returns its path relative to the corpus root."""
    path = _study_dir(root, study) / f"s{study.study_id}" / f"{dicom}.jpg"
    Image.fromarray(pixels).save(path, quality=quality)
    return path.relative_to(root).as_posix()


def _study_row(study: _Study, report: Report, findings: list[Finding], frontal: str) -> list:
    doubted = sorted({k for s in report.body if s.polarity == "uncertain" for k in s.kinds})
    return [
        study.study_id,
        study.subject_id,
        study.split,
        report.layout,
        frontal,
        ";".join(_finding_code(f) for f in findings),
        ";".join(doubted),
    ]
