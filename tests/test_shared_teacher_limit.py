"""Two runs against one teacher account stay within its limits together: the shared Prefect rate limit (issue
27 item 4), on a real Prefect server and a real local OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import threading

import pytest

from models.distill.teacher_http import complete_many
from tasks.teacher_limits import PrefectRateLimit
from tests.fake_openai_server import FakeOpenAIServer
from tests.test_teacher_http import cfg_for, requests_for

RPM = 240  # 4 requests/s, a burst of 4


def two_runs_at_once(server: FakeOpenAIServer, shared: PrefectRateLimit | None, n: int) -> list[float]:
    """Two runs, each with its own client and its own rpm bucket (as two pipelines have), started together;
    the arrival times at the teacher, sorted."""
    start = len(server.arrivals)

    def one_run(tag: str) -> None:
        reqs = requests_for([f"Mild effusion number {tag}{i}." for i in range(n)])
        results = asyncio.run(
            complete_many(reqs, cfg_for(server, concurrency=8, rpm=RPM, tpm=None), None, None, shared)
        )
        assert all(r.content for r in results)

    runs = [threading.Thread(target=one_run, args=(tag,)) for tag in "ab"]
    for r in runs:
        r.start()
    for r in runs:
        r.join()
    return sorted(server.arrivals[start:])


def busiest_second(arrivals: list[float]) -> int:
    return max(sum(1 for t in arrivals if a <= t < a + 1.0) for a in arrivals)


@pytest.mark.slow
def test_two_runs_share_the_teachers_requests_per_minute(prefect_server):
    n = 12  # per run: 24 requests together
    with FakeOpenAIServer() as server:
        alone = two_runs_at_once(server, None, n)
        shared = PrefectRateLimit("ecamp-test-teacher", rpm=RPM, tpm=None)
        shared.ensure()
        together = two_runs_at_once(server, shared, n)
    assert len(alone) == len(together) == 2 * n
    # Each run within its own 4/s, but the account sees both: 8/s and more in the busiest second.
    assert busiest_second(alone) >= 9, alone
    # Shared: the burst (4) plus 4/s, whichever run sends; the 20 after the burst take about 5 s.
    assert busiest_second(together) <= 4 + 4 + 1, together
    assert together[-1] - together[0] >= 4.0, together


@pytest.mark.slow
def test_the_limits_are_set_to_the_runs_rpm_and_tpm_and_follow_a_change(prefect_server):
    from prefect.client.orchestration import get_client

    PrefectRateLimit("ecamp-test-acct", rpm=3500, tpm=90_000).ensure()
    PrefectRateLimit("ecamp-test-acct", rpm=600, tpm=90_000).ensure()  # a later run with another tier
    with get_client(sync_client=True) as client:
        requests = client.read_global_concurrency_limit_by_name("ecamp-test-acct-requests")
        tokens = client.read_global_concurrency_limit_by_name("ecamp-test-acct-tokens")
    assert (requests.limit, requests.slot_decay_per_second) == (10, pytest.approx(10.0))
    assert (tokens.limit, tokens.slot_decay_per_second) == (1500, pytest.approx(1500.0))


def test_a_shared_limit_without_a_prefect_server_is_a_clear_error(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        with pytest.raises(RuntimeError) as err:
            PrefectRateLimit("acct", rpm=60, tpm=None).ensure()
    assert str(err.value) == (
        "shared teacher limit 'acct' lives on a Prefect server, and PREFECT_API_URL is not set: start the "
        "run against the server that the other runs use, or unset seed_distill.shared_limit"
    )
    with pytest.raises(ValueError, match="rpm and tpm are both unset"):
        PrefectRateLimit("acct", rpm=None, tpm=None)


def test_a_shared_limit_with_the_batch_api_is_refused_by_the_config():
    from tasks.config import ConfigError, load_config
    from tests.conftest import REPO_ROOT

    with pytest.raises(
        ConfigError, match="shared_limit paces live requests; the Batch API's requests are paced"
    ):
        load_config(
            REPO_ROOT / "configs" / "paper.yaml",
            ["seed_distill.shared_limit=acct", "seed_distill.batch_api=true"],
        )
