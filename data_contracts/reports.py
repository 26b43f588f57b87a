"""Row contracts of the `extract_reports` stage: the report and image tables every later stage reads."""

from __future__ import annotations

from typing import ClassVar, Literal

from data_contracts.base import Row

Split = Literal["train", "validate", "test"]


class Report(Row):
    """One study's report: FINDINGS and IMPRESSION (cleaned) and their concatenation used for training."""

    contract: ClassVar[str] = "reports"
    version: ClassVar[int] = 1
    study_id: str
    subject_id: str  # "" when the source does not say (manifest without subject_id)
    split: Split
    findings: str
    impression: str
    text: str  # findings + " " + impression, whitespace collapsed, PHI marks "___" kept
    source_path: str  # the report file, or "<manifest>#row N" for manifests


class Image(Row):
    """One image of a study that has a usable report; `path` is absolute, `stamp` says which content of it
    was checked (`data_contracts.stamps`): a replaced image changes this table, so its readers rerun."""

    contract: ClassVar[str] = "images"
    version: ClassVar[int] = 2
    image_id: str
    study_id: str
    subject_id: str
    split: Split
    path: str
    view: str  # ViewPosition (PA, AP, LATERAL, ...), "" when unknown
    height: int
    width: int
    stamp: str  # `sha256:<hex>`, or `stat:<size>:<mtime_ns>` until the file first changes


class Reject(Row):
    """An input that could not be used, with the reason, so nothing is lost silently."""

    contract: ClassVar[str] = "rejects"
    version: ClassVar[int] = 1
    source: str  # the file the problem is in (report, image, manifest, CSV)
    key: str  # study id, dicom id or "row N" of a manifest
    reason: str
