"""The run's DuckDB catalog: every artifact version written, and the edges to what it was made from.

The Parquet metadata is the source of truth (an artifact carries its own lineage); the catalog makes it
queryable across a run (`ecamp lineage`, SQL) without opening every file.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from data_contracts.io import ArtifactInfo, Upstream, read_info

_log = logging.getLogger("ecamp.catalog")

CATALOG_NAME = "catalog.duckdb"
RECORD_NAME = "_stage.json"  # tasks.record.RECORD: a stage's success record

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


def record(
    run_dir: Path, info: ArtifactInfo, log: logging.Logger | logging.LoggerAdapter | None = None
) -> None:
    """Append one artifact version and its upstream edges; an unreadable catalog is rebuilt first."""
    path = catalog_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _insert(path, info)
    except duckdb.Error as err:
        (log or _log).warning("%s is unreadable (%s): rebuilding it from the artifacts' metadata", path, err)
        rebuild(run_dir)
        _insert(path, info)


def artifact_files(run_dir: Path) -> list[Path]:
    """The Parquet artifacts of a run: `<run_dir>/<stage>/<name>.parquet` (attempt folders and shards
    aside)."""
    return sorted(p for p in Path(run_dir).glob("*/*.parquet") if not p.name.startswith(".tmp-"))


def rebuild(run_dir: Path) -> int:
    """A new catalog from the lineage every artifact carries in its own metadata; a broken one is kept aside
    as `catalog.duckdb.broken-<time>`. Returns the number of artifacts recorded. History goes: only the
    versions on disk are known (edges to older versions show as inputs)."""
    path = catalog_path(run_dir)
    if path.exists():
        path.rename(path.with_name(f"{path.name}.broken-{int(time.time())}"))
    Path(f"{path}.wal").unlink(missing_ok=True)
    infos = []
    for artifact in artifact_files(run_dir):
        try:
            infos.append(read_info(artifact))
        except ValueError as err:  # not ours, or unreadable: not an artifact of this run
            _log.warning("catalog rebuild: skipping %s (%s)", artifact, err)
    infos += file_infos(run_dir)
    for info in sorted(infos, key=lambda i: i.created_at):
        _insert(path, info)
    return len(infos)


def file_infos(run_dir: Path) -> list[ArtifactInfo]:
    """The lineage of the file outputs (weights, adapters), kept in each stage's success record
    (`<stage>/_stage.json`, see tasks/record.py) since a weights file has no Parquet metadata to carry it."""
    found = []
    for path in sorted(Path(run_dir).glob(f"*/{RECORD_NAME}")):
        try:
            outputs = json.loads(path.read_text())["outputs"]
            found += [
                ArtifactInfo.from_json(o["info"], str(path))
                for o in outputs.values()
                if o["kind"] == "file" and o.get("info")
            ]
        except (OSError, ValueError, KeyError, TypeError) as err:
            _log.warning("catalog rebuild: skipping %s (%s)", path, err)
    return found


def _readable(run_dir: Path) -> bool:
    """Whether the catalog can be queried; a missing or broken one is rebuilt (with a warning) when the run
    has artifacts. False when there is nothing to catalog."""
    path = catalog_path(run_dir)
    if path.exists():
        try:
            with duckdb.connect(str(path), read_only=True) as con:
                con.execute("SELECT count(*) FROM artifacts").fetchone()
            return True
        except duckdb.Error as err:
            _log.warning("%s is unreadable (%s): rebuilding it from the artifacts' metadata", path, err)
    elif not artifact_files(run_dir):
        return False
    else:
        _log.warning("%s is missing: rebuilding it from the artifacts' metadata", path)
    return rebuild(run_dir) > 0


def _insert(path: Path, info: ArtifactInfo) -> None:
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
    """Latest recorded version of an artifact given by name (`reports`), `stage/name`, path or URI; a file
    output also by its name without suffix (`pretrain_ecamp/encoder`)."""
    path = catalog_path(run_dir)
    if not _readable(run_dir):
        return None
    key = name_or_uri
    candidate = Path(name_or_uri)
    if candidate.suffix == ".parquet" and candidate.exists():
        key = candidate.resolve().as_uri()
    stage, _, name = key.partition("/") if "/" in key and "://" not in key else ("", "", key)
    with duckdb.connect(str(path), read_only=True) as con:
        row = con.execute(
            """SELECT info FROM artifacts
               WHERE uri = ? OR ((name = ? OR name LIKE ? || '.%') AND (? = '' OR stage = ?))
               ORDER BY created_at DESC LIMIT 1""",
            [key, name, name, stage, stage],
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
