"""Benchmark the async teacher client against the local fake OpenAI server: concurrency 1 vs 32, and the
cache.

The server adds a fixed latency per request (default 50 ms, like a fast hosted endpoint's queueing) and
answers with a constant sentence, so the numbers measure the client (limits, retries bookkeeping, cache
commits), not the model. Rate limits are off (rpm/tpm None) so that only the concurrency cap bounds
throughput. Measured:
* requests/s at concurrency 1 and 32 (every answer committed to a fresh SQLite cache, fsync per answer),
  and their ratio (ideal: 32; the bound is latency / per-request client+server CPU time);
* the cache-hit path: reports/s of a rerun that is answered entirely from the cache (zero requests sent).

    .venv/bin/python bench/teacher_client.py [--latency-ms 50] [--n1 64] [--n32 512] [--cached 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.distill.cache import CachedResponse, ResponseCache  # noqa: E402
from models.distill.prompt import build_messages  # noqa: E402
from models.distill.teacher_http import ChatRequest, ClientConfig, complete_many  # noqa: E402
from tests.fake_openai_server import FakeOpenAIServer  # noqa: E402

ANSWER = "There is mild left pleural effusion.\nThere is no pneumothorax."


def make_requests(n: int, tag: str) -> list[ChatRequest]:
    return [
        ChatRequest(
            f"{tag}{i}", tuple(build_messages(f"Report {tag}{i}: mild left pleural effusion.", ["effusion"]))
        )
        for i in range(n)
    ]


def timed_run(server: FakeOpenAIServer, n: int, concurrency: int, cache_dir: Path) -> float:
    """Requests/s for `n` fresh requests at `concurrency`, every answer committed to a new cache."""
    cfg = ClientConfig(base_url=server.base_url, model="bench", concurrency=concurrency, rpm=None, tpm=None)
    requests = make_requests(n, f"c{concurrency}-")
    sent_before = server.completions_sent
    with ResponseCache(cache_dir / f"c{concurrency}.sqlite") as cache:
        t0 = time.perf_counter()
        results = asyncio.run(complete_many(requests, cfg, cache))
        elapsed = time.perf_counter() - t0
    assert all(r.content == ANSWER for r in results) and server.completions_sent - sent_before == n
    return n / elapsed


def cache_hit_rate(server: FakeOpenAIServer, n: int, cache_dir: Path) -> float:
    """Reports/s when every request is answered from the cache (nothing may be sent)."""
    cfg = ClientConfig(base_url=server.base_url, model="bench", concurrency=32, rpm=None, tpm=None)
    requests = make_requests(n, "hit-")
    with ResponseCache(cache_dir / "hits.sqlite") as cache:
        cache.put_many(
            [CachedResponse("bench", r.hash(cfg), ANSWER, 100, 12, 0.05, "http") for r in requests]
        )
        sent_before = server.completions_sent
        t0 = time.perf_counter()
        results = asyncio.run(complete_many(requests, cfg, cache))
        elapsed = time.perf_counter() - t0
    assert server.completions_sent == sent_before and all(r.cached for r in results)
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--n1", type=int, default=64, help="requests at concurrency 1")
    parser.add_argument("--n32", type=int, default=512, help="requests at concurrency 32")
    parser.add_argument("--cached", type=int, default=5000, help="requests answered from the cache")
    args = parser.parse_args()
    print(f"cpu: os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    with (
        tempfile.TemporaryDirectory() as tmp,
        FakeOpenAIServer(lambda report, entities: ANSWER, args.latency_ms / 1000) as server,
    ):
        one = timed_run(server, args.n1, 1, Path(tmp))
        many = timed_run(server, args.n32, 32, Path(tmp))
        hits = cache_hit_rate(server, args.cached, Path(tmp))
    print(f"server latency {args.latency_ms:.0f} ms per request")
    print(f"concurrency  1: {one:8.1f} requests/s ({args.n1} requests; ideal {1000 / args.latency_ms:.1f})")
    print(
        f"concurrency 32: {many:8.1f} requests/s ({args.n32} requests; ideal {32000 / args.latency_ms:.0f})"
    )
    print(f"ratio 32 vs 1 : {many / one:8.1f}x")
    print(f"cache hits    : {hits:8.0f} reports/s ({args.cached} reports, zero requests sent)")


if __name__ == "__main__":
    main()
