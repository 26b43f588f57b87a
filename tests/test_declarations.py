"""The declared stage interface: the README's table, stage independence, side inputs as artifacts, and the
`ecamp ablate` command end to end (architecture issue, items 2-4)."""

from __future__ import annotations

import ast
import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from models.text.entities import load_entity_list
from tasks.record import read_record
from tasks.registry import STAGE_MODULES, stage_table, stages
from tasks.stage import base_stage
from tests.conftest import REPO_ROOT
from tests.test_gloria import STAGE_CFG
from tests.test_pretrain import MODEL_SETTINGS

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
TINY_PRETRAIN = [
    *MODEL_SETTINGS,
    "pretrain_ecamp.model.vocab_size=400",
    "pretrain_ecamp.text.max_len=48",
    "pretrain_ecamp.tokenizer_min_frequency=1",
    "pretrain_ecamp.train.epochs=1",
    "pretrain_ecamp.train.batch_size=8",
    "pretrain_ecamp.train.accum_iter=1",
    "pretrain_ecamp.train.warmup_epochs=0",
    "pretrain_ecamp.train.num_workers=0",
]
TINY_GLORIA = [f"train_gloria.{k}={v}" for k, v in (STAGE_CFG | {"train.epochs": 1}).items()]


def test_readme_stage_table_is_the_declarations():
    readme = (REPO_ROOT / "README.md").read_text()
    assert stage_table() in readme, "README's stage table differs from tasks.registry.stage_table()"


def test_stages_never_import_each_other():
    for module in STAGE_MODULES:
        path = REPO_ROOT / (module.replace(".", "/") + ".py")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not imported & (set(STAGE_MODULES) - {module}), f"{module} imports another stage"


def test_every_read_is_declared_by_an_earlier_stage():
    seen: dict[str, set[str]] = {}
    for stage in stages():
        for ref in stage.reads:
            producer, name = ref.split("/", 1)
            assert name in seen.get(base_stage(producer), set()), ref  # stage__row: an ablation row
        seen[stage.name] = set(stage.outputs)


def run_until_pretrain(run_dir: Path, overrides: list[str]) -> dict[str, str]:
    from tasks.config import load_config
    from tasks.registry import get_stage
    from tasks.runner import run_stage

    config = load_config(DEMO, [*overrides, *TINY_GLORIA, *TINY_PRETRAIN, "run.device=cpu"])
    names = ("extract_reports", "match_entities", "train_gloria", "pretrain_ecamp")
    return {n: run_stage(get_stage(n), config, run_dir).status for n in names}


@pytest.mark.slow  # whole pipelines through a real Prefect server
def test_a_different_entity_list_reaches_gloria_and_pretraining(small_corpus, tmp_path):
    """Item 4: match_entities writes the lexicon it used; GLoRIA and the MLM masking read it from there."""
    run_dir = tmp_path / "run"
    base = [f"data.root={small_corpus}"]
    assert set(run_until_pretrain(run_dir, base).values()) == {"ran"}
    assert set(run_until_pretrain(run_dir, base).values()) == {"cached"}
    derived = tmp_path / "top20.txt"  # Table 8: the corpus's own top-20 list, as a user would pick it
    shutil.copy(run_dir / "match_entities" / "entity_lists" / "entities_top20.txt", derived)
    job = run_dir / "pretrain_ecamp" / "job" / "job.json"
    before = json.loads(job.read_text())["entity_words"]
    statuses = run_until_pretrain(run_dir, [*base, f"match_entities.entity_list={derived}"])
    assert statuses == {
        "extract_reports": "cached",
        "match_entities": "ran",
        "train_gloria": "ran",
        "pretrain_ecamp": "ran",
    }
    after = json.loads(job.read_text())["entity_words"]
    assert after == sorted(load_entity_list(derived).forms) and after != before
    lexicon = pq.read_table(run_dir / "match_entities" / "lexicon.parquet").to_pylist()
    assert {r["source"] for r in lexicon} == {str(derived)}
    gloria = read_record(run_dir, "train_gloria").parts["upstream"]["match_entities/lexicon"]
    assert gloria == read_record(run_dir, "match_entities").outputs["lexicon"].content_hash


@pytest.mark.slow  # whole pipelines through a real Prefect server
def test_the_encoder_carries_its_lineage_and_ecamp_lineage_answers_for_model_files(small_corpus, tmp_path):
    """Deployments issue 4: model files are cataloged like Parquet outputs; the export names what made it."""
    from models.ecamp.export import read_metadata

    run_dir = tmp_path / "run"
    assert set(run_until_pretrain(run_dir, [f"data.root={small_corpus}"]).values()) == {"ran"}
    record = read_record(run_dir, "pretrain_ecamp")
    expected = {ref: digest for ref, digest in record.parts["upstream"].items() if digest}
    lineage = json.loads(read_metadata(run_dir / "pretrain_ecamp" / "encoder.safetensors")["lineage"])
    assert "run_id" not in lineage and lineage["stage"] == "pretrain_ecamp"  # the same weights: the same file
    assert {k: v for k, v in lineage["upstream"].items() if v} == expected
    assert (
        expected["train_gloria/attention_maps"]
        == read_record(run_dir, "train_gloria").outputs["attention_maps"].content_hash
    )
    card = (run_dir / "pretrain_ecamp" / "MODEL_CARD.md").read_text()
    assert (
        "## Lineage" in card
        and f"| `train_gloria/attention_maps` | `{expected['train_gloria/attention_maps']}` |" in card
    )

    result = CliRunner().invoke(app, ["lineage", "pretrain_ecamp/encoder", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    out = result.output
    encoder = record.outputs["encoder.safetensors"].content_hash
    assert out.splitlines()[0].startswith("pretrain_ecamp/encoder.safetensors") and encoder[:12] in out
    assert "train_gloria/attention_maps" in out and "extract_reports/images" in out
    assert "mimic-cxr-2.0.0-metadata.csv.gz" in out  # down to the input files
    weights = CliRunner().invoke(app, ["lineage", "gloria.safetensors", "--run-dir", str(run_dir)])
    assert weights.exit_code == 0 and "train_gloria/gloria.safetensors" in weights.output, weights.output


@pytest.mark.slow  # whole pipelines through a real Prefect server
@pytest.mark.usefixtures("prefect_server")
def test_the_paper_config_smoke_runs_pretraining_through_the_image_cache(small_corpus, tmp_path):
    """Issue 12 acceptance: configs/paper.yaml's pre-training path (all views, paper text settings, the image
    cache) on CPU, with small sizes, through `ecamp stage` on upstream artifacts of the demo corpus."""
    run_dir = tmp_path / "run"
    run_until_pretrain(run_dir, [f"data.root={small_corpus}"])  # upstream artifacts (and a demo encoder)
    paper = str(REPO_ROOT / "configs" / "paper.yaml")
    small = [
        *TINY_PRETRAIN,
        "pretrain_ecamp.train.init_checkpoint=random",
        "pretrain_ecamp.nproc=1",
        "pretrain_ecamp.image_cache.workers=1",
        f"data.root={small_corpus}",
        "run.device=cpu",
    ]
    args = ["stage", "pretrain_ecamp", "-c", paper, "--run-dir", str(run_dir), "--force"]
    result = CliRunner().invoke(app, [*args, *(x for s in small for x in ("--set", s))])
    assert result.exit_code == 0, result.output
    stage_dir = run_dir / "pretrain_ecamp"
    trained_on = [json.loads(line) for line in (stage_dir / "job" / "records.jsonl").read_text().splitlines()]
    assert trained_on and all(Path(r["path"]).parent == stage_dir / "image_cache" for r in trained_on)
    job = json.loads((stage_dir / "job" / "job.json").read_text())
    assert job["text"]["negative_scope"] == "mention" and job["train"]["lr"] == 1.5e-4  # the paper's settings
    metrics = pq.read_table(stage_dir / "pretrain_metrics.parquet").to_pylist()
    assert metrics and all(math.isfinite(m["total"]) for m in metrics)
    assert (stage_dir / "encoder.safetensors").stat().st_size > 0


@pytest.mark.slow  # whole pipelines through a real Prefect server
@pytest.mark.usefixtures("prefect_server")
def test_ablate_runs_a_row_end_to_end_and_caches_it(small_corpus, tmp_path):
    """Item 2: `ecamp ablate` through the CLI on a finished run; a second call skips the row."""
    run_dir = tmp_path / "run"
    common = ["-c", DEMO, "--run-dir", str(run_dir), "--set", f"data.root={small_corpus}"]
    result = CliRunner().invoke(app, ["run", *common, "--until", "match_entities"])
    assert result.exit_code == 0, result.output
    tiny = [x for s in TINY_PRETRAIN for x in ("--set", s)]
    args = ["ablate", "--table", "9", "--row", "lambda_0.1", *common, *tiny]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    row = run_dir / "pretrain_ecamp__lambda_0.1"
    assert (row / "encoder.safetensors").stat().st_size > 0
    metrics = pq.read_table(row / "pretrain_metrics.parquet").to_pylist()
    assert metrics and all(math.isfinite(m["total"]) for m in metrics)
    assert "pretrain_ecamp__lambda_0.1" in first.output and "ran" in first.output
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "cached" in second.output, second.output
    assert not (run_dir / "pretrain_ecamp").exists()  # the row never touches the main stage folder


def test_no_flows_module_is_named_like_a_standard_library_module():
    """A deployment's flow run puts its entrypoint's folder (flows/) on sys.path, and a process spawned from
    it (evaluate.workers) imports with that path: flows/queue.py was imported as the standard `queue` there
    and broke multiprocessing itself. (Other packages' folders are not put on sys.path.)"""
    import sys

    ours = {p.stem for p in (REPO_ROOT / "flows").glob("*.py")}
    assert "pipeline" in ours
    assert sorted(ours & set(sys.stdlib_module_names)) == []
