"""Parquet artifacts: validated, written atomically, carrying their lineage in the file metadata.

A file that exists under its final name is complete: writers go through a temp file in the same folder and
`os.replace`, so a run killed mid-write leaves only a `.tmp-*` file that no reader ever opens.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.base import ContractError, Row, contract_by_name, to_table, validate_table

METADATA_KEY = b"ecamp.lineage"
LINEAGE_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float)}


class ArtifactWriteError(OSError):
    """No space (or quota) left while writing an artifact: one line naming the file; the partial temp file is
    removed and any previous version of the artifact is intact. Keeps the errno, so it is never retried."""

    def __init__(self, path: Path, err: OSError):
        super().__init__(
            f"{os.strerror(err.errno).lower()} writing {path}; the partial file was removed "
            "and any previous version is intact: free space and rerun"
        )
        self.errno = err.errno


@dataclass(frozen=True)
class Upstream:
    """An input of an artifact: another artifact or an input file/folder, with the hash it had when read."""

    uri: str
    content_hash: str


@dataclass
class Lineage:
    stage: str
    run_id: str
    config_hash: str
    code_version: str
    upstream: list[Upstream] = field(default_factory=list)


@dataclass
class ArtifactInfo:
    uri: str
    name: str
    schema_name: str
    schema_version: int
    rows: int
    content_hash: str
    stage: str
    run_id: str
    config_hash: str
    code_version: str
    upstream: list[Upstream]
    created_at: float

    @classmethod
    def from_json(cls, data: Any, source: str = "lineage metadata") -> ArtifactInfo:
        """The lineage as JSON gives it; a field missing, unknown or of the wrong type (metadata edited by
        hand or by another tool) is a ContractError naming `source` and the field."""
        if not isinstance(data, dict):
            raise ContractError(source, None, f"lineage metadata is a {type(data).__name__}, not a mapping")
        names = {f.name: f.type for f in fields(cls)}
        if missing := sorted(set(names) - set(data)):
            raise ContractError(source, None, f"lineage metadata lacks {missing}")
        if unknown := sorted(set(data) - set(names)):
            raise ContractError(source, None, f"lineage metadata has unknown fields {unknown}")
        for name, kind in names.items():
            value = data[name]
            if name == "upstream":
                good = isinstance(value, list) and all(
                    isinstance(u, dict)
                    and set(u) == {"uri", "content_hash"}
                    and all(isinstance(v, str) for v in u.values())
                    for u in value
                )
            else:
                good = isinstance(value, LINEAGE_TYPES[kind]) and not isinstance(value, bool)
            if not good:
                raise ContractError(
                    source,
                    None,
                    f"lineage field '{name}' holds {value!r:.80} ({type(value).__name__}), not {kind}",
                )
        return cls(**{**data, "upstream": [Upstream(**u) for u in data["upstream"]]})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def file_uri(path: Path) -> str:
    return Path(path).resolve().as_uri()


def content_hash(table: pa.Table) -> str:
    """SHA-256 of the table's data (not of the file), so the hash survives re-encoding and metadata
    changes."""
    table = table.replace_schema_metadata(None).combine_chunks()
    digest = hashlib.sha256()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    digest.update(sink.getvalue())
    return digest.hexdigest()


def write_artifact(
    path: Path, data: pa.Table | list[Any], contract: type[Row], lineage: Lineage, uri: str | None = None
) -> ArtifactInfo:
    """Validate `data` against `contract` and write it to `path` atomically with lineage metadata.

    `uri` names where the artifact will live when it is written elsewhere first (a stage's attempt folder).
    """
    path = Path(path)
    table = to_table(data, contract, source=str(path))
    info = ArtifactInfo(
        uri=uri or file_uri(path),
        name=path.stem,
        schema_name=contract.contract,
        schema_version=contract.version,
        rows=table.num_rows,
        content_hash=content_hash(table),
        stage=lineage.stage,
        run_id=lineage.run_id,
        config_hash=lineage.config_hash,
        code_version=lineage.code_version,
        upstream=list(lineage.upstream),
        created_at=time.time(),
    )
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(info.to_json()).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ArtifactWriteError(path, err) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return info


def read_info(path: Path) -> ArtifactInfo:
    """Lineage metadata of an artifact, without reading its data."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: artifact does not exist")
    try:
        metadata = pq.read_schema(path).metadata or {}
    except pa.ArrowInvalid as err:
        raise ContractError(str(path), None, f"not a readable Parquet file ({err})") from None
    if METADATA_KEY not in metadata:
        raise ContractError(str(path), None, "no ecamp lineage metadata: not written by data_contracts")
    try:
        data = json.loads(metadata[METADATA_KEY])
    except ValueError as err:  # bad JSON or UTF-8
        raise ContractError(str(path), None, f"lineage metadata is not JSON ({err})") from None
    return ArtifactInfo.from_json(data, str(path))


def read_artifact(path: Path, contract: type[Row] | None = None, verify_hash: bool = False) -> pa.Table:
    """Read and validate an artifact; the contract defaults to the one named in its metadata."""
    return read_artifact_and_info(path, contract, verify_hash)[0]


def read_artifact_and_info(
    path: Path, contract: type[Row] | None = None, verify_hash: bool = False
) -> tuple[pa.Table, ArtifactInfo]:
    """`read_artifact` plus the lineage metadata it checked, for callers that record what they read."""
    path = Path(path)
    info = read_info(path)
    contract = contract or contract_by_name(info.schema_name)
    if info.schema_name != contract.contract:
        raise ContractError(
            str(path), None, f"holds contract '{info.schema_name}', expected '{contract.contract}'"
        )
    if info.schema_version != contract.version:
        raise ContractError(
            str(path),
            None,
            f"written with {contract.contract} v{info.schema_version}, code expects v{contract.version}: "
            f"rerun its stage",
        )
    table = validate_table(pq.read_table(path), contract, source=str(path))
    if table.num_rows != info.rows:
        raise ContractError(str(path), None, f"has {table.num_rows} rows, metadata says {info.rows}")
    if verify_hash and content_hash(table) != info.content_hash:
        raise ContractError(str(path), None, "content hash does not match its metadata (file was modified)")
    return table, info
