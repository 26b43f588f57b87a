"""Stage 5, `bulk_distill`: a distilled report T_d (Eq. 1) for every report of the corpus.

The teacher's seed answer is used where it exists; every other report with entity mentions gets the LoRA
student's answer to the same Table 2 prompt. Student answers that fail QC (malformed lines, missing or
invented entities, a certainty stage 2 contradicts) are re-sent to the teacher while `retry_budget` lasts;
the rest are kept with their flags. Reports without any entity have nothing to distil (source "none").

Work is cut into shards of `shard_size` reports, each written atomically under `shards/` the moment it is
done, so a crashed run redoes only the unfinished shards; at the end all shards are merged and checked
(every report exactly once) into `distilled_reports`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm
from transformers import AutoTokenizer

from data_contracts.io import Lineage, read_artifact, write_artifact
from data_contracts.student import DistilledReport
from models.devices import resolve_device
from models.distill import parse, rules_teacher
from models.distill.cache import ResponseCache
from models.distill.complete import EntityCompletion
from models.distill.generate import (
    GenerationSettings,
    OpenAIBackend,
    StudentBackend,
    TransformersBackend,
    VllmSettings,
    start_vllm_server,
)
from models.distill.item import DistillItem, distill_item
from models.distill.student import load_student, student_prompt
from models.distill.teacher_http import ChatRequest, ClientConfig, complete_many, run_sync
from tasks.base import StageConfig, StageContext
from tasks.stage import Stage

SHARD_DIR = "shards"
ADAPTER, TINY_BASE = "adapter", "base_model"  # finetune_student's declared file outputs
PLAN_FILE = "plan.json"
RETRY_CACHE_FILE = "teacher_retry_cache.sqlite"
STUDENT_CACHE_FILE = "student_cache.sqlite"
QC_KINDS = (
    "empty_response",
    "unparseable_line",
    "multi_entity_sentence",
    "hallucinated_entity",
    "missing_entity",
    "polarity_disagrees",
)

TeacherFn = Callable[[Sequence[DistillItem]], list[str | None]]


class InProcessBackend(BaseModel):
    """The student generates in this process (transformers + peft, batched greedy): CPU demo, tests, small
    runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["transformers"] = "transformers"
    gen_batch: int = Field(16, ge=1, description="prompts per generate() call")


class ServerBackend(BaseModel):
    """An OpenAI-compatible server serves the adapter as model `served_model`: vLLM started here from the
    serving environment (`start_server`), or a server you started (`base_url`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["openai"] = "openai"
    base_url: str = "http://127.0.0.1:8000/v1"
    served_model: str = "student"
    api_key_env: str = "VLLM_API_KEY"
    send_key_to_local: bool = Field(
        False, description="send the key to a server you started (a vLLM started here always gets it)"
    )
    concurrency: int = Field(256, ge=1)
    timeout_s: float = Field(300.0, gt=0)
    max_retries: int = Field(
        6, ge=0, description="retries per request (backoff); an unreachable server fails the stage"
    )
    start_server: bool = Field(True, description="start vLLM's server with the adapter here (`vllm`)")
    vllm: VllmSettings = Field(default_factory=VllmSettings)


Backend = Annotated[InProcessBackend | ServerBackend, Field(discriminator="kind")]


class Config(StageConfig):
    shard_size: int = Field(2000, ge=1, description="reports per shard (the unit of resume)")
    backend: Backend = Field(
        default_factory=ServerBackend,
        description="where the student generates: {kind: transformers, ...} or {kind: openai, ...}; a "
        "setting of the other kind is refused (`backend: transformers` alone means that kind with its "
        "defaults)",
    )
    retry_budget: int = Field(1000, ge=0, description="student answers failing QC that may go to the teacher")
    retry_on: list[str] = Field(
        default_factory=lambda: list(QC_KINDS), description="QC flag kinds that trigger it"
    )
    workers: int = Field(
        1,
        ge=1,
        description="under run.gpu_pool: shard groups handed to this many stage-gpu sub-runs at once, each "
        "with its own student (its own vLLM server on its GPU host); the pipeline merges their shards. Each "
        "group has retry_budget / workers teacher retries. 1 = the whole stage in one sub-run",
    )

    @field_validator("backend", mode="before")
    @classmethod
    def kind_alone(cls, value: Any) -> Any:
        """`backend: transformers` (or `--set bulk_distill.backend=openai`): that kind with its defaults."""
        return {"kind": value} if isinstance(value, str) else value


# ------------------------------------------------------------------------------------------- items


def build_items(
    ctx: StageContext, max_prompt_tokens: int
) -> tuple[list[DistillItem], dict[str, dict], list[str], parse.EntityFinder]:
    """(reports needing the student, teacher rows by study, reports without entities, entity finder)."""
    reports = (
        ctx.read("extract_reports/reports").select(["study_id", "text", "findings", "impression"]).to_pylist()
    )
    mention_table = ctx.read("match_entities/entity_mentions")
    mentions = rules_teacher.mentions_by_study(mention_table)
    seeds = {r["study_id"]: r for r in ctx.read("seed_distill/seed_distillations").to_pylist()}
    known = {r["study_id"] for r in reports}
    for name, ids in (("entity_mentions", set(mentions)), ("seed_distillations", set(seeds))):
        if unknown := sorted(ids - known):
            raise ValueError(f"{name} has {len(unknown)} study ids missing from reports, e.g. {unknown[:3]}")
    todo, empty = [], []
    for r in sorted(reports, key=lambda r: r["study_id"]):
        sid = r["study_id"]
        if sid in seeds:
            continue
        if sid not in mentions:
            empty.append(sid)
            continue
        todo.append(distill_item(r, mentions[sid], max_prompt_tokens))
    finder = parse.EntityFinder(sorted(set(mention_table.column("entity").to_pylist())))
    return todo, seeds, empty, finder


# ------------------------------------------------------------------------------------------- shards


def shard_plan(study_ids: Sequence[str], shard_size: int) -> list[list[str]]:
    return [list(study_ids[i : i + shard_size]) for i in range(0, len(study_ids), shard_size)]


def plan_key(shards: Sequence[Sequence[str]], identity: dict) -> str:
    """Changes whenever a shard's content could: its study ids, the adapter, the backend and QC settings."""
    blob = json.dumps({"shards": shards, **identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def planned_key(shard_dir: Path) -> str | None:
    """The key of the plan the shard folder holds (None: no plan yet)."""
    plan = shard_dir / PLAN_FILE
    return json.loads(plan.read_text()).get("key") if plan.exists() else None


def prepare_shard_dir(shard_dir: Path, key: str, n_shards: int) -> None:
    """Keep finished shards only if they were made under the same plan; otherwise start over."""
    if planned_key(shard_dir) == key:
        return
    plan = shard_dir / PLAN_FILE
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True)
    plan.write_text(json.dumps({"key": key, "shards": n_shards}))


def shard_path(shard_dir: Path, index: int) -> Path:
    return shard_dir / f"shard_{index:05d}.parquet"


def retry_worthy(flags: Sequence[str], kinds: Sequence[str]) -> bool:
    return any(f.split(":", 1)[0] in kinds for f in flags)


def distilled_row(
    item: DistillItem, text: str, source: str, model: str, shard: int, finder: parse.EntityFinder
) -> dict:
    parsed = parse.parse_response(text, finder)
    return {
        "study_id": item.study_id,
        "distilled_text": parse.distilled_text(parsed),
        "source": source,
        "model": model,
        "entities": item.entities,
        "raw_response": text,
        "flags": parse.qc_flags(parsed, item.entities, item.polarities),
        "shard": shard,
    }


def distill_shard(
    items: Sequence[DistillItem],
    shard: int,
    backend: StudentBackend,
    teacher: TeacherFn,
    budget_left: int,
    cfg: Config,
    student_model: str,
    teacher_model: str,
    finder: parse.EntityFinder,
    reprompt_rounds: int | None = None,
) -> list[dict]:
    """Student answers for one shard; the first `budget_left` QC failures are re-sent to the teacher.

    `reprompt_rounds` (None: plain greedy answers): entity-complete decoding (models/distill/complete.py),
    re-prompting for missing entities, then scoring where the backend gives log-probabilities (in-process).
    """
    prompts = [student_prompt(it.report, it.entities) for it in items]
    answers = backend.generate(prompts)
    if len(answers) != len(items):
        raise RuntimeError(f"student backend returned {len(answers)} answers for {len(items)} prompts")
    if reprompt_rounds is not None:
        completion = EntityCompletion(
            student_prompt, backend.generate, getattr(backend, "answer_logprobs", None), reprompt_rounds
        )
        answers, _ = completion([it.report for it in items], [it.entities for it in items], answers, finder)
    rows = [
        distilled_row(it, a, "student", student_model, shard, finder)
        for it, a in zip(items, answers, strict=True)
    ]
    failing = [i for i, r in enumerate(rows) if retry_worthy(r["flags"], cfg.retry_on)][:budget_left]
    if failing:
        for i, text in zip(failing, teacher([items[i] for i in failing]), strict=True):
            if text is None:
                rows[i]["flags"] = [*rows[i]["flags"], "teacher_retry_failed"]
            else:
                rows[i] = distilled_row(items[i], text, "teacher_retry", teacher_model, shard, finder)
    return rows


@dataclass
class Work:
    """What the whole stage, each shard group and the merge agree on: the reports, the shards and the plan."""

    todo: list[DistillItem]
    seeds: dict[str, dict]
    empty: list[str]
    finder: parse.EntityFinder
    settings: dict
    model_row: dict
    student_model: str
    reprompt_rounds: int | None
    shards: list[list[str]]
    key: str


def plan_work(ctx: StageContext, cfg: Config) -> Work:
    """Read the upstream artifacts and cut the reports the student answers into the shard plan."""
    settings = ctx.read("seed_distill/teacher_settings").to_pylist()[0]
    todo, seeds, empty, finder = build_items(ctx, settings["max_prompt_tokens"])
    model_row = ctx.read("finetune_student/student_model").to_pylist()[0]
    student_model = f"student:{model_row['adapter_sha256'][:12]}"
    reprompt_rounds = model_row["reprompt_rounds"] if model_row["decoding"] == "entity_complete" else None
    if reprompt_rounds is not None:
        student_model += f"+entity_complete{reprompt_rounds}"  # in the shard plan key: a change redoes shards
    shards = shard_plan([it.study_id for it in todo], cfg.shard_size)
    identity = {
        "student": student_model,
        "teacher": teacher_name(settings),
        "retry_budget": cfg.retry_budget,
        "retry_on": sorted(cfg.retry_on),
        "backend": cfg.backend.kind,
    }
    key = plan_key(shards, identity)
    return Work(todo, seeds, empty, finder, settings, model_row, student_model, reprompt_rounds, shards, key)


def group_shards(n_shards: int, group: int, groups: int) -> list[int]:
    """The shards of group `group` of `groups`: every groups-th one, so the groups finish at about the same
    time."""
    return list(range(group, n_shards, groups))


def group_budget(total: int, group: int, groups: int) -> int:
    """Group `group`'s share of the teacher retry budget; the shares add up to `total`."""
    return total // groups + (1 if group < total % groups else 0)


def run_shards(
    work: Work,
    indices: Sequence[int],
    shard_dir: Path,
    cfg: Config,
    backend_factory: Callable[[], StudentBackend],
    teacher: TeacherFn,
    teacher_model: str,
    budget: int,
    lineage: Lineage,
    log,
) -> int:
    """Distil the shards among `indices` not yet on disk (each written atomically the moment it is done),
    within `budget` teacher retries counted over all of `indices`; returns how many shards it distilled."""
    done = [i for i in indices if shard_path(shard_dir, i).exists()]
    pending = [i for i in indices if i not in done]
    if not pending:  # e.g. the merge after shard groups: the finished shards are read once, by the merge
        return 0
    used = sum(
        r["source"] == "teacher_retry"
        for i in done
        for r in read_artifact(shard_path(shard_dir, i), DistilledReport).to_pylist()
    )
    if done:
        log.info(
            "resuming: %d of %d shards already done, %d teacher retries used", len(done), len(indices), used
        )
    by_id = {it.study_id: it for it in work.todo}
    backend = backend_factory()
    bar = tqdm(
        total=sum(len(work.shards[i]) for i in indices),
        initial=sum(len(work.shards[i]) for i in done),
        unit="report",
        desc="bulk_distill",
        mininterval=1.0,
        dynamic_ncols=True,
    )
    with bar:
        for i in pending:
            rows = distill_shard(
                [by_id[s] for s in work.shards[i]],
                i,
                backend,
                teacher,
                max(0, budget - used),
                cfg,
                work.student_model,
                teacher_model,
                work.finder,
                work.reprompt_rounds,
            )
            write_artifact(shard_path(shard_dir, i), rows, DistilledReport, lineage)
            used += sum(r["source"] == "teacher_retry" for r in rows)
            bar.update(len(rows))
    return len(pending)


def read_shards(shard_dir: Path, n_shards: int) -> list[dict]:
    """Every shard's rows in shard order; a missing shard is an error naming it."""
    missing = [
        shard_path(shard_dir, i).name for i in range(n_shards) if not shard_path(shard_dir, i).exists()
    ]
    if missing:
        raise RuntimeError(f"bulk_distill merge: {len(missing)} shards are not done, e.g. {missing[:3]}")
    return [
        r
        for i in range(n_shards)
        for r in read_artifact(shard_path(shard_dir, i), DistilledReport).to_pylist()
    ]


# ------------------------------------------------------------------------------------------- merge


def merge_rows(
    shard_rows: Sequence[dict], seeds: dict[str, dict], empty: Sequence[str], expected: set[str]
) -> list[dict]:
    """Teacher rows + student shard rows + entity-less reports; each report exactly once or an error."""
    rows = [
        {
            "study_id": sid,
            "distilled_text": s["distilled_text"],
            "source": "teacher",
            "model": s["model"],
            "entities": s["entities"],
            "raw_response": s["raw_response"],
            "flags": s["flags"],
            "shard": -1,
        }
        for sid, s in seeds.items()
    ]
    rows += [
        {
            "study_id": sid,
            "distilled_text": "",
            "source": "none",
            "model": "",
            "entities": [],
            "raw_response": "",
            "flags": [],
            "shard": -1,
        }
        for sid in empty
    ]
    rows += shard_rows
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["study_id"]] += 1
    if dup := sorted(s for s, n in counts.items() if n > 1):
        raise RuntimeError(f"bulk_distill merge: {len(dup)} reports distilled more than once, e.g. {dup[:3]}")
    if missing := sorted(expected - set(counts)):
        raise RuntimeError(
            f"bulk_distill merge: {len(missing)} reports have no distillation, e.g. {missing[:3]}"
        )
    return sorted(rows, key=lambda r: r["study_id"])


# ------------------------------------------------------------------------------------------- backends


def teacher_name(settings: dict) -> str:
    """The model name QC retries are answered by (it is in the shard plan: another teacher redoes shards)."""
    if settings["teacher"] == "rules":
        return rules_teacher.MODEL_NAME
    return ClientConfig.model_validate_json(settings["client_json"]).model


def teacher_fn(ctx: StageContext, settings: dict, stack: ExitStack) -> tuple[TeacherFn, str]:
    """The teacher seed_distill used (its `teacher_settings` artifact), for QC retries."""
    if settings["teacher"] == "rules":
        return (lambda items: [rules_teacher.distill(it.full_text, it.mentions) for it in items]), (
            rules_teacher.MODEL_NAME
        )
    client_cfg = ClientConfig.model_validate_json(settings["client_json"])
    cache = stack.enter_context(ResponseCache(ctx.scratch(RETRY_CACHE_FILE)))

    def ask(items: Sequence[DistillItem]) -> list[str | None]:
        requests = [ChatRequest(it.study_id, tuple(it.messages())) for it in items]
        return [r.content for r in run_sync(lambda: complete_many(requests, client_cfg, cache))]

    return ask, client_cfg.model


def student_backend(ctx: StageContext, cfg: Config, model_row: dict, stack: ExitStack) -> StudentBackend:
    adapter_dir = ctx.read_path(f"finetune_student/{ADAPTER}")
    tiny = f"finetune_student/{TINY_BASE}"
    base = ctx.read_path(tiny) if ctx.has(tiny) else Path(model_row["base_model"])
    backend = cfg.backend
    if isinstance(backend, InProcessBackend):
        model, tokenizer = load_student(base, adapter_dir, resolve_device(ctx.config.run.device))
        settings = GenerationSettings(
            batch_size=backend.gen_batch,
            max_new_tokens=model_row["max_new_tokens"],
            max_prompt=model_row["max_prompt"],
        )
        return TransformersBackend(model, tokenizer, settings)
    base_url, send_key = backend.base_url, backend.send_key_to_local
    if backend.start_server:
        server = stack.enter_context(
            start_vllm_server(base, adapter_dir, backend.vllm, ctx.scratch("vllm_server.log"))
        )
        base_url, send_key = server.base_url, True  # our own child process, which reads VLLM_API_KEY too
    client_cfg = ClientConfig(
        base_url=base_url,
        model=backend.served_model,
        api_key_env=backend.api_key_env,
        send_key_to_local=send_key,
        concurrency=backend.concurrency,
        max_retries=backend.max_retries,
        rpm=None,
        tpm=None,
        timeout_s=backend.timeout_s,
        max_tokens=model_row["max_new_tokens"],
        temperature=0.0,
    )
    cache = stack.enter_context(ResponseCache(ctx.scratch(STUDENT_CACHE_FILE)))
    tokenizer = AutoTokenizer.from_pretrained(base)  # the one the in-process backend and training cut with
    return OpenAIBackend(client_cfg, cache, tokenizer, model_row["max_prompt"])


# ------------------------------------------------------------------------------------------- stage


def log_work(ctx: StageContext, work: Work, cfg: Config, injected: bool) -> None:
    evals = {r["system"]: r for r in ctx.read("finetune_student/student_eval").to_pylist()}
    if "student" in evals:
        ctx.log.info(
            "student held-out polarity agreement %.3f (all-absent baseline %.3f)",
            evals["student"]["polarity_acc"],
            evals.get("all_absent", {}).get("polarity_acc", float("nan")),
        )
    ctx.log.info(
        "%d reports: %d teacher, %d student, %d without entities",
        len(work.todo) + len(work.seeds) + len(work.empty),
        len(work.seeds),
        len(work.todo),
        len(work.empty),
    )
    if work.reprompt_rounds is not None and not injected and cfg.backend.kind != "transformers":
        ctx.log.warning(
            "entity_complete: a server gives no prompt log-probabilities, so entities still missing after "
            "re-prompting stay missing; QC re-sends such answers to the teacher (retry_budget)"
        )


def distil(
    ctx: StageContext,
    cfg: Config,
    work: Work,
    indices: Sequence[int],
    budget: int,
    backend: StudentBackend | None,
    teacher: TeacherFn | None,
) -> int:
    """`run_shards` with the configured (or injected) student and teacher; returns the shards distilled."""
    with ExitStack() as stack:
        teacher_model = "injected"
        if teacher is None:
            teacher, teacher_model = teacher_fn(ctx, work.settings, stack)
        factory = (
            (lambda: backend)
            if backend is not None
            else (lambda: student_backend(ctx, cfg, work.model_row, stack))
        )
        shard_dir = ctx.scratch(SHARD_DIR)
        return run_shards(
            work, indices, shard_dir, cfg, factory, teacher, teacher_model, budget, ctx.lineage(), ctx.log
        )


def plan_groups(ctx: StageContext, cfg: Config, groups: int) -> list[int]:
    """Before shard groups run elsewhere: the plan written into the shard folder (a stale folder reset), and
    the groups that still have shards to do."""
    work = plan_work(ctx, cfg)
    shard_dir = ctx.scratch(SHARD_DIR)
    prepare_shard_dir(shard_dir, work.key, len(work.shards))
    return [
        g
        for g in range(groups)
        if any(not shard_path(shard_dir, i).exists() for i in group_shards(len(work.shards), g, groups))
    ]


def distil_group(
    ctx: StageContext,
    cfg: Config,
    group: int,
    groups: int,
    backend: StudentBackend | None = None,
    teacher: TeacherFn | None = None,
) -> int:
    """One shard group, on the stage's behalf in another process (a stage-gpu sub-run): its shards into the
    stage's shard folder, nothing merged or committed. The plan must be the one `plan_groups` wrote: a group
    never resets the folder, which other groups are writing into."""
    work = plan_work(ctx, cfg)
    shard_dir = ctx.scratch(SHARD_DIR)
    if planned_key(shard_dir) != work.key:
        raise RuntimeError(
            f"bulk_distill shard group {group}/{groups}: {shard_dir / PLAN_FILE} is missing or was planned "
            "for other inputs or settings; the pipeline plans the groups before handing them out (run the "
            "stage again)"
        )
    log_work(ctx, work, cfg, backend is not None)
    mine = group_shards(len(work.shards), group, groups)
    budget = group_budget(cfg.retry_budget, group, groups)
    done = distil(ctx, cfg, work, mine, budget, backend, teacher)
    ctx.log.info("shard group %d/%d: %d of its %d shards distilled here", group, groups, done, len(mine))
    return done


def run(
    ctx: StageContext,
    cfg: Config,
    backend: StudentBackend | None = None,
    teacher: TeacherFn | None = None,
) -> None:
    """`backend` / `teacher` replace the configured ones (tests inject counting or failing doubles).

    Shards the groups of `workers` sub-runs left are only merged here; any still missing are distilled."""
    work = plan_work(ctx, cfg)
    log_work(ctx, work, cfg, backend is not None)
    shard_dir = ctx.scratch(SHARD_DIR)
    prepare_shard_dir(shard_dir, work.key, len(work.shards))
    indices = range(len(work.shards))
    distil(ctx, cfg, work, indices, cfg.retry_budget, backend, teacher)
    expected = {it.study_id for it in work.todo} | set(work.seeds) | set(work.empty)
    rows = merge_rows(read_shards(shard_dir, len(work.shards)), work.seeds, work.empty, expected)
    by_source: dict[str, int] = defaultdict(int)
    for r in rows:
        by_source[r["source"]] += 1
    flagged = sum(bool(r["flags"]) for r in rows if r["source"] == "student")
    ctx.log.info(
        "distilled reports by source %s; %d kept student answers carry QC flags", dict(by_source), flagged
    )
    ctx.write("distilled_reports", rows)


STAGE = Stage(
    name="bulk_distill",
    version="3",
    config=Config,
    run=run,
    summary="the fine-tuned student distils every other report (sharded, resumable); QC retries go to the "
    "teacher",
    reads=(
        "extract_reports/reports",
        "match_entities/entity_mentions",
        "seed_distill/seed_distillations",
        "seed_distill/teacher_settings",
        "finetune_student/student_model",
        "finetune_student/student_eval",
        f"finetune_student/{ADAPTER}",
        f"finetune_student/{TINY_BASE}",
    ),
    optional=(f"finetune_student/{TINY_BASE}",),
    gpu=True,
    retries=2,  # the teacher endpoint for QC retries
    writes={"distilled_reports": DistilledReport},
)


# ------------------------------------------------------------------------------------------- shard groups


def group_context(config: Any, run_dir: Path, log: Any, run_id: str) -> StageContext:
    """The stage's context for work done on its behalf outside a run of it (no lock, no attempt, no
    commit)."""
    from tasks.runner import prepare_stage

    prepared = prepare_stage(STAGE, config, Path(run_dir), log, run_id, STAGE.name, force=True)
    return prepared.ctx


def pending_groups(config: Any, run_dir: Path, log: Any, run_id: str, n_groups: int) -> list[int]:
    """In the pipeline's process, before handing the groups out: the plan written, the groups left to do."""
    return plan_groups(group_context(config, run_dir, log, run_id), config.bulk_distill, n_groups)


def run_group(config: Any, run_dir: Path, log: Any, run_id: str, group: int, n_groups: int) -> int:
    """In a stage-gpu sub-run: distil shard group `group` of `n_groups` (`distil_group`)."""
    return distil_group(group_context(config, run_dir, log, run_id), config.bulk_distill, group, n_groups)
