"""Prefect flows: the full pipeline and a single stage. Wiring only; the stages live in `tasks/`.

Skipping finished stages is the runner's job (fingerprints of upstream hashes + config + code), not
Prefect's result cache: it needs no result storage shared between workers and survives a new server.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tasks.config import config_from_dict, load_config
from tasks.lock import run_lock
from tasks.registry import get_stage, stage_names
from tasks.runner import StageResult, run_stage
from tasks.stage import variant_name

PLOT_SUFFIXES = (".png",)
MAX_INLINE_BYTES = 512 * 1024


def artifact_key(stage: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only (`pretrain_ecamp__lambda_0.1`)."""
    return "ecamp-" + re.sub(r"[^a-z0-9]+", "-", stage.lower()).strip("-")


def output_table(result: StageResult) -> list[dict[str, Any]]:
    return [
        {
            "artifact": f"{result.stage}/{name}",
            "rows": info.rows,
            "schema": f"{info.schema_name} v{info.schema_version}",
            "content_hash": info.content_hash[:12],
            "uri": info.uri,
            "upstream": ", ".join(
                u.uri.rsplit("/", 2)[-2] + "/" + u.uri.rsplit("/", 1)[-1] for u in info.upstream
            ),
            "status": result.status,
        }
        for name, info in result.outputs.items()
    ]


def publish(result: StageResult, run_dir: Path) -> None:
    """A table artifact of the stage's outputs (the lineage view the OSS UI shows), its Markdown outputs (the
    evaluation table, model cards) and its plots, embedded inline so that the UI shows them."""
    create_table_artifact(
        table=output_table(result),
        key=artifact_key(result.stage),
        description=f"**{result.stage}** {result.status} · fingerprint `{result.fingerprint}` · run dir `{run_dir}`",
    )
    stage_dir = run_dir / result.stage
    for doc in sorted(p for p in stage_dir.glob("*.md") if p.is_file()):
        create_markdown_artifact(
            doc.read_text(), key=f"{artifact_key(result.stage)}-{artifact_key(doc.stem)[6:]}"
        )
    plots = sorted(p for p in stage_dir.rglob("*") if p.suffix in PLOT_SUFFIXES)
    if plots:
        lines = [f"# {result.stage} plots", ""] + [inline_image(p) for p in plots]
        create_markdown_artifact("\n\n".join(lines), key=artifact_key(result.stage) + "-plots")


def inline_image(path: Path) -> str:
    """Markdown showing a PNG in the UI (a data URI: an http page cannot open file://); big ones as a path."""
    data = path.read_bytes()
    if len(data) > MAX_INLINE_BYTES:
        return f"- `{path}` ({len(data) // 1024} KiB, too large to embed)"
    return f"**{path.name}**\n\n![{path.name}](data:image/png;base64,{base64.b64encode(data).decode()})"


@task(cache_policy=NO_CACHE, persist_result=False)
def stage_task(
    stage: str, config_data: dict[str, Any], run_dir: str, force: bool = False, name: str | None = None
) -> dict[str, Any]:
    """One stage (under folder `name`, for ablation rows) through the runner, which decides if it is cached."""
    logger = get_run_logger()
    config = config_from_dict(config_data)
    result = run_stage(
        get_stage(stage),
        config,
        Path(run_dir),
        force=force,
        log=logger,
        run_id=str(flow_run.id or "local"),
        name=name,
    )
    if result.status == "ran":
        publish(result, Path(run_dir))
    return {
        "stage": result.stage,
        "status": result.status,
        "outputs": {k: v.uri for k, v in result.outputs.items()},
    }


def resolve_run_dir(config: Any, run_dir: str | None) -> str:
    return str(Path(run_dir or config.run.run_dir).resolve())


def stages_until(until: str | None) -> list[str]:
    names = stage_names()
    if until is None:
        return names
    if until not in names:
        raise ValueError(f"--until {until}: unknown stage (stages: {', '.join(names)})")
    return names[: names.index(until) + 1]


@flow(name="ecamp-pipeline")
def ecamp_pipeline(
    config_path: str = "configs/demo.yaml",
    run_dir: str | None = None,
    until: str | None = None,
    overrides: list[str] | None = None,
    force: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Every registered stage in order; finished stages with unchanged inputs and config are skipped."""
    config = load_config(config_path, overrides)
    target = resolve_run_dir(config, run_dir)
    data = config.model_dump(mode="json")
    summaries = []
    with run_lock(Path(target)):  # held across stages: no other run slips in between two of them
        for stage in stages_until(until):
            for row in ablations_for(stage, config):  # e.g. the MIM-only encoder that `evaluate` compares
                summaries.append(
                    ablation_row_task("7", row, config_path, overrides, target, force=stage in (force or []))
                )
            run = stage_task.with_options(name=stage, task_run_name=stage)
            summaries.append(run(stage, data, target, force=stage in (force or [])))
    return summaries


def ablations_for(stage: str, config: Any) -> list[str]:
    """Ablation rows (of table 7) a stage reads as initializations; they run just before it."""
    if stage != "evaluate":
        return []
    return [init for init in config.evaluate.inits if init == "mim_only"]


def ablation_row_task(
    table: str, row: str, config_path: str, overrides: list[str] | None, run_dir: str, force: bool = False
) -> dict[str, Any]:
    """`pretrain_ecamp` with the overrides of one ablation row, under the folder `pretrain_ecamp__<row>`."""
    from tasks.pretrain_ecamp import STAGE, ablation_rows

    row_overrides = ablation_rows(table, [row])[row]
    data = load_config(config_path, [*(overrides or []), *row_overrides]).model_dump(mode="json")
    name = variant_name(STAGE.name, row)
    return stage_task.with_options(name=name, task_run_name=name)(
        STAGE.name, data, run_dir, force=force, name=name
    )


@flow(name="ecamp-stage")
def ecamp_stage(
    stage: str,
    config_path: str = "configs/demo.yaml",
    run_dir: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Exactly one stage, reading its upstream artifacts from the run directory (e.g. to rerun a failed one)."""
    config = load_config(config_path, overrides)
    get_stage(stage)
    run = stage_task.with_options(name=stage, task_run_name=stage)
    return run(stage, config.model_dump(mode="json"), resolve_run_dir(config, run_dir), force=force)


@flow(name="ecamp-ablations")
def ecamp_ablations(
    table: str,
    config_path: str = "configs/demo.yaml",
    run_dir: str | None = None,
    rows: list[str] | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Pre-train one encoder per row of a paper ablation table (7, 8 or 9) on the run's upstream artifacts."""
    from tasks.pretrain_ecamp import ablation_rows

    target = resolve_run_dir(
        load_config(config_path, overrides), run_dir
    )  # rows change pretrain_ecamp.* only
    return [
        ablation_row_task(table, row, config_path, overrides, target, force=force)
        for row in ablation_rows(table, rows)
    ]
