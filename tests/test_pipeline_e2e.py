"""The demo config end to end through the Prefect flows on a generated corpus, against a real Prefect API."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.record import read_record
from tasks.registry import stage_names

from .conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # whole pipelines through a real Prefect server

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def pipeline_run(prefect_server, small_corpus, tmp_path_factory):
    from flows.pipeline import ecamp_pipeline

    run_dir = tmp_path_factory.mktemp("run")
    overrides = [f"data.root={small_corpus}"]

    def go(extra: list[str] | None = None, until: str | None = "match_entities"):
        return ecamp_pipeline(
            config_path=DEMO, run_dir=str(run_dir), until=until, overrides=overrides + (extra or [])
        )

    first = go()
    return run_dir, go, first


def statuses(summaries):
    return {s["stage"]: s["status"] for s in summaries}


def test_first_run_executes_both_foundation_stages(pipeline_run):
    run_dir, _, first = pipeline_run
    assert statuses(first) == {"extract_reports": "ran", "match_entities": "ran"}
    for ref in ("extract_reports/reports", "extract_reports/images", "match_entities/entity_mentions"):
        assert (run_dir / f"{ref}.parquet").exists()
    assert (run_dir / "catalog.duckdb").exists()


def test_rerun_is_cached_and_a_config_change_reruns_only_that_stage(pipeline_run):
    _, go, _ = pipeline_run
    assert statuses(go()) == {"extract_reports": "cached", "match_entities": "cached"}
    assert statuses(go(["match_entities.matcher.post_window=4"])) == {
        "extract_reports": "cached",
        "match_entities": "ran",
    }
    assert statuses(go()) == {"extract_reports": "cached", "match_entities": "ran"}  # back to post_window 6


def latest_artifacts(prefix: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    with get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(like_=prefix))
        )
    return {a.key: a for a in latest}


def test_each_stage_publishes_its_manifest_under_a_run_scoped_key(pipeline_run):
    import json

    from flows.publish import artifact_key

    run_dir, _, _ = pipeline_run
    latest = latest_artifacts(f"ecamp-{run_dir.name}-")
    assert artifact_key(run_dir, "match_entities") == f"ecamp-{run_dir.name}-match-entities"
    assert {artifact_key(run_dir, "extract_reports"), artifact_key(run_dir, "match_entities")} <= set(latest)
    rows = json.loads(latest[artifact_key(run_dir, "match_entities")].data)
    record = read_record(run_dir, "match_entities")
    outputs = {r["artifact"]: r for r in rows if r["role"] == "output"}
    assert (
        outputs["match_entities/entity_mentions"]["content_hash"]
        == record.outputs["entity_mentions"].content_hash
    )
    assert outputs["match_entities/fig2a_entities.png"]["schema"] == "file"  # file outputs are listed too
    inputs = {r["artifact"]: r for r in rows if r["role"] == "input"}
    reports_hash = read_record(run_dir, "extract_reports").outputs["reports"].content_hash
    assert inputs["extract_reports/reports"] == inputs["extract_reports/reports"] | {
        "content_hash": reports_hash,
        "made_by": "extract_reports",
        "path": "extract_reports/reports.parquet",
    }
    assert outputs["match_entities/entity_mentions"]["path"] == "match_entities/entity_mentions.parquet"
    assert any(r["artifact"] == "input file" and r["path"].endswith("table1.txt") for r in rows)
    plots = latest[artifact_key(run_dir, "match_entities", "plots")]  # shown by the UI: no file:// link
    assert "![fig2a_entities.png](data:image/png;base64,iVBORw0KGgo" in str(plots.data)
    lineage = latest[artifact_key(run_dir, "lineage")].data
    assert (
        "![lineage.png](data:image/png;base64,iVBORw0KGgo" in lineage  # a picture the UI renders, not Mermaid
        and "flowchart" not in lineage
        and f"`match_entities/entity_mentions` sha256 `{record.outputs['entity_mentions'].content_hash}`"
        in lineage
    )


def test_cached_stages_end_cached_and_task_inputs_are_the_stage_dag(pipeline_run):
    """The run graph: each stage task's inputs are exactly its upstream stages; a skipped stage is
    `Cached`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    _, go, _ = pipeline_run
    go()
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    by_id = {t.id: t for t in tasks}
    named = {t.name: t for t in tasks}
    assert named["extract_reports"].state.name == "Cached" and named["match_entities"].state.name == "Cached"
    assert named["extract_reports"].state.is_completed()
    edges = {
        name: sorted(by_id[i.id].name for inputs in t.task_inputs.values() for i in inputs if i.id in by_id)
        for name, t in named.items()
    }
    assert edges["extract_reports"] == [] and edges["match_entities"] == ["extract_reports"]


def test_lineage_cli_prints_chain_down_to_input_files(pipeline_run, small_corpus):
    run_dir, _, _ = pipeline_run
    result = CliRunner().invoke(app, ["lineage", "entity_mentions", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "match_entities/entity_mentions" in out
    assert "extract_reports/reports" in out
    assert "input" in out and "mimic-cxr-2.0.0-metadata.csv.gz" in out and "/files" in out
    assert (
        "input" in out.split("\n")[1] and "configs/entities/table1.txt" in out
    )  # the entity list is an input
    assert (
        out.index("match_entities/entity_mentions")
        < out.index("extract_reports/reports")
        < out.index("mimic-cxr-2.0.0-metadata.csv.gz")
    )


def test_lineage_of_unknown_artifact_fails_clearly(pipeline_run):
    run_dir, _, _ = pipeline_run
    result = CliRunner().invoke(app, ["lineage", "no_such_thing", "--run-dir", str(run_dir)])
    assert result.exit_code == 2 and "no stage declares an output 'no_such_thing'" in result.output
    assert "entity_mentions" in result.output  # the declared artifacts are listed
    result = CliRunner().invoke(app, ["lineage", "distilled_reports", "--run-dir", str(run_dir)])
    assert result.exit_code == 2 and "no artifact 'distilled_reports' in the catalog" in result.output


def test_single_stage_flow_reruns_one_stage(pipeline_run, small_corpus):
    from flows.pipeline import ecamp_stage

    run_dir, _, _ = pipeline_run
    summary = ecamp_stage(
        stage="match_entities",
        config_path=DEMO,
        run_dir=str(run_dir),
        overrides=[f"data.root={small_corpus}"],
        force=True,
    )
    assert summary["status"] == "ran"
    assert "match_entities" in stage_names()


def test_catalog_rebuild_cli_restores_lineage(pipeline_run):
    """Reliability #8: a deleted catalog comes back from the artifacts' own metadata."""
    run_dir, _, _ = pipeline_run
    (run_dir / "catalog.duckdb").unlink()
    result = CliRunner().invoke(app, ["catalog", "rebuild", "--run-dir", str(run_dir)])
    assert result.exit_code == 0 and "artifacts" in result.output, result.output
    lineage = CliRunner().invoke(app, ["lineage", "entity_mentions", "--run-dir", str(run_dir)])
    assert lineage.exit_code == 0 and "extract_reports/reports" in lineage.output
    missing = CliRunner().invoke(app, ["catalog", "rebuild", "--run-dir", str(run_dir / "nope")])
    assert missing.exit_code == 2 and "no such run directory" in missing.output


def test_run_from_a_stage_takes_earlier_stages_as_they_are_and_recomputes_the_rest(
    pipeline_run, small_corpus, tmp_path
):
    """Deployments issue 3: `ecamp run --from` (the flow's `from_stage`) resumes after a failure."""
    run_dir, _, _ = pipeline_run
    before = {n: read_record(run_dir, n).finished_at for n in ("extract_reports", "match_entities")}
    args = ["run", "-c", DEMO, "--run-dir", str(run_dir), "--set", f"data.root={small_corpus}"]
    result = CliRunner().invoke(app, [*args, "--from", "match_entities", "--until", "match_entities"])
    assert result.exit_code == 0, result.output
    assert read_record(run_dir, "extract_reports").finished_at == before["extract_reports"]
    assert read_record(run_dir, "match_entities").finished_at > before["match_entities"]
    assert "extract_reports    taken" in result.output and "match_entities     ran" in result.output

    empty = CliRunner().invoke(
        app, [*args[:3], "--run-dir", str(tmp_path / "new"), "--from", "match_entities"]
    )
    assert empty.exit_code == 2
    assert f"--from match_entities: extract_reports never succeeded in {tmp_path / 'new'}" in empty.output
