"""Persistent response cache: one row per (endpoint model, prompt hash), committed as soon as it arrives.

SQLite with `synchronous=FULL` fsyncs every commit, so a crash loses at most the requests that were
in flight; a rerun (or a Batch API merge) looks responses up here first and never pays for one twice.
WAL mode lets several processes (sharded bulk runs) share one file. No API key is ever stored.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
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


class ResponseCache:
    """Dictionary-like store of teacher responses backed by one SQLite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def get(self, model: str, prompt_hash: str) -> CachedResponse | None:
        row = self._db.execute(
            "SELECT model, prompt_hash, content, prompt_tokens, completion_tokens, latency_s, source "
            "FROM responses WHERE model = ? AND prompt_hash = ?",
            (model, prompt_hash),
        ).fetchone()
        return CachedResponse(*row) if row else None

    def put(self, response: CachedResponse) -> None:
        """Insert and commit (fsync) one response; an existing key is kept (first paid answer wins)."""
        self.put_many([response])

    def put_many(self, responses: list[CachedResponse]) -> None:
        now = time.time()
        rows = [
            (
                r.model,
                r.prompt_hash,
                r.content,
                r.prompt_tokens,
                r.completion_tokens,
                r.latency_s,
                r.source,
                now,
            )
            for r in responses
        ]
        with self._db:  # one transaction, committed (and fsynced) on exit
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def __contains__(self, key: tuple[str, str]) -> bool:
        return self.get(*key) is not None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"
