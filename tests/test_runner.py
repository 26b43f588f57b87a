"""The stage runner and the declared interface: fingerprints, skipping, forcing, verified outputs, attempts
that fail without touching the last good run, undeclared reads and writes, the run-directory lock and the
catalog rebuild (reliability points 4-8)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import types
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, ConfigDict, Field

from data_contracts import catalog
from data_contracts.base import Row
from data_contracts.io import content_hash, read_artifact, read_info
from tasks.base import MissingUpstreamError, StageConfig, UndeclaredError
from tasks.lock import RunDirectoryBusy, run_lock
from tasks.record import read_record
from tasks.runner import check_upstream, run_stage
from tasks.stage import Stage
from tests.conftest import REPO_ROOT


class Number(Row):
    contract: ClassVar[str] = "test_number"
    value: int


class SourceConfig(StageConfig):
    n: int = 3


class DoubleConfig(StageConfig):
    factor: int = Field(2, ge=1)
    crash: bool = False
    misbehave: str = ""  # "read", "write", "file", "section": do something undeclared


def make_stages(calls: list[str]) -> tuple[Stage, Stage]:
    def run_source(ctx, cfg):
        calls.append("source")
        ctx.write("numbers", [{"value": i} for i in range(cfg.n)])

    def run_double(ctx, cfg):
        calls.append("double")
        values = ctx.read("source/numbers").column("value").to_pylist()
        ctx.write("doubled", [{"value": v * cfg.factor} for v in values])
        ctx.path("weights.bin").write_bytes(bytes([cfg.factor]) * 8)
        if cfg.crash:
            raise RuntimeError("killed after the first output")
        if cfg.misbehave == "read":
            ctx.read("source/other")
        if cfg.misbehave == "write":
            ctx.write("extra", [{"value": 1}], Number)
        if cfg.misbehave == "file":
            ctx.path("notes.txt")
        if cfg.misbehave == "section":
            return ctx.config.source
        ctx.write("count", [{"value": len(values)}])

    source = Stage(
        name="source",
        version="1",
        config=SourceConfig,
        run=run_source,
        summary="numbers",
        writes={"numbers": Number},
        sections=("data",),
        input_files=lambda c: [Path(c.data.manifest)],
    )
    double = Stage(
        name="double",
        version="1",
        config=DoubleConfig,
        run=run_double,
        summary="doubled numbers",
        reads=("source/numbers",),
        writes={"doubled": Number, "count": Number},
        files=("weights.bin",),
    )
    return source, double


class Run(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    num_threads: int | None = None


class Data(BaseModel):
    source: str = "manifest"
    manifest: str = ""


def make_config(tmp_path, n=3, factor=2, crash=False, seed=0, misbehave=""):
    manifest = tmp_path / "manifest.csv"
    if not manifest.exists():
        manifest.write_text("study_id,image_path,report_text\n")
    return types.SimpleNamespace(
        run=Run(seed=seed),
        data=Data(manifest=str(manifest)),
        source=SourceConfig(n=n),
        double=DoubleConfig(factor=factor, crash=crash, misbehave=misbehave),
    )


@pytest.fixture
def setup(tmp_path):
    calls: list[str] = []
    stages = make_stages(calls)
    run_dir = tmp_path / "run"
    log = logging.getLogger("test")

    def go(config, force=False):
        return [run_stage(s, config, run_dir, force=force, log=log) for s in stages]

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


def test_a_failed_attempt_keeps_the_last_good_run_and_its_partial_outputs_apart(setup, tmp_path):
    """Reliability #6: outputs of a failed attempt never replace the good ones, nor delete the record."""
    calls, go, run_dir = setup
    good = go(make_config(tmp_path))[1]
    before = (run_dir / "double" / "doubled.parquet").read_bytes()
    with pytest.raises(RuntimeError, match="killed"):
        go(make_config(tmp_path, factor=4, crash=True))
    record = read_record(run_dir, "double")
    assert record is not None and record.fingerprint == good.fingerprint
    assert (run_dir / "double" / "doubled.parquet").read_bytes() == before
    assert (run_dir / "double" / "weights.bin").read_bytes() == bytes([2]) * 8
    partial = pq.read_table(run_dir / "double" / ".attempt" / "doubled.parquet").column("value").to_pylist()
    assert partial == [0, 4, 8]  # kept apart, for inspection
    assert go(make_config(tmp_path))[1].status == "cached"  # the last good run is still the valid one
    results = go(make_config(tmp_path, factor=4))
    assert results[1].status == "ran" and results[1].outputs["count"].rows == 1
    assert not (run_dir / "double" / ".attempt").exists()


def test_deleted_or_edited_outputs_are_not_taken_as_cached(setup, tmp_path):
    """Reliability #4: non-Parquet outputs are hashed and checked like the Parquet ones."""
    calls, go, run_dir = setup
    go(make_config(tmp_path))
    (run_dir / "double" / "doubled.parquet").unlink()
    assert [r.status for r in go(make_config(tmp_path))] == ["cached", "ran"]
    (run_dir / "double" / "weights.bin").unlink()
    assert [r.status for r in go(make_config(tmp_path))] == ["cached", "ran"]
    (run_dir / "double" / "weights.bin").write_bytes(b"tampered")
    assert [r.status for r in go(make_config(tmp_path))] == ["cached", "ran"]
    assert (run_dir / "double" / "weights.bin").read_bytes() == bytes([2]) * 8


def test_an_edited_upstream_is_seen_and_lineage_records_what_was_read(setup, tmp_path):
    """Reliability #5: an artifact edited with pyarrow (metadata kept) is neither cached nor trusted."""
    calls, go, run_dir = setup
    go(make_config(tmp_path))
    path = run_dir / "source" / "numbers.parquet"
    table = pq.read_table(path)
    edited = pa.table({"value": [7, 8, 9]}).replace_schema_metadata(table.schema.metadata)
    pq.write_table(edited, path)
    log = logging.getLogger("test")
    _, double = make_stages(calls)
    forced = run_stage(double, make_config(tmp_path), run_dir, force=True, log=log)
    claimed = read_info(path).content_hash  # the metadata still carries the original data's hash
    actual = content_hash(read_artifact(path))
    assert actual != claimed and forced.outputs["doubled"].upstream[0].content_hash == actual
    assert pq.read_table(run_dir / "double" / "doubled.parquet").column("value").to_pylist() == [14, 16, 18]
    results = go(make_config(tmp_path))
    assert results[0].status == "ran"  # the edited artifact is not its stage's output any more
    assert pq.read_table(path).column("value").to_pylist() == [0, 1, 2]


@pytest.mark.parametrize("misbehave", ["read", "write", "file", "section"])
def test_undeclared_reads_writes_files_and_sections_are_refused(setup, tmp_path, misbehave):
    calls, go, run_dir = setup
    with pytest.raises(UndeclaredError, match="without declaring|not declared|declaring it"):
        go(make_config(tmp_path, misbehave=misbehave))
    assert read_record(run_dir, "double") is None


def test_missing_upstream_is_a_clear_error(tmp_path):
    _, double = make_stages([])
    with pytest.raises(MissingUpstreamError, match=r"double needs \['source/numbers'\].*run source first"):
        run_stage(double, make_config(tmp_path), tmp_path / "run")


def test_an_upstream_output_deleted_after_its_success_is_missing_not_read(setup, tmp_path):
    """The upstream check looks at the recorded output itself, not only at its producer's success record."""
    calls, go, run_dir = setup
    source, double = make_stages([])
    go(make_config(tmp_path))
    (run_dir / "source" / "numbers.parquet").unlink()
    for check in (
        lambda: run_stage(double, make_config(tmp_path, factor=3), run_dir),
        lambda: check_upstream(double, run_dir),  # the CLI's pre-flight
    ):
        with pytest.raises(
            MissingUpstreamError, match=r"double needs \['source/numbers'\].*run source first"
        ):
            check()


def test_a_named_run_is_a_separate_cached_stage_folder(setup, tmp_path):
    """Ablation rows run a stage under another folder name; they never overwrite or reuse the main one."""
    calls, go, run_dir = setup
    source, double = make_stages(calls)
    go(make_config(tmp_path))
    log = logging.getLogger("test")
    row = run_stage(double, make_config(tmp_path, factor=5), run_dir, log=log, name="double__x5")
    assert row.stage == "double__x5" and row.status == "ran"
    assert (run_dir / "double__x5" / "doubled.parquet").exists()
    assert read_record(run_dir, "double").fingerprint != row.fingerprint
    again = run_stage(double, make_config(tmp_path, factor=5), run_dir, log=log, name="double__x5")
    assert again.status == "cached"
    assert go(make_config(tmp_path))[1].status == "cached"


HOLD = """
import sys, time
from pathlib import Path
from tasks.lock import run_lock, RunDirectoryBusy
try:
    with run_lock(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(60)
except RunDirectoryBusy as err:
    print(err, flush=True)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    return proc


def test_one_run_per_run_directory_in_both_orders_and_a_killed_holder_frees_it(setup, tmp_path):
    """Reliability #7: a second run fails at once naming the holder; SIGKILL of the holder frees the lock."""
    calls, go, run_dir = setup
    run_dir.mkdir()
    holder = hold_lock(run_dir)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusy, match=rf"in use by pid {holder.pid} .*started 20\d\d-"):
            go(make_config(tmp_path))
        assert calls == [] and not (run_dir / "source").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
    assert [r.status for r in go(make_config(tmp_path))] == ["ran", "ran"]  # no stale lock left behind

    with run_lock(run_dir, "flow run 'brisk-owl' (1234)"):  # the other order: this process holds it
        other = hold_lock(run_dir)
        out, _ = other.communicate(timeout=60)
        assert f"in use by flow run 'brisk-owl' (1234), pid {os.getpid()}" in out and "held" not in out


def test_a_broken_or_missing_catalog_is_rebuilt_from_the_artifacts(setup, tmp_path, caplog):
    """Reliability #8: the Parquet metadata holds the lineage; the catalog is only an index of it."""
    calls, go, run_dir = setup
    go(make_config(tmp_path))
    path = catalog.catalog_path(run_dir)
    path.write_bytes(b"not a duckdb file" * 100)
    with caplog.at_level(logging.WARNING):
        results = go(make_config(tmp_path, factor=3))
    assert results[1].status == "ran" and "rebuilding it from the artifacts' metadata" in caplog.text
    assert list(run_dir.glob("catalog.duckdb.broken-*"))
    info = catalog.latest(run_dir, "doubled")
    assert info.content_hash == results[1].outputs["doubled"].content_hash
    tree = catalog.lineage_tree(run_dir, info)
    assert tree.upstream[0].info.name == "numbers"
    path.unlink()
    assert catalog.latest(run_dir, "count").rows == 1
    assert catalog.rebuild(run_dir) == 4  # numbers, doubled, count and the file output weights.bin
    weights = catalog.latest(run_dir, "double/weights.bin")
    assert weights.schema_name == "file" and weights.upstream[0].content_hash == info.upstream[0].content_hash


@pytest.mark.parametrize("damage", ["garbage", "binary", "directory"])
def test_an_unreadable_success_record_counts_as_never_run_with_a_warning(tmp_path, caplog, damage):
    """Hostile pass: a `_stage.json` that is binary or a folder crashed the runner instead of rerunning."""
    from tasks.record import RECORD, read_record

    path = tmp_path / "match_entities" / RECORD
    path.parent.mkdir(parents=True)
    if damage == "garbage":
        path.write_text("{not json")
    elif damage == "binary":
        path.write_bytes(b"\xff\xfe\x00\x81")
    else:
        path.mkdir()
    with caplog.at_level("WARNING"):
        assert read_record(tmp_path, "match_entities") is None
    assert f"{path} is unreadable" in caplog.text and "counts as never run" in caplog.text


def test_per_step_log_lines_are_gated_to_one_per_interval(tmp_path, monkeypatch):
    import tasks.base
    from tests.context import make_test_context

    clock = iter([100.0, 101.0, 109.9, 110.0, 125.0])
    monkeypatch.setattr(tasks.base.time, "monotonic", lambda: next(clock))
    due = make_test_context(tmp_path).every(seconds=10)
    assert [due() for _ in range(5)] == [True, False, False, True, True]


def test_an_artifact_copied_from_another_run_is_recorded_as_read_here(setup, tmp_path, caplog):
    """Reliability #17b: a right-schema artifact copied in from another run directory was read with the
    "changed" warning, and the lineage named the other run's file (the uri in the copy's metadata)."""
    calls, go, run_dir = setup
    go(make_config(tmp_path))
    other = tmp_path / "other"
    source, double = make_stages(calls)
    run_stage(source, make_config(tmp_path, n=5), other, log=logging.getLogger("test"))
    path, foreign = run_dir / "source" / "numbers.parquet", other / "source" / "numbers.parquet"
    path.write_bytes(foreign.read_bytes())
    with caplog.at_level(logging.WARNING):
        forced = run_stage(double, make_config(tmp_path), run_dir, force=True, log=logging.getLogger("test"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{path} is a copy of {foreign.resolve().as_uri()} (run {read_info(foreign).run_id}), not the file "
        f"its stage wrote here: lineage records it as read from {path} with the hash of its content"
    ]
    [upstream] = forced.outputs["doubled"].upstream
    assert upstream.uri == path.resolve().as_uri() != read_info(path).uri
    assert upstream.content_hash == content_hash(read_artifact(path)) == read_info(foreign).content_hash
    assert pq.read_table(run_dir / "double" / "doubled.parquet").column("value").to_pylist() == [
        0,
        2,
        4,
        6,
        8,
    ]
    assert [r.status for r in go(make_config(tmp_path))] == ["ran", "ran"]  # the copy is not source's output
