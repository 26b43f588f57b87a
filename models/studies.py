"""The inputs as studies: a MIMIC-CXR(-JPG) tree or a generic manifest -> reports, images and rejects.

Both readers list candidate studies (report source + images); `assemble` then parses every report with
`models.text.sections`, checks every image with `models.images`, and keeps a study only when its
report has FINDINGS/IMPRESSION text and at least one image is usable. Every input left out gets a
reject naming the file, the study/row and the reason, so the invariant downstream stages rely on
is: every report has >= 1 image, every image has a report. The `extract_reports` stage writes the three.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from data_contracts.reports import Image, Reject, Report
from data_contracts.stamps import stat_stamp
from models.images import (
    ConstantImageError,
    ImageLoadError,
    describe_path_error,
    image_size,
    load_grayscale,
    looks_inverted,
    path_problem,
)
from models.text.sections import extract_findings_impression

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
MANIFEST_REQUIRED = ("study_id", "image_path", "report_text")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validate": "validate",
    "validation": "validate",
    "valid": "validate",
    "val": "validate",
    "dev": "validate",
    "test": "test",
    "testing": "test",
}
FRONTAL_VIEWS = {"PA", "AP"}

_log = logging.getLogger(__name__)


class ExtractConfig(BaseModel):
    """How strictly inputs are checked; `extract_reports` nests these as its own settings."""

    model_config = ConfigDict(extra="forbid")

    image_workers: int = Field(16, ge=1, description="threads that check images (header or full decode)")
    min_image_side: int = Field(
        64, ge=1, description="images whose shorter side has fewer pixels are rejected (not a radiograph)"
    )
    max_aspect_ratio: float = Field(
        3.0, ge=1.0, description="images whose longer side / shorter side is larger are rejected"
    )
    max_report_chars: int = Field(
        100_000, ge=1, description="longer reports are rejected at read time (MIMIC reports are < 10k)"
    )


class InputLayoutError(ValueError):
    """The input (MIMIC tree, CSV or manifest) is not in the expected layout; the message names the file."""


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class CandidateImage:
    image_id: str
    path: Path
    view: str


@dataclass
class CandidateStudy:
    """A study as listed by a reader, before its report and images are checked."""

    study_id: str
    subject_id: str
    split: str
    source: str  # report file path, or "<manifest>#row N"
    report_path: Path | None = None  # MIMIC: read the file; manifest: `report_text` holds the text
    report_text: str | None = None
    images: list[CandidateImage] = field(default_factory=list)


@dataclass
class Extraction:
    reports: list[Report] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    def reject(self, source: str | Path, key: str, reason: str) -> None:
        self.rejects.append(Reject(source=str(source), key=key, reason=reason))


# --------------------------------------------------------------------------- reports


class ReportError(Exception):
    """A report that cannot be used; the message is the reject reason."""


def read_report_file(path: Path, max_chars: int) -> str:
    """The text of a report file; ReportError when missing, unreadable, empty, too long or not UTF-8.

    A file of more than 4 bytes per allowed character is rejected before it is read (UTF-8 needs at most
    4 bytes a character), so a huge file never lands in memory.
    """
    try:
        size = path.stat().st_size
        if size > 4 * max_chars:
            raise ReportError(f"report too long: {size:,} bytes (max_report_chars is {max_chars:,})")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ReportError("report file missing") from None
    except (OSError, ValueError) as err:
        raise ReportError(f"cannot read report file: {describe_path_error(path, err)}") from None
    if not data.strip():
        raise ReportError("empty report file" if not data else "report file contains only whitespace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ReportError(f"not valid UTF-8: byte 0x{data[err.start]:02x} at offset {err.start}") from None


def parse_report(study: CandidateStudy, max_chars: int) -> Report:
    """Report row for a study, or ReportError with the reason it has no usable text.

    Reports longer than `max_chars` are rejected before section parsing: a multi-megabyte "report" is a
    mistake upstream, and every later stage (entity matching, teacher prompts) pays for its length.
    """
    if study.report_path is not None:
        text = read_report_file(study.report_path, max_chars)
    else:
        text = study.report_text or ""
        if not text.strip():
            raise ReportError("empty report_text")
    if len(text) > max_chars:
        raise ReportError(f"report too long: {len(text):,} characters (max_report_chars is {max_chars:,})")
    sections = extract_findings_impression(text)
    if sections.origin == "none":
        found = ", ".join(sections.section_names) or "none"
        raise ReportError(f"no FINDINGS or IMPRESSION section and no closing paragraph (sections: {found})")
    return Report(
        study_id=study.study_id,
        subject_id=study.subject_id,
        split=study.split,
        findings=sections.findings,
        impression=sections.impression,
        text=sections.text,
        source_path=study.source,
    )


# --------------------------------------------------------------------------- images


def check_image(image: CandidateImage, decode: bool, cfg: ExtractConfig) -> tuple[int, int]:
    """(height, width) of a usable image; ImageLoadError otherwise. Both modes check size and shape.

    `decode=False` reads the header and end-of-file marker, and always entropy-decodes a sequential JPEG at
    1/8 scale: a file cut short and re-terminated with FF D9 otherwise passes both checks and trains on
    grey. That costs ~10-35 CPU-ms per MIMIC-size JPEG against 0.15 ms for the header (see
    `models.images._decode_jpeg_to_last_block`), ~2 CPU-hours once for MIMIC's 377k images, spread over
    `image_workers` threads: less than one training epoch, which decodes every image in full.
    `decode=True` decodes the pixels (the same check, at no extra cost) and also rejects frontal views that
    look like a negative. Both reject a constant image (every pixel one value: a blank export), the header
    check only where it decodes (sequential JPEG, as MIMIC-CXR-JPG's), after the size and shape checks.
    """
    try:
        if not decode:
            height, width = image_size(image.path)
            check_shape(image, height, width, cfg)
            return height, width
        pixels = load_grayscale(image.path, reject_constant=True)
    except ConstantImageError as err:
        check_shape(image, err.height, err.width, cfg)  # too small or too elongated is the more basic reason
        raise
    check_shape(image, pixels.shape[0], pixels.shape[1], cfg)
    if image.view.upper() in FRONTAL_VIEWS and looks_inverted(pixels):
        raise ImageLoadError(
            image.path,
            "frontal image looks inverted (spine darker than lungs): check PhotometricInterpretation",
        )
    return pixels.shape[0], pixels.shape[1]


def check_shape(image: CandidateImage, height: int, width: int, cfg: ExtractConfig) -> None:
    """ImageLoadError for an image too small or too elongated to be a radiograph (a thumbnail, an icon, a
    strip): such images decode, and resizing them to the training size would feed the model noise."""
    short, long = min(height, width), max(height, width)
    problems = []
    if short < cfg.min_image_side:
        problems.append(f"shorter side {short} px < min_image_side {cfg.min_image_side}")
    if short == 0 or long / short > cfg.max_aspect_ratio:
        ratio = f"{long / short:.2f}" if short else "infinite"
        problems.append(f"aspect ratio {long}/{short} = {ratio} > max_aspect_ratio {cfg.max_aspect_ratio:g}")
    if problems:
        raise ImageLoadError(
            image.path, f"image is {width}x{height} px (width x height): {'; '.join(problems)}"
        )


def check_images(
    images: list[CandidateImage], decode: bool, cfg: ExtractConfig
) -> list[tuple[int, int] | ImageLoadError]:
    """Check images in parallel threads (PIL and pydicom release the GIL while reading and decoding)."""

    def one(image: CandidateImage) -> tuple[int, int] | ImageLoadError:
        try:
            return check_image(image, decode, cfg)
        except ImageLoadError as err:
            return err

    if cfg.image_workers <= 1 or len(images) < 2:
        return [one(image) for image in images]
    with ThreadPoolExecutor(max_workers=cfg.image_workers) as pool:
        return list(pool.map(one, images))


# --------------------------------------------------------------------------- assembly


def assemble(
    studies: list[CandidateStudy],
    check_decode: bool,
    cfg: ExtractConfig,
    out: Extraction,
    stamps: Mapping[str, str] | None = None,
) -> Extraction:
    """Parse reports, check images, and keep the studies with a usable report and >= 1 usable image.

    Each image row carries its file's stamp from `stamps` (the runner's, taken for the fingerprint), or its
    first-seen stamp when it has none there, so a replaced image changes `images` and every stage reading it
    reruns."""
    stamps = stamps or {}
    parsed: list[tuple[CandidateStudy, Report]] = []
    for study in studies:
        try:
            parsed.append((study, parse_report(study, cfg.max_report_chars)))
        except ReportError as err:
            n = len(study.images)
            out.reject(study.source, study.study_id, f"{err} ({n} image(s) of the study left out)")
    images = [image for study, _ in parsed for image in study.images]
    results = iter(check_images(images, check_decode, cfg))
    for study, report in parsed:
        kept: list[Image] = []
        for image in study.images:
            result = next(results)
            if isinstance(result, ImageLoadError):
                out.reject(image.path, image.image_id, f"study {study.study_id}: {result.reason}")
                continue
            kept.append(
                Image(
                    image_id=image.image_id,
                    study_id=study.study_id,
                    subject_id=study.subject_id,
                    split=study.split,
                    path=str(image.path),
                    view=image.view,
                    height=result[0],
                    width=result[1],
                    stamp=stamps.get(str(image.path)) or stat_stamp(image.path),
                )
            )
        if not kept:
            out.reject(study.source, study.study_id, "no usable image: every image of the study was rejected")
            continue
        out.reports.append(report)
        out.images.extend(kept)
    return out


def _normalize_views(views: list[str] | None) -> set[str]:
    return {v.strip().upper() for v in views or [] if v.strip()}


# --------------------------------------------------------------------------- MIMIC-CXR


def _find_csv(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.exists():
            return candidate
    raise InputLayoutError(f"{root / (name + '.gz')}: not found (MIMIC-CXR-JPG CSV expected in data.root)")


def read_csv_columns(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """A CSV as strings (ids keep leading zeros, blanks stay ''), with its required columns checked."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise InputLayoutError(f"{path}: cannot read CSV ({err})") from None
    _require_columns(path, list(frame.columns), required)
    frame = frame[list(required)]
    return frame.map(str.strip) if len(frame) else frame


def _require_columns(path: Path | str, found: list[str], required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        raise InputLayoutError(
            f"{path}: missing required column(s) {', '.join(repr(c) for c in missing)} "
            f"(found: {', '.join(found) or 'none'})"
        )


def _mimic_dir(root: Path, subject_id: str) -> Path:
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}"


def _report_files(root: Path, out: Extraction) -> dict[str, Path]:
    """study_id -> report path for every files/pXX/pSUBJ/sSTUDY.txt (scandir: fast at 227k files).

    The walk only finds reports that have no metadata; a folder it cannot enter (symlink loop, no
    permission) becomes a reject and the walk goes on. Studies listed in the metadata are read from their
    expected path anyway, so a problem there is also reported per study when its report is read.
    """
    found: dict[str, Path] = {}
    files = root / "files"
    if not os.path.lexists(files):
        return found
    for group in _subfolders(str(files), out):
        for subject in _subfolders(group, out):
            for entry in _list_folder(subject, out):
                if not (entry.name.startswith("s") and entry.name.endswith(".txt")):
                    continue
                try:
                    is_file = entry.is_file()
                except OSError:
                    is_file = True  # a report name that cannot be stat'ed: reading it names the problem
                if is_file:
                    found[entry.name[1:-4]] = Path(entry.path)
    return found


def _list_folder(path: str, out: Extraction) -> list[os.DirEntry]:
    """The entries of a folder of the files/ tree, or [] and a reject when it cannot be listed."""
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError as err:
        _reject_folder(path, err, out)
        return []


def _subfolders(path: str, out: Extraction) -> list[str]:
    """Paths of the sub-folders of `path`; an entry that cannot be stat'ed is a reject, plain files are
    skipped."""
    folders = []
    for entry in _list_folder(path, out):
        try:
            if entry.is_dir():
                folders.append(entry.path)
        except OSError as err:
            _reject_folder(entry.path, err, out)
    return folders


def _reject_folder(path: str, err: OSError, out: Extraction) -> None:
    reason = (
        f"cannot list folder: {describe_path_error(path, err)} (reports in it are not checked for metadata)"
    )
    out.reject(path, os.path.basename(path), reason)


def list_mimic_studies(
    root: Path, views: list[str] | None, max_studies: int | None, out: Extraction
) -> list[CandidateStudy]:
    """Studies of a MIMIC-CXR tree: metadata CSV x split CSV x report files, filtered by view."""
    root = Path(root).resolve()
    meta_path, split_path = _find_csv(root, METADATA_CSV), _find_csv(root, SPLIT_CSV)
    meta = read_csv_columns(meta_path, METADATA_COLUMNS)
    split = read_csv_columns(split_path, SPLIT_COLUMNS)
    split_of = dict(zip(split["dicom_id"], split["split"], strict=True))
    wanted = _normalize_views(views)
    reports = _report_files(root, out)

    studies: dict[str, CandidateStudy] = {}
    subject_of: dict[str, str] = {}
    skipped_views: dict[str, Counter[str]] = {}
    for dicom_id, subject_id, study_id, view in meta[list(METADATA_COLUMNS)].itertuples(index=False):
        subject_of.setdefault(study_id, subject_id)
        if wanted and view.upper() not in wanted:
            skipped_views.setdefault(study_id, Counter())[view or "''"] += 1
            continue
        image_split = SPLIT_ALIASES.get(split_of.get(dicom_id, "").lower())
        if image_split is None:
            known = dicom_id in split_of
            reason = f"split {split_of[dicom_id]!r} unknown" if known else "not in split CSV"
            out.reject(split_path, dicom_id, f"study {study_id}: {reason}")
            continue
        study = studies.get(study_id)
        if study is None:
            report_path = _mimic_dir(root, subject_id) / f"s{study_id}.txt"
            study = CandidateStudy(
                study_id, subject_id, image_split, str(report_path), report_path=report_path
            )
            studies[study_id] = study
        elif study.split != image_split or study.subject_id != subject_id:
            reason = f"study {study_id}: split/subject differ from the study's other images"
            out.reject(meta_path, dicom_id, reason)
            continue
        image_path = _mimic_dir(root, subject_id) / f"s{study_id}" / f"{dicom_id}.jpg"
        study.images.append(CandidateImage(dicom_id, image_path, view))

    # Studies listed in the metadata that have no candidate image left, and reports with no metadata at all.
    for study_id, subject_id in sorted(subject_of.items()):
        if study_id in studies:
            continue
        report = _mimic_dir(root, subject_id) / f"s{study_id}.txt"
        if study_id in skipped_views:
            listed = ", ".join(f"{v} x{n}" for v, n in sorted(skipped_views[study_id].items()))
            reason = f"no image with a view in data.views {sorted(wanted)} ({listed})"
        else:
            reason = (
                f"no image left: every image of the study is missing from {split_path.name} or inconsistent"
            )
        out.reject(report, study_id, reason)
    for study_id, path in sorted(reports.items()):
        if study_id not in subject_of:
            out.reject(path, study_id, f"report has no image in {meta_path.name}")

    kept = [studies[s] for s in sorted(studies)]
    if max_studies is not None:
        kept = kept[:max_studies]
    n_skipped = sum(sum(c.values()) for c in skipped_views.values())
    _log.info(
        "MIMIC %s: %d studies, %d images outside data.views %s", root, len(kept), n_skipped, sorted(wanted)
    )
    return kept


# --------------------------------------------------------------------------- manifest


def read_manifest_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet manifest as strings ('' for missing values), required columns checked."""
    suffix = "".join(path.suffixes[-2:]).lower()
    if not path.exists():
        raise InputLayoutError(f"{path}: manifest not found")
    if path.suffix.lower() == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise InputLayoutError(f"{path}: cannot read Parquet manifest ({err})") from None
        _require_columns(path, table.column_names, MANIFEST_REQUIRED)
        columns = {name: table.column(name).cast(pa.string()).fill_null("") for name in table.column_names}
        frame = pa.table(columns).to_pandas()
    elif suffix.endswith((".csv", ".csv.gz", ".tsv")):
        try:
            sep = "\t" if suffix.endswith(".tsv") else ","
            frame = pd.read_csv(
                path, dtype=str, keep_default_na=False, na_filter=False, sep=sep, encoding="utf-8-sig"
            )
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
            raise InputLayoutError(f"{path}: cannot read CSV manifest ({err})") from None
        _require_columns(path, list(frame.columns), MANIFEST_REQUIRED)
    else:
        raise InputLayoutError(f"{path}: manifest must be .csv, .csv.gz, .tsv or .parquet")
    return frame


def list_manifest_studies(
    path: Path, views: list[str] | None, max_studies: int | None, out: Extraction
) -> list[CandidateStudy]:
    """One study per manifest row; relative image paths resolve against the manifest's folder."""
    path = Path(path).resolve()
    frame = read_manifest_table(path)
    wanted = _normalize_views(views)
    has_view = "view" in frame.columns
    if wanted and not has_view:
        _log.warning("%s has no 'view' column: data.views %s not applied", path, sorted(wanted))
    first_row: dict[str, int] = {}
    studies: list[CandidateStudy] = []
    for number, row in enumerate(frame.to_dict("records"), start=1):
        key = f"row {number}"
        study_id = str(row["study_id"]).strip()
        image_path = str(row["image_path"]).strip()
        raw_split = str(row.get("split", "train")).strip().lower() or "train"
        view = str(row.get("view", "")).strip().upper()
        if not study_id:
            out.reject(path, key, "empty study_id")
            continue
        if study_id in first_row:
            out.reject(
                path, key, f"duplicate study_id {study_id!r} (first at row {first_row[study_id]}, kept)"
            )
            continue
        first_row[study_id] = number
        if not image_path:
            out.reject(path, key, f"study {study_id}: empty image_path")
            continue
        if raw_split not in SPLIT_ALIASES:
            out.reject(
                path, key, f"study {study_id}: split {row['split']!r} is not one of train, validate, test"
            )
            continue
        if wanted and has_view and view.upper() not in wanted:
            out.reject(path, key, f"study {study_id}: view {view!r} not in data.views {sorted(wanted)}")
            continue
        image, problem = manifest_image(path, image_path)
        if problem:
            out.reject(path, key, f"study {study_id}: image_path {_shorten(image_path)}: {problem}")
            continue
        studies.append(
            CandidateStudy(
                study_id=study_id,
                subject_id=str(row.get("subject_id", "")).strip(),
                split=SPLIT_ALIASES[raw_split],
                source=f"{path}#{key}",
                report_text=str(row["report_text"]),
                images=[CandidateImage(f"{study_id}_{image.stem}", image, view)],
            )
        )
    if max_studies is not None:
        studies = studies[:max_studies]
    _log.info("manifest %s: %d rows, %d candidate studies", path, len(frame), len(studies))
    return studies


def manifest_image(manifest: Path, value: str) -> tuple[Path, str | None]:
    """The image a manifest row names, as the stage opens it (relative to the resolved manifest's folder),
    and why it cannot even be looked up, if so."""
    image = Path(value)
    return _resolve_image(image if image.is_absolute() else manifest.parent / image)


def _resolve_image(image: Path) -> tuple[Path, str | None]:
    """(absolute path, None), or (the path, why it cannot even be looked up: NUL byte, symlink loop, name
    too long...). A missing file is not a problem here: the image check rejects it by its own path."""
    problem = path_problem(image)
    if problem is None:
        try:
            return image.resolve(), None
        except (OSError, RuntimeError, ValueError) as err:  # RuntimeError: a symlink loop (Python 3.11)
            problem = f"cannot resolve path: {err}"
    return image, problem


def _shorten(text: str, keep: int = 80) -> str:
    """repr() of a manifest value (shows a NUL byte), cut for a reject reason when it is very long."""
    if len(text) <= keep:
        return repr(text)
    return f"{text[:keep]!r}... ({len(text):,} characters)"


# --------------------------------------------------------------------------- entry points


def extract(data: Any, cfg: ExtractConfig, stamps: Mapping[str, str] | None = None) -> Extraction:
    """Run the reader named by `data.source` (a `tasks.config.DataConfig`) and assemble the three tables;
    `stamps`: the input files' stamps (see `assemble`)."""
    out = Extraction()
    if data.source == "mimic":
        if not data.root:
            raise InputLayoutError("data.root must be set when data.source is 'mimic'")
        studies = list_mimic_studies(Path(data.root), data.views, data.max_studies, out)
    elif data.source == "manifest":
        if not data.manifest:
            raise InputLayoutError("data.manifest must be set when data.source is 'manifest'")
        studies = list_manifest_studies(Path(data.manifest), data.views, data.max_studies, out)
    else:
        raise InputLayoutError(f"data.source {data.source!r} must be 'mimic' or 'manifest'")
    assemble(studies, data.check_images, cfg, out, stamps)
    out.reports.sort(key=lambda r: r.study_id)
    out.images.sort(key=lambda i: (i.study_id, i.image_id))
    return out
