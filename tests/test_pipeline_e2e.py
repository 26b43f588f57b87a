"""The demo config end to end through the Prefect flows on a generated corpus, against a real Prefect API."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.registry import stage_names

from .conftest import REPO_ROOT

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


def test_each_stage_publishes_a_table_artifact(pipeline_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    with get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(like_="ecamp-"))
        )
    keys = {a.key for a in latest}
    assert {"ecamp-extract-reports", "ecamp-match-entities"} <= keys
    match = next(a for a in latest if a.key == "ecamp-match-entities")
    assert "entity_mentions" in str(match.data) and "extract_reports/reports.parquet" in str(match.data)
    plots = next(
        a for a in latest if a.key == "ecamp-match-entities-plots"
    )  # shown by the UI: no file:// link
    assert "![fig2a_entities.png](data:image/png;base64,iVBORw0KGgo" in str(plots.data)


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
    assert result.exit_code == 2 and "no stage declares an artifact 'no_such_thing'" in result.output
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
