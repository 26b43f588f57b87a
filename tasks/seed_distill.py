"""Stage 3, `seed_distill`: the teacher distils a seed set of reports (paper: 10,000 with GPT-3.5-turbo).

reports + entity mentions -> seed selection (stratified by entity) -> Table 2 prompt per report ->
teacher (`rules`: offline, deterministic; `openai`: any OpenAI-compatible endpoint, synchronous or
Batch API) -> parse + QC flags -> `seed_distillations`, `distill_usage`, `distill_rejects`.

Every teacher answer is committed to `teacher_cache.sqlite` in this stage's folder as it arrives, so a
crashed or repeated run sends only what is still missing.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Literal

from pydantic import Field, model_validator

from data_contracts.distill import DistillReject, DistillUsage, SeedDistillation, TeacherSettings
from models.distill import parse, rules_teacher
from models.distill.batch_api import run_batch
from models.distill.cache import ResponseCache
from models.distill.governance import check_route, resolve_api_key
from models.distill.item import DistillItem, distill_item
from models.distill.prompt import prompt_hash
from models.distill.seed import select_seed
from models.distill.teacher_http import (
    ApiVersion,
    ChatRequest,
    ChatResult,
    ClientConfig,
    complete_many,
    run_sync,
    summarize,
)
from tasks.base import StageConfig, StageContext
from tasks.stage import Stage
from tasks.teacher_limits import PrefectRateLimit

MIN_DISTILLATIONS = 2  # finetune_student needs one to train on and one to evaluate

CACHE_FILE = "teacher_cache.sqlite"
BATCH_STATE_FILE = "batch_state.json"


class Config(StageConfig):
    n_reports: int = Field(
        10_000, ge=1, description="seed reports for the teacher; more than the corpus = all"
    )
    selection: Literal["stratified", "random"] = Field(
        "stratified",
        description="seed reports: entity quotas first (rare entities represented) or drawn at random",
    )
    teacher: Literal["rules", "openai"] = "openai"
    provider: Literal["openai", "azure"] = "openai"
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-3.5-turbo"
    azure_endpoint: str | None = None
    azure_api_version: ApiVersion | None = None  # a YAML date (2024-10-21) is taken as its ISO string
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="name of the env var holding the key (never the key)"
    )
    send_key_to_local: bool = Field(
        False, description="send the key to a local/private endpoint too (else a placeholder is sent)"
    )
    external_endpoint_ack: str | None = None
    proxy: str | None = Field(
        None, description="HTTP proxy to the teacher; judged like the endpoint (HTTP(S)_PROXY is ignored)"
    )
    concurrency: int = Field(16, ge=1)
    rpm: float | None = Field(3500, gt=0)
    tpm: float | None = Field(90_000, gt=0)
    shared_limit: str | None = Field(
        None,
        description="name of a Prefect global rate limit pair (<name>-requests, <name>-tokens) set to "
        "rpm/tpm and shared by every run that names it, so runs against one account stay within its limits "
        "together; needs PREFECT_API_URL",
    )
    max_retries: int = Field(6, ge=0)
    timeout_s: float = Field(60.0, gt=0)
    max_retry_after_s: float = Field(
        600.0, ge=0, description="a longer Retry-After is not waited for: the request ends as a reject"
    )
    max_tokens: int = Field(256, ge=1)
    max_answer_chars: int | None = Field(
        None, ge=1, description="longer answers are rejects (None: 16 characters per max_tokens token)"
    )
    batch_api: bool = False
    batch_poll_s: float = Field(60.0, gt=0)
    max_prompt_tokens: int = Field(3800, ge=64, description="gpt-3.5-turbo: 4096 context - 256 answer")
    price_prompt_per_1k: float = Field(0.0005, ge=0, description="USD per 1k prompt tokens (cost estimate)")
    price_completion_per_1k: float = Field(0.0015, ge=0)
    batch_discount: float = Field(0.5, ge=0, le=1, description="Batch API price factor")

    @model_validator(mode="after")
    def _shared_limit_is_for_live_requests(self) -> Config:
        if self.shared_limit is not None and self.batch_api:
            raise ValueError(
                "shared_limit paces live requests; the Batch API's requests are paced by the provider's "
                "batch queue, so set one or the other"
            )
        return self

    def client_config(self) -> ClientConfig:
        return ClientConfig(
            provider=self.provider,
            base_url=self.base_url,
            model=self.model,
            azure_endpoint=self.azure_endpoint,
            azure_api_version=self.azure_api_version,
            api_key_env=self.api_key_env,
            send_key_to_local=self.send_key_to_local,
            external_endpoint_ack=self.external_endpoint_ack,
            proxy=self.proxy,
            concurrency=self.concurrency,
            rpm=self.rpm,
            tpm=self.tpm,
            max_retries=self.max_retries,
            timeout_s=self.timeout_s,
            max_retry_after_s=self.max_retry_after_s,
            max_tokens=self.max_tokens,
            max_answer_chars=self.max_answer_chars,
            temperature=0.0,
        )


# ------------------------------------------------------------------------------------------- inputs


# ------------------------------------------------------------------------------------------- teachers


def rules_results(items: list[DistillItem], model: str, max_tokens: int) -> list[ChatResult]:
    """The offline teacher; it reads stage 2's mentions of the full report text."""
    out = []
    for it in items:
        t0 = time.perf_counter()
        content = rules_teacher.distill(it.full_text, it.mentions)
        h = prompt_hash(it.messages(), 0.0, max_tokens)
        out.append(ChatResult(it.study_id, model, h, content, latency_s=time.perf_counter() - t0))
    return out


def http_results(ctx: StageContext, cfg: Config, items: list[DistillItem]) -> list[ChatResult]:
    client_cfg = cfg.client_config()
    requests = [ChatRequest(it.study_id, tuple(it.messages())) for it in items]
    upper = sum(r.cost_tokens(client_cfg) for r in requests)
    ctx.log.info(
        "teacher %s at %s: %d requests, at most ~%d tokens (<= $%.2f before cache hits)",
        cfg.model,
        client_cfg.endpoint_url,
        len(requests),
        upper,
        upper / 1000 * cfg.price_completion_per_1k,
    )
    with ResponseCache(ctx.scratch(CACHE_FILE)) as cache:
        if cfg.batch_api:
            return run_sync(
                lambda: run_batch(
                    requests,
                    client_cfg,
                    cache,
                    ctx.scratch(BATCH_STATE_FILE),
                    poll_interval_s=cfg.batch_poll_s,
                    log=ctx.log.info,
                )
            )
        done = [0]

        def progress(result: ChatResult) -> None:
            done[0] += 1
            if done[0] % 500 == 0 or done[0] == len(requests):
                ctx.log.info("teacher: %d/%d answered", done[0], len(requests))

        shared = shared_limit(ctx, cfg)
        return run_sync(lambda: complete_many(requests, client_cfg, cache, progress, shared))


def shared_limit(ctx: StageContext, cfg: Config) -> PrefectRateLimit | None:
    if cfg.shared_limit is None:
        return None
    shared = PrefectRateLimit(cfg.shared_limit, cfg.rpm, cfg.tpm)
    shared.ensure()
    ctx.log.info(
        "teacher limits shared on the Prefect server with every run naming %r: %s, %s",
        cfg.shared_limit,
        f"{cfg.rpm:g} requests/min" if cfg.rpm else "requests unlimited",
        f"{cfg.tpm:g} tokens/min" if cfg.tpm else "tokens unlimited",
    )
    return shared


# ------------------------------------------------------------------------------------------- outputs


def distillation_row(it: DistillItem, result: ChatResult, finder: parse.EntityFinder) -> dict:
    parsed = parse.parse_response(result.content or "", finder)
    flags = parse.qc_flags(parsed, it.entities, it.polarities)
    if result.finish_reason == "length":
        flags.append("truncated_response")
    return {
        "study_id": it.study_id,
        "model": result.model,
        "prompt_hash": result.prompt_hash,
        "report": it.report,
        "entities": it.entities,
        "raw_response": result.content or "",
        "distilled_text": parse.distilled_text(parsed),
        "sentences": [p.text for p in parsed],
        "parsed_json": parse.parsed_json(parsed),
        "flags": flags,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "latency_s": result.latency_s,
        "cached": result.cached,
        "truncated": it.truncated,
        "error": None,
    }


def usage_row(cfg: Config, results: list[ChatResult], mode: str, wall_s: float) -> dict:
    s = summarize(results)
    price = (
        s["prompt_tokens"] / 1000 * cfg.price_prompt_per_1k
        + s["completion_tokens"] / 1000 * cfg.price_completion_per_1k
    )
    if mode == "batch":
        price *= cfg.batch_discount
    elif mode == "rules":
        price = 0.0
    model = results[0].model if results else cfg.model
    return {
        "model": model,
        "mode": mode,
        **s,
        "estimated_cost_usd": round(price, 6),
        "wall_s": round(wall_s, 3),
    }


def check_teacher_access(cfg: Config) -> None:
    """Data-use policy and API key, checked before any work (the key is only looked up, never kept)."""
    client_cfg = cfg.client_config()
    resolve_api_key(
        client_cfg.api_key_env,
        check_route(client_cfg.endpoint_url, client_cfg.proxy, cfg.external_endpoint_ack),
    )


def run(ctx: StageContext, cfg: Config) -> None:
    if cfg.teacher == "openai":
        check_teacher_access(cfg)
    reports = {r["study_id"]: r for r in ctx.read("extract_reports/reports").to_pylist()}
    mention_table = ctx.read("match_entities/entity_mentions")
    mentions = rules_teacher.mentions_by_study(mention_table)
    unknown = sorted(set(mentions) - set(reports))
    if unknown:
        raise ValueError(
            f"entity_mentions has {len(unknown)} study ids missing from reports, e.g. {unknown[:3]}"
        )
    seeds = select_seed(
        {sid: {m.entity for m in ms} for sid, ms in mentions.items()},
        cfg.n_reports,
        ctx.config.run.seed,
        stratified=cfg.selection == "stratified",
    )
    ctx.log.info(
        "seed set: %d of %d reports with entity mentions (%d reports in all)",
        len(seeds),
        len(mentions),
        len(reports),
    )
    items = [distill_item(reports[sid], mentions[sid], cfg.max_prompt_tokens) for sid in seeds]
    ctx.log.info(
        "%d reports truncated to fit max_prompt_tokens=%d",
        sum(it.truncated for it in items),
        cfg.max_prompt_tokens,
    )

    t0 = time.perf_counter()
    if cfg.teacher == "rules":
        mode, results = "rules", rules_results(items, rules_teacher.MODEL_NAME, cfg.max_tokens)
    else:
        mode, results = ("batch" if cfg.batch_api else "http"), http_results(ctx, cfg, items)
    wall = time.perf_counter() - t0

    finder = parse.EntityFinder(sorted(set(mention_table.column("entity").to_pylist())))
    rows, rejects = [], []
    for it, result in zip(items, results, strict=True):
        if result.error is not None:
            rejects.append(
                {
                    "study_id": it.study_id,
                    "stage": ctx.name,
                    "reason": result.error,
                    "attempts": result.attempts,
                }
            )
        else:
            rows.append(distillation_row(it, result, finder))
    usage = usage_row(cfg, results, mode, wall)
    ctx.log.info("teacher usage: %s", usage)
    ctx.write("seed_distillations", rows)
    ctx.write("distill_usage", [usage])
    ctx.write("distill_rejects", rejects)
    settings = {
        "teacher": cfg.teacher,
        "client_json": cfg.client_config().model_dump_json(),
        "max_prompt_tokens": cfg.max_prompt_tokens,
    }
    ctx.write("teacher_settings", [settings])
    check_enough(rows, rejects, len(items))


class TooFewAnswersError(RuntimeError):
    """The teacher answered too few requests for the stage to count as done; says why and what to do."""


def check_enough(rows: list[dict], rejects: list[dict], asked: int) -> None:
    """Too few answers is a failed stage, not a success a rerun would skip: failed requests are never
    cached, so the next run sends them again (the answers already paid for come from the cache)."""
    if len(rows) >= min(MIN_DISTILLATIONS, asked):
        return
    reasons = Counter(r["reason"].split(": ", 1)[-1][:120] for r in rejects).most_common(3)
    raise TooFewAnswersError(
        f"seed_distill: only {len(rows)} of {asked} teacher requests succeeded (at least {MIN_DISTILLATIONS} "
        f"are needed); most common reasons: {reasons}. Fix the cause and run the stage again: failed "
        "requests are retried, answers already received come from the cache"
    )


STAGE = Stage(
    name="seed_distill",
    version="2",
    config=Config,
    run=run,
    summary="the teacher LLM's context distillation (Table 2 prompt) of the seed reports",
    reads=("extract_reports/reports", "match_entities/entity_mentions"),
    writes={
        "seed_distillations": SeedDistillation,
        "distill_usage": DistillUsage,
        "distill_rejects": DistillReject,
        "teacher_settings": TeacherSettings,
    },
    retries=2,  # the teacher LLM endpoint: rate limits, timeouts, dropped connections
)
