"""The async teacher client against a real local OpenAI-compatible server: every fault ends in a retry,
a recorded reject or a clear error; nothing answered is lost and nothing is paid twice."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from models.distill.batch_api import read_state, run_batch
from models.distill.cache import CachedResponse, ResponseCache
from models.distill.governance import EndpointPolicyError, MissingAPIKeyError, is_local_host
from models.distill.parse import EntityFinder, parse_response, qc_flags
from models.distill.prompt import build_messages
from models.distill.teacher_http import (
    ChatRequest,
    ClientConfig,
    TeacherClient,
    TeacherFatalError,
    TokenBucket,
    complete_many,
    summarize,
)
from tests.fake_openai_server import FakeOpenAIServer, rules_responder

REPO = Path(__file__).resolve().parent.parent
ENTITIES = ["effusion", "pneumothorax", "pneumonia", "atelectasis", "cardiomegaly"]
REPORTS = [
    "Mild left pleural effusion. No pneumothorax.",
    "Possible pneumonia in the right lower lobe. No effusion.",
    "Moderate cardiomegaly. Bibasilar atelectasis.",
    "No pneumothorax. Small right effusion.",
    "Severe cardiomegaly with no effusion.",
    "Patchy right basilar atelectasis; pneumonia cannot be excluded.",
]


def requests_for(reports: list[str]) -> list[ChatRequest]:
    out = []
    for i, report in enumerate(reports):
        found = EntityFinder(ENTITIES).find(report)
        out.append(ChatRequest(f"s{i}", tuple(build_messages(report, found))))
    return out


def expected(report: str) -> str:
    return rules_responder(report, EntityFinder(ENTITIES).find(report))


def cfg_for(server: FakeOpenAIServer, **kw) -> ClientConfig:
    base = {
        "base_url": server.base_url,
        "model": "teacher",
        "concurrency": 1,
        "backoff_base_s": 0.01,
        "timeout_s": 15.0,
        "max_retries": 3,
    }
    return ClientConfig(**{**base, **kw})


def run(reqs, cfg, cache=None, progress=None):
    return asyncio.run(complete_many(reqs, cfg, cache, progress))


@pytest.fixture()
def server():
    with FakeOpenAIServer() as s:
        yield s


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


# ------------------------------------------------------------------------------------------ happy path


def test_answers_are_the_rules_teacher_and_a_rerun_sends_zero_requests(server, tmp_path):
    reqs = requests_for(REPORTS)
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        first = run(reqs, cfg_for(server, concurrency=4), cache)
        assert [r.content for r in first] == [expected(r) for r in REPORTS]
        assert first[0].content == "There is mild left pleural effusion.\nThere is no pneumothorax."
        assert [r.key for r in first] == [f"s{i}" for i in range(len(REPORTS))]
        assert server.completions_sent == len(REPORTS) and len(cache) == len(REPORTS)
        assert all(r.prompt_tokens == 100 and r.completion_tokens > 0 and r.attempts == 1 for r in first)
        again = run(reqs, cfg_for(server, concurrency=4), cache)
    assert server.completions_sent == len(REPORTS)  # nothing sent the second time
    assert [r.content for r in again] == [r.content for r in first] and all(r.cached for r in again)
    assert summarize(again)["http_attempts"] == 0 and summarize(again)["cache_hits"] == len(REPORTS)


def test_identical_prompts_are_sent_once(server):
    reqs = requests_for([REPORTS[0]]) + [ChatRequest("dup", requests_for([REPORTS[0]])[0].messages)]
    results = run(reqs, cfg_for(server))
    assert server.completions_sent == 1
    assert results[1].key == "dup" and results[1].content == results[0].content and results[1].attempts == 0


def test_text_completions_endpoint_for_a_served_student(server):
    prompt = "A chat ... USER: " + build_messages(REPORTS[0], ["effusion"])[-1]["content"] + " ASSISTANT:"
    (result,) = run([ChatRequest("s0", prompt=prompt)], cfg_for(server, model="student"))
    assert server.counts["POST /v1/completions"] == 1
    assert result.content == "There is mild left pleural effusion."


# ------------------------------------------------------------------------------------------ faults


def test_429_retry_after_is_honoured_not_the_backoff(server):
    server.faults.extend(["429:0.4"])
    t0 = time.monotonic()
    (result,) = run(requests_for(REPORTS[:1]), cfg_for(server, backoff_base_s=10.0))
    elapsed = time.monotonic() - t0
    assert result.content == expected(REPORTS[0]) and result.attempts == 2
    assert server.completions_sent == 2
    assert 0.4 <= elapsed < 5.0  # waited the server's 0.4 s, not the 10 s backoff


def test_500s_and_invalid_bodies_are_retried_and_counted(server):
    server.faults.extend(["500", "503", "invalid_json", "html", "empty", "no_usage"])
    results = run(requests_for(REPORTS[:2]), cfg_for(server, max_retries=5))
    assert results[0].attempts == 6 and results[0].content == expected(REPORTS[0])
    assert (
        results[0].prompt_tokens == 0
    )  # the successful answer had no usage block: counted as 0, not a crash
    assert results[1].attempts == 1 and results[1].content == expected(REPORTS[1])
    s = summarize(results)
    assert (s["http_attempts"], s["retries"], s["rejects"]) == (7, 5, 0)
    assert server.completions_sent == 7


def test_timeout_is_retried_within_the_per_request_limit(server):
    server.faults.append("timeout:2.0")
    t0 = time.monotonic()
    (result,) = run(requests_for(REPORTS[:1]), cfg_for(server, timeout_s=0.3))
    assert result.content == expected(REPORTS[0]) and result.attempts == 2
    assert time.monotonic() - t0 < 1.8  # did not wait for the slow answer


def test_exhausted_retries_become_a_reject_with_the_reason_and_nothing_cached(server, tmp_path):
    server.faults.extend(["500"] * 3)
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        results = run(requests_for(REPORTS[:2]), cfg_for(server, max_retries=2), cache)
        assert results[0].content is None and results[0].attempts == 3
        assert results[0].error == "gave up after 3 attempt(s): HTTP 500"
        assert results[1].content == expected(REPORTS[1])
        assert len(cache) == 1
        rerun = run(requests_for(REPORTS[:2]), cfg_for(server, max_retries=2), cache)  # the reject is retried
    assert rerun[0].content == expected(REPORTS[0]) and rerun[1].cached
    assert server.completions_sent == 3 + 1 + 1


def test_persistent_empty_content_and_bad_request_are_rejects(server):
    server.faults.extend(["empty", "empty", "400"])
    results = run(requests_for(REPORTS[:2]), cfg_for(server, max_retries=1))
    assert results[0].error == "gave up after 2 attempt(s): empty content"
    assert results[1].attempts == 1 and "HTTP 400" in results[1].error and "invalid" in results[1].error


def test_wrong_format_content_is_kept_and_flagged_by_qc(server):
    server.faults.append("wrong_format")
    (result,) = run(requests_for(REPORTS[:1]), cfg_for(server))
    parsed = parse_response(result.content, EntityFinder(ENTITIES))
    flags = qc_flags(parsed, ["effusion", "pneumothorax"], {})
    assert result.attempts == 1
    assert flags == [
        "unparseable_line:0",
        "unparseable_line:1",
        "missing_entity:effusion",
        "missing_entity:pneumothorax",
    ]


def test_retry_after_longer_than_the_limit_is_a_reject_not_a_hang(server):
    server.faults.append("429:3600")
    (result,) = run(requests_for(REPORTS[:1]), cfg_for(server, max_retry_after_s=60))
    assert result.attempts == 1 and "Retry-After 3600s exceeds max_retry_after_s" in result.error


def test_auth_and_quota_errors_stop_the_run_and_never_show_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-SECRET-123")
    with FakeOpenAIServer(require_key="sk-right") as server:
        with pytest.raises(TeacherFatalError, match=r"HTTP 401 .*check the API key") as err:
            run(requests_for(REPORTS[:3]), cfg_for(server, send_key_to_local=True))
        assert "SECRET" not in str(err.value)
        assert server.auth_headers[0] == "Bearer sk-wrong-SECRET-123"  # it was sent, just never echoed
    with FakeOpenAIServer() as server:
        server.faults.append("429-quota")
        with pytest.raises(TeacherFatalError, match="quota is exhausted"):
            run(requests_for(REPORTS[:1]), cfg_for(server))
        assert server.completions_sent == 1


def test_endpoint_down_is_a_clear_error_after_the_retries():
    with FakeOpenAIServer() as server:
        url = server.base_url
    with pytest.raises(TeacherFatalError, match=r"unreachable after 3 attempt\(s\): connection error"):
        run(requests_for(REPORTS[:1]), ClientConfig(base_url=url, max_retries=2, backoff_base_s=0.01))


# ------------------------------------------------------------------------------------------ governance


def test_external_endpoint_is_refused_without_the_ack_and_explains_the_dua(monkeypatch):
    cfg = ClientConfig(base_url="https://api.openai.com/v1")
    with pytest.raises(EndpointPolicyError) as err:
        run(requests_for(REPORTS[:1]), cfg)
    msg = str(err.value)
    assert "api.openai.com" in msg and "Data Use Agreement" in msg and "zero-retention verified" in msg
    assert "24 Sept 2025" in msg
    with pytest.raises(EndpointPolicyError, match="expected 'zero-retention verified'"):
        run(requests_for(REPORTS[:1]), cfg.model_copy(update={"external_endpoint_ack": "yes"}))
    acked = cfg.model_copy(update={"external_endpoint_ack": "zero-retention verified"})
    with pytest.raises(MissingAPIKeyError, match="OPENAI_API_KEY is not set"):  # before any request
        run(requests_for(REPORTS[:1]), acked)
    azure = ClientConfig(
        provider="azure", azure_endpoint="https://x.openai.azure.com", azure_api_version="2024-10-21"
    )
    with pytest.raises(EndpointPolicyError, match="x.openai.azure.com"):
        run(requests_for(REPORTS[:1]), azure)


def test_local_and_private_hosts_are_allowed():
    assert all(map(is_local_host, ["localhost", "127.0.0.1", "::1", "10.1.2.3", "192.168.0.9", "172.16.5.5"]))
    assert not any(map(is_local_host, ["api.openai.com", "8.8.8.8", "gpu-node.example.org", "172.32.0.1"]))
    # Reliability #3: a name under .localhost can resolve anywhere; only the literal name counts as local.
    assert not any(
        map(is_local_host, ["evil.localhost", "api.openai.com.localhost", "localhost.example.org"])
    )


def test_local_endpoint_gets_a_placeholder_key_unless_the_config_says_so(server, tmp_path, monkeypatch):
    """Reliability #3: an exported OPENAI_API_KEY goes to a local server only with send_key_to_local."""
    (result,) = run(requests_for(REPORTS[:1]), cfg_for(server))
    assert server.auth_headers[-1] == "Bearer EMPTY" and result.content
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-TOPSECRET")
    run(requests_for(REPORTS[1:2]), cfg_for(server))
    assert server.auth_headers[-1] == "Bearer EMPTY"
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        run(requests_for(REPORTS[2:4]), cfg_for(server, send_key_to_local=True), cache)
        client = TeacherClient(cfg_for(server, send_key_to_local=True), cache)
        assert "TOPSECRET" not in repr(client) and "***" in repr(client)
        asyncio.run(client.close())
    assert server.auth_headers[-1] == "Bearer sk-live-TOPSECRET"
    for f in tmp_path.iterdir():
        assert b"TOPSECRET" not in f.read_bytes()


def test_a_redirect_is_never_followed(monkeypatch):
    """Reliability #3: a local endpoint answering 307 elsewhere gets no prompt through to the other host."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-TOPSECRET")
    with FakeOpenAIServer() as local, FakeOpenAIServer() as elsewhere:
        local.redirect_to = elsewhere.base_url
        with pytest.raises(
            TeacherFatalError,
            match=r"HTTP 307 .*redirect to http://127\.0\.0\.1:\d+/v1/chat/completions not followed",
        ):
            run(requests_for(REPORTS), cfg_for(local, concurrency=4))
        assert sum(elsewhere.counts.values()) == 0 and elsewhere.auth_headers == []
        assert set(local.auth_headers) == {"Bearer EMPTY"}


def test_azure_client_reaches_the_deployment_route(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "azure-key")
    host = server.base_url.removesuffix("/v1")
    cfg = ClientConfig(
        provider="azure",
        azure_endpoint=host,
        azure_api_version="2024-10-21",
        model="gpt35-deploy",
        send_key_to_local=True,
    )
    (result,) = run(requests_for(REPORTS[:1]), cfg)
    assert result.content == expected(REPORTS[0])
    assert server.counts["POST /openai/deployments/gpt35-deploy/chat/completions"] == 1
    assert server.auth_headers[-1] == "azure-key"  # Azure sends it as the api-key header


# ------------------------------------------------------------------------------------------ limits


def test_concurrency_cap_and_rpm_limit(tmp_path):
    with FakeOpenAIServer(latency_s=0.2) as server:
        run(requests_for(REPORTS), cfg_for(server, concurrency=3, rpm=None, tpm=None))
        assert server.max_in_flight == 3  # overlapped, and never more than the cap
        reports = [f"Mild effusion number {i}." for i in range(25)]
        start = len(server.arrivals)
        results = run(requests_for(reports), cfg_for(server, concurrency=32, rpm=600, tpm=None))
        arrivals = sorted(server.arrivals[start:])
    assert all(r.content for r in results) and len(arrivals) == 25
    # 600/min = 10/s with a burst of 10, as the provider sees it: the 15 after the burst are spread over >=
    # 1.5 s, and no half second holds more than the burst + 5 + 1 (unpaced, all 25 arrive within a few
    # milliseconds)
    assert arrivals[-1] - arrivals[0] >= 1.3
    assert max(sum(1 for t in arrivals if a <= t < a + 0.5) for a in arrivals) <= 16


def test_token_bucket_paces_tokens_per_minute():
    async def go() -> float:
        bucket = TokenBucket(per_minute=6000)  # 100 tokens/s, burst 100
        t0 = time.monotonic()
        for _ in range(4):
            await bucket.acquire(50)
        return time.monotonic() - t0

    assert 0.9 <= asyncio.run(go()) < 2.0  # 200 tokens: 100 burst + 100 at 100/s


# ------------------------------------------------------------------------------------------ crash


CRASH_SCRIPT = """
import asyncio, json, os, sys
sys.path.insert(0, {repo!r})
from models.distill.cache import CachedResponse, ResponseCache
from models.distill.teacher_http import ChatRequest, ClientConfig, complete_many
reqs = [ChatRequest(k, tuple(m)) for k, m in json.load(open({reqs!r}))]
done = []
def progress(result):
    done.append(result)
    if len(done) == 3:
        os._exit(17)   # a hard crash: no cleanup, no flush of anything not yet committed
client = ClientConfig(base_url={url!r}, model="teacher", concurrency=1)
asyncio.run(complete_many(reqs, client, ResponseCache({cache!r}), progress))
"""


def test_a_crash_mid_run_resumes_without_paying_again(server, tmp_path):
    reqs = requests_for(REPORTS)
    (tmp_path / "reqs.json").write_text(json.dumps([[r.key, list(r.messages)] for r in reqs]))
    script = CRASH_SCRIPT.format(
        repo=str(REPO),
        reqs=str(tmp_path / "reqs.json"),
        url=server.base_url,
        cache=str(tmp_path / "c.sqlite"),
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 17, proc.stderr
    assert server.completions_sent == 3
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        assert len(cache) == 3
        results = run(reqs, cfg_for(server), cache)
    assert [r.content for r in results] == [expected(r) for r in REPORTS]
    assert sum(r.cached for r in results) == 3
    assert server.completions_sent == len(REPORTS)  # 3 before the crash + 3 after: none paid twice
    assert set(server.prompts_answered.values()) == {1}


# ------------------------------------------------------------------------------------------ batch API


def test_batch_api_merges_out_of_order_output_and_resubmits_only_failures(tmp_path):
    reqs = requests_for(REPORTS[:4])
    cfg = ClientConfig(base_url="http://127.0.0.1:1/v1", model="teacher")
    failing = reqs[2].hash(cfg)
    with FakeOpenAIServer(batch_failed_ids=frozenset({failing})) as server:
        cfg = cfg.model_copy(update={"base_url": server.base_url})
        with ResponseCache(tmp_path / "c.sqlite") as cache:
            results = asyncio.run(
                run_batch(reqs, cfg, cache, tmp_path / "state.json", poll_interval_s=0.01, log=lambda m: None)
            )
            assert [r.content for r in results] == [
                None if i == 2 else expected(REPORTS[i]) for i in range(4)
            ]
            assert results[2].error == "batch error server_error: injected batch failure"
            assert [r.attempts for r in results] == [1, 1, 1, 1] and len(cache) == 3
            server.batch_failed_ids = frozenset()
            again = asyncio.run(
                run_batch(reqs, cfg, cache, tmp_path / "state.json", poll_interval_s=0.01, log=lambda m: None)
            )
        assert [r.content for r in again] == [expected(r) for r in REPORTS[:4]]
        assert [r.cached for r in again] == [True, True, False, True]
        assert server.counts["POST /v1/batches"] == 2
        second_input = server.files["file-3"].decode().splitlines()
        assert [json.loads(x)["custom_id"] for x in second_input] == [
            failing
        ]  # only the failed one resubmitted
        assert set(server.prompts_answered.values()) == {1}


def test_batch_crash_while_polling_resumes_the_same_batch(tmp_path):
    reqs = requests_for(REPORTS[:3])
    with FakeOpenAIServer(batch_polls_until_done=1000) as server:
        cfg = ClientConfig(base_url=server.base_url, model="teacher")
        with ResponseCache(tmp_path / "c.sqlite") as cache:
            with pytest.raises(TimeoutError, match="rerun to resume it"):
                asyncio.run(
                    run_batch(
                        reqs,
                        cfg,
                        cache,
                        tmp_path / "s.json",
                        poll_interval_s=0.01,
                        max_wait_s=0.05,
                        log=lambda m: None,
                    )
                )
            assert read_state(tmp_path / "s.json")["batches"][0]["merged"] is False
            server.batch_polls_until_done = 0
            results = asyncio.run(
                run_batch(reqs, cfg, cache, tmp_path / "s.json", poll_interval_s=0.01, log=lambda m: None)
            )
        assert server.counts["POST /v1/batches"] == 1  # polled the existing batch, did not pay for a new one
        assert [r.content for r in results] == [expected(r) for r in REPORTS[:3]]
        assert read_state(tmp_path / "s.json")["batches"][0]["merged"] is True


# ------------------------------------------------------------------------------------------ stage


def test_stage_with_an_http_teacher_rejects_then_resumes_from_the_cache(tmp_path):
    import pyarrow.parquet as pq

    from tasks import seed_distill
    from tests.context import make_test_context, run_direct
    from tests.test_rules_teacher import PIPELINE, write_upstream

    write_upstream(tmp_path)
    out = tmp_path / "seed_distill"
    with FakeOpenAIServer() as server:
        cfg = seed_distill.Config(
            teacher="openai",
            base_url=server.base_url,
            model="teacher",
            n_reports=10,
            concurrency=1,
            max_retries=1,
        )
        server.faults.extend(["500", "500"])  # the first seed report fails twice: a reject
        ctx = make_test_context(tmp_path, PIPELINE, stage="seed_distill")
        run_direct(ctx, cfg)
        rejects = pq.read_table(out / "distill_rejects.parquet").to_pylist()
        assert rejects == [
            {
                "study_id": "s1",
                "stage": "seed_distill",
                "attempts": 2,
                "reason": "gave up after 2 attempt(s): HTTP 500",
            }
        ]
        rows = pq.read_table(out / "seed_distillations.parquet").to_pylist()
        assert [r["study_id"] for r in rows] == ["s2", "s4"]
        assert rows[0]["raw_response"] == "There may be right lower lobe pneumonia.\nThere is no effusion."
        assert rows[0]["flags"] == [] and rows[0]["prompt_tokens"] == 100 and not rows[0]["cached"]
        usage = pq.read_table(out / "distill_usage.parquet").to_pylist()[0]
        assert (
            usage["mode"],
            usage["requests"],
            usage["http_attempts"],
            usage["retries"],
            usage["rejects"],
        ) == (
            "http",
            3,
            4,
            1,
            1,
        )
        assert usage["estimated_cost_usd"] == pytest.approx(
            200 / 1000 * cfg.price_prompt_per_1k
            + usage["completion_tokens"] / 1000 * cfg.price_completion_per_1k
        )
        run_direct(ctx, cfg)  # rerun: only the reject is sent
        assert server.completions_sent == 4 + 1
        rows = pq.read_table(out / "seed_distillations.parquet").to_pylist()
        assert [(r["study_id"], r["cached"]) for r in rows] == [("s1", False), ("s2", True), ("s4", True)]
        assert pq.read_table(out / "distill_rejects.parquet").num_rows == 0
        assert b"sk-" not in (out / seed_distill.CACHE_FILE).read_bytes()


def test_a_run_where_every_request_failed_is_a_failure_and_the_next_run_retries(tmp_path):
    """Reliability #9: no success record for a seed set below the minimum; failures are sent again."""
    import pyarrow.parquet as pq

    from tasks import seed_distill
    from tasks.record import read_record
    from tests.context import make_test_context, run_direct
    from tests.test_rules_teacher import PIPELINE, write_upstream

    write_upstream(tmp_path)
    with FakeOpenAIServer() as server:
        cfg = seed_distill.Config(
            teacher="openai",
            base_url=server.base_url,
            model="teacher",
            n_reports=10,
            concurrency=1,
            max_retries=0,
        )
        server.faults.extend(["500"] * 3)
        ctx = make_test_context(tmp_path, PIPELINE, stage="seed_distill")
        with pytest.raises(RuntimeError, match=r"only 0 of 3 teacher requests succeeded .*HTTP 500"):
            run_direct(ctx, cfg)
        assert read_record(tmp_path, "seed_distill") is None
        assert not (tmp_path / "seed_distill" / "seed_distillations.parquet").exists()
        rejects = pq.read_table(tmp_path / "seed_distill" / ".attempt" / "distill_rejects.parquet")
        assert rejects.num_rows == 3  # the failed attempt's outputs, kept apart
        run_direct(ctx, cfg)
        assert server.completions_sent == 3 + 3
        assert set(read_record(tmp_path, "seed_distill").outputs) >= {
            "seed_distillations",
            "teacher_settings",
        }


def test_stage_refuses_an_external_teacher_before_any_work(tmp_path):
    from tasks import seed_distill
    from tests.context import make_test_context, run_direct
    from tests.test_rules_teacher import PIPELINE

    ctx = make_test_context(tmp_path, PIPELINE, stage="seed_distill")
    with pytest.raises(EndpointPolicyError, match="PhysioNet"):
        run_direct(ctx, seed_distill.Config(teacher="openai"))  # no upstream needed to fail first
    with pytest.raises(MissingAPIKeyError):
        seed_distill.run(
            ctx, seed_distill.Config(teacher="openai", external_endpoint_ack="zero-retention verified")
        )


def test_group_commit_makes_every_answer_durable_before_aput_returns(tmp_path):
    from models.distill.cache import CachedResponse

    async def go() -> tuple[int, int]:
        with ResponseCache(tmp_path / "c.sqlite") as cache:
            writes = []
            write = cache._write
            cache._write = lambda rs: (writes.append(len(rs)), write(rs))[1]
            await asyncio.gather(
                *(cache.aput(CachedResponse("m", f"h{i}", "x", 1, 1, 0.0, "http")) for i in range(50))
            )
            with ResponseCache(tmp_path / "c.sqlite") as other:  # a second connection sees all 50 committed
                return len(other), len(writes)

    stored, commits = asyncio.run(go())
    assert stored == 50 and commits < 50  # answers arriving together share one fsync


def test_retry_after_header_forms():
    from email.utils import format_datetime

    from models.distill.teacher_http import _retry_after

    class R:
        def __init__(self, **headers):
            self.headers = headers

    assert _retry_after(R(**{"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    assert _retry_after(R(**{"retry-after": "1.5"})) == 1.5
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= _retry_after(R(**{"retry-after": soon})) <= 31
    assert _retry_after(R(**{"retry-after": "soon"})) is None and _retry_after(R()) is None


def test_an_answer_longer_than_its_cap_is_a_reject_row_and_never_cached(tmp_path):
    """Reliability #17e: a server ignoring max_tokens sent 3.8 MB answers, which were accepted and cached."""
    import pyarrow.parquet as pq

    from tasks import seed_distill
    from tests.context import make_test_context, run_direct
    from tests.test_rules_teacher import PIPELINE, write_upstream

    huge = "There is effusion. " * 20_000  # 380,000 characters
    answers = iter([huge])

    def runaway(report: str, entities: list[str]) -> str:
        return next(answers, None) or rules_responder(report, entities)

    write_upstream(tmp_path)
    out = tmp_path / "seed_distill"
    with FakeOpenAIServer(responder=runaway) as server:
        cfg = seed_distill.Config(
            teacher="openai",
            base_url=server.base_url,
            model="teacher",
            n_reports=10,
            concurrency=1,
            max_tokens=64,
        )
        ctx = make_test_context(tmp_path, PIPELINE, stage="seed_distill")
        run_direct(ctx, cfg)
        assert server.completions_sent == 3  # a reject, not retried: at temperature 0 it would come again
        rejects = pq.read_table(out / "distill_rejects.parquet").to_pylist()
        assert rejects == [
            {
                "study_id": "s1",
                "stage": "seed_distill",
                "attempts": 1,
                "reason": "gave up after 1 attempt(s): answer too long: 380,000 characters, the limit is "
                "1,024 (16 x max_tokens 64); the endpoint did not stop at max_tokens",
            }
        ]
        assert [r["study_id"] for r in pq.read_table(out / "seed_distillations.parquet").to_pylist()] == [
            "s2",
            "s4",
        ]
        with ResponseCache(out / seed_distill.CACHE_FILE) as cache:
            assert len(cache) == 2
            cfg = cfg_for(server, max_tokens=64, max_answer_chars=30)
            reqs = [ChatRequest("a", prompt="x"), ChatRequest("b", prompt="y")]
            texts = ["There is no effusion at all.", "There is a small left pleural effusion."]
            cache.put_many(
                [
                    CachedResponse("teacher", r.hash(cfg), t, 1, 1, 0.1, "http")
                    for r, t in zip(reqs, texts, strict=True)
                ]
            )
            results = run(reqs, cfg, cache)
    assert [r.content for r in results] == ["There is no effusion at all.", None]
    assert results[1].error == (
        "cached answer too long: 39 characters, the limit is 30 (max_answer_chars); the endpoint did not "
        "stop at max_tokens"
    )
    assert server.completions_sent == 3
