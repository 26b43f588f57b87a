"""OpenAI Batch API mode: upload a JSONL of requests, create a batch, poll, download, merge into the cache.

Half the price of synchronous calls and no rate-limit juggling, at the cost of up to 24 h latency
(the paper's 10,000 teacher calls fit one batch: at most 50,000 requests / 200 MB per file).
`custom_id` is the prompt hash, so output lines (which come back in any order) join onto requests
without ambiguity and identical prompts are paid once. The batch ids are written to a small state
file right after creation: a crash while polling resumes the same batch instead of paying again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from models.distill.cache import CachedResponse, ResponseCache
from models.distill.teacher_http import (
    ChatRequest,
    ChatResult,
    ClientConfig,
    answer_too_long,
    make_openai_client,
)

MAX_REQUESTS_PER_FILE = 50_000
TERMINAL = ("completed", "failed", "expired", "cancelled")


class BatchFailedError(RuntimeError):
    """The service rejected a whole batch (e.g. validation failed); nothing was paid for it."""


def batch_lines(requests: Sequence[ChatRequest], cfg: ClientConfig) -> list[dict]:
    """One JSONL request object per unique prompt; custom_id = prompt hash."""
    url = "/chat/completions" if cfg.provider == "azure" else "/v1/chat/completions"
    lines, seen = [], set()
    for req in requests:
        if req.messages is None:
            raise ValueError(f"request {req.key!r}: the Batch API mode sends chat messages only")
        h = req.hash(cfg)
        if h in seen:
            continue
        seen.add(h)
        body = {
            "model": cfg.model,
            "messages": list(req.messages),
            "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens,
        }
        lines.append({"custom_id": h, "method": "POST", "url": url, "body": body})
    return lines


def read_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"batches": []}


def write_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def merge_output(text: str, model: str, cache: ResponseCache) -> tuple[set[str], dict[str, str]]:
    """Put every successful output line into the cache; returns (merged custom_ids, custom_id -> reason
    for the failed ones)."""
    good, failed = [], {}
    for line in text.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        cid, resp = row["custom_id"], row.get("response") or {}
        if row.get("error") or resp.get("status_code") != 200:
            err = row.get("error") or {}
            failed[cid] = (
                f"batch error {err.get('code') or resp.get('status_code')}: {err.get('message', '')}".strip()
            )
            continue
        body = resp["body"]
        content = ((body.get("choices") or [{}])[0].get("message") or {}).get("content")
        if not content or not content.strip():
            failed[cid] = "batch output with empty content"
            continue
        usage = body.get("usage") or {}
        good.append(
            CachedResponse(
                model,
                cid,
                content,
                usage.get("prompt_tokens", 0),
                usage.get("completion_tokens", 0),
                0.0,
                "batch",
            )
        )
    cache.put_many(good)
    return {r.prompt_hash for r in good}, failed


async def run_batch(
    requests: Sequence[ChatRequest],
    cfg: ClientConfig,
    cache: ResponseCache,
    state_path: str | Path,
    poll_interval_s: float = 60.0,
    max_wait_s: float = 26 * 3600.0,
    log: Callable[[str], None] = print,
) -> list[ChatResult]:
    """Results in input order; requests already cached are not resubmitted, failed ones carry `error`."""
    state_path = Path(state_path)
    client, _ = make_openai_client(cfg)
    state = read_state(state_path)
    failed: dict[str, str] = {}
    paid: set[str] = set()
    try:
        in_flight = {cid for b in state["batches"] if not b.get("merged") for cid in b["custom_ids"]}
        todo = [ln for ln in batch_lines(requests, cfg) if ln["custom_id"] not in in_flight]
        todo = [ln for ln in todo if cache.get(cfg.model, ln["custom_id"]) is None]
        for start in range(0, len(todo), MAX_REQUESTS_PER_FILE):
            chunk = todo[start : start + MAX_REQUESTS_PER_FILE]
            data = "".join(json.dumps(ln) + "\n" for ln in chunk).encode()
            f = await client.files.create(file=("ecamp-teacher.jsonl", data), purpose="batch")
            b = await client.batches.create(
                input_file_id=f.id,
                endpoint=chunk[0]["url"],
                completion_window="24h",
                metadata={"job": "ecamp-seed-distill"},
            )
            state["batches"].append(
                {"id": b.id, "custom_ids": [ln["custom_id"] for ln in chunk], "merged": False}
            )
            write_state(state_path, state)
            log(f"submitted batch {b.id} with {len(chunk)} requests")
        for entry in state["batches"]:
            if not entry.get("merged"):
                failed.update(
                    await _wait_and_merge(client, entry, cfg, cache, poll_interval_s, max_wait_s, log, paid)
                )
                entry["merged"] = True
                write_state(state_path, state)
    finally:
        await client.close()
    return _results(requests, cfg, cache, failed, paid)


async def _wait_and_merge(
    client, entry, cfg, cache, poll_interval_s, max_wait_s, log, paid
) -> dict[str, str]:
    deadline = time.monotonic() + max_wait_s
    while (b := await client.batches.retrieve(entry["id"])).status not in TERMINAL:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"batch {entry['id']} still {b.status} after {max_wait_s:.0f}s; rerun to resume it"
            )
        await asyncio.sleep(poll_interval_s)
    log(f"batch {entry['id']} {b.status}: {b.request_counts}")
    if b.status == "failed" and not b.output_file_id:
        errors = "; ".join(e.message or "" for e in (b.errors.data if b.errors and b.errors.data else []))
        raise BatchFailedError(f"batch {entry['id']} failed: {errors or 'no reason given'}")
    failed: dict[str, str] = {}
    for file_id in (b.output_file_id, b.error_file_id):
        if file_id:
            text = (await client.files.content(file_id)).text
            merged, bad = merge_output(text, cfg.model, cache)
            paid |= merged
            failed.update(bad)
    for cid in entry["custom_ids"]:  # expired/cancelled batches keep only partial output
        if cid not in failed and cache.get(cfg.model, cid) is None:
            failed[cid] = f"no output: batch {b.status}"
    return failed


def _results(
    requests: Sequence[ChatRequest],
    cfg: ClientConfig,
    cache: ResponseCache,
    failed: dict[str, str],
    paid: set[str],
) -> list[ChatResult]:
    """Every answer is read back from the cache; those paid in this run count one attempt (the first key
    of a duplicated prompt only), the rest are cache hits."""
    out, counted = [], set()
    for req in requests:
        h = req.hash(cfg)
        hit = cache.get(cfg.model, h)
        if hit is None:
            reason = failed.get(h, "no batch output (rerun to resubmit)")
            out.append(ChatResult(req.key, cfg.model, h, None, attempts=1, error=reason))
        else:
            new = h in paid and h not in counted
            counted.add(h)
            if (too_long := answer_too_long(hit.content, cfg)) is not None:
                out.append(
                    ChatResult(req.key, cfg.model, h, None, attempts=int(new), cached=not new, error=too_long)
                )
                continue
            out.append(
                ChatResult(
                    req.key,
                    cfg.model,
                    h,
                    hit.content,
                    hit.prompt_tokens,
                    hit.completion_tokens,
                    hit.latency_s,
                    attempts=int(new),
                    cached=not new,
                )
            )
    return out
