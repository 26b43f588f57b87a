"""Stage 1, `extract_reports`: a MIMIC-CXR(-JPG) tree or a generic manifest -> `reports`, `images`, `rejects`.

The readers and the checks are `models.studies`; this module declares the stage and writes what they found.
Every input left out is a `rejects` row naming the file, the study/row and the reason; downstream stages rely
on every report having >= 1 image and every image a report.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from data_contracts.reports import Image, Reject, Report
from models.studies import ExtractConfig, InputLayoutError, extract, manifest_image, read_manifest_table
from tasks.base import StageConfig, StageContext
from tasks.stage import FileSet, Stage

__all__ = ["STAGE", "Config", "InputLayoutError", "extract"]


class Config(StageConfig, ExtractConfig):
    """The input checks of `models.studies.ExtractConfig`; the inputs themselves are the `data` section."""


def run(ctx: StageContext, cfg: Config) -> None:
    result = extract(ctx.config.data, cfg, ctx.input_stamps)
    ctx.write("rejects", result.rejects, Reject)
    if not result.reports and not result.rejects:
        source = ctx.config.data.manifest if ctx.config.data.source == "manifest" else ctx.config.data.root
        raise InputLayoutError(f"{source}: no study at all in the input (an empty manifest or MIMIC tree)")
    if not result.reports:
        reasons = Counter(r.reason.split(" (")[0] for r in result.rejects).most_common(3)
        raise InputLayoutError(
            f"no usable study found ({len(result.rejects)} rejected, see "
            f"extract_reports/.attempt/rejects.parquet); "
            f"most common reasons: {reasons}"
        )
    ctx.write("reports", result.reports, Report)
    ctx.write("images", result.images, Image)
    ctx.log.info(
        "%d reports, %d images, %d rejects", len(result.reports), len(result.images), len(result.rejects)
    )


def data_files(config: Any) -> list[Path | FileSet]:
    """The input files the `data` section names, for the cache key and lineage: the MIMIC tree (every
    report and image under files/) and CSVs, or the manifest and every image it names. A missing setting is
    an error."""
    data = config.data
    if data.source == "manifest":
        if not data.manifest:
            raise InputLayoutError("data.source is 'manifest' but data.manifest is not set")
        manifest = Path(data.manifest)
        return [manifest, manifest_images(manifest)] if manifest.is_file() else [manifest]
    if not data.root:
        raise InputLayoutError("data.source is 'mimic' but data.root is not set")
    root = Path(data.root)
    return [root / "files", *sorted(root.glob("mimic-cxr-2.0.0-*.csv*"))]


def manifest_images(manifest: Path) -> FileSet:
    """Every image the manifest names, for the fingerprint: a replaced image reruns the stage."""
    manifest = Path(manifest).resolve()
    column = read_manifest_table(manifest)["image_path"]
    found = (manifest_image(manifest, value.strip()) for value in column if value.strip())
    paths = dict.fromkeys(str(image) for image, problem in found if problem is None)
    return FileSet(manifest, "image_path", tuple(paths))


STAGE = Stage(
    name="extract_reports",
    version="4",
    config=Config,
    run=run,
    summary="MIMIC-CXR reports + MIMIC-CXR-JPG tree and CSVs, or a manifest → one row per study and image",
    writes={"rejects": Reject, "reports": Report, "images": Image},
    sections=("data",),
    input_files=data_files,
    inputs_hint="data.root (the MIMIC-CXR(-JPG) root holding files/ and the CSVs) or data.manifest",
    retries=2,  # a network file system that hiccups
)
