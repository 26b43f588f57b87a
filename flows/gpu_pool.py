"""Handing a GPU stage to the GPU work pool: a run of the `stage-gpu` deployment, waited for.

The pipeline runs on the CPU pool; a stage marked `gpu` runs as a sub-run of `ecamp-stage/stage-gpu` (pool
`run.gpu_pool`) when the config names that pool. The run directory must be on storage both workers see;
the pipeline lets go of its lock while the sub-run holds it. A sub-run nobody picks up is cancelled after
`run.gpu_pickup_timeout_s` with a message saying which worker to start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled

from tasks.lock import handed_over
from tasks.record import read_record
from tasks.runner import StageResult

POLL_S = 0.5  # a hand-off's end is noticed within half a second: one cheap read of the run's state
WAITING = (StateType.SCHEDULED, StateType.PENDING)


class GpuPoolError(RuntimeError):
    """The GPU stage could not be handed over, was not picked up, or its run on the GPU pool failed."""


@dataclass
class GpuHandoff:
    deployment: str  # flow/name, e.g. ecamp-stage/stage-gpu
    pool: str
    timeout_s: float
    parameters: dict[str, Any] = field(default_factory=dict)


def unlinked(value: Any) -> Any:
    """`value` with every string a new object (lists and dicts copied).

    Prefect draws a sub-run's input edges from its parameters: any one that is, by `id`, part of an earlier
    task's result links to that task. Stage names are interned strings that each stage's summary holds, so the
    MIM-only row's `stage: pretrain_ecamp` drew an edge from the pretrain_ecamp task, though the row reads
    only what pre-training reads. A sub-run's data lineage is its parent task's edges; its own draw nothing.
    """
    if isinstance(value, str):
        return value.encode().decode()  # decoding makes a new str; copy() and slicing return the same one
    if isinstance(value, list):
        return [unlinked(v) for v in value]
    if isinstance(value, dict):
        return {k: unlinked(v) for k, v in value.items()}
    return value


def check_deployment(client: Any, handoff: GpuHandoff) -> None:
    """The deployment exists and serves the configured pool: a typo must not leave a run waiting forever."""
    try:
        deployment = client.read_deployment_by_name(handoff.deployment)
    except ObjectNotFound:
        raise GpuPoolError(
            f"run.gpu_pool is {handoff.pool!r} but deployment {handoff.deployment!r} does not exist: "
            "run `prefect --no-prompt deploy --all`, or unset run.gpu_pool to run every stage here"
        ) from None
    if deployment.work_pool_name != handoff.pool:
        raise GpuPoolError(
            f"deployment {handoff.deployment!r} runs on pool {deployment.work_pool_name!r}, "
            f"not run.gpu_pool {handoff.pool!r}"
        )


def wait_for_pickup(client: Any, run_id: Any, handoff: GpuHandoff, name: str) -> None:
    """Block until a worker starts the run; cancel it and fail with what to do when none does in time."""
    deadline = time.monotonic() + handoff.timeout_s
    while (state := client.read_flow_run(run_id).state) is not None and state.type in WAITING:
        if time.monotonic() > deadline:
            client.set_flow_run_state(run_id, Cancelled(message="no GPU worker picked it up"), force=True)
            raise GpuPoolError(
                f"{name}: no worker of pool {handoff.pool!r} picked up its run within {handoff.timeout_s:g} "
                f"s (run.gpu_pickup_timeout_s): start one with `prefect worker start --pool {handoff.pool}`, "
                f"or unset run.gpu_pool to run GPU stages in the pipeline's own process"
            )
        time.sleep(POLL_S)


def wait_for_end(client: Any, run_id: Any) -> Any:
    while not (state := client.read_flow_run(run_id).state).is_final():
        time.sleep(POLL_S)
    return state


def run_on_gpu_pool(
    handoff: GpuHandoff, name: str, run_dir: Path, log: logging.Logger | logging.LoggerAdapter
) -> StageResult:
    """Run stage `name` as a sub-run of the GPU deployment, wait for it, and read what it left in the run
    directory; its failure is this stage's failure, with the sub-run's message."""
    before = read_record(run_dir, name)
    with get_client(sync_client=True) as client:
        check_deployment(client, handoff)
        with handed_over(run_dir):
            child = run_deployment(handoff.deployment, parameters=unlinked(handoff.parameters), timeout=0)
            log.info(
                "%s: handed to %s on pool %s as run %s", name, handoff.deployment, handoff.pool, child.name
            )
            wait_for_pickup(client, child.id, handoff, name)
            state = wait_for_end(client, child.id)
    if not state.is_completed():
        raise GpuPoolError(
            f"{name}: its run {child.name} on pool {handoff.pool} ended {state.name}: {state.message}"
        )
    record = read_record(run_dir, name)
    if record is None:
        raise GpuPoolError(f"{name}: run {child.name} completed but left no success record in {run_dir}")
    ran = before is None or record.finished_at != before.finished_at
    outputs = record.artifact_infos()
    return StageResult(name, "ran" if ran else "cached", record.fingerprint, outputs, record.seconds)


STAGE_OF_GROUPS = "bulk_distill"


def shard_groups(stage: str, config: Any) -> int:
    """How many shard groups a stage hands to the GPU pool: `bulk_distill.workers` above 1, else none."""
    workers = config.bulk_distill.workers
    return workers if stage == STAGE_OF_GROUPS and workers > 1 else 0


def run_groups_on_gpu_pool(
    handoff: GpuHandoff,
    config: Any,
    run_dir: Path,
    name: str,
    run_id: str,
    log: logging.Logger | logging.LoggerAdapter,
    n_groups: int,
) -> None:
    """bulk_distill's `n_groups` shard groups (`shard_groups`), planned here, then the ones with shards left
    handed to the GPU pool as sub-runs all at once, and waited for. Groups beyond the pool's free slots wait
    their turn: only the first must be picked up within the timeout. A failed group fails the stage once the
    others have ended, so their shards are kept for the rerun."""
    from tasks.bulk_distill import pending_groups  # here: it imports transformers

    groups = pending_groups(config, run_dir, log, run_id, n_groups)
    if not groups:
        return
    with get_client(sync_client=True) as client:
        check_deployment(client, handoff)
        children = []
        for group in groups:
            parameters = {**handoff.parameters, "shard_group": f"{group}/{n_groups}"}
            child = run_deployment(handoff.deployment, parameters=unlinked(parameters), timeout=0)
            log.info(
                "%s: shard group %d/%d handed to pool %s as run %s",
                name,
                group,
                n_groups,
                handoff.pool,
                child.name,
            )
            children.append((group, child))
        wait_for_pickup(client, children[0][1].id, handoff, f"{name} shard group {groups[0]}/{n_groups}")
        ended = [(group, child, wait_for_end(client, child.id)) for group, child in children]
    failed = [
        f"group {g}/{n_groups} (run {c.name}) ended {s.name}: {s.message}"
        for g, c, s in ended
        if not s.is_completed()
    ]
    if failed:
        raise GpuPoolError(
            f"{name}: {'; '.join(failed)}; the other groups' shards are kept, and a rerun distils only the "
            f"missing ones"
        )
