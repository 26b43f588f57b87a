"""Inputs and what the CLI may write (issue 26, points 4-6): changed images are seen, the demo generator never
deletes a user's edits, and nothing is written outside the run directory or generated that the run will not
read."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

import flows.cli
from flows.cli import app
from models.synth.corpus import MARKER, CorpusFolderError, SynthConfig, generate_corpus
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


# ------------------------------------------------------------------------------- 5. the generator's deletes


def test_regenerating_the_demo_corpus_keeps_a_users_edits_and_folders(tmp_path, monkeypatch, no_flow):
    """`ecamp demo` with another synth config replaced a generated corpus wholesale: a report the user had
    edited and a folder they had added were deleted. Both are now a refusal, and nothing is touched."""
    monkeypatch.chdir(tmp_path)
    base = ["demo", "--until", "extract_reports", "--set", "data.root=corpus", "--set", "synth.image_size=64"]
    assert CliRunner().invoke(app, [*base, "--set", "synth.n_studies=3"]).exit_code == 0
    corpus = tmp_path / "corpus"
    report = sorted((corpus / "files").rglob("s*.txt"))[0]
    rel = report.relative_to(corpus).as_posix()
    report.write_text(report.read_text() + "\nADDENDUM: my correction.\n")
    (corpus / "my_labels").mkdir()

    result = CliRunner().invoke(app, [*base, "--set", "synth.n_studies=4"])
    assert result.exit_code == 2, result.output
    assert result.output == (
        "error: corpus holds a generated corpus plus files the generator did not write (my_labels/): "
        "refusing to replace it. Move those files away or choose another folder.\n"
    )
    (corpus / "my_labels").rmdir()
    result = CliRunner().invoke(app, [*base, "--set", "synth.n_studies=4"])
    assert result.exit_code == 2, result.output
    assert result.output == (
        f"error: corpus holds a generated corpus with files edited since it was written ({rel}): "
        "refusing to replace it. Move the corpus away or choose another folder.\n"
    )
    assert report.read_text().endswith("ADDENDUM: my correction.\n")
    assert len(list((corpus / "files").rglob("s*.txt"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no partial or moved-aside folder
    assert len(no_flow) == 1  # only the first, successful demo reached the flow


def test_an_unedited_corpus_is_still_replaced_and_an_old_marker_is_refused(tmp_path):
    """The refusal is about the user's files only: the generator's own corpus, even with files deleted,
    is replaced; a marker without hashes (an older generator's) cannot show edits and is refused."""
    small = SynthConfig(n_studies=2, image_size=64)
    corpus = tmp_path / "corpus"
    generate_corpus(small, corpus)
    marker = json.loads((corpus / MARKER).read_text())
    assert {"files", "downstream", "downstream/masks"} <= set(marker["folders"])
    assert (
        marker["files"]["summary.json"] == hashlib.sha256((corpus / "summary.json").read_bytes()).hexdigest()
    )
    (corpus / "summary.json").unlink()
    assert generate_corpus(small.model_copy(update={"n_studies": 3}), corpus, overwrite=True).n_studies == 3

    marker = json.loads((corpus / MARKER).read_text())
    (corpus / MARKER).write_text(json.dumps({**marker, "files": sorted(marker["files"])}))
    with pytest.raises(CorpusFolderError) as err:
        generate_corpus(small, corpus, overwrite=True)
    assert str(err.value) == (
        f"{corpus} was generated by an older corpus generator whose {MARKER} has no file hashes, so edits to "
        "it cannot be told apart: refusing to replace it. Move it away or delete it yourself."
    )
    assert len(list((corpus / "files").rglob("s*.txt"))) == 3
