"""Run one stage with fingerprint-based skipping; no Prefect here, so it is testable and reusable.

A stage's fingerprint is the hash of: the content hashes of its upstream artifacts (or of its input files
for the first stage), its config section, the run seed, and its code version. When the fingerprint equals
the one recorded by the stage's last *successful* run and every output is intact, the stage is skipped.
The success record is deleted before a run starts and written last, so a crash never looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from data_contracts.io import ArtifactInfo, Upstream, read_info
from tasks.base import StageContext, artifact_path
from tasks.config import section_hash, stable_hash

MANIFEST = "_stage.json"


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" | "cached"
    fingerprint: str
    outputs: dict[str, ArtifactInfo] = field(default_factory=dict)
    seconds: float = 0.0


def _tree_fingerprint(path: Path) -> str:
    """Cheap fingerprint of an input file or folder: relative paths, sizes and mtimes (no content reads)."""
    if path.is_file():
        st = path.stat()
        return stable_hash([path.name, st.st_size, st.st_mtime_ns])
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            st = p.stat()
            entries.append((str(p.relative_to(path)), st.st_size, st.st_mtime_ns))
    return stable_hash(entries)


def data_inputs(config: Any) -> list[Upstream]:
    """The input files of the first stage, with fingerprints, for its cache key and its lineage."""
    data = config.data
    if data.source == "manifest":
        if not data.manifest:
            raise ValueError("data.source is 'manifest' but data.manifest is not set")
        paths = [Path(data.manifest)]
    else:
        if not data.root:
            raise ValueError("data.source is 'mimic' but data.root is not set")
        root = Path(data.root)
        paths = [root / "files", *sorted(root.glob("mimic-cxr-2.0.0-*.csv*"))]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"input not found: {', '.join(missing)}")
    return [Upstream(p.resolve().as_uri(), _tree_fingerprint(p)) for p in paths]


def upstream_hashes(module: ModuleType, run_dir: Path) -> dict[str, Upstream | None]:
    found: dict[str, Upstream | None] = {}
    for ref in module.UPSTREAM:
        path = artifact_path(run_dir, ref)
        if path.exists():
            info = read_info(path)
            found[ref] = Upstream(info.uri, info.content_hash)
        else:
            found[ref] = None
    return found


def code_version(module: ModuleType) -> str:
    return f"{module.NAME}@{module.CODE_VERSION}"


def stage_fingerprint(
    module: ModuleType, config: Any, upstream: dict[str, Upstream | None]
) -> tuple[str, dict[str, Any]]:
    parts: dict[str, Any] = {
        "stage": module.NAME,
        "code": code_version(module),
        "config": section_hash(config, module.NAME),
        "seed": config.run.seed,
        "upstream": {k: (v.content_hash if v else None) for k, v in upstream.items()},
    }
    if not module.UPSTREAM:
        parts["data"] = section_hash(config, "data")
        parts["inputs"] = {u.uri: u.content_hash for u in data_inputs(config)}
    return stable_hash(parts), parts


def read_manifest(run_dir: Path, stage: str) -> dict[str, Any] | None:
    path = Path(run_dir) / stage / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _write_manifest(run_dir: Path, result: StageResult, parts: dict[str, Any]) -> None:
    path = Path(run_dir) / result.stage / MANIFEST
    payload = {
        "stage": result.stage,
        "fingerprint": result.fingerprint,
        "parts": parts,
        "finished_at": time.time(),
        "seconds": result.seconds,
        "outputs": {name: info.to_json() for name, info in result.outputs.items()},
    }
    tmp = path.with_name(f".tmp-{os.getpid()}-{MANIFEST}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def cached_result(stage: str, run_dir: Path, fingerprint: str) -> StageResult | None:
    """The last successful result of `stage` if it matches `fingerprint` and all its outputs are intact."""
    manifest = read_manifest(run_dir, stage)
    if not manifest or manifest.get("fingerprint") != fingerprint:
        return None
    outputs = {}
    for name, data in manifest["outputs"].items():
        recorded = ArtifactInfo.from_json(data)
        path = Path(run_dir) / stage / f"{name}.parquet"
        try:
            on_disk = read_info(path)
        except (FileNotFoundError, ValueError):
            return None
        if on_disk.content_hash != recorded.content_hash:
            return None
        outputs[name] = on_disk
    return StageResult(stage, "cached", fingerprint, outputs)


def _set_threads(config: Any) -> None:
    if config.run.num_threads:
        import torch

        torch.set_num_threads(config.run.num_threads)


def run_stage(
    module: ModuleType,
    config: Any,
    run_dir: Path,
    *,
    force: bool = False,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    run_id: str = "local",
    name: str | None = None,
) -> StageResult:
    """Run `module`'s stage unless an identical successful run exists (or `force`).

    `name` runs the stage under another folder name (ablation rows: `pretrain_ecamp__no_sr`); the config
    section is still the module's own.
    """
    run_dir = Path(run_dir)
    name = name or module.NAME
    log = log or logging.getLogger(f"ecamp.{name}")
    upstream = upstream_hashes(module, run_dir)
    fingerprint, parts = stage_fingerprint(module, config, upstream)
    missing = [ref for ref, up in upstream.items() if up is None]
    if not force:
        cached = cached_result(name, run_dir, fingerprint)
        if cached:
            log.info("%s: cached (fingerprint %s), skipped", name, fingerprint)
            return cached
    stage_dir = run_dir / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / MANIFEST).unlink(missing_ok=True)
    if missing:
        log.info(
            "%s: upstream not present (the stage decides whether it can run without): %s",
            name,
            missing,
        )
    ctx = StageContext(
        run_dir=run_dir,
        stage=name,
        config=config,
        log=log,
        run_id=run_id,
        config_hash=section_hash(config, module.NAME),
        code_version=code_version(module),
        inputs=data_inputs(config) if not module.UPSTREAM else [],
        upstream={ref: up for ref, up in upstream.items() if up is not None},
    )
    _set_threads(config)
    log.info("%s: running (fingerprint %s)", name, fingerprint)
    start = time.perf_counter()
    module.run(ctx, getattr(config, module.NAME))
    result = StageResult(name, "ran", fingerprint, dict(ctx.outputs), time.perf_counter() - start)
    _write_manifest(run_dir, result, parts)
    log.info("%s: done in %.1f s, outputs: %s", name, result.seconds, ", ".join(result.outputs) or "none")
    return result
