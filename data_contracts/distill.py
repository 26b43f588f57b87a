"""Row contracts of the `seed_distill` stage: the teacher's distillations, its usage bill, its rejects."""

from __future__ import annotations

from typing import ClassVar, Literal

from data_contracts.base import Row


class SeedDistillation(Row):
    """One seed report's teacher answer, kept raw and parsed, with the QC flags that route it later."""

    contract: ClassVar[str] = "seed_distillations"
    version: ClassVar[int] = 1
    study_id: str
    model: str  # endpoint model (or "rules-teacher-v1"); with prompt_hash, the cache key
    prompt_hash: str
    report: str  # the report text as sent (after truncation), i.e. the student's input
    entities: list[str]  # requested entities, in the prompt's order
    raw_response: str
    distilled_text: str  # well-formed sentences joined by spaces: T_d of Eq. 1
    sentences: list[str]  # every sentence of the response, well-formed or not
    parsed_json: str  # per sentence: entities, certainty, severity words and bin, location words
    flags: list[str]  # QC flags (models/distill/parse.py::qc_flags), empty when clean
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cached: bool  # answered from the response cache: nothing paid in this run
    truncated: bool  # the report was shortened to fit max_prompt_tokens (FINDINGS first)
    error: str | None  # always None here: failed requests go to distill_rejects


class DistillUsage(Row):
    """The run's bill: one row per (model, mode); cost is estimated from the configured prices."""

    contract: ClassVar[str] = "distill_usage"
    version: ClassVar[int] = 1
    model: str
    mode: str  # "http", "batch" or "rules"
    requests: int
    http_attempts: int  # requests actually sent, retries included
    retries: int
    cache_hits: int
    rejects: int
    prompt_tokens: int
    completion_tokens: int
    estimated_cost_usd: float
    wall_s: float


class DistillReject(Row):
    """A seed report without a distillation, and why (the next run retries it: it is not in the cache)."""

    contract: ClassVar[str] = "distill_rejects"
    version: ClassVar[int] = 1
    study_id: str
    stage: str
    reason: str
    attempts: int


class TeacherSettings(Row):
    """The teacher `seed_distill` used, for `bulk_distill`'s QC retries: a declared input instead of a
    read of another stage's config section, so a teacher change reaches (and reruns) the bulk stage."""

    contract: ClassVar[str] = "teacher_settings"
    version: ClassVar[int] = 1
    teacher: Literal["rules", "openai"]
    client_json: str  # models.distill.teacher_http.ClientConfig as JSON (endpoint, model, limits; no key)
    max_prompt_tokens: int
