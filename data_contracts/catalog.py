"""The run's DuckDB catalog: every artifact version written, and the edges to what it was made from.

The Parquet metadata is the source of truth (an artifact carries its own lineage); the catalog makes it
queryable across a run (`ecamp lineage`, SQL) without opening every file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from data_contracts.io import ArtifactInfo, Upstream

CATALOG_NAME = "catalog.duckdb"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    uri VARCHAR, name VARCHAR, stage VARCHAR, schema_name VARCHAR, schema_version INTEGER,
    rows BIGINT, content_hash VARCHAR, run_id VARCHAR, config_hash VARCHAR, code_version VARCHAR,
    created_at DOUBLE, info JSON
);
CREATE TABLE IF NOT EXISTS lineage (
    uri VARCHAR, content_hash VARCHAR, upstream_uri VARCHAR, upstream_hash VARCHAR
);
"""


def catalog_path(run_dir: Path) -> Path:
    return Path(run_dir) / CATALOG_NAME


def record(run_dir: Path, info: ArtifactInfo) -> None:
    """Append one artifact version and its upstream edges."""
    path = catalog_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(path)) as con:
        con.execute(_SCHEMA)
        con.execute(
            "INSERT INTO artifacts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                info.uri,
                info.name,
                info.stage,
                info.schema_name,
                info.schema_version,
                info.rows,
                info.content_hash,
                info.run_id,
                info.config_hash,
                info.code_version,
                info.created_at,
                json.dumps(info.to_json()),
            ],
        )
        if info.upstream:
            con.executemany(
                "INSERT INTO lineage VALUES (?,?,?,?)",
                [[info.uri, info.content_hash, u.uri, u.content_hash] for u in info.upstream],
            )


def latest(run_dir: Path, name_or_uri: str) -> ArtifactInfo | None:
    """Latest recorded version of an artifact given by name (`reports`), `stage/name`, path or URI."""
    path = catalog_path(run_dir)
    if not path.exists():
        return None
    key = name_or_uri
    candidate = Path(name_or_uri)
    if candidate.suffix == ".parquet" and candidate.exists():
        key = candidate.resolve().as_uri()
    stage, _, name = key.partition("/") if "/" in key and "://" not in key else ("", "", key)
    with duckdb.connect(str(path), read_only=True) as con:
        row = con.execute(
            """SELECT info FROM artifacts
               WHERE uri = ? OR (name = ? AND (? = '' OR stage = ?))
               ORDER BY created_at DESC LIMIT 1""",
            [key, name, stage, stage],
        ).fetchone()
    return ArtifactInfo.from_json(json.loads(row[0])) if row else None


def by_hash(run_dir: Path, uri: str, content_hash: str) -> ArtifactInfo | None:
    """The exact artifact version an edge points at (None for input files, which are not artifacts)."""
    with duckdb.connect(str(catalog_path(run_dir)), read_only=True) as con:
        row = con.execute(
            "SELECT info FROM artifacts WHERE uri = ? AND content_hash = ? ORDER BY created_at DESC LIMIT 1",
            [uri, content_hash],
        ).fetchone()
    return ArtifactInfo.from_json(json.loads(row[0])) if row else None


@dataclass
class LineageNode:
    uri: str
    content_hash: str
    info: ArtifactInfo | None  # None: an input file or folder
    upstream: list[LineageNode] = field(default_factory=list)


def lineage_tree(run_dir: Path, info: ArtifactInfo) -> LineageNode:
    """The upstream chain of an artifact, down to the input files."""

    def build(edge: Upstream, seen: frozenset[str]) -> LineageNode:
        found = by_hash(run_dir, edge.uri, edge.content_hash)
        node = LineageNode(edge.uri, edge.content_hash, found)
        if found and edge.uri not in seen:
            node.upstream = [build(u, seen | {edge.uri}) for u in found.upstream]
        return node

    root = LineageNode(info.uri, info.content_hash, info)
    root.upstream = [build(u, frozenset({info.uri})) for u in info.upstream]
    return root
