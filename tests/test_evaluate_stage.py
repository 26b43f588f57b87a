"""Stage 8 end to end on a tiny generated downstream corpus: rows, table, plot, lineage hash, cache, `ecamp
report`."""

from __future__ import annotations

import hashlib

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from models.ecamp.export import export_encoder
from models.ecamp.model import ECAMP
from models.evaluate.report import plot_results, results_table
from models.resources import CONFIG_DIR
from models.synth.corpus import SynthConfig, generate_corpus
from tasks.config import load_config
from tasks.registry import get_stage
from tasks.runner import run_stage
from tests.test_eval_heads import TINY

DEMO = CONFIG_DIR / "demo.yaml"
FIT = "{epochs: 1, batch_size: 16, min_steps: 2, warmup_epochs: 0}"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    corpus = root / "downstream"
    generate_corpus(
        SynthConfig(
            n_studies=40,
            image_size=64,
            seed=3,
            p_abnormal=0.6,
            p_lateral=0.0,
            frac_validate=0.25,
            frac_test=0.25,
        ),
        corpus,
    )
    torch.manual_seed(0)
    encoder = export_encoder(ECAMP(TINY), root / "tiny_ecamp.safetensors")
    datasets = ", ".join(
        f"{{name: syn-{t[:3]}, kind: synth, task: {t}, path: {corpus}}}"
        for t in ("classification", "segmentation", "detection")
    )
    overrides = [
        f"evaluate.inits=[pixels, random, {encoder}]",
        f"evaluate.datasets=[{datasets}]",
        "evaluate.fractions=[10, 100]",
        "evaluate.seeds=[0, 1]",
        f"evaluate.protocol.finetune={FIT}",
        f"evaluate.protocol.linear_probe={FIT}",
        f"evaluate.protocol.segmentation={{head: {{channels: [8, 8, 8]}}, fit: {FIT}}}",
        f"evaluate.protocol.detection={{head: {{channels: [8, 8, 8]}}, fit: {FIT}}}",
        "run.device=cpu",
    ]
    config = load_config(DEMO, overrides)
    run_dir = root / "run"
    result = run_stage(get_stage("evaluate"), config, run_dir)
    return {
        "config": config,
        "run_dir": run_dir,
        "encoder": encoder,
        "result": result,
        "overrides": overrides,
    }


def test_every_protocol_init_fraction_and_seed_gives_one_row(evaluated):
    assert evaluated["result"].status == "ran"
    rows = pq.read_table(evaluated["run_dir"] / "evaluate" / "eval_results.parquet").to_pylist()
    assert (
        len(rows) == 4 * 3 * 2 * 2
    )  # finetune, linear probe, segmentation, detection x inits x fractions x seeds
    assert {r["task"] for r in rows} == {"finetune", "linear_probe", "segmentation", "detection"}
    assert {(r["task"], r["metric"]) for r in rows} == {
        ("finetune", "auc"),
        ("linear_probe", "auc"),
        ("segmentation", "dice"),
        ("detection", "map"),
    }
    assert {r["init"] for r in rows} == {"pixels", "random", "tiny_ecamp"}
    assert all(0.0 <= r["value"] <= 1.0 for r in rows)
    digest = hashlib.sha256(evaluated["encoder"].read_bytes()).hexdigest()
    assert {r["checkpoint_hash"] for r in rows if r["init"] == "tiny_ecamp"} == {digest}
    assert {r["checkpoint_hash"] for r in rows if r["init"] == "random"} == {"random"}
    assert {r["checkpoint_hash"] for r in rows if r["init"] == "pixels"} == {"pixels"}
    assert {r["task"] for r in rows if r["init"] == "pixels"} == {
        "finetune",
        "linear_probe",
        "segmentation",
        "detection",
    }
    n_train = {(r["dataset"], r["fraction"]) for r in rows}
    sizes = {(r["dataset"], r["fraction"]): r["n_train"] for r in rows}
    assert all(sizes[(d, 10)] < sizes[(d, 100)] for d, _ in n_train)


def test_the_table_and_plot_are_written_and_the_rerun_is_cached(evaluated):
    stage_dir = evaluated["run_dir"] / "evaluate"
    table = (stage_dir / "RESULTS.md").read_text()
    assert "### Classification, fine-tuned — AUC (%, mean ± std over seeds)" in table
    assert "| init | syn-cla 10% | syn-cla 100% |" in table
    assert "| tiny_ecamp |" in table and "| random |" in table and "| pixels |" in table
    assert "pixels: a linear model on the 32×32 image, no encoder" in table
    assert (stage_dir / "eval_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_stage(get_stage("evaluate"), evaluated["config"], evaluated["run_dir"])
    assert again.status == "cached"
    result = CliRunner().invoke(app, ["report", "--run-dir", str(evaluated["run_dir"])])
    assert result.exit_code == 0 and table.strip() in result.output


def test_report_without_an_evaluation_says_what_to_run(tmp_path):
    result = CliRunner().invoke(app, ["report", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no evaluation table; run `ecamp evaluate` (or the pipeline) first" in result.output


def test_table_cells_are_mean_and_std_over_seeds_with_the_paper_beside():
    rows = [
        {
            "task": "finetune",
            "metric": "auc",
            "dataset": "cxr14",
            "init": "ecamp",
            "fraction": 1,
            "seed": s,
            "value": v,
        }
        for s, v in ((0, 0.80), (1, 0.82), (2, 0.84))
    ] + [
        {
            "task": "finetune",
            "metric": "auc",
            "dataset": "cxr14",
            "init": "random",
            "fraction": 1,
            "seed": 0,
            "value": 0.5,
        }
    ]
    table = results_table(rows, {"cxr14": "chestxray14"})
    assert "| ecamp | 82.0 ± 1.6 |" in table  # population std of 80, 82, 84 = 1.63
    assert "| random | 50.0 ± 0.0 |" in table
    assert "| ECAMP (paper) | 81.9 |" in table
    assert "ECAMP (paper)" not in results_table(rows)  # not a paper dataset: no paper row


def test_plot_has_one_panel_per_task_and_dataset_and_one_line_per_init(tmp_path):
    import numpy as np
    from PIL import Image

    def rows_of(inits):
        return [
            {
                "task": t,
                "metric": m,
                "dataset": d,
                "init": i,
                "fraction": f,
                "seed": 0,
                "value": 0.5 + 0.1 * k,
            }
            for t, m, d in (("segmentation", "dice", "seg"), ("detection", "map", "det"))
            for k, i in enumerate(inits)
            for f in (1, 10, 100)
        ]

    def count(path, colour):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        return int((pixels == colour).all(axis=-1).sum())

    blue, orange, grey = (31, 119, 180), (255, 127, 14), (115, 115, 115)  # tab:blue, tab:orange, pixels' 0.45
    with_pixels = plot_results(rows_of(["random", "ecamp", "pixels"]), tmp_path / "a.png")
    assert Image.open(with_pixels).size == (840, 360)  # two panels of 4.2 x 3.6 inches at 100 dpi
    without = plot_results(rows_of(["random", "ecamp"]), tmp_path / "b.png")
    assert (
        min(count(p, c) for p in (with_pixels, without) for c in (blue, orange)) > 100
    )  # a line per encoder
    # the pixels reference row is its own dashed grey line (text anti-aliasing alone leaves a few such pixels)
    assert count(with_pixels, grey) > 10 * max(count(without, grey), 10)


def test_evaluate_cli_names_a_missing_dataset_or_encoder_in_one_line_before_any_flow(tmp_path):
    data = tmp_path / "downstream"
    data.mkdir()
    common = ["evaluate", "-c", str(DEMO), "--run-dir", str(tmp_path / "run"), "--set", "evaluate.synth=null"]
    result = CliRunner().invoke(app, [*common, "--init", str(tmp_path / "nosuch.pth")])
    assert result.exit_code == 2
    assert result.output.startswith("error: evaluate: input not found: ") and "nosuch.pth" in result.output
    one_set = f"evaluate.datasets=[{{name: d, kind: synth, task: segmentation, path: {data}}}]"
    result = CliRunner().invoke(app, [*common, "--set", one_set, "--init", "random", "--init", "mim_only"])
    assert result.exit_code == 2
    assert result.output == (
        f"error: evaluate: init 'mim_only' needs pretrain_ecamp__mim_only/encoder.safetensors, which "
        f"{tmp_path / 'run'} has not written: run ecamp ablate --table 7 --row mim_only\n"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # spawns two worker processes
def test_datasets_in_worker_processes_give_the_same_rows_in_the_same_order(evaluated, tmp_path, caplog):
    """`evaluate.workers: 2` runs the three datasets in two processes (one torch thread each here); each run
    is seeded by itself, so the rows are those of the one-process run."""
    config = load_config(DEMO, [*evaluated["overrides"], "evaluate.workers=2"])
    with caplog.at_level("INFO"):
        run_stage(get_stage("evaluate"), config, tmp_path / "run")
    one = pq.read_table(evaluated["run_dir"] / "evaluate" / "eval_results.parquet").to_pylist()
    two = pq.read_table(tmp_path / "run" / "evaluate" / "eval_results.parquet").to_pylist()
    assert [(r["task"], r["init"], r["fraction"], r["seed"]) for r in two] == [
        (r["task"], r["init"], r["fraction"], r["seed"]) for r in one
    ]
    assert [r["value"] for r in two] == pytest.approx([r["value"] for r in one], abs=1e-5)
    assert "syn-cla, syn-seg, syn-det: in 2 worker processes" in caplog.text
    assert "syn-seg segmentation random 10% s1: dice" in caplog.text  # a worker's lines reach the stage's log
