"""The pieces the deployments build on, one by one: which errors are retried, which stages retry and which
go to the GPU pool, the lock handed to a GPU run, the GPU hand-off's errors, and the missing-input hint."""

from __future__ import annotations

import errno
import os
import signal
import types
from pathlib import Path

import httpx
import openai
import pytest

from flows.gpu_pool import GpuHandoff, GpuPoolError, check_deployment, wait_for_pickup
from flows.pipeline import gpu_handoff, stage_options, with_gpu_pool
from flows.retry import is_transient, transient_failure
from tasks.config import load_config
from tasks.lock import RunDirectoryBusy, handed_over, run_lock
from tasks.registry import get_stage, stages
from tasks.runner import run_stage

from .conftest import REPO_ROOT
from .test_runner import hold_lock

REQUEST = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")


def status_error(cls: type[openai.APIStatusError], code: int) -> openai.APIStatusError:
    return cls("boom", response=httpx.Response(code, request=REQUEST), body=None)


def caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (openai.APIConnectionError(request=REQUEST), True),
        (openai.APITimeoutError(request=REQUEST), True),
        (status_error(openai.RateLimitError, 429), True),
        (status_error(openai.InternalServerError, 503), True),
        (status_error(openai.BadRequestError, 400), False),  # a wrong model name fails again
        (status_error(openai.AuthenticationError, 401), False),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (OSError(errno.EIO, "I/O error"), True),  # a network file system's hiccup
        (TimeoutError("read timed out"), True),
        (FileNotFoundError(errno.ENOENT, "missing"), False),
        (PermissionError(errno.EACCES, "denied"), False),
        (OSError(errno.ENOSPC, "disk full"), False),
        (ValueError("bad config"), False),
        (RuntimeError("loss is NaN at step 3"), False),
        (caused(RuntimeError("teacher failed"), openai.APIConnectionError(request=REQUEST)), True),
        (caused(RuntimeError("teacher failed"), ValueError("bad answer")), False),
    ],
)
def test_only_transient_errors_are_retried(error, transient):
    assert is_transient(error) is transient


def test_the_retry_condition_reads_the_failed_state():
    def state(error: BaseException | None):
        def result():
            if error is not None:
                raise error
            return 1

        return types.SimpleNamespace(result=result)

    assert transient_failure(None, None, state(ConnectionResetError("reset"))) is True
    assert transient_failure(None, None, state(ValueError("bad"))) is False
    assert transient_failure(None, None, state(None)) is False


def test_llm_and_file_system_stages_retry_and_gpu_stages_are_marked():
    declared = stages()
    assert {s.name for s in declared if s.retries} == {"extract_reports", "seed_distill", "bulk_distill"}
    assert {s.name for s in declared if s.gpu} == {
        "finetune_student",
        "bulk_distill",
        "train_gloria",
        "pretrain_ecamp",
        "evaluate",
    }
    options = stage_options(get_stage("seed_distill"), "seed_distill")
    assert options["retries"] == 2 and options["retry_condition_fn"] is transient_failure
    assert options["retry_delay_seconds"](2) == [10, 20]  # exponential backoff
    plain = stage_options(get_stage("match_entities"), "match_entities")
    assert plain == {"name": "match_entities", "task_run_name": "match_entities"}


def test_prefect_retries_a_transient_failure_and_not_a_deterministic_one(prefect_server):
    from prefect import flow, task

    attempts: dict[str, int] = {"transient": 0, "deterministic": 0}

    @task
    def flaky(kind: str) -> str:
        attempts[kind] += 1
        if kind == "transient" and attempts[kind] < 3:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        if kind == "deterministic":
            raise ValueError("seed_distill.n_reports must be positive")
        return "done"

    @flow
    def both() -> list:
        results = []
        for kind in attempts:
            options = stage_options(get_stage("seed_distill"), kind) | {"retry_delay_seconds": 0}
            results.append(flaky.with_options(**options)(kind, return_state=True))
        return results

    transient, deterministic = both()
    assert transient.is_completed() and transient.result() == "done" and attempts["transient"] == 3
    assert deterministic.is_failed() and attempts["deterministic"] == 1
    with pytest.raises(ValueError, match="n_reports must be positive"):
        deterministic.result()


def test_the_lock_is_handed_to_the_gpu_run_and_taken_back(tmp_path):
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        with handed_over(run_dir):  # the GPU stage's process takes it while the pipeline waits
            other = hold_lock(run_dir)
            try:
                assert other.stdout.readline().strip() == "held"
                with pytest.raises(RunDirectoryBusy):  # a third run may not take it back from under it
                    with run_lock(run_dir):
                        pass
            finally:
                os.kill(other.pid, signal.SIGKILL)
                other.wait(10)
        refused = hold_lock(run_dir)  # the pipeline holds it again
        out, _ = refused.communicate(timeout=60)
        assert f"in use by pid {os.getpid()}" in out
    last = hold_lock(run_dir)  # released at the end
    try:
        assert last.stdout.readline().strip() == "held"
    finally:
        os.kill(last.pid, signal.SIGKILL)
        last.wait(10)


class FakeClient:
    """The few client calls the GPU hand-off makes, answering as a server whose run no worker picks up."""

    def __init__(self, pool: str | None = "ecamp-gpu"):
        from prefect.client.schemas.objects import StateType

        self.pool, self.cancelled = pool, []
        self.waiting = types.SimpleNamespace(state=types.SimpleNamespace(type=StateType.SCHEDULED))

    def read_deployment_by_name(self, name: str):
        from prefect.exceptions import ObjectNotFound

        if self.pool is None:
            raise ObjectNotFound(None)
        return types.SimpleNamespace(work_pool_name=self.pool)

    def read_flow_run(self, run_id):
        return self.waiting

    def set_flow_run_state(self, run_id, state, force=False):
        self.cancelled.append((run_id, state.type.value, force))


HANDOFF = GpuHandoff("ecamp-stage/stage-gpu", "ecamp-gpu", timeout_s=0.3)


def test_a_gpu_run_nobody_picks_up_is_cancelled_with_what_to_do(monkeypatch):
    monkeypatch.setattr("flows.gpu_pool.POLL_S", 0.05)
    client = FakeClient()
    with pytest.raises(GpuPoolError) as err:
        wait_for_pickup(client, "run-1", HANDOFF, "train_gloria")
    assert str(err.value) == (
        "train_gloria: no worker of pool 'ecamp-gpu' picked up its run within 0.3 s "
        "(run.gpu_pickup_timeout_s): "
        "start one with `prefect worker start --pool ecamp-gpu`, or unset run.gpu_pool to run GPU stages in "
        "the pipeline's own process"
    )
    assert client.cancelled == [("run-1", "CANCELLED", True)]


def test_a_missing_or_misplaced_gpu_deployment_is_an_error_before_any_run():
    with pytest.raises(
        GpuPoolError, match=r"deployment 'ecamp-stage/stage-gpu' does not exist: run `prefect"
    ):
        check_deployment(FakeClient(pool=None), HANDOFF)
    with pytest.raises(GpuPoolError, match="runs on pool 'ecamp-cpu', not run.gpu_pool 'ecamp-gpu'"):
        check_deployment(FakeClient(pool="ecamp-cpu"), HANDOFF)
    check_deployment(FakeClient(), HANDOFF)


def test_a_missing_corpus_says_which_setting_to_change(tmp_path):
    config = load_config(REPO_ROOT / "configs" / "paper.yaml", [f"data.root={tmp_path / 'mimic-cxr'}"])
    with pytest.raises(FileNotFoundError) as err:
        run_stage(get_stage("extract_reports"), config, tmp_path / "run")
    message = str(err.value)
    assert message.startswith("extract_reports: input not found: ") and str(tmp_path / "mimic-cxr") in message
    assert message.endswith(
        "; set data.root (the MIMIC-CXR(-JPG) root holding files/ and the CSVs) or data.manifest "
        "(ecamp --set KEY=VALUE, or the deployment's overrides)"
    )
    assert not Path(tmp_path / "run" / "extract_reports").exists()


def test_the_deployments_gpu_routing_survives_a_runs_own_overrides():
    import yaml

    deployments = {
        d["name"]: d for d in yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    }
    for name in ("full", "paper"):
        params = deployments[name]["parameters"]
        assert params["gpu_pool"] == "ecamp-gpu", name
        assert not any("gpu_pool" in o for o in params.get("overrides", [])), name
    # what `prefect deployment run 'ecamp-pipeline/full' -p 'overrides=[...]'` hands the flow
    overrides = with_gpu_pool("ecamp-gpu", ["match_entities.plot_top_n=20"])
    config = load_config(REPO_ROOT / "configs" / "demo.yaml", overrides)
    assert config.run.gpu_pool == "ecamp-gpu" and config.match_entities.plot_top_n == 20
    handoff = gpu_handoff(
        get_stage("pretrain_ecamp"), config, "configs/demo.yaml", overrides, "runs/x", False
    )
    assert handoff is not None and handoff.pool == "ecamp-gpu"
    assert handoff.parameters["overrides"] == ["run.gpu_pool=ecamp-gpu", "match_entities.plot_top_n=20"]
    # an explicit override of the pool still wins; no gpu_pool keeps the caller's overrides as they are
    explicit = load_config(
        REPO_ROOT / "configs" / "demo.yaml", with_gpu_pool("ecamp-gpu", ["run.gpu_pool=other"])
    )
    assert explicit.run.gpu_pool == "other"
    assert with_gpu_pool(None, ["a.b=1"]) == ["a.b=1"] and with_gpu_pool("", None) is None


def test_the_flows_stage_parameter_type_lists_the_registry_in_order_and_every_parameter_is_described():
    from typing import get_args

    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import StageName, ecamp_ablations, ecamp_pipeline, ecamp_stage
    from tasks.registry import stage_names

    assert list(get_args(StageName)) == list(stage_names())
    for flow in (ecamp_pipeline, ecamp_stage, ecamp_ablations):
        props = parameter_schema(flow.fn).model_dump()["properties"]
        assert all(spec.get("description") for spec in props.values()), flow.name
    assert parameter_schema(ecamp_stage.fn).model_dump()["properties"]["stage"]["enum"] == list(stage_names())


def test_the_lineage_picture_puts_each_artifact_right_of_everything_it_was_made_from():
    """Issue 27 item 8: the graph is a PNG the UI renders; columns are the longest chain of inputs behind a
    node."""
    from flows.lineage_graph import depths, draw_lineage, order_by_parents

    edges = [
        ("files", "reports"),
        ("files", "images"),
        ("reports", "mentions"),
        ("images", "encoder"),
        ("mentions", "encoder"),
        ("encoder", "results"),
    ]
    nodes = ["files", "reports", "images", "mentions", "encoder", "results"]
    assert depths(nodes, edges) == {
        "files": 0,
        "reports": 1,
        "images": 1,
        "mentions": 2,
        "encoder": 3,
        "results": 4,
    }
    columns = {0: ["a", "b"], 1: ["y", "x"]}
    order_by_parents(columns, [("a", "x"), ("b", "y")])
    assert columns[1] == ["x", "y"]  # x's input is above y's: fewer crossings
    png = draw_lineage({n: f"{n}\n0123456789ab" for n in nodes}, edges)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000


def test_a_known_errors_traceback_goes_to_debug_and_a_bugs_stays_an_error(caplog):
    """Issue 27 item 2: Prefect logs a failed run's exception once more on its way out; for an error the user
    can fix that record is lowered to DEBUG (its one-line cause is already an ERROR), a bug's keeps ERROR."""
    import logging
    import sys

    from flows.logs import KnownErrorsAtDebug

    def record(error: BaseException) -> logging.LogRecord:
        try:
            raise error
        except BaseException:
            return logging.LogRecord(
                "prefect.flow_runs", logging.ERROR, __file__, 1, "exited", None, sys.exc_info()
            )

    known, bug = record(FileNotFoundError("data.root missing")), record(ZeroDivisionError("a bug"))
    run_logger = logging.getLogger("prefect.flow_runs")
    before = run_logger.level
    try:
        run_logger.setLevel(logging.INFO)
        assert not KnownErrorsAtDebug().filter(known)  # lowered to DEBUG, which is not logged at INFO
        assert (known.levelno, known.levelname) == (logging.DEBUG, "DEBUG")
        assert KnownErrorsAtDebug().filter(bug) and (bug.levelno, bug.levelname) == (logging.ERROR, "ERROR")
        run_logger.setLevel(logging.DEBUG)
        assert KnownErrorsAtDebug().filter(record(FileNotFoundError("x")))  # kept where DEBUG is logged
    finally:
        run_logger.setLevel(before)
