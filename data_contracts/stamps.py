"""Stamps of the input files a stage reads (images, reports, manifests, lists) that change when their content
does, kept cheap at MIMIC scale (377,110 images, ~570 GB).

A file's stamp is `stat:<size>:<mtime_ns>` when the run directory first sees it, and `sha256:<hex>` of its
content once its size or mtime has changed since the recorded stamp. The run directory's table
(`_input_stamps.parquet`: path, size, mtime_ns, stamp) remembers them between runs.

WHY this split: hashing every image on every fingerprint, or even once on a first run, would read ~570 GB
before a stage starts, longer than the stages it guards; a `stat` per file costs seconds. So the fast path is
the stat alone: an unchanged size and mtime keep the recorded stamp without reading a byte. Only a file whose
size or mtime moved is read, and then its content decides: an image replaced by another one gets a new stamp
whatever its size, while the same bytes rewritten (a re-copy, a `touch`) keep their `sha256:` stamp and rerun
nothing. A file first seen has no recorded content to compare with, so its first change always counts (one
conservative rerun); a lost or unreadable table makes every file first seen again (reruns, never a stale
result). As with make or rsync, an edit that keeps both the size and the mtime goes unseen.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.files import sha256_file

STAMPS_FILE = "_input_stamps.parquet"  # in the run directory, beside the stage folders
ABSENT = "absent"  # no file there (a manifest row naming a missing image: the stage rejects it)
NOT_A_FILE = "not-a-file"
SCHEMA = pa.schema(
    [("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("stamp", pa.string())]
)


def stat_stamp(path: str | Path) -> str:
    """The stamp of a file no table has seen: its size and mtime (ABSENT / NOT_A_FILE when it is neither)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return ABSENT
    return f"stat:{st.st_size}:{st.st_mtime_ns}" if stat.S_ISREG(st.st_mode) else NOT_A_FILE


class StampTable:
    """The recorded stamps of one run directory; `stamps` brings them up to date, `save` writes them back.
    One writer at a time: the run directory's lock."""

    def __init__(self, path: Path, warn: Callable[[str], None] = lambda message: None):
        self.path = Path(path)
        self.rows: dict[str, tuple[int, int, str]] = {}
        self.changed = False
        if not self.path.exists():
            return
        try:
            table = pq.read_table(self.path, schema=SCHEMA)
            columns = [table.column(name).to_pylist() for name in SCHEMA.names]
            self.rows = {p: (size, mtime, s) for p, size, mtime, s in zip(*columns, strict=True)}
        except (pa.ArrowException, OSError, ValueError) as err:
            warn(f"{self.path}: unreadable ({err}): every input file counts as first seen")
            self.changed = True

    def stamps(self, paths: Sequence[str], workers: int = 8) -> list[str]:
        """The current stamp of each path: a stat each, a content hash only where size or mtime moved since
        the recorded stamp (in `workers` threads: hashlib and file reads release the GIL)."""
        found: list[str] = [""] * len(paths)
        to_hash: list[tuple[int, str, int, int]] = []
        for i, path in enumerate(paths):
            try:
                st = os.stat(path)
            except (OSError, ValueError):
                found[i] = ABSENT
                continue
            if not stat.S_ISREG(st.st_mode):
                found[i] = NOT_A_FILE
                continue
            recorded = self.rows.get(path)
            if recorded is not None and recorded[:2] == (st.st_size, st.st_mtime_ns):
                found[i] = recorded[2]
            elif recorded is None:
                found[i] = f"stat:{st.st_size}:{st.st_mtime_ns}"
                self.rows[path] = (st.st_size, st.st_mtime_ns, found[i])
                self.changed = True
            else:
                to_hash.append((i, path, st.st_size, st.st_mtime_ns))

        def content(job: tuple[int, str, int, int]) -> str:
            try:
                return f"sha256:{sha256_file(Path(job[1]))}"
            except OSError:
                return ABSENT  # gone or unreadable since the stat; the stage says which and why

        with ThreadPoolExecutor(max(1, min(workers, len(to_hash)))) as pool:
            for (i, path, size, mtime), stamp_ in zip(to_hash, pool.map(content, to_hash), strict=True):
                found[i] = stamp_
                self.rows[path] = (size, mtime, stamp_)
                self.changed = True
        return found

    def save(self) -> None:
        """Write the table atomically when anything changed."""
        if not self.changed:
            return
        paths = sorted(self.rows)
        columns = [paths, *([self.rows[p][k] for p in paths] for k in range(3))]
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        arrays = [pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA, strict=True)]
        pq.write_table(pa.Table.from_arrays(arrays, schema=SCHEMA), partial)
        os.replace(partial, self.path)
        self.changed = False
