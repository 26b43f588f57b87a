"""The teacher's provider limits as Prefect global rate limits, so that every run against one account shares
them.

Each run's client keeps itself within `rpm` / `tpm`; two pipelines at once (two deployments, a rerun beside a
backfill) would still send twice that and meet the provider's 429s. A pair of global concurrency limits with a
slot decay, `<name>-requests` and `<name>-tokens`, is one budget on the Prefect server for all of them: a
request takes one slot of the first and its token estimate of the second, and the slots drain at rpm/60 and
tpm/60 a second. The limit holds one second's worth (the client's own burst), and a request larger than that
takes the whole of it, as the client's token bucket lets it borrow.
"""

from __future__ import annotations

import math

from prefect.client.orchestration import get_client
from prefect.concurrency.asyncio import rate_limit
from prefect.settings import PREFECT_API_URL


class PrefectRateLimit:
    """`SharedLimit` on a Prefect server: the named pair of global rate limits, created or updated to
    rpm/tpm."""

    def __init__(self, name: str, rpm: float | None, tpm: float | None):
        if rpm is None and tpm is None:
            raise ValueError(
                f"shared limit {name!r}: rpm and tpm are both unset, so there is nothing to share"
            )
        self.name, self.rpm, self.tpm = name, rpm, tpm
        self.token_slots = max(1, math.ceil(tpm / 60)) if tpm else 0

    @property
    def requests_limit(self) -> str:
        return f"{self.name}-requests"

    @property
    def tokens_limit(self) -> str:
        return f"{self.name}-tokens"

    def ensure(self) -> None:
        """Create the limits, or set them to this run's rpm/tpm (the last run to start decides)."""
        if not PREFECT_API_URL.value():
            raise RuntimeError(
                f"shared teacher limit {self.name!r} lives on a Prefect server, and PREFECT_API_URL is not "
                f"set: start the run against the server that the other runs use, or unset "
                f"seed_distill.shared_limit"
            )
        with get_client(sync_client=True) as client:
            if self.rpm:
                client.upsert_global_concurrency_limit_by_name(
                    self.requests_limit, max(1, math.ceil(self.rpm / 60)), self.rpm / 60
                )
            if self.tpm:
                client.upsert_global_concurrency_limit_by_name(
                    self.tokens_limit, self.token_slots, self.tpm / 60
                )

    async def acquire(self, requests: int, tokens: int) -> None:
        if self.rpm:
            await rate_limit(self.requests_limit, occupy=requests, strict=True)
        if self.tpm:
            await rate_limit(self.tokens_limit, occupy=min(tokens, self.token_slots), strict=True)
