"""What a run shows in the open-source Prefect UI and event feed: manifests, lineage, plots, asset events.

The open-source UI has no asset graph (Prefect Cloud has one), so lineage is made visible through what it
does show: one table artifact per stage and run (its manifest), one Markdown artifact per pipeline run
drawing the chain from input files to the encoder and its evaluation, plots embedded inline, and asset
materialization events that `/api/events/filter` returns. Everything here is read from the stages' success
records, the one source of truth for what an output is and what it was made from.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from flows.lineage_graph import draw_lineage
from tasks.base import FILE_SCHEMA
from tasks.config import stable_hash
from tasks.record import SuccessRecord, read_record
from tasks.stage import split_ref

PLOT_SUFFIXES = (".png",)
MAX_INLINE_BYTES = 512 * 1024
MATERIALIZED = (
    "prefect.asset.materialization.succeeded"  # Prefect's own event name: Cloud's asset graph reads it
)


def slug(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only
    (`pretrain_ecamp__lambda_0.1`)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_name(run_dir: Path) -> str:
    """The run's name in artifact keys: its directory's name (`runs/demo` -> `demo`)."""
    return slug(Path(run_dir).resolve().name) or "run"


def artifact_key(run_dir: Path, stage: str, suffix: str = "") -> str:
    """`ecamp-<run>-<stage>[-<suffix>]`: two run directories never overwrite each other's latest version."""
    return "-".join(p for p in ("ecamp", run_name(run_dir), slug(stage), slug(suffix)) if p)


def short(uri: str, run_dir: Path) -> str:
    """A path relative to the run directory (`extract_reports/reports.parquet`), else the URI itself."""
    path = uri.removeprefix("file://")
    root = str(Path(run_dir).resolve()) + "/"
    return path.removeprefix(root) if path.startswith(root) else uri


def manifest_rows(record: SuccessRecord, status: str, run_dir: Path) -> list[dict[str, Any]]:
    """One row per output (model files included) and per input: full SHA-256, rows, schema, the stage that
    made it and its path (relative to the run directory when inside it). Hash first: it is what a row is
    for."""
    rows = []
    for name, out in record.outputs.items():
        info = out.info
        file_output = out.kind == "file" or info is None or info.schema_name == FILE_SCHEMA
        rows.append(
            {
                "role": "output",
                "artifact": f"{record.stage}/{name}",
                "content_hash": out.content_hash,
                "rows": "" if file_output else info.rows,
                "schema": "file" if file_output else f"{info.schema_name} v{info.schema_version}",
                "made_by": record.stage,
                "status": status,
                "path": short(info.uri, run_dir) if info else "",
            }
        )
    for ref, digest in record.parts.get("upstream", {}).items():
        producer, name = split_ref(ref)
        made = read_record(run_dir, producer)
        source = made.outputs.get(name) if made and digest else None
        rows.append(
            {
                "role": "input",
                "artifact": ref,
                "content_hash": digest or "",
                "rows": "",
                "schema": "",
                "made_by": producer if digest else "(optional, absent)",
                "status": "",
                "path": short(source.info.uri, run_dir) if source and source.info else "",
            }
        )
    for uri, digest in record.parts.get("inputs", {}).items():
        rows.append(
            {
                "role": "input",
                "artifact": "input file",
                "content_hash": digest,
                "rows": "",
                "schema": "",
                "made_by": "(outside the run)",
                "status": "",
                "path": uri.removeprefix("file://"),
            }
        )
    return rows


def manifest_description(record: SuccessRecord, status: str, run_dir: Path) -> str:
    config_hash = stable_hash(record.parts.get("config", {}))  # as StageContext.config_hash
    return (
        f"**{record.stage}** {status} · config `{config_hash}` · code `{record.parts.get('code', '')}` · "
        f"fingerprint `{record.fingerprint}` · run dir `{Path(run_dir).resolve()}`"
    )


def publish_stage(name: str, status: str, run_dir: Path, manifest_only: bool = False) -> SuccessRecord:
    """The stage's manifest for this run (cached or ran); its Markdown outputs, plots and asset events when
    it ran (a cached stage's documents and events are those of the run that made them). `manifest_only`: the
    pipeline's copy of the manifest of a stage its GPU sub-run ran and published in full."""
    record = read_record(run_dir, name)
    if record is None:
        raise FileNotFoundError(f"{name}: no success record in {run_dir} to publish")
    create_table_artifact(
        table=manifest_rows(record, status, run_dir),
        key=artifact_key(run_dir, name),
        description=manifest_description(record, status, run_dir),
    )
    if status != "ran" or manifest_only:
        return record
    stage_dir = Path(run_dir) / name
    for doc in sorted(p for p in stage_dir.glob("*.md") if p.is_file()):
        create_markdown_artifact(doc.read_text(), key=artifact_key(run_dir, name, doc.stem))
    plots = sorted(p for p in stage_dir.rglob("*") if p.suffix in PLOT_SUFFIXES and ".attempt" not in p.parts)
    if plots:
        lines = [f"# {name} plots", ""] + [inline_image(p) for p in plots]
        create_markdown_artifact("\n\n".join(lines), key=artifact_key(run_dir, name, "plots"))
    emit_materializations(record)
    return record


def emit_materializations(record: SuccessRecord) -> None:
    """One asset event per output, its upstream assets related with the role `asset` and the exact hashes
    in the payload: `/api/events/filter` then answers "what was this made from" by machine."""
    for name, out in record.outputs.items():
        if out.info is None:
            continue
        upstream = {u.uri: u.content_hash for u in out.info.upstream}
        emit_event(
            event=MATERIALIZED,
            resource={
                "prefect.resource.id": out.info.uri,
                "prefect.resource.name": f"{record.stage}/{name}",
                "ecamp.content_hash": out.content_hash,
            },
            related=[{"prefect.resource.id": uri, "prefect.resource.role": "asset"} for uri in upstream],
            payload={
                "stage": record.stage,
                "content_hash": out.content_hash,
                "rows": out.info.rows,
                "schema": out.info.schema_name,
                "upstream": upstream,
            },
        )


def inline_image(path: Path) -> str:
    """Markdown showing a PNG in the UI (a data URI: an http page cannot open file://); big ones as a path."""
    data = path.read_bytes()
    if len(data) > MAX_INLINE_BYTES:
        return f"- `{path}` ({len(data) // 1024} KiB, too large to embed)"
    return f"**{path.name}**\n\n{inline_png(path.name, data)}"


def inline_png(name: str, data: bytes) -> str:
    return f"![{name}](data:image/png;base64,{base64.b64encode(data).decode()})"


def label(uri: str, run_dir: Path) -> str:
    """How the lineage names an artifact: `stage/name` inside the run directory, the path outside it."""
    inside = short(uri, run_dir)
    return inside.removesuffix(".parquet") if inside != uri else uri.removeprefix("file://")


# The artifacts that carry the method from the reports to the encoder's evaluation, in pipeline order.
CHAIN = (
    "extract_reports/reports",
    "match_entities/entity_mentions",
    "seed_distill/seed_distillations",
    "finetune_student/adapter",
    "bulk_distill/distilled_reports",
    "train_gloria/gloria.safetensors",
    "train_gloria/attention_maps",
    "pretrain_ecamp/encoder.safetensors",
    "evaluate/eval_results",
)


def chain_table(run_dir: Path) -> list[str]:
    """A Markdown table of the CHAIN artifacts this run has: hash, and what each was made from (names only, so
    the table fits the UI's width; the hashes of the inputs are in the list below it and in the manifests)."""
    rows = ["| artifact | SHA-256 | made from |", "|---|---|---|"]
    for ref in CHAIN:
        stage, name = split_ref(ref)
        record = read_record(run_dir, stage)
        out = record.outputs.get(name) if record else None
        if out is None or out.info is None:
            continue
        sources = ", ".join(
            f"`{label(u.uri, run_dir)}`"
            for u in out.info.upstream
            if u.uri.startswith(Path(run_dir).resolve().as_uri())
        )
        rows.append(f"| `{ref}` | `{out.content_hash[:16]}` | {sources or 'input files'} |")
    return rows


def lineage_markdown(run_dir: Path, summaries: list[dict[str, Any]]) -> str:
    """The pipeline run's chain from input files to the encoder and its evaluation: a table and a list with
    hashes a person reads in the UI, the same as a picture of the graph, then the evaluation plot."""
    run_dir = Path(run_dir)
    labels: dict[str, str] = {}  # uri -> box text, in the order the list meets them
    edges: dict[tuple[str, str], None] = {}  # ordered set

    def node(uri: str, digest: str) -> str:
        labels.setdefault(uri, f"{shorter(label(uri, run_dir))}\n{digest[:12]}")
        return uri

    text = []
    for summary in summaries:
        record = read_record(run_dir, summary["stage"])
        if record is None:
            continue
        text.append(f"- **{summary['stage']}** ({summary['status']}, fingerprint `{record.fingerprint}`)")
        for name, out in record.outputs.items():
            if out.info is None:
                continue
            me = node(out.info.uri, out.content_hash)
            text.append(f"  - `{record.stage}/{name}` sha256 `{out.content_hash}`")
            sources = [f"`{label(u.uri, run_dir)}` `{u.content_hash[:12]}`" for u in out.info.upstream]
            if sources:
                text.append(f"    - from {', '.join(sources)}")
            for up in out.info.upstream:
                edges[(node(up.uri, up.content_hash), me)] = None
    lines = [
        f"# Lineage of run `{run_name(run_dir)}`",
        "",
        f"Run directory `{run_dir.resolve()}`.",
        "",
        "## From the reports to the evaluation",
        "",
        *chain_table(run_dir),
        "",
        "## Graph",
        "",
        "Every output (boxes: path in the run directory or input file, first 12 hex digits of its SHA-256), "
        'each arrow one "made from"; input files on the left.',
        "",
        inline_png("lineage.png", draw_lineage(labels, list(edges))),
        "",
        "## Every output",
        "",
        "Each output (model files included) with its SHA-256 and what it was made from (first 12 hex "
        "digits); each stage's manifest artifact has the full hashes of its inputs.",
        "",
        *text,
    ]
    plot = run_dir / "evaluate" / "eval_plot.png"
    if plot.is_file():
        lines += ["", "## Evaluation", "", inline_image(plot)]
    return "\n".join(lines)


def shorter(text: str, width: int = 44) -> str:
    """A box label: long input paths keep their end, where the file name is."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def publish_lineage(run_dir: Path, summaries: list[dict[str, Any]]) -> None:
    create_markdown_artifact(lineage_markdown(run_dir, summaries), key=artifact_key(run_dir, "lineage"))
