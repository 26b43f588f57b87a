"""The success record (`<run_dir>/<stage>/_stage.json`): the only proof that a stage's outputs are complete.

It is written last, after every output of the attempt is in place, and lists each output with its content
hash and a cheap stamp. Readers trust an output only through it: an output it does not list, or whose
content no longer matches, is not there. A failed or refused attempt never touches it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_contracts import catalog, files
from data_contracts.io import ArtifactInfo, content_hash, read_artifact_and_info

RECORD = catalog.RECORD_NAME
log = logging.getLogger(__name__)


@dataclass
class OutputRecord:
    kind: Literal["parquet", "file"]
    content_hash: str
    stamp: str
    info: ArtifactInfo | None = None  # lineage metadata (file outputs: schema 'file', 0 rows)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["info"] = self.info.to_json() if self.info else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutputRecord:
        info = ArtifactInfo.from_json(data["info"]) if data.get("info") else None
        return cls(data["kind"], data["content_hash"], data["stamp"], info)


@dataclass
class SuccessRecord:
    stage: str
    fingerprint: str
    parts: dict[str, Any]
    seconds: float
    outputs: dict[str, OutputRecord] = field(default_factory=dict)
    finished_at: float = field(default_factory=time.time)

    def artifact_infos(self) -> dict[str, Any]:
        """Output name -> its ArtifactInfo (lineage, hash), for the outputs that carry one."""
        return {n: o.info for n, o in self.outputs.items() if o.info is not None}


def output_path(run_dir: Path, stage: str, name: str, kind: str) -> Path:
    folder = Path(run_dir) / stage
    return folder / f"{name}.parquet" if kind == "parquet" else folder / name


def record_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage / RECORD


def read_record(run_dir: Path, stage: str) -> SuccessRecord | None:
    """The stage's success record, or None when it never succeeded here (or the record is unreadable)."""
    path = record_path(run_dir, stage)
    try:
        data = json.loads(path.read_text())
        outputs = {name: OutputRecord.from_json(o) for name, o in data["outputs"].items()}
        return SuccessRecord(
            data["stage"], data["fingerprint"], data["parts"], data["seconds"], outputs, data["finished_at"]
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # ValueError: bad JSON or UTF-8
        log.warning(
            "%s is unreadable (%s: %s): the stage counts as never run here", path, type(err).__name__, err
        )
        return None


def write_record(run_dir: Path, record: SuccessRecord) -> None:
    path = record_path(run_dir, record.stage)
    payload = asdict(record) | {"outputs": {n: o.to_json() for n, o in record.outputs.items()}}
    tmp = path.with_name(f".tmp-{os.getpid()}-{RECORD}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def current_hash(run_dir: Path, stage: str, name: str, rec: OutputRecord) -> str | None:
    """The content hash the output has now: the recorded one when its stamp is unchanged, else recomputed
    from what is on disk (so an edited artifact is seen, and lineage records what is really read).
    None when the output is missing or unreadable."""
    path = output_path(run_dir, stage, name, rec.kind)
    try:
        if files.stamp(path) == rec.stamp:
            return rec.content_hash
        if rec.kind == "parquet":
            table, _ = read_artifact_and_info(path)
            return content_hash(table)
        return files.content_hash(path)
    except (OSError, ValueError):
        return None


def verified_outputs(run_dir: Path, record: SuccessRecord) -> bool:
    """True when every output the record lists is on disk with the content it had."""
    return all(
        current_hash(run_dir, record.stage, name, rec) == rec.content_hash
        for name, rec in record.outputs.items()
    )
