"""Calling a stage's `run` directly in tests, without the runner or Prefect, through the same context.

`run_direct` does what the runner does around `run` (begin the attempt, commit its outputs with a success
record) minus the fingerprint; `seed_artifact` plants an upstream artifact as if its stage had written it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from data_contracts import files
from data_contracts.io import Lineage, write_artifact
from tasks.base import StageContext
from tasks.record import OutputRecord, SuccessRecord, output_path, read_record, write_record
from tasks.registry import get_stage
from tasks.stage import split_ref


def make_test_context(run_dir: Path, config: Any = None, stage: str = "extract_reports") -> StageContext:
    """A context for the registered stage `stage`, its attempt begun; `config` defaults to the defaults."""
    if config is None:
        from tasks.config import load_config

        config = load_config(None)
    ctx = StageContext(
        run_dir=Path(run_dir), stage=get_stage(stage), config=config, log=logging.getLogger(f"ecamp.{stage}")
    )
    ctx.begin()
    return ctx


def run_direct(ctx: StageContext, cfg: Any, **kwargs: Any) -> StageContext:
    """The stage's `run` on `ctx` in a fresh attempt, then the commit that puts its outputs under their
    final names."""
    ctx.begin()
    ctx.stage.run(ctx, cfg, **kwargs)
    ctx.commit("test", {}, 0.0)
    return ctx


def seed_artifact(run_dir: Path, ref: str, data: Any) -> Path:
    """Write `stage/name` with its declared contract and list it in that stage's success record."""
    stage_name, name = split_ref(ref)
    contract = get_stage(stage_name).writes[name]
    path = output_path(run_dir, stage_name, name, "parquet")
    info = write_artifact(path, data, contract, Lineage(stage_name, "test", "", "test"))
    record = read_record(run_dir, stage_name) or SuccessRecord(stage_name, "test", {}, 0.0)
    record.outputs[name] = OutputRecord("parquet", info.content_hash, files.stamp(path), info)
    write_record(run_dir, record)
    return path


def seed_file(run_dir: Path, ref: str) -> Path:
    """List an existing file output `stage/name` (already written at its final path) in the success record."""
    stage_name, name = split_ref(ref)
    path = output_path(run_dir, stage_name, name, "file")
    record = read_record(run_dir, stage_name) or SuccessRecord(stage_name, "test", {}, 0.0)
    record.outputs[name] = OutputRecord("file", files.content_hash(path), files.stamp(path))
    write_record(run_dir, record)
    return path
