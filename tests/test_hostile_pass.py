"""Issue 26, round 2: the failures the hostile pass over every `ecamp` command found (docs/hostile-pass-2.md).

Each test reproduces the input from its row there and asserts the one-line error (or the refused config) that
replaced a traceback, a mid-run crash naming no setting, or results silently replaced by an empty table.
"""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import ConfigError, load_config
from tests.test_one_line_errors import DEMO, extracted, folder_bytes, one_line_error, stage_argv

# ------------------------------------------------------------------------------------------ config at load


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.seed=-1", "run.seed: Input should be greater than or equal to 0 (got -1)"),
        ("run.seed=1180591620717411303424", "run.seed: Input should be less than or equal to 4294967295"),
        ("synth.seed=-1", "synth.seed: Input should be greater than or equal to 0 (got -1)"),
        ("evaluate.seeds=[-3]", "evaluate.seeds.0: Input should be greater than or equal to 0 (got -3)"),
        (
            "pretrain_ecamp.train.seed=-2",
            "pretrain_ecamp.train.seed: Input should be greater than or equal to 0",
        ),
        (
            "run.num_threads=100000",
            "run.num_threads: Input should be less than or equal to 1024 (got 100000)",
        ),
    ],
)
def test_a_bad_seed_or_thread_count_is_a_config_error_naming_its_key(override, message):
    """Seeds were accepted, then failed minutes in (numpy: "expected non-negative integer", torch: "Overflow
    when unpacking long long") naming no setting; 100,000 torch threads exhausted memory and hung the
    command."""
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert message in str(err.value)
    assert load_config(DEMO, ["run.seed=4294967295"]).run.seed == 4294967295


@pytest.mark.parametrize("key", ["seeds", "fractions", "protocols"])
def test_an_empty_evaluation_grid_is_refused(key):
    """`evaluate.seeds=[]` ran, evaluated nothing and replaced the last RESULTS.md with "no results"."""
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [f"evaluate.{key}=[]"])
    assert f"evaluate.{key}: List should have at least 1 item after validation, not 0 (got [])" in str(
        err.value
    )


# ------------------------------------------------------------------------------------------ before any flow


def test_evaluate_accepts_pixels_and_refuses_a_folder_as_a_checkpoint_in_one_line(tmp_path, console):
    """`ecamp evaluate` with the default inits (or `--init pixels`) treated `pixels` as a checkpoint path and
    crashed with a traceback ("checkpoint pixels does not exist"); a folder given as `--init` did too."""
    data = tmp_path / "downstream"
    data.mkdir()
    folder = tmp_path / "weights.pth"
    folder.mkdir()
    one_set = f"evaluate.datasets=[{{name: d, kind: synth, task: segmentation, path: {data}}}]"
    common = ["evaluate", "-c", DEMO, "--run-dir", tmp_path / "run", "--set", "evaluate.synth=null"]
    common += ["--set", one_set, "--init", "pixels"]
    line = one_line_error([*common, "--init", "mim_only"], console)
    assert line == (
        f"error: evaluate: init 'mim_only' needs pretrain_ecamp__mim_only/encoder.safetensors, which "
        f"{tmp_path / 'run'} has not written: run ecamp ablate --table 7 --row mim_only"
    )
    assert (
        one_line_error([*common, "--init", folder], console)
        == f"error: {folder} is a folder, not a weights file"
    )
    assert not (tmp_path / "run").exists()


def test_a_run_dir_that_cannot_be_created_or_locked_is_one_line(tmp_path, console):
    """A read-only run directory (or one under a file) was an OSError traceback from the lock."""
    blocker = tmp_path / "a_file"
    blocker.write_text("mine\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(blocker / "lock")  # opening it fails: its folder is a file (ENOTDIR)
    line = one_line_error(["catalog", "rebuild", "--run-dir", run_dir], console)
    assert line == (
        f"error: cannot create {run_dir / '.lock'} (Not a directory): the run directory must be writable; "
        "choose another --run-dir or fix its permissions"
    )
    from tasks.lock import RunDirectoryNotWritable, run_lock

    with pytest.raises(RunDirectoryNotWritable, match=r"cannot create .*a_file/sub \(Not a directory\)"):
        with run_lock(blocker / "sub"):
            pass
    assert blocker.read_text() == "mine\n"


def test_report_of_a_results_file_that_is_not_text_is_one_line(tmp_path, console):
    table = tmp_path / "run" / "evaluate" / "RESULTS.md"
    table.parent.mkdir(parents=True)
    table.write_bytes(b"# ok\n\xff\xfe binary")
    line = one_line_error(["report", "--run-dir", tmp_path / "run"], console)
    assert line == f"error: {table}: not the evaluation table (not UTF-8 text: invalid start byte at byte 5)"


def test_synth_out_empty_is_refused_and_out_dot_writes_the_working_directory(tmp_path, console, monkeypatch):
    """`--out ""` was the working directory; `--out .` failed saying an empty folder was "not empty" (the
    partial corpus was made inside it)."""
    monkeypatch.chdir(tmp_path)
    line = one_line_error(["synth", "--out", "", "--n", "2"], console)
    assert line == "error: --out is empty; name the folder to write the corpus to (or . on purpose)"
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(app, ["synth", "--out", ".", "--n", "2", "--set", "synth.image_size=64"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / ".ecamp-synth.json").is_file() and (tmp_path / "files").is_dir()


# ------------------------------------------------------------------------------------------ inside a flow


@pytest.mark.parametrize("kind", ["stage folder a file", "attempt a file", "attempt a link"])
def test_a_stage_folder_or_attempt_folder_that_is_not_a_folder_is_refused_and_kept(
    tmp_path, console, prefect_server, small_corpus, kind
):
    """Was a NotADirectoryError / FileExistsError traceback; an `.attempt` link would have received the
    attempt's outputs wherever it pointed."""
    run_dir = tmp_path / "run"
    extracted(run_dir, small_corpus)
    folder = run_dir / "extract_reports"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if kind == "stage folder a file":
        shutil.rmtree(folder)
        folder.write_text("mine\n")
        path, found, what = folder, "a file", "the stage's folder"
    else:
        path, found, what = folder / ".attempt", "a file or a link", "the stage's attempt folder"
        path.write_text("mine\n") if kind == "attempt a file" else path.symlink_to(elsewhere)
    before = folder_bytes(folder) if folder.is_dir() else folder.read_bytes()
    argv = stage_argv("extract_reports", run_dir, f"data.root={small_corpus}", force=True)
    line = one_line_error(argv, console)
    assert line == (
        f"error: {path} is {found}, not {what}: move it away and run again (nothing in the run directory was "
        f"changed)"
    )
    assert (folder_bytes(folder) if folder.is_dir() else folder.read_bytes()) == before
    assert list(elsewhere.iterdir()) == []


@pytest.mark.slow  # two interpreters importing torch, transformers and Prefect: 15 s
def test_python_m_flows_pipeline_is_the_ecamp_command_line(tmp_path):
    """`python -m flows.pipeline` imported the flows and exited 0 having run nothing, whatever its
    arguments."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = [sys.executable, "-m", "flows.pipeline"]
    helped = subprocess.run(
        [*run, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert helped.returncode == 0 and "catalog" in helped.stdout and "evaluate" in helped.stdout
    failed = subprocess.run(
        [*run, "run", "-c", "nosuch.yaml"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert (failed.returncode, failed.stderr) == (2, "error: nosuch.yaml: config file not found\n")
    assert list(tmp_path.iterdir()) == []
