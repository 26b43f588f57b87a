"""Run one stage with fingerprint-based skipping; no Prefect here, so it is testable and reusable.

A stage's fingerprint is the hash of: the content hashes of the upstream outputs it declares (as they are
now on disk, not as their metadata claims), the stamps of every input file it reads (`data_contracts.stamps`:
a stat, and a content hash where size or mtime moved), its config section and the sections it declares, the
run seed, and its code version. When the fingerprint equals the one in the
stage's success record and every output the record lists still has its content, the stage is skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_contracts import files
from data_contracts.io import ArtifactInfo, Upstream
from data_contracts.stamps import STAMPS_FILE, StampTable
from tasks.base import MissingUpstreamError, StageContext
from tasks.config import section_hash, stable_hash
from tasks.lock import run_lock
from tasks.record import current_hash, read_record, verified_outputs
from tasks.stage import FileSet, Stage, split_ref


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" | "cached" (fingerprint unchanged) | "taken" (a resume's earlier stage, not compared)
    fingerprint: str
    outputs: dict[str, ArtifactInfo] = field(default_factory=dict)
    seconds: float = 0.0


def input_paths(stage: Stage, config: Any, made: Sequence[Path] = ()) -> list[Path | FileSet]:
    """The files and folders outside the run directory the stage reads (and the file sets inputs list); a
    missing file or folder is an error naming it, unless it lies in a folder of `made` (to be generated)."""
    if stage.input_files is None:
        return []
    entries = stage.input_files(config)
    paths = [Path(p) for p in entries if not isinstance(p, FileSet)]
    missing = [str(p) for p in paths if not p.exists() and not any(p == r or r in p.parents for r in made)]
    if missing:
        raise FileNotFoundError(missing_inputs(stage, missing))
    return entries


def missing_inputs(stage: Stage, missing: list[str]) -> str:
    hint = (
        f"; set {stage.inputs_hint} (ecamp --set KEY=VALUE, or the deployment's overrides)"
        if stage.inputs_hint
        else ""
    )
    return f"{stage.name}: input not found: {', '.join(missing)}{hint}"


class PreflightError(ValueError):
    """Everything a config lacks before a run starts, one problem per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        head = f"{len(problems)} problems before any stage ran:\n" if len(problems) > 1 else ""
        super().__init__(head + "\n".join(problems))


def preflight(config: Any, names: list[str]) -> None:
    """Every problem of the config for the stages `names`, all at once, before the first of them starts: each
    stage's own checks (an initial weight file that is missing) and its input files that are missing, except
    the folders `prepare_inputs` will generate. A user fixes them in one go instead of one per attempt."""
    from tasks.inputs import generated_roots
    from tasks.registry import get_stage

    problems: list[str] = []
    try:
        made = generated_roots(config, names)
    except ValueError as err:  # data.generate without data.root
        made, problems = [], [str(err)]
    for name in names:
        stage = get_stage(name)
        if stage.preflight is not None:
            try:
                stage.preflight(config)
            except (ValueError, FileNotFoundError) as err:
                problems.append(str(err))
        try:
            input_paths(stage, config, made)
        except (ValueError, FileNotFoundError) as err:
            problems.append(str(err))
    if problems:
        raise PreflightError(problems)


def input_files(
    stage: Stage, config: Any, run_dir: Path, log: logging.Logger | logging.LoggerAdapter | None = None
) -> tuple[list[Upstream], dict[str, str]]:
    """One lineage entry per declared input (a file, a folder, a file set) whose hash covers the stamp of
    every file in it, for the cache key; and path -> stamp of every file, for the stage (images carry theirs).
    The stamps are brought up to date against the run directory's table, under the run lock."""
    warn = (log or logging.getLogger(f"ecamp.{stage.name}")).warning
    table = StampTable(Path(run_dir) / STAMPS_FILE, warn)
    upstream: list[Upstream] = []
    stamps: dict[str, str] = {}
    for entry in input_paths(stage, config):
        if isinstance(entry, FileSet):
            uri = f"{Path(entry.listed_in).resolve().as_uri()}#{entry.name}"
            paths = names = list(entry.paths)
        else:
            root = Path(entry).resolve()
            found = files.list_files(root)
            uri, paths = root.as_uri(), [str(f) for f in found]
            names = [f.relative_to(root).as_posix() if f != root else f.name for f in found]
        current = table.stamps(paths)
        stamps.update(zip(paths, current, strict=True))
        upstream.append(Upstream(uri, stable_hash([list(pair) for pair in zip(names, current, strict=True)])))
    table.save()
    return upstream, stamps


def upstream_hashes(stage: Stage, run_dir: Path) -> dict[str, str | None]:
    """Current content hash of each declared read (None when its producer has no success listing it)."""
    found: dict[str, str | None] = {}
    for ref in stage.reads:
        producer, name = split_ref(ref)
        record = read_record(run_dir, producer)
        rec = record.outputs.get(name) if record else None
        found[ref] = current_hash(run_dir, producer, name, rec) if rec else None
    return found


def check_upstream(
    stage: Stage, run_dir: Path, name: str | None = None, upstream: dict[str, str | None] | None = None
) -> None:
    """Refuse to start `stage` (run as `name`) while a declared, non-optional read is not there: its producer
    never succeeded, or the output it recorded is gone or unreadable. `upstream`: `upstream_hashes`, if
    known."""
    upstream = upstream_hashes(stage, Path(run_dir)) if upstream is None else upstream
    if missing := [ref for ref, h in upstream.items() if h is None and ref not in stage.optional]:
        producers = ", ".join(dict.fromkeys(split_ref(r)[0] for r in missing))
        raise MissingUpstreamError(
            f"{name or stage.name} needs {missing}, which no successful run in {run_dir} has written: "
            f"run {producers} first"
        )


def stage_fingerprint(
    stage: Stage, config: Any, upstream: dict[str, str | None], inputs: list[Upstream]
) -> tuple[str, dict[str, Any]]:
    parts: dict[str, Any] = {
        "stage": stage.name,
        "code": stage.code_version,
        "config": {s: section_hash(config, s) for s in (stage.name, *stage.sections)},
        "seed": config.run.seed,
        "upstream": upstream,
        "inputs": {u.uri: u.content_hash for u in inputs},
    }
    return stable_hash(parts), parts


def cached_result(name: str, run_dir: Path, fingerprint: str) -> StageResult | None:
    """The last successful result of `name` if it matches `fingerprint` and all its outputs are intact."""
    record = read_record(run_dir, name)
    if record is None or record.fingerprint != fingerprint or not verified_outputs(run_dir, record):
        return None
    outputs = record.artifact_infos()
    return StageResult(name, "cached", fingerprint, outputs)


def reused_result(name: str, run_dir: Path) -> StageResult:
    """The last successful result of `name` as it is, without checking its fingerprint: what a resume
    (`from_stage`) builds on. An output changed since, or a stage that never succeeded, is an error."""
    record = read_record(run_dir, name)
    if record is None:
        raise MissingUpstreamError(
            f"{name} has no successful run in {run_dir} to resume from: run without from_stage"
        )
    if not verified_outputs(run_dir, record):
        raise MissingUpstreamError(
            f"{name}'s outputs in {run_dir} changed or went missing since it succeeded: run it again"
        )
    outputs = record.artifact_infos()
    return StageResult(name, "taken", record.fingerprint, outputs)


def current_result(stage: Stage, config: Any, run_dir: Path, name: str | None = None) -> StageResult | None:
    """The stage's last success when `run_stage` would skip it (same fingerprint, outputs intact), else None:
    lets the pipeline skip a GPU stage without starting a run on the GPU pool."""
    with run_lock(run_dir):
        inputs, _ = input_files(stage, config, run_dir)
        fingerprint, _ = stage_fingerprint(stage, config, upstream_hashes(stage, run_dir), inputs)
        return cached_result(name or stage.name, run_dir, fingerprint)


def _set_threads(config: Any) -> None:
    if config.run.num_threads:
        import torch

        torch.set_num_threads(config.run.num_threads)


@dataclass
class Prepared:
    """A stage about to run: its context, and the fingerprint and parts its success record will hold."""

    ctx: StageContext
    fingerprint: str
    parts: dict[str, Any]


def prepare_stage(
    stage: Stage,
    config: Any,
    run_dir: Path,
    log: logging.Logger | logging.LoggerAdapter,
    run_id: str,
    name: str,
    force: bool = True,
) -> Prepared | StageResult:
    """The context a run of `stage` would get (inputs stamped, upstream checked) with its fingerprint; the
    cached result instead when one matches and not `force`. Also for work done on a stage's behalf in another
    process (bulk_distill's shard groups), which reads the same upstream but commits nothing."""
    inputs, stamps = input_files(stage, config, run_dir, log)
    upstream = upstream_hashes(stage, run_dir)
    fingerprint, parts = stage_fingerprint(stage, config, upstream, inputs)
    if not force and (cached := cached_result(name, run_dir, fingerprint)):
        log.info("%s: cached (fingerprint %s), skipped", name, fingerprint)
        return cached
    check_upstream(stage, run_dir, name, upstream)
    ctx = StageContext(
        run_dir=run_dir,
        stage=stage,
        config=config,
        log=log,
        name=name,
        run_id=run_id,
        config_hash=stable_hash(parts["config"]),
        inputs=inputs,
        input_stamps=stamps,
    )
    return Prepared(ctx, fingerprint, parts)


def run_stage(
    stage: Stage,
    config: Any,
    run_dir: Path,
    *,
    force: bool = False,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    run_id: str = "local",
    name: str | None = None,
) -> StageResult:
    """Run `stage` unless an identical successful run exists (or `force`).

    `name` runs the stage under another folder name (ablation rows: `pretrain_ecamp__no_sr`); the config
    section is still the stage's own. The run directory is locked for the whole attempt.
    """
    run_dir = Path(run_dir)
    name = name or stage.name
    log = log or logging.getLogger(f"ecamp.{name}")
    if stage.preflight is not None:
        stage.preflight(config)
    with run_lock(run_dir):
        prepared = prepare_stage(stage, config, run_dir, log, run_id, name, force)
        if isinstance(prepared, StageResult):
            return prepared
        ctx, fingerprint = prepared.ctx, prepared.fingerprint
        _set_threads(config)
        log.info("%s: running (fingerprint %s)", name, fingerprint)
        start = time.perf_counter()
        ctx.begin()
        stage.run(ctx, getattr(config, stage.name))
        seconds = time.perf_counter() - start
        record = ctx.commit(fingerprint, prepared.parts, seconds)
    outputs = record.artifact_infos()
    result = StageResult(name, "ran", fingerprint, outputs, seconds)
    log.info("%s: done in %.1f s, outputs: %s", name, seconds, ", ".join(stage.outputs) or "none")
    return result
