"""The `ecamp` CLI's own behaviour: synth, and clear errors before any work starts."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from models.checkpoints import CheckpointWriteError
from models.devices import DeviceError
from tasks.registry import stage_names

from .conftest import REPO_ROOT


def test_synth_writes_a_mimic_tree_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "corpus"
    result = CliRunner().invoke(app, ["synth", "--out", str(out), "--n", "6", "--set", "synth.image_size=64"])
    assert result.exit_code == 0, result.output
    assert (out / "mimic-cxr-2.0.0-metadata.csv.gz").exists()
    assert len(list((out / "files").rglob("s*.txt"))) == 6
    again = CliRunner().invoke(app, ["synth", "--out", str(out), "--n", "6"])
    assert again.exit_code == 2 and "error" in again.output
    forced = CliRunner().invoke(app, ["synth", "--out", str(out), "--n", "4", "--overwrite"])
    assert forced.exit_code == 0 and len(list((out / "files").rglob("s*.txt"))) == 4


def test_unknown_config_key_fails_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  root: x\n  colour: blue\n")
    result = CliRunner().invoke(app, ["run", "-c", str(bad), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "data.colour: unknown key" in result.output
    assert not (tmp_path / "run").exists()


def test_unknown_stage_is_named(tmp_path):
    result = CliRunner().invoke(app, ["stage", "nope", "-c", "configs/demo.yaml", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown stage 'nope'" in result.output


def test_ablate_rejects_unknown_table_and_row(tmp_path):
    result = CliRunner().invoke(
        app, ["ablate", "--table", "10", "-c", "configs/demo.yaml", "--run-dir", str(tmp_path)]
    )
    assert result.exit_code == 2 and "unknown ablation table '10'" in result.output
    result = CliRunner().invoke(
        app,
        ["ablate", "--table", "7", "--row", "nope", "-c", "configs/demo.yaml", "--run-dir", str(tmp_path)],
    )
    assert result.exit_code == 2 and "table 7 has no rows ['nope']" in result.output


def test_demo_refuses_a_data_root_it_did_not_generate(tmp_path):
    """Reliability #1: `ecamp demo --set data.root=<user folder>` stops before touching the folder."""
    user = tmp_path / "mimic-cxr"
    (user / "files").mkdir(parents=True)
    (user / "files" / "notes.txt").write_text("my annotations")
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            f"data.root={user}",
            "--until",
            "extract_reports",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "was not written by the corpus generator" in result.output
    assert (user / "files" / "notes.txt").read_text() == "my annotations"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mimic-cxr"]  # no run dir, no partial corpus


DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
NO_CUDA = "error: run.device is 'cuda' but torch sees no CUDA device; use run.device=cpu or auto\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "-c", "{tmp}"], "error: {tmp}: is a directory, not a config file"),
        (["run", "-c", "/dev/zero"], "error: /dev/zero: larger than 1 MiB, not a pipeline config"),
        (
            ["run", "-c", DEMO, "--set", "run.run_dir="],
            "error: " + DEMO + ": run.run_dir: Value error, is empty",
        ),
    ],
)
def test_bad_config_paths_and_an_empty_run_dir_fail_before_any_work(tmp_path, monkeypatch, argv, message):
    """Reliability #14a-c: a traceback, an OOM kill at 23 GB, and a run written into the working directory."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in argv])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(message.format(tmp=tmp_path)) and result.output.count("\n") == 1
    assert list(work.iterdir()) == []


def test_force_and_until_must_name_stages_that_run(tmp_path):
    """Reliability #14e: `ecamp run --force nosuch` used to run everything and ignore the typo."""
    base = ["run", "-c", DEMO, "--run-dir", str(tmp_path / "run")]
    stages = ", ".join(stage_names())
    result = CliRunner().invoke(app, [*base, "--force", "extract_reports", "--force", "nosuch"])
    assert result.exit_code == 2
    assert result.output == f"error: --force nosuch: unknown stage (stages: {stages})\n"
    result = CliRunner().invoke(app, [*base, "--until", "extract_report"])
    assert result.output == f"error: --until extract_report: unknown stage (stages: {stages})\n"
    result = CliRunner().invoke(app, [*base, "--until", "extract_reports", "--force", "pretrain_ecamp"])
    assert (
        result.output == "error: --force pretrain_ecamp: after --until extract_reports, so it would not run\n"
    )
    result = CliRunner().invoke(app, ["demo", "--run-dir", str(tmp_path / "run"), "--until", "nosuch"])
    assert result.exit_code == 2 and "error: --until nosuch: unknown stage" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["run", "-c", DEMO], ["stage", "extract_reports", "-c", DEMO], ["demo"]])
def test_cuda_without_cuda_is_one_line_before_anything_starts(tmp_path, monkeypatch, command):
    """Reliability #14h: checked up front, so no corpus, run directory or Prefect server is made."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [*command, "--run-dir", str(tmp_path / "run"), "--set", "run.device=cuda"]
    result = CliRunner().invoke(app, [*argv, "--set", f"data.root={tmp_path / 'corpus'}"])
    assert (result.exit_code, result.output) == (2, NO_CUDA)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "err",
    [
        DeviceError(NO_CUDA.removeprefix("error: ").strip()),
        FloatingPointError("ECAMP loss is nan at epoch 0, step 2 (non-finite: mim=nan, total=nan)"),
        CheckpointWriteError(
            "no space left on device writing checkpoint x/checkpoint.pt (torch: [enforce fail])"
        ),
    ],
)
def test_errors_a_stage_raises_are_one_line(tmp_path, monkeypatch, err):
    """A stage can still raise them mid-run (e.g. a GPU gone after the up-front check): `error: ...`, exit
    2."""

    def failing_flow(**kwargs):
        raise err

    monkeypatch.setattr("flows.pipeline.ecamp_stage", failing_flow)
    monkeypatch.setattr("flows.local_server.prefect_api", lambda say: contextlib.nullcontext())
    result = CliRunner().invoke(app, ["stage", "extract_reports", "-c", DEMO, "--run-dir", str(tmp_path)])
    assert (result.exit_code, result.output) == (2, f"error: {err}\n")


def process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie waiting for its new parent to reap it has already stopped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.2)


def answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow  # a real Prefect server in a killed CLI process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_cli_stops_its_temporary_prefect_server(tmp_path, sig):
    """Reliability #14g: the server the flows start without PREFECT_API_URL used to outlive a killed CLI."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    log_path = tmp_path / "cli.log"
    (tmp_path / "files").mkdir()  # an (empty) MIMIC tree: pre-flight passes and the CLI starts its server
    argv = [
        "run",
        "-c",
        "configs/demo.yaml",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"data.root={tmp_path}",
        "--set",
        "data.generate=false",
    ]
    with log_path.open("wb") as log:
        cli = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *argv], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
        )
    server: dict[str, str] = {}
    try:

        def announced() -> bool:
            found = re.search(r"temporary Prefect server at (\S+) \(pid (\d+)\)", log_path.read_text())
            assert found or cli.poll() is None, log_path.read_text()  # the CLI must not end first
            if found:
                server.update(url=found[1], pid=found[2])
            return found is not None

        wait_until(
            announced, 180, "the CLI to start its server"
        )  # imports and preflight, on a loaded machine
        os.kill(cli.pid, signal.SIGSTOP)  # hold the CLI in its startup wait: the kill lands mid-command
        wait_until(lambda: answers(server["url"] + "/health"), 120, "the server to answer")
        os.kill(cli.pid, sig)
        os.kill(cli.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM once continued
        assert cli.wait(timeout=10) == -sig
        started = time.monotonic()
        wait_until(lambda: not process_alive(int(server["pid"])), 10, "the server to stop with the CLI")
        print(f"server {server['pid']} gone {time.monotonic() - started:.2f} s after the CLI's {sig.name}")
        assert not answers(server["url"] + "/health")
    finally:  # whatever happened, leave no process behind
        if cli.poll() is None:
            cli.kill()
        cli.wait(timeout=10)
        pid = int(server.get("pid", 0))
        if pid and process_alive(pid) and b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)


def test_a_server_that_does_not_start_is_one_line(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(
        "flows.local_server.server_command", lambda fd: [sys.executable, "-c", "raise SystemExit(3)"]
    )
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # even after a test started prefect_server
        result = CliRunner().invoke(app, ["stage", "extract_reports", "-c", DEMO, "--run-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert re.search(
        r"^error: the temporary Prefect server exited with code 3 before answering "
        r"http://127.0.0.1:\d+/api/health$",
        result.output.splitlines()[-1],
    ), result.output
    assert "PREFECT_API_URL" not in os.environ and list(tmp_path.iterdir()) == []


def test_a_configured_prefect_api_is_used_as_is(monkeypatch):
    from flows import local_server

    monkeypatch.setattr(local_server, "launch_server", lambda: pytest.fail("started a server"))
    checked = []
    monkeypatch.setattr(local_server, "check_answers", checked.append)  # port 9 answers nobody
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with local_server.prefect_api():
        assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:9/api"
    assert checked == ["http://127.0.0.1:9/api"]


@pytest.mark.parametrize("command", ["run", "stage", "demo", "catalog"])
def test_a_run_dir_that_is_a_file_is_one_line_and_left_alone(tmp_path, command):
    """Hostile pass: `--run-dir` naming a file gave a FileExistsError traceback from mkdir."""
    afile = tmp_path / "afile"
    afile.write_text("notes")
    argv = {
        "run": ["run", "-c", DEMO, "--until", "extract_reports"],
        "stage": ["stage", "extract_reports", "-c", DEMO],
        "demo": ["demo", "--until", "extract_reports"],
        "catalog": ["catalog", "rebuild"],
    }[command]
    result = CliRunner().invoke(app, [*argv, "--run-dir", str(afile)])
    assert result.exit_code == 2, result.output
    assert "a file, not a" in result.output and result.output.count("\n") == 1, result.output
    assert afile.read_text() == "notes"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stage", "train_gloria"], "error: train_gloria needs ['extract_reports/images', "),
        (["ablate", "--table", "9"], "error: ablation table 9 needs ['extract_reports/images', "),
    ],
)
def test_a_stage_before_its_upstream_is_one_line_before_any_flow(tmp_path, argv, message):
    """Hostile pass: the error came after Prefect's traceback of the failed flow; now it comes first and
    alone."""
    result = CliRunner().invoke(app, [*argv, "-c", DEMO, "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(message) and result.output.count("\n") == 1, result.output
    assert "run extract_reports, match_entities first" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv", [["run", "-c", DEMO], ["stage", "match_entities", "-c", DEMO], ["catalog", "rebuild"]]
)
def test_a_busy_run_dir_is_one_line_naming_the_holder_before_any_flow(tmp_path, argv):
    """Hostile pass: a second `ecamp run` on a busy run dir ended in a RunDirectoryBusy traceback (exit 1)."""
    from tests.test_runner import hold_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_lock(run_dir)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(app, [*argv, "--run-dir", str(run_dir)])
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: run directory {run_dir} is in use by pid {holder.pid}")
    assert result.output.count("\n") == 1, result.output
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


@pytest.mark.slow  # the paper config through a real Prefect server
def test_the_paper_config_without_its_mae_weights_stops_before_any_work(tmp_path):
    paper = str(REPO_ROOT / "configs" / "paper.yaml")
    run_dir = tmp_path / "run"
    gloria_random = [
        "--set",
        "train_gloria.model.image_checkpoint=random",
        "--set",
        "train_gloria.model.text_checkpoint=random",
    ]
    for argv in (
        ["run", "-c", paper, *gloria_random],
        ["stage", "pretrain_ecamp", "-c", paper],
        ["ablate", "--table", "7", "-c", paper],
    ):
        result = CliRunner().invoke(app, [*argv, "--run-dir", str(run_dir)])
        assert result.exit_code == 2, argv
        assert (
            "pretrain_ecamp.train.init_checkpoint /models/mae/mae_pretrain_vit_base.pth not found: the "
            "official runs start from MAE ImageNet ViT-B: download "
            "https://dl.fbaipublicfiles.com/mae/pretrain/"
        ) in result.output, argv
        assert result.output.startswith("error: "), argv
    assert not run_dir.exists()
    # stages before pre-training do not need the weights: the paper config reaches its (missing) MIMIC tree
    result = CliRunner().invoke(
        app,
        [
            "run",
            "-c",
            paper,
            "--run-dir",
            str(run_dir),
            "--until",
            "match_entities",
            "--set",
            f"data.root={tmp_path / 'mimic'}",
        ],
    )
    assert result.exit_code == 2 and "init_checkpoint" not in result.output
    assert str(tmp_path / "mimic") in result.output.splitlines()[-1]


def test_the_paper_config_without_gloria_s_resnet_and_clinical_bert_stops_before_any_work(tmp_path):
    """Issue 12 point 7: GLoRIA starts from ImageNet ResNet-50 and Bio_ClinicalBERT, or random by choice.
    Issue 27 point 9: every missing weight file and input is named in the first attempt, not one per
    attempt."""
    paper = str(REPO_ROOT / "configs" / "paper.yaml")
    common = ["-c", paper, "--run-dir", str(tmp_path / "run")]
    image = (
        "train_gloria.model.image_checkpoint /models/gloria/resnet50-0676ba61.pth not found: official GLoRIA "
        "starts from ImageNet ResNet-50 weights: download https://download.pytorch.org/models/"
    )
    text = (
        "train_gloria.model.text_checkpoint /models/gloria/Bio_ClinicalBERT not found: official GLoRIA "
        "starts from Bio_ClinicalBERT: download https://huggingface.co/emilyalsentzer/Bio_ClinicalBERT"
    )
    mae = "pretrain_ecamp.train.init_checkpoint /models/mae/mae_pretrain_vit_base.pth not found"
    data = "extract_reports: input not found: /data/mimic-cxr/files; set data.root"
    downstream = "evaluate: input not found: /data/downstream/ChestX-ray14, /data/downstream/CheXpert"
    result = CliRunner().invoke(app, ["run", *common])
    assert result.exit_code == 2 and result.output.startswith("error: 4 problems before any stage ran:\n")
    lines = result.output.splitlines()[1:]
    assert [
        next(i for i, line in enumerate(lines) if part in line)
        for part in (data, image, text, mae, downstream)
    ] == [
        0,
        1,
        2,
        3,
        4,
    ], result.output  # in stage order, one per line
    result = CliRunner().invoke(app, ["stage", "train_gloria", *common])
    assert result.exit_code == 2 and result.output.startswith(f"error: {image}"), result.output
    assert text in result.output  # both of GLoRIA's weights at once
    image_random = ["--set", "train_gloria.model.image_checkpoint=random"]
    result = CliRunner().invoke(app, ["stage", "train_gloria", *common, *image_random])
    assert result.exit_code == 2 and result.output.startswith(f"error: {text}"), result.output
    unset = ["--set", "train_gloria.model.text_checkpoint=null"]
    result = CliRunner().invoke(app, ["stage", "train_gloria", *common, *image_random, *unset])
    assert result.exit_code == 2 and "error: train_gloria.model.text_checkpoint is not set:" in result.output
    assert not (tmp_path / "run").exists()
