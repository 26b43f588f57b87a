"""The `ecamp` CLI's own behaviour: synth, and clear errors before any work starts."""

from __future__ import annotations

from typer.testing import CliRunner

from flows.cli import app


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
