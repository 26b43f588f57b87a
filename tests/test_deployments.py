"""prefect.yaml against a real Prefect server: deploy, then a process worker runs the single-stage deployment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

PREFECT = str(Path(sys.executable).parent / "prefect")


def prefect_cli(args: list[str], env: dict[str, str], timeout: int = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [PREFECT, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "ECAMP_HOME": str(REPO_ROOT),
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    for pool in ("ecamp-cpu", "ecamp-gpu"):
        prefect_cli(["work-pool", "create", pool, "--type", "process"], env)
    prefect_cli(["--no-prompt", "deploy", "--all"], env)
    return env


def test_deploy_all_creates_the_three_deployments(deployed):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        names = {
            f"{client.read_flow(d.flow_id).name}/{d.name}"
            for d in client.read_deployments()
            if "ecamp" in d.tags
        }
    assert names == {
        "ecamp-pipeline/full",
        "ecamp-pipeline/paper",
        "ecamp-stage/stage",
        "ecamp-stage/stage-gpu",
    }


def test_worker_runs_the_stage_deployment(deployed, small_corpus, tmp_path):
    from prefect.client.orchestration import get_client

    run_dir = tmp_path / "run"
    params = [
        "-p", "stage=extract_reports",
        "-p", "config_path=configs/demo.yaml",
        "-p", f"run_dir={run_dir}",
        "-p", "overrides=" + json.dumps([f"data.root={small_corpus}"]),
    ]  # fmt: skip
    created = prefect_cli(["deployment", "run", "ecamp-stage/stage", *params], deployed)
    assert "Created flow run" in created.stdout
    prefect_cli(["worker", "start", "--pool", "ecamp-cpu", "--run-once"], deployed, timeout=400)
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if r.parameters.get("run_dir") == str(run_dir)]
    assert len(runs) == 1 and runs[0].state.is_completed(), runs[0].state
    assert (run_dir / "extract_reports" / "reports.parquet").exists()
