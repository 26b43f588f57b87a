"""Async client for any OpenAI-compatible endpoint (OpenAI, Azure OpenAI, vLLM serving the student).

Why our own loop around the SDK: every attempt must be counted (usage and cost reports), a crash must
never make us pay twice, and one failing report must end as a recorded reject, not as a lost run. So
the SDK's own retries are off (`max_retries=0`) and this module does

  cache lookup -> dedupe identical prompts -> concurrency cap (Semaphore) -> requests/min and tokens/min
  buckets -> call with a hard timeout -> retry with exponential backoff honouring `Retry-After`
  on 429/5xx/timeouts/invalid bodies -> commit each answer to the cache the moment it arrives.

Errors that no retry can fix (bad key, unknown model, exhausted quota, endpoint down) stop the run
with a clear message; everything answered so far is already in the cache.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, Literal, Protocol

import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from models.distill.cache import CachedResponse, ResponseCache
from models.distill.governance import ApiKey, check_route, redact, resolve_api_key
from models.distill.prompt import estimate_prompt_tokens, estimate_tokens, prompt_hash

# English text averages about 4 characters a token: 16 leaves room for long words and whitespace, and still
# stops an answer that ignores max_tokens (3.8 MB answers to max_tokens 256 were seen) at a few kB.
ANSWER_CHARS_PER_TOKEN = 16


def iso_date(value: Any) -> Any:
    """YAML reads an unquoted `2024-10-21` as a date; an API version is that date's ISO string."""
    return value.isoformat() if isinstance(value, date) else value


ApiVersion = Annotated[str, BeforeValidator(iso_date)]


class ClientConfig(BaseModel):
    """Endpoint, model and the limits of one OpenAI-compatible service. The key comes from `api_key_env`."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["openai", "azure"] = "openai"
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-3.5-turbo"  # for Azure: the deployment name
    azure_endpoint: str | None = None  # e.g. https://my-resource.openai.azure.com
    azure_api_version: ApiVersion | None = None  # e.g. 2024-10-21 (a YAML date is accepted)
    api_key_env: str = "OPENAI_API_KEY"
    send_key_to_local: bool = False  # a local server gets a placeholder key unless this says otherwise
    external_endpoint_ack: str | None = None
    proxy: str | None = None  # e.g. http://10.0.0.5:3128; judged by the data-use policy like the endpoint
    concurrency: int = Field(16, ge=1)
    # Provider limits (requests / tokens per minute; tokens = prompt estimate + max_tokens). None = unlimited,
    # right for a local vLLM; a hosted API needs its account tier's values (seed_distill sets OpenAI's).
    rpm: float | None = Field(None, gt=0)
    tpm: float | None = Field(None, gt=0)
    max_retries: int = Field(6, ge=0)
    timeout_s: float = Field(60.0, gt=0)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    max_retry_after_s: float = Field(600.0, ge=0)  # a longer Retry-After is not waited for: reject
    temperature: float = 0.0
    max_tokens: int = Field(256, ge=1)
    # A longer answer is a reject (never cached): a server that ignores max_tokens can send megabytes a
    # report. None: ANSWER_CHARS_PER_TOKEN characters per max_tokens token.
    max_answer_chars: int | None = Field(None, ge=1)
    seed: int = 0  # backoff jitter

    @property
    def endpoint_url(self) -> str:
        return (self.azure_endpoint or "") if self.provider == "azure" else self.base_url

    @property
    def answer_char_limit(self) -> int:
        return self.max_answer_chars or ANSWER_CHARS_PER_TOKEN * self.max_tokens


def answer_too_long(content: str, cfg: ClientConfig) -> str | None:
    """The reject reason for an answer longer than `cfg.answer_char_limit`, or None."""
    limit = cfg.answer_char_limit
    if len(content) <= limit:
        return None
    source = (
        "max_answer_chars"
        if cfg.max_answer_chars
        else f"{ANSWER_CHARS_PER_TOKEN} x max_tokens {cfg.max_tokens}"
    )
    return (
        f"answer too long: {len(content):,} characters, the limit is {limit:,} ({source}); "
        "the endpoint did not stop at max_tokens"
    )


@dataclass(frozen=True)
class ChatRequest:
    """One request: chat `messages`, or a raw `prompt` for /v1/completions (a student without chat template):
    its text, or its token ids (the student's prompt cut as in training, sent as ids so the server neither
    re-tokenises nor adds a second BOS)."""

    key: str  # the caller's id, e.g. study_id
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError(f"request {self.key!r}: give exactly one of messages or prompt")
        if self.messages is not None:
            object.__setattr__(self, "messages", tuple(self.messages))
        if self.prompt is not None and not isinstance(self.prompt, str):
            object.__setattr__(self, "prompt", tuple(int(i) for i in self.prompt))

    def hash(self, cfg: ClientConfig) -> str:
        if self.messages is not None:
            messages = self.messages
        elif isinstance(self.prompt, str):
            messages = ({"role": "prompt", "content": self.prompt},)
        else:
            messages = ({"role": "prompt_ids", "content": " ".join(map(str, self.prompt))},)
        return prompt_hash(messages, cfg.temperature, cfg.max_tokens)

    def cost_tokens(self, cfg: ClientConfig) -> int:
        """What a tokens/min limit charges up front: prompt estimate plus the completion budget."""
        if self.messages is not None:
            used = estimate_prompt_tokens(self.messages)
        elif isinstance(self.prompt, str):
            used = estimate_tokens(self.prompt)
        else:
            used = len(self.prompt)
        return used + cfg.max_tokens


@dataclass(frozen=True)
class ChatResult:
    key: str
    model: str
    prompt_hash: str
    content: str | None  # None when rejected
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 0  # HTTP requests actually sent for this result (0 when cached or deduplicated)
    cached: bool = False
    finish_reason: str | None = None
    error: str | None = None  # the reason of a reject


class TeacherFatalError(RuntimeError):
    """A failure no retry can fix; the run stops, answers so far are in the cache."""


class RetryableError(Exception):
    """One attempt failed in a way worth retrying; `retry_after` is the server's requested wait."""

    def __init__(self, reason: str, retry_after: float | None = None, fatal_when_exhausted: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.fatal_when_exhausted = (
            fatal_when_exhausted  # e.g. endpoint down: every other request would fail too
        )


class RejectError(Exception):
    """This request cannot succeed (e.g. 400 context too long): record a reject, go on with the others."""


# ---------------------------------------------------------------------------------------------- limiters


class TokenBucket:
    """`per_minute` units per minute, refilled continuously, burst of one second's worth.

    Providers enforce per-minute limits on sub-minute windows, so a full minute's burst would trip
    them; a request larger than the burst may still go when the bucket is full (it borrows).
    """

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, amount: float) -> None:
        async with self._lock:
            need = min(amount, self.capacity)
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
                self.updated = now
                if self.level >= need:
                    self.level -= amount
                    return
                await asyncio.sleep((need - self.level) / self.rate)


# ---------------------------------------------------------------------------------------------- client


def make_openai_client(cfg: ClientConfig) -> tuple[openai.AsyncOpenAI, ApiKey]:
    """The SDK client after the data-use check; SDK retries off so ours are the only ones.

    Redirects are never followed (the SDK's default client follows them): the policy check covers the
    configured host only, and a 307 would carry the report text and the key to a host nobody checked. For the
    same reason the environment's proxy variables are ignored (`trust_env=False`): only the configured
    endpoint, and the configured `proxy` when set, are ever contacted.
    """
    if cfg.provider == "azure" and not (cfg.azure_endpoint and cfg.azure_api_version):
        raise ValueError("provider 'azure' needs azure_endpoint and azure_api_version")
    local = check_route(cfg.endpoint_url, cfg.proxy, cfg.external_endpoint_ack)
    key = resolve_api_key(cfg.api_key_env, local, cfg.send_key_to_local)
    http = openai.DefaultAsyncHttpxClient(follow_redirects=False, trust_env=False, proxy=cfg.proxy)
    if cfg.provider == "azure":
        client = openai.AsyncAzureOpenAI(
            azure_endpoint=cfg.azure_endpoint,
            api_version=cfg.azure_api_version,
            api_key=key.value,
            max_retries=0,
            timeout=cfg.timeout_s,
            http_client=http,
        )
    else:
        client = openai.AsyncOpenAI(
            base_url=cfg.base_url, api_key=key.value, max_retries=0, timeout=cfg.timeout_s, http_client=http
        )
    return client, key


class SharedLimit(Protocol):
    """A provider limit held outside this process: every run that names it draws on one budget.

    The client's own buckets keep one run within `rpm`/`tpm`; two runs against one account would still send
    twice that. A shared limit (e.g. a Prefect global rate limit, `tasks.teacher_limits`) is waited for too.
    """

    async def acquire(self, requests: int, tokens: int) -> None: ...


class TeacherClient:
    """Sends requests with limits and retries; one instance per run (it owns the SDK client)."""

    def __init__(self, cfg: ClientConfig, cache: ResponseCache | None, shared: SharedLimit | None = None):
        self.cfg = cfg
        self.cache = cache
        self.shared = shared
        self.client, self._key = make_openai_client(cfg)
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._rpm = TokenBucket(cfg.rpm) if cfg.rpm else None
        self._tpm = TokenBucket(cfg.tpm) if cfg.tpm else None
        self._pause_until = 0.0  # a 429's Retry-After holds back every worker, not only the one that got it
        self._rng = random.Random(cfg.seed)

    def __repr__(self) -> str:
        return f"TeacherClient(model={self.cfg.model!r}, endpoint={self.cfg.endpoint_url!r}, key={self._key})"

    async def close(self) -> None:
        await self.client.close()

    # -- one request ------------------------------------------------------------------------------------

    async def complete(self, req: ChatRequest) -> ChatResult:
        """Answer from the cache, or send with retries; returns a result with `error` set on a reject."""
        h = req.hash(self.cfg)
        if self.cache is not None and (hit := self.cache.get(self.cfg.model, h)) is not None:
            if (too_long := answer_too_long(hit.content, self.cfg)) is not None:
                return ChatResult(req.key, self.cfg.model, h, None, cached=True, error=f"cached {too_long}")
            return ChatResult(
                req.key,
                self.cfg.model,
                h,
                hit.content,
                hit.prompt_tokens,
                hit.completion_tokens,
                hit.latency_s,
                attempts=0,
                cached=True,
            )
        async with self._sem:
            return await self._send_with_retries(req, h)

    async def _send_with_retries(self, req: ChatRequest, h: str) -> ChatResult:
        cfg, attempts, reason = self.cfg, 0, ""
        for attempt in range(cfg.max_retries + 1):
            await self._wait_for_turn(req)
            attempts += 1
            t0 = time.monotonic()
            try:
                content, usage, finish = await self._send_once(req)
            except RetryableError as e:
                reason = e.reason
                wait = self._retry_wait(attempt, e.retry_after)
                if wait is None:
                    reason = f"{reason}; Retry-After {e.retry_after:.0f}s exceeds max_retry_after_s"
                    break
                if e.retry_after is not None:
                    self._pause_until = max(self._pause_until, time.monotonic() + wait)
                if attempt < cfg.max_retries:
                    await asyncio.sleep(wait)
                elif e.fatal_when_exhausted:
                    raise TeacherFatalError(
                        redact(
                            f"endpoint {cfg.endpoint_url} unreachable after {attempts} attempt(s): {reason}",
                            self._key,
                        )
                    ) from None
                continue
            except RejectError as e:
                reason = str(e)
                break
            latency = time.monotonic() - t0
            prompt_tokens, completion_tokens = usage
            if self.cache is not None:  # committed (group commit, fsync) before anyone sees the answer
                await self.cache.aput(
                    CachedResponse(cfg.model, h, content, prompt_tokens, completion_tokens, latency, "http")
                )
            return ChatResult(
                req.key,
                cfg.model,
                h,
                content,
                prompt_tokens,
                completion_tokens,
                latency,
                attempts=attempts,
                finish_reason=finish,
            )
        return ChatResult(
            req.key,
            cfg.model,
            h,
            None,
            attempts=attempts,
            error=redact(f"gave up after {attempts} attempt(s): {reason}", self._key),
        )

    async def _wait_for_turn(self, req: ChatRequest) -> None:
        if (pause := self._pause_until - time.monotonic()) > 0:
            await asyncio.sleep(pause)
        if self._rpm is not None:
            await self._rpm.acquire(1)
        if self._tpm is not None:
            await self._tpm.acquire(req.cost_tokens(self.cfg))
        if self.shared is not None:
            await self.shared.acquire(1, req.cost_tokens(self.cfg))

    def _retry_wait(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds before the next attempt: the server's Retry-After when given, else 2^n backoff + jitter."""
        if retry_after is not None:
            return None if retry_after > self.cfg.max_retry_after_s else max(0.0, retry_after)
        backoff = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2**attempt)
        return backoff * (1.0 + 0.25 * self._rng.random())

    async def _send_once(self, req: ChatRequest) -> tuple[str, tuple[int, int], str | None]:
        """One HTTP request under a hard total timeout; maps SDK errors onto retry / reject / fatal."""
        cfg = self.cfg
        try:
            async with asyncio.timeout(cfg.timeout_s):
                resp = await self._post(req)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            raise TeacherFatalError(self._describe(e, "check the API key, model name and endpoint")) from None
        except openai.RateLimitError as e:
            if e.code == "insufficient_quota":
                raise TeacherFatalError(self._describe(e, "the account's quota is exhausted")) from None
            raise RetryableError("429 rate limited", _retry_after(e.response)) from None
        except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
            raise RejectError(self._describe(e, "the request itself is invalid")) from None
        except openai.APIStatusError as e:
            if 300 <= e.status_code < 400:
                where = e.response.headers.get("location", "an unnamed location")
                raise TeacherFatalError(
                    redact(
                        f"HTTP {e.status_code} from {cfg.endpoint_url}: redirect to {where} not followed "
                        "(report text goes only to the configured endpoint, which the data-use policy "
                        "checked); configure the final URL instead",
                        self._key,
                    )
                ) from None
            if e.status_code in (408, 409) or e.status_code >= 500:
                raise RetryableError(f"HTTP {e.status_code}", _retry_after(e.response)) from None
            raise RejectError(self._describe(e, "unexpected status")) from None
        except (TimeoutError, openai.APITimeoutError):
            raise RetryableError(f"timeout after {cfg.timeout_s:g}s") from None
        except openai.APIConnectionError as e:
            raise RetryableError(f"connection error: {e.__cause__ or e}", fatal_when_exhausted=True) from None
        except (openai.APIResponseValidationError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise RetryableError(f"invalid JSON in response: {type(e).__name__}") from None
        content, tokens, finish = _extract(resp, chat=req.messages is not None)
        if (too_long := answer_too_long(content, cfg)) is not None:
            raise RejectError(too_long)  # at temperature 0 a retry gets the same answer
        return content, tokens, finish

    async def _post(self, req: ChatRequest) -> object:
        """The request through the SDK's generic `post` (same auth, URL rules incl. Azure deployments, error
        types and response models): skipping the per-call TypedDict transform of `chat.completions.create`
        saves several ms of CPU per request, which caps throughput at high concurrency."""
        body: dict[str, object] = {
            "model": self.cfg.model,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        if req.messages is not None:
            body["messages"] = list(req.messages)
            return await self.client.post("/chat/completions", cast_to=ChatCompletion, body=body)
        body["prompt"] = req.prompt if isinstance(req.prompt, str) else list(req.prompt)
        return await self.client.post("/completions", cast_to=Completion, body=body)

    def _describe(self, e: openai.APIError, hint: str) -> str:
        status = getattr(e, "status_code", "")
        return redact(f"HTTP {status} from {self.cfg.endpoint_url} ({hint}): {e.message}", self._key)


def _retry_after(response: object) -> float | None:
    """Seconds from `retry-after-ms`, or `retry-after` in seconds or as an HTTP date; None when
    absent/unreadable."""
    headers = getattr(response, "headers", None) or {}
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def _extract(resp: object, chat: bool) -> tuple[str, tuple[int, int], str | None]:
    """Content, (prompt, completion) tokens and finish reason; a malformed or empty body is retryable."""
    choices = getattr(resp, "choices", None)
    if not choices:
        raise RetryableError(
            "invalid response: no choices" if not isinstance(resp, str) else "invalid JSON body"
        )
    choice = choices[0]
    content = choice.message.content if chat else choice.text
    if not content or not content.strip():
        raise RetryableError("empty content")
    usage = getattr(resp, "usage", None)  # OpenAI-compatible servers may omit it
    tokens = (usage.prompt_tokens or 0, usage.completion_tokens or 0) if usage else (0, 0)
    return content, tokens, getattr(choice, "finish_reason", None)


# ---------------------------------------------------------------------------------------------- many


async def complete_many(
    requests: Sequence[ChatRequest],
    client_cfg: ClientConfig,
    cache: ResponseCache | None,
    progress: Callable[[ChatResult], None] | None = None,
    shared: SharedLimit | None = None,
) -> list[ChatResult]:
    """Results in input order. Identical prompts are sent once; cached ones are not sent at all.

    `progress(result)` is called as each unique request finishes (after its cache commit).
    """
    client = TeacherClient(client_cfg, cache, shared)
    by_hash: dict[str, ChatRequest] = {}
    for req in requests:
        by_hash.setdefault(req.hash(client_cfg), req)

    async def run_one(req: ChatRequest) -> ChatResult:
        result = await client.complete(req)
        if progress is not None:
            progress(result)
        return result

    try:
        async with asyncio.TaskGroup() as group:
            tasks = {h: group.create_task(run_one(r)) for h, r in by_hash.items()}
    except* TeacherFatalError as eg:
        raise eg.exceptions[0] from None
    finally:
        await client.close()
    unique = {h: t.result() for h, t in tasks.items()}
    out = []
    for req in requests:
        first = unique[req.hash(client_cfg)]
        if first.key == req.key:
            out.append(first)
        else:  # a duplicate prompt: same answer, nothing sent for it
            out.append(ChatResult(**{**first.__dict__, "key": req.key, "attempts": 0, "cached": True}))
    return out


def run_sync(coro_fn: Callable[[], object]) -> object:
    """Run an async job from sync stage code, also when the caller's thread already has a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn())
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro_fn())
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="teacher-client")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def summarize(results: Sequence[ChatResult]) -> dict[str, int]:
    """Counts for the usage artifact and logs: sent attempts, retries, cache hits, rejects, tokens."""
    return {
        "requests": len(results),
        "http_attempts": sum(r.attempts for r in results),
        "retries": sum(max(0, r.attempts - 1) for r in results),
        "cache_hits": sum(1 for r in results if r.cached),
        "rejects": sum(1 for r in results if r.error is not None),
        "prompt_tokens": sum(r.prompt_tokens for r in results if not r.cached),
        "completion_tokens": sum(r.completion_tokens for r in results if not r.cached),
    }
