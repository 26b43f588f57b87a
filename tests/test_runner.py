"""The stage runner: fingerprints, skipping, forcing, invalidation downstream, crashes never look complete."""

from __future__ import annotations

import logging
import types
from typing import ClassVar

import pytest
from pydantic import BaseModel, ConfigDict, Field

from data_contracts.base import Row
from tasks.base import MissingUpstreamError, StageConfig
from tasks.runner import read_manifest, run_stage


class Number(Row):
    contract: ClassVar[str] = "test_number"
    value: int


class SourceConfig(StageConfig):
    n: int = 3


class DoubleConfig(StageConfig):
    factor: int = Field(2, ge=1)
    crash: bool = False


def make_modules(calls: list[str]):
    def run_source(ctx, cfg):
        calls.append("source")
        ctx.write("numbers", [{"value": i} for i in range(cfg.n)], Number)

    def run_double(ctx, cfg):
        calls.append("double")
        values = ctx.read("source/numbers").column("value").to_pylist()
        ctx.write("doubled", [{"value": v * cfg.factor} for v in values], Number)
        if cfg.crash:
            raise RuntimeError("killed after the first output")
        ctx.write("count", [{"value": len(values)}], Number)

    source = types.SimpleNamespace(
        NAME="source", CODE_VERSION="1", UPSTREAM=[], Config=SourceConfig, run=run_source
    )
    double = types.SimpleNamespace(
        NAME="double", CODE_VERSION="1", UPSTREAM=["source/numbers"], Config=DoubleConfig, run=run_double
    )
    return source, double


class Run(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    num_threads: int | None = None


class Data(BaseModel):
    source: str = "manifest"
    manifest: str = ""


def make_config(tmp_path, n=3, factor=2, crash=False, seed=0):
    manifest = tmp_path / "manifest.csv"
    if not manifest.exists():
        manifest.write_text("study_id,image_path,report_text\n")
    return types.SimpleNamespace(
        run=Run(seed=seed),
        data=Data(manifest=str(manifest)),
        source=SourceConfig(n=n),
        double=DoubleConfig(factor=factor, crash=crash),
    )


@pytest.fixture
def setup(tmp_path):
    calls: list[str] = []
    source, double = make_modules(calls)
    run_dir = tmp_path / "run"
    log = logging.getLogger("test")

    def go(config, force=False):
        return [run_stage(m, config, run_dir, force=force, log=log) for m in (source, double)]

    return calls, go, run_dir


def test_second_run_is_cached_and_force_recomputes(setup, tmp_path):
    calls, go, run_dir = setup
    first = go(make_config(tmp_path))
    assert [r.status for r in first] == ["ran", "ran"] and calls == ["source", "double"]
    second = go(make_config(tmp_path))
    assert [r.status for r in second] == ["cached", "cached"] and calls == ["source", "double"]
    assert second[1].outputs["doubled"].content_hash == first[1].outputs["doubled"].content_hash
    go(make_config(tmp_path), force=True)
    assert calls == ["source", "double", "source", "double"]


def test_config_change_reruns_only_that_stage(setup, tmp_path):
    calls, go, run_dir = setup
    go(make_config(tmp_path))
    results = go(make_config(tmp_path, factor=3))
    assert [r.status for r in results] == ["cached", "ran"] and calls == ["source", "double", "double"]


def test_upstream_change_reruns_downstream_and_lineage_points_at_new_version(setup, tmp_path):
    calls, go, run_dir = setup
    go(make_config(tmp_path))
    results = go(make_config(tmp_path, n=5))
    assert [r.status for r in results] == ["ran", "ran"]
    doubled = results[1].outputs["doubled"]
    assert doubled.rows == 5
    assert [u.content_hash for u in doubled.upstream] == [results[0].outputs["numbers"].content_hash]


def test_input_file_change_reruns_the_first_stage(setup, tmp_path):
    calls, go, run_dir = setup
    go(make_config(tmp_path))
    (tmp_path / "manifest.csv").write_text("study_id,image_path,report_text\ns1,a.png,No effusion.\n")
    results = go(make_config(tmp_path))
    assert results[0].status == "ran"
    assert results[1].status == "cached"  # same numbers came out, so the downstream stage stays valid
    assert results[0].outputs["numbers"].upstream[0].uri.endswith("manifest.csv")


def test_crash_mid_stage_leaves_no_success_record_and_reruns(setup, tmp_path):
    calls, go, run_dir = setup
    go(make_config(tmp_path))
    with pytest.raises(RuntimeError, match="killed"):
        go(make_config(tmp_path, factor=4, crash=True))
    assert read_manifest(run_dir, "double") is None
    results = go(make_config(tmp_path, factor=4))
    assert results[1].status == "ran" and results[1].outputs["count"].rows == 1


def test_tampered_output_is_not_taken_as_cached(setup, tmp_path):
    calls, go, run_dir = setup
    go(make_config(tmp_path))
    (run_dir / "double" / "doubled.parquet").unlink()
    assert [r.status for r in go(make_config(tmp_path))] == ["cached", "ran"]


def test_missing_upstream_is_a_clear_error(tmp_path):
    _, double = make_modules([])
    with pytest.raises(MissingUpstreamError, match="needs 'source/numbers'.*run stage 'source' first"):
        run_stage(double, make_config(tmp_path), tmp_path / "run")


def test_a_named_run_is_a_separate_cached_stage_folder(setup, tmp_path):
    """Ablation rows run a stage under another folder name; they never overwrite or reuse the main one."""
    calls, go, run_dir = setup
    source, double = make_modules(calls)
    go(make_config(tmp_path))
    log = logging.getLogger("test")
    row = run_stage(double, make_config(tmp_path, factor=5), run_dir, log=log, name="double__x5")
    assert row.stage == "double__x5" and row.status == "ran"
    assert (run_dir / "double__x5" / "doubled.parquet").exists()
    assert read_manifest(run_dir, "double")["fingerprint"] != row.fingerprint
    again = run_stage(double, make_config(tmp_path, factor=5), run_dir, log=log, name="double__x5")
    assert again.status == "cached"
    assert go(make_config(tmp_path))[1].status == "cached"
