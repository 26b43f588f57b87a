"""Prefect flows: the full pipeline, one stage, ablation rows. Wiring only; the stages live in `tasks/`.

Skipping finished stages is the runner's job (fingerprints of upstream hashes + config + code), not
Prefect's result cache: it needs no result storage shared between workers and survives a new server. Each
stage task receives exactly its upstream stages' results, so the run graph draws the real data lineage; a
cached stage ends in a Completed state named `Cached`, and a stage before a resume's `from_stage` (taken as
it is, not compared) in one named `Taken`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff
from prefect.utilities.annotations import quote

from flows.gpu_pool import (
    STAGE_OF_GROUPS,
    GpuHandoff,
    run_groups_on_gpu_pool,
    run_on_gpu_pool,
    shard_groups,
)
from flows.logs import failed_in_one_line, forward_stage_logs, known_errors, quiet_known_tracebacks
from flows.publish import publish_lineage, publish_stage
from flows.retry import is_transient, transient_failure
from flows.run_queue import run_dir_slot, this_flow_run
from tasks.config import config_from_dict, load_config
from tasks.inputs import prepare_inputs
from tasks.lock import run_lock
from tasks.registry import STAGE_MODULES, get_stage, stage_names
from tasks.runner import current_result, preflight, reused_result, run_stage
from tasks.stage import Stage, split_ref, variant_name

quiet_known_tracebacks()  # a failed run's known error: one ERROR line, its traceback at DEBUG

# The stage names in pipeline order, read from tasks.registry's module list (each stage is named after its
# module, checked by a test) without importing the stages: typed so that the deployments' parameter forms
# offer a choice and the server refuses an unknown name before a run exists.
StageName = Literal[tuple(module.rsplit(".", 1)[1] for module in STAGE_MODULES)]


@task(cache_policy=NO_CACHE, persist_result=False)
def stage_task(
    stage: str,
    config_data: dict[str, Any],
    run_dir: str,
    upstream: dict[str, Any] | None = None,
    force: bool = False,
    name: str | None = None,
    reuse: bool = False,
    handoff: GpuHandoff | None = None,
) -> dict[str, Any] | State:
    """One stage (under folder `name`, for ablation rows): run here through the runner, handed to the GPU
    pool (`handoff`), or, before a resume's `from_stage`, its last success taken as it is (`reuse`).
    `upstream` carries the upstream stages' results only so that the run graph draws their edges; callers
    pass every other argument quoted: Prefect links an argument to any earlier task whose result holds the
    same object (a stage name string in a summary), which drew edges the data does not have."""
    logger = get_run_logger()
    try:
        return one_stage(logger, stage, config_data, run_dir, force, name or stage, reuse, handoff)
    except known_errors() as err:
        if is_transient(err):
            raise  # Prefect retries it (stage_options)
        return failed_in_one_line(logger, err, where=name or stage)


def one_stage(
    logger: Any,
    stage: str,
    config_data: dict[str, Any],
    run_dir: str,
    force: bool,
    name: str,
    reuse: bool,
    handoff: GpuHandoff | None,
) -> dict[str, Any] | State:
    """The body of `stage_task`: its summary, in a state named `Cached` or `Taken` when it did not run."""
    with forward_stage_logs(logger):
        config = config_from_dict(config_data)
        handed = False
        if reuse:
            result = reused_result(name, Path(run_dir))
            logger.info("%s: taken as it is from %s (resuming from a later stage)", name, run_dir)
        else:
            to_gpu = handoff is not None and (
                force or not current_result(get_stage(stage), config, Path(run_dir), name)
            )
            if to_gpu and (n_groups := shard_groups(stage, config)):  # bulk_distill over several GPU workers
                run_groups_on_gpu_pool(handoff, config, Path(run_dir), name, run_id(), logger, n_groups)
                to_gpu = False  # every shard is done: the stage, run here, only merges them
            if to_gpu:
                result, handed = run_on_gpu_pool(handoff, name, Path(run_dir), logger), True
            else:  # a cached GPU stage, a merge, or a CPU stage: here
                result = run_stage(
                    get_stage(stage),
                    config,
                    Path(run_dir),
                    force=force,
                    log=logger,
                    run_id=run_id(),
                    name=name,
                )
        # a handed-over stage published in full from its own run on the GPU pool; its manifest is shown here
        # too
        publish_stage(name, result.status, Path(run_dir), manifest_only=handed)
    summary = {
        "stage": name,
        "status": result.status,
        "fingerprint": result.fingerprint,
        "outputs": {k: v.uri for k, v in result.outputs.items()},
    }
    if result.status == "cached":
        return Completed(name="Cached", data=summary, message=f"fingerprint {result.fingerprint} unchanged")
    if result.status == "taken":
        return Completed(
            name="Taken",
            data=summary,
            message="taken as it is for a resume from a later stage: outputs intact, inputs and config not "
            "compared",
        )
    return summary


def run_id() -> str:
    return str(flow_run.id or "local")


def stage_options(stage: Stage, name: str) -> dict[str, Any]:
    """Task options: names for the UI, and retries with backoff for the stages that talk to an LLM endpoint or
    a file system (only on transient errors; a deterministic error fails at once)."""
    options: dict[str, Any] = {"name": name, "task_run_name": name}
    if stage.retries:
        options |= {
            "retries": stage.retries,
            "retry_delay_seconds": exponential_backoff(backoff_factor=10),
            "retry_condition_fn": transient_failure,
        }
    return options


@task(
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_condition_fn=transient_failure,
)
def prepare_inputs_task(config_data: dict[str, Any], stages: list[str]) -> None:
    """The generated corpora the config asks for and `stages` read (the demo corpus, synth evaluation sets),
    made when absent."""
    logger = get_run_logger()
    prepare_inputs(config_from_dict(config_data), logger.info, stages)


def resolve_run_dir(config: Any, run_dir: str | None) -> str:
    return str(Path(run_dir or config.run.run_dir).resolve())


def stage_window(from_stage: str | None, until: str | None) -> tuple[list[str], int]:
    """The stages up to `until`, and the index of `from_stage` among them (0 when None)."""
    names = stage_names()
    for flag, name in (("from_stage", from_stage), ("until", until)):
        if name is not None and name not in names:
            raise ValueError(f"{flag} {name}: unknown stage (stages: {', '.join(names)})")
    last = names.index(until) if until else len(names) - 1
    first = names.index(from_stage) if from_stage else 0
    if first > last:
        raise ValueError(f"from_stage {from_stage} comes after until {until}: nothing to run")
    return names[: last + 1], first


def upstream_of(stage: Stage, states: dict[str, State]) -> dict[str, State]:
    """The states of the stages `stage` reads from (run graph edges), among those this flow run has.

    Their data replaced by an `Edge`: Prefect walks a task's arguments down into every object and links any
    it has seen in an earlier task's result by its `id`, so the summary strings inside a state (`"ran"`)
    drew edges to whichever stage had returned the same string last."""
    producers = dict.fromkeys(split_ref(ref)[0] for ref in stage.reads)
    return {p: states[p].model_copy(update={"data": Edge(p)}) for p in producers if p in states}


class Edge:
    """What a stage task receives for an upstream stage: its name. A plain object, so Prefect neither walks
    into it nor mistakes it (by `id`) for another task's result."""

    def __init__(self, stage: str):
        self.stage = stage


def gpu_handoff(
    stage: Stage, config: Any, config_path: str, overrides: list[str] | None, run_dir: str, force: bool
) -> GpuHandoff | None:
    """How to run a GPU stage on the GPU pool, when the config names one."""
    if not (stage.gpu and config.run.gpu_pool):
        return None
    return GpuHandoff(
        deployment=config.run.gpu_deployment,
        pool=config.run.gpu_pool,
        timeout_s=config.run.gpu_pickup_timeout_s,
        parameters={
            "stage": stage.name,
            "config_path": config_path,
            "run_dir": run_dir,
            "overrides": list(overrides or []),
            "force": force,
        },
    )


@flow(name="ecamp-pipeline")
def ecamp_pipeline(
    config_path: str = "configs/demo.yaml",
    run_dir: str | None = None,
    until: StageName | None = None,
    overrides: list[str] | None = None,
    force: list[StageName] | None = None,
    from_stage: StageName | None = None,
    gpu_pool: str | None = None,
) -> list[dict[str, Any]]:
    """Every stage in order; finished stages with unchanged inputs and config are skipped.

    Args:
        config_path: Pipeline YAML config, relative to the checkout (configs/demo.yaml, configs/paper.yaml).
        run_dir: Run directory; empty = the config's run.run_dir. Must be on storage every worker sees.
        until: Last stage to run; empty = all eight.
        overrides: Config fields to change, each "section.field=value" (e.g. "data.root=/data/mimic-cxr").
        force: Stages to recompute even when their inputs and config are unchanged.
        from_stage: Resume: earlier stages are taken as they are in the run directory, this one and every
        later
            one are recomputed.
        gpu_pool: Work pool of the GPU stages (run.gpu_pool), kept apart from overrides so that a run's own
            overrides keep it; empty = every stage in this flow run's process.
    """
    current = None  # the stage a failure comes from, for the run's state message
    try:
        overrides = with_gpu_pool(gpu_pool, overrides)
        config = load_config(config_path, overrides)
        names, first = stage_window(from_stage, until)
        preflight(config, names[first:])
        data = config.model_dump(mode="json")
        prepare_inputs_task(quote(data), quote(names[first:]))
        target = resolve_run_dir(config, run_dir)
        states: dict[str, State] = {}
        summaries = []
        # the slot queues a second run of this run directory; the lock, held across stages, keeps others out
        with run_dir_slot(target, get_run_logger()), run_lock(Path(target), this_flow_run()):
            for i, name in enumerate(names):
                current, stage = name, get_stage(name)
                reuse = i < first
                forced = name in (force or []) or (from_stage is not None and not reuse)
                for row in ablations_for(name, config):  # e.g. the MIM-only encoder that `evaluate` compares
                    state = ablation_row_task(
                        "7", row, config_path, overrides, target, force=forced, reuse=reuse, states=states
                    )
                    states[state.result()["stage"]] = state
                    summaries.append(state.result())
                handoff = (
                    None if reuse else gpu_handoff(stage, config, config_path, overrides, target, forced)
                )
                state = stage_task.with_options(**stage_options(stage, name))(
                    quote(name),
                    quote(data),
                    quote(target),
                    upstream_of(stage, states),
                    force=forced,
                    reuse=reuse,
                    handoff=quote(handoff),
                    return_state=True,
                )
                states[name] = state
                summaries.append(state.result())  # a failed stage fails the flow here, with its error
        publish_lineage(Path(target), summaries)
        return summaries
    except known_errors() as err:
        return failed_in_one_line(get_run_logger(), err, where=current)


def with_gpu_pool(gpu_pool: str | None, overrides: list[str] | None) -> list[str] | None:
    """`run.gpu_pool=<pool>` ahead of the user's overrides (a later override of the same key wins)."""
    if not gpu_pool:
        return overrides
    return [f"run.gpu_pool={gpu_pool}", *(overrides or [])]


def ablations_for(stage: str, config: Any) -> list[str]:
    """Ablation rows (of table 7) a stage reads as initializations; they run just before it."""
    if stage != "evaluate":
        return []
    return [init for init in config.evaluate.inits if init == "mim_only"]


def ablation_row_task(
    table: str,
    row: str,
    config_path: str,
    overrides: list[str] | None,
    run_dir: str,
    force: bool = False,
    reuse: bool = False,
    states: dict[str, State] | None = None,
) -> State:
    """`pretrain_ecamp` with the overrides of one ablation row, under the folder `pretrain_ecamp__<row>`."""
    from tasks.pretrain_ecamp import STAGE, ablation_rows

    row_overrides = [*(overrides or []), *ablation_rows(table, [row])[row]]
    config = load_config(config_path, row_overrides)
    name = variant_name(STAGE.name, row)
    handoff = None if reuse else gpu_handoff(STAGE, config, config_path, row_overrides, run_dir, force)
    if handoff is not None:
        handoff.parameters["name"] = name
    return stage_task.with_options(**stage_options(STAGE, name))(
        quote(STAGE.name),
        quote(config.model_dump(mode="json")),
        quote(run_dir),
        upstream_of(STAGE, states or {}),
        force=force,
        name=quote(name),
        reuse=reuse,
        handoff=quote(handoff),
        return_state=True,
    )


@flow(name="ecamp-stage")
def ecamp_stage(
    stage: StageName,
    config_path: str = "configs/demo.yaml",
    run_dir: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    name: str | None = None,
    shard_group: str | None = None,
) -> dict[str, Any]:
    """Exactly one stage, reading its upstream artifacts from the run directory (e.g. to rerun a failed one,
    or a GPU stage the pipeline hands to the GPU pool).

    Args:
        stage: The stage to run.
        config_path: Pipeline YAML config, relative to the checkout.
        run_dir: Run directory; empty = the config's run.run_dir.
        overrides: Config fields to change, each "section.field=value".
        force: Recompute even when inputs and config are unchanged.
        name: Folder of an ablation row (pretrain_ecamp__<row>) instead of the stage's own.
        shard_group: bulk_distill only, "i/N": distil shard group i of N into the stage's shard folder and
            merge nothing (the pipeline hands these out under bulk_distill.workers).
    """
    try:
        config = load_config(config_path, overrides)
        if shard_group is not None:
            group, n_groups = parse_group(stage, shard_group)
            target = resolve_run_dir(config, run_dir)
            run = shard_group_task.with_options(**stage_options(get_stage(stage), f"{stage} {shard_group}"))
            return run(quote(config.model_dump(mode="json")), quote(target), group, n_groups)
        declared = get_stage(stage)
        preflight(config, [stage])
        run = stage_task.with_options(**stage_options(declared, name or stage))
        state = run(
            stage,
            quote(config.model_dump(mode="json")),
            resolve_run_dir(config, run_dir),
            force=force,
            name=name,
            return_state=True,
        )
        return state.result()
    except known_errors() as err:
        return failed_in_one_line(get_run_logger(), err, where=name or stage)


def parse_group(stage: str, shard_group: str) -> tuple[int, int]:
    """'i/N' with 0 <= i < N, for bulk_distill; anything else is an error naming the parameter."""
    parts = shard_group.split("/")
    if stage != STAGE_OF_GROUPS or len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(
            f"shard_group {shard_group!r}: expected 'i/N' (e.g. '0/2') with stage {STAGE_OF_GROUPS}"
        )
    group, n_groups = int(parts[0]), int(parts[1])
    if not 0 <= group < n_groups:
        raise ValueError(f"shard_group {shard_group!r}: group {group} is not one of 0..{n_groups - 1}")
    return group, n_groups


@task(cache_policy=NO_CACHE, persist_result=False)
def shard_group_task(config_data: dict[str, Any], run_dir: str, group: int, n_groups: int) -> dict[str, Any]:
    """One bulk_distill shard group on this worker; retried like the stage on transient errors (its finished
    shards are kept)."""
    from tasks.bulk_distill import run_group  # here: it imports transformers

    logger = get_run_logger()
    with forward_stage_logs(logger):
        done = run_group(config_from_dict(config_data), Path(run_dir), logger, run_id(), group, n_groups)
    return {"stage": STAGE_OF_GROUPS, "shard_group": f"{group}/{n_groups}", "shards_distilled": done}


@flow(name="ecamp-ablations")
def ecamp_ablations(
    table: Literal["7", "8", "9"],
    config_path: str = "configs/demo.yaml",
    run_dir: str | None = None,
    rows: list[str] | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Pre-train one encoder per row of a paper ablation table on the run's upstream artifacts.

    Args:
        table: Paper table: 7 (components), 8 (text composition) or 9 (lambda_neg).
        config_path: Pipeline YAML config, relative to the checkout.
        run_dir: Run directory; empty = the config's run.run_dir.
        rows: Rows to run; empty = every row of the table.
        overrides: Config fields to change, each "section.field=value".
        force: Recompute rows even when cached.
    """
    try:
        from tasks.pretrain_ecamp import ablation_rows

        target = resolve_run_dir(
            load_config(config_path, overrides), run_dir
        )  # rows change pretrain_ecamp.* only
        with run_dir_slot(target, get_run_logger()):
            return [
                ablation_row_task(table, row, config_path, overrides, target, force=force).result()
                for row in ablation_rows(table, rows)
            ]
    except known_errors() as err:
        return failed_in_one_line(get_run_logger(), err)


if __name__ == "__main__":  # `python -m flows.pipeline ...`: the `ecamp` commands, rather than a silent no-op
    from flows.cli import app

    app()
