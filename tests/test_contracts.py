"""Data contracts: Arrow schema mapping, validation errors, atomic writes, lineage metadata, catalog."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import catalog
from data_contracts.base import ContractError, Row, to_table
from data_contracts.io import (
    METADATA_KEY,
    Lineage,
    Upstream,
    content_hash,
    read_artifact,
    read_info,
    write_artifact,
)


class Mention(Row):
    contract: ClassVar[str] = "test_mention"
    version: ClassVar[int] = 2
    arrow_overrides: ClassVar[dict[str, pa.DataType]] = {"grid": pa.list_(pa.float16())}
    study_id: str
    start: int
    score: float
    descriptors: list[str]
    polarity: Literal["positive", "negative", "uncertain"]
    grid: list[float]
    note: str | None = None


def rows(n: int = 3) -> list[dict]:
    return [
        {
            "study_id": f"s{i}",
            "start": i,
            "score": i / 2,
            "descriptors": ["mild", "left"],
            "polarity": "negative" if i % 2 else "positive",
            "grid": [0.5, 0.25],
            "note": None,
        }
        for i in range(n)
    ]


LINEAGE = Lineage(
    stage="test", run_id="r1", config_hash="c1", code_version="test@1", upstream=[Upstream("file:///in", "h")]
)


def test_arrow_schema_maps_types_and_nullability():
    schema = Mention.arrow_schema()
    assert schema.field("study_id").type == pa.string() and not schema.field("study_id").nullable
    assert schema.field("start").type == pa.int64()
    assert schema.field("descriptors").type == pa.list_(pa.string())
    assert schema.field("grid").type == pa.list_(pa.float16())
    assert schema.field("note").nullable


def test_round_trip_keeps_values_and_lineage(tmp_path):
    path = tmp_path / "stage" / "mentions.parquet"
    info = write_artifact(path, rows(), Mention, LINEAGE)
    table = read_artifact(path, Mention, verify_hash=True)
    assert table.to_pylist() == rows()
    meta = read_info(path)
    assert meta.rows == 3 and meta.schema_name == "test_mention" and meta.schema_version == 2
    assert meta.content_hash == info.content_hash == content_hash(table)
    assert meta.upstream == [Upstream("file:///in", "h")]
    assert (
        meta.stage == "test"
        and meta.run_id == "r1"
        and meta.config_hash == "c1"
        and meta.code_version == "test@1"
    )
    assert not list(path.parent.glob(".tmp-*"))


def test_row_instances_and_tables_are_accepted(tmp_path):
    models = [Mention(**r) for r in rows()]
    a = write_artifact(tmp_path / "a.parquet", models, Mention, LINEAGE)
    b = write_artifact(tmp_path / "b.parquet", pa.Table.from_pylist(rows()), Mention, LINEAGE)
    assert a.content_hash == b.content_hash


@pytest.mark.parametrize(
    "patch, column, problem",
    [
        ({"polarity": "absent"}, "polarity", "not in ['positive', 'negative', 'uncertain']"),
        ({"start": "twelve"}, "start", "valid integer"),
        ({"study_id": None}, "study_id", "null in a required column"),
        ({"extra": 1}, "extra", "not in contract"),
    ],
)
def test_bad_rows_name_the_column_and_row(patch, column, problem):
    data = rows(4)
    data[2] = {**data[2], **patch}
    with pytest.raises(ContractError) as err:
        to_table(data, Mention, source="x.parquet")
    assert err.value.column == column
    assert problem in str(err.value) and "x.parquet" in str(err.value)
    if column != "extra":
        assert err.value.row == 2


def test_table_with_wrong_schema_is_rejected_on_read(tmp_path):
    path = tmp_path / "bad.parquet"
    write_artifact(path, rows(), Mention, LINEAGE)
    table = pq.read_table(path)
    meta = table.schema.metadata
    broken = table.set_column(1, "start", pa.array(["a", "b", "c"])).replace_schema_metadata(meta)
    pq.write_table(broken, path)
    with pytest.raises(ContractError, match=r"bad.parquet: column 'start': expected int64, found string"):
        read_artifact(path, Mention)
    dropped = table.drop_columns(["score"]).replace_schema_metadata(meta)
    pq.write_table(dropped, path)
    with pytest.raises(ContractError, match=r"column 'score': missing"):
        read_artifact(path, Mention)


def test_null_and_enum_found_at_arrow_level_with_row_index():
    table = pa.Table.from_pylist(rows(5))
    pol = table.column("polarity").to_pylist()
    pol[3] = "maybe"
    table = table.set_column(table.column_names.index("polarity"), "polarity", pa.array(pol))
    with pytest.raises(ContractError) as err:
        to_table(table, Mention, source="t")
    assert err.value.row == 3 and "'maybe'" in str(err.value)


def test_version_mismatch_and_foreign_files_are_clear_errors(tmp_path):
    path = tmp_path / "m.parquet"
    write_artifact(path, rows(), Mention, LINEAGE)
    table = pq.read_table(path)
    info = json.loads(table.schema.metadata[METADATA_KEY])
    info["schema_version"] = 1
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(info)}), path)
    with pytest.raises(ContractError, match="written with test_mention v1, code expects v2"):
        read_artifact(path, Mention)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    with pytest.raises(ContractError, match="no ecamp lineage metadata"):
        read_artifact(plain, Mention)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(ContractError, match="not a readable Parquet file"):
        read_info(garbage)


def test_modified_content_fails_hash_check(tmp_path):
    path = tmp_path / "m.parquet"
    write_artifact(path, rows(), Mention, LINEAGE)
    table = pq.read_table(path)
    changed = table.set_column(0, "study_id", pa.array(["x", "y", "z"]))
    pq.write_table(changed, path)
    read_artifact(path, Mention)  # still a valid table ...
    with pytest.raises(ContractError, match="content hash does not match"):
        read_artifact(path, Mention, verify_hash=True)  # ... but not the data its lineage describes


def test_killed_mid_write_leaves_nothing_that_looks_complete(tmp_path):
    """SIGKILL the writer between writing the temp file and the rename: no artifact under the final name."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(tmp_path.parent)!r})
        from tests.test_contracts import Mention, rows, LINEAGE
        from data_contracts import io
        io.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        io.write_artifact({str(tmp_path / "out.parquet")!r}, rows(1000), Mention, LINEAGE)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=str(_repo_root()))
    assert proc.returncode == -9, proc.stderr.decode()
    assert not (tmp_path / "out.parquet").exists()
    leftovers = list(tmp_path.glob(".tmp-*"))
    assert len(leftovers) == 1  # the partial file is only ever under a temp name
    with pytest.raises(FileNotFoundError):
        read_artifact(tmp_path / "out.parquet", Mention)


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


def test_catalog_records_versions_and_lineage(tmp_path):
    up = write_artifact(tmp_path / "a" / "up.parquet", rows(2), Mention, LINEAGE)
    catalog.record(tmp_path, up)
    down_lineage = Lineage("b", "r2", "c2", "b@1", [Upstream(up.uri, up.content_hash)])
    down = write_artifact(tmp_path / "b" / "down.parquet", rows(3), Mention, down_lineage)
    catalog.record(tmp_path, down)
    assert catalog.latest(tmp_path, "down").content_hash == down.content_hash
    assert catalog.latest(tmp_path, "b/down").uri == down.uri
    assert catalog.latest(tmp_path, str(tmp_path / "b" / "down.parquet")).uri == down.uri
    assert catalog.latest(tmp_path, "nope") is None
    tree = catalog.lineage_tree(tmp_path, down)
    assert [n.uri for n in tree.upstream] == [up.uri]
    assert tree.upstream[0].info.name == "up"
    assert [n.uri for n in tree.upstream[0].upstream] == ["file:///in"]
    assert tree.upstream[0].upstream[0].info is None  # an input file, not an artifact
