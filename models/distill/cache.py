"""Persistent response cache: one row per (endpoint model, prompt hash), committed as soon as it arrives.

SQLite with `synchronous=FULL` fsyncs every commit, so a crash loses at most the requests that were
in flight; a rerun (or a Batch API merge) looks responses up here first and never pays for one twice.
WAL mode lets several processes (sharded bulk runs) share one file. No API key is ever stored.

An fsync takes milliseconds, so async callers use `aput`: answers that arrive together are committed
together in a worker thread (group commit), off the event loop; `aput` returns only once its answer
is on disk, so nothing is reported done before it is durable.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import astuple, dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    model TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    content TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (model, prompt_hash)
)
"""


@dataclass(frozen=True)
class CachedResponse:
    model: str
    prompt_hash: str
    content: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    source: str  # "http" or "batch": how it was paid for


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def _insert(db: sqlite3.Connection, responses: list[CachedResponse]) -> None:
    """One transaction (one fsync) for all `responses`; an existing key keeps its first answer."""
    now = time.time()
    with db:  # committed on exit
        db.execute("BEGIN")
        db.executemany(
            "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(*astuple(r), now) for r in responses],
        )


class ResponseCache:
    """Dictionary-like store of teacher responses backed by one SQLite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect(self.path)
        self._db.execute(_SCHEMA)
        self._writer: sqlite3.Connection | None = None  # used by one flush at a time, in a worker thread
        self._pending: list[tuple[CachedResponse, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def get(self, model: str, prompt_hash: str) -> CachedResponse | None:
        row = self._db.execute(
            "SELECT model, prompt_hash, content, prompt_tokens, completion_tokens, latency_s, source "
            "FROM responses WHERE model = ? AND prompt_hash = ?",
            (model, prompt_hash),
        ).fetchone()
        return CachedResponse(*row) if row else None

    def put_many(self, responses: list[CachedResponse]) -> None:
        """Insert and commit (fsync) responses; an existing key is kept (first paid answer wins)."""
        _insert(self._db, responses)

    async def aput(self, response: CachedResponse) -> None:
        """Commit `response` together with whatever else is waiting; returns once it is durable."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((response, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._write, [r for r, _ in batch])
            except Exception as err:  # every waiter sees the failure; nothing is reported as stored
                for _, future in batch:
                    future.set_exception(err)
                continue
            for _, future in batch:
                future.set_result(None)

    def _write(self, responses: list[CachedResponse]) -> None:
        if self._writer is None:
            self._writer = _connect(self.path)
        _insert(self._writer, responses)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def __contains__(self, key: tuple[str, str]) -> bool:
        return self.get(*key) is not None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"
