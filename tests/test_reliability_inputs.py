"""Inputs and what the CLI may write (issue 26, points 4-6): changed images are seen, the demo generator never
deletes a user's edits, and nothing is written outside the run directory or generated that the run will not
read."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import flows.cli
from flows.cli import app
from tasks.config import load_config
from tasks.inputs import prepare_inputs

from .conftest import REPO_ROOT

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
EMPTY_RUN_DIR = "error: --run-dir is empty; name a run directory (e.g. runs/default, or . on purpose)\n"


@pytest.fixture
def no_flow(monkeypatch) -> list[dict]:
    """The CLI up to the flow: the flow itself (a Prefect server, the stages) is recorded, not run."""
    calls: list[dict] = []
    monkeypatch.setattr(flows.cli, "_run_flow", lambda flow, **kwargs: calls.append(kwargs) or [])
    return calls


# ------------------------------------------------------------------------------- 6. writes outside the run


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "-c", DEMO, "--until", "extract_reports"],
        ["stage", "extract_reports", "-c", DEMO],
        ["demo", "--until", "extract_reports"],
        ["evaluate", "-c", DEMO],
        ["catalog", "rebuild"],
    ],
)
def test_an_empty_run_dir_option_is_refused_and_nothing_is_written(tmp_path, monkeypatch, no_flow, argv):
    """`--run-dir ""` became Path("."): artifacts, catalog.duckdb and .lock landed in the working directory."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*argv, "--run-dir", ""])
    assert result.exit_code == 2, result.output
    assert result.output == EMPTY_RUN_DIR
    assert list(tmp_path.iterdir()) == [] and no_flow == []


def test_a_manifest_run_generates_no_demo_corpus(tmp_path, monkeypatch, no_flow):
    """demo.yaml says data.generate: true; with data.source=manifest data.root is never read, so the CLI (and
    the pipeline's own input step) must not write the 400-study corpus into ./demo_data."""
    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "m.csv"
    manifest.write_text("study_id,image_path,report_text\n")
    sets = ["--set", "data.source=manifest", "--set", f"data.manifest={manifest}"]
    result = CliRunner().invoke(app, ["run", "-c", DEMO, *sets, "--until", "extract_reports"])
    assert result.exit_code == 0, result.output
    assert len(no_flow) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]
    said: list[str] = []
    config = load_config(DEMO, ["data.source=manifest", f"data.manifest={manifest}"])
    prepare_inputs(config, said.append, ["extract_reports"], regenerate=True)
    assert said == [] and sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]


def test_demo_until_extract_reports_generates_only_the_corpus_it_reads(tmp_path, monkeypatch, no_flow):
    """`ecamp demo --until extract_reports` also built the 3,000-study downstream set that only evaluate reads."""
    monkeypatch.chdir(tmp_path)
    sets = ["--set", "data.root=corpus", "--set", "synth.n_studies=4", "--set", "synth.image_size=64"]
    result = CliRunner().invoke(app, ["demo", *sets, "--until", "extract_reports"])
    assert result.exit_code == 0, result.output
    assert "generating the demo corpus at corpus" in result.output
    assert "downstream" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no demo_data/downstream
    assert no_flow[0]["until"] == "extract_reports"
