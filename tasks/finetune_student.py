"""Stage 4, `finetune_student`: LoRA-tune the student on the teacher's seed distillations (paper §3.1, footnote 2).

seed_distillations -> Table 2 prompt in the Vicuna v1.1 template + the teacher's well-formed sentences ->
held-out split -> LoRA (peft) on the base (Vicuna-7B v1.5 from a local path, or the tiny Llama built here) ->
adapter dir (safetensors) + `student_model`, `student_loss` and `student_eval`: entity-level agreement with the
teacher on held-out seed reports, next to the trivial baseline that calls every entity absent. With
`decoding: entity_complete` (models/distill/complete.py) the student row is the completed answers and the plain
greedy answers are reported as `student_greedy` beside it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from data_contracts.files import sha256_file
from data_contracts.student import StudentEval, StudentLoss, StudentModel
from models.devices import resolve_device
from models.distill import parse
from models.distill.complete import EntityCompletion, kept_sentences
from models.distill.generate import GenerationSettings, TransformersBackend
from models.distill.student import (
    LoraSettings,
    TinyDims,
    TrainSettings,
    WarmupSettings,
    attach_lora,
    build_tiny_base,
    encode_example,
    load_base,
    save_adapter,
    student_prompt,
    train_student,
    warm_up_base,
)
from tasks.base import StageConfig, StageContext
from tasks.stage import Stage

ADAPTER_DIR = "adapter"
TINY_BASE_DIR = "base_model"


class PretrainedBase(BaseModel):
    """A base LM on disk (the paper: Vicuna-7B v1.5); nothing is downloaded at run time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pretrained"] = "pretrained"
    path: str = Field("models/vicuna-7b-v1.5", description="local HF directory of the base LM")


class TinyBase(BaseModel):
    """A tiny Llama built here from `LlamaConfig`, with a BPE tokenizer trained on the corpus (demo, tests)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["tiny"] = "tiny"
    dims: TinyDims = Field(default_factory=TinyDims)
    warmup: WarmupSettings = Field(
        default_factory=WarmupSettings,
        description="causal-LM warm-up of the tiny base on training report texts",
    )


class Config(StageConfig):
    base: Annotated[PretrainedBase | TinyBase, Field(discriminator="kind")] = Field(
        default_factory=PretrainedBase,
        description="the LM the adapter is trained on: {kind: pretrained, path: ...} or {kind: tiny, dims, warmup}",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    decoding: Literal["greedy", "entity_complete"] = Field(
        "greedy",
        description="entity_complete: after greedy decoding, drop repeats and add each missing requested "
        "entity by re-prompting, then in the form the student scores most likely (models/distill/complete.py)",
    )
    reprompt_rounds: int = Field(
        1, ge=0, description="entity_complete: re-prompts for still-missing entities"
    )
    entity_subset_copies: int = Field(
        0,
        ge=0,
        description="extra training copies of each report asking for a random subset of its entities, the "
        "answer cut to those sentences: teaches a small student to read the entity list (0: paper)",
    )
    held_out: float = Field(
        0.05, gt=0, lt=1, description="share of seed reports kept out of training for eval"
    )
    min_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="fail the stage when the student's held-out polarity agreement is lower, so bulk_distill "
        "never distils the corpus with it (None: only a warning when it is below the all-absent baseline)",
    )

    def max_positions(self) -> int:
        """Positions the tiny base needs: a whole training example, or a cut prompt plus its answer."""
        return max(self.train.max_len, self.generation.max_prompt + self.generation.max_new_tokens)


# ------------------------------------------------------------------------------------------- data


def clean_answer(raw_response: str, finder: parse.EntityFinder) -> str:
    """The teacher's well-formed sentences, one per line (its output format), without malformed lines."""
    return "\n".join(p.text for p in parse.parse_response(raw_response, finder) if p.well_formed)


def entity_subset_rows(
    rows: Sequence[dict], copies: int, finder: parse.EntityFinder, seed: int
) -> list[dict]:
    """`copies` variants of each training row that request a random proper subset of its answer sentences.

    A student that only sees full entity lists can write a plausible list without reading it: the tiny demo
    student repeats common entities and skips rare ones. When the requested list varies and the answer follows
    it (the teacher answers "one by one", in list order), the list has to be read. The subset keeps the answer's
    sentence order; its entity list is the entities those sentences name, in the original list order. Only the
    sentences `kept_sentences` accepts take part (one per requested entity), so every subset answer is exactly
    what its list asks for.
    """
    rng = random.Random(seed)
    out = []
    for r in rows:
        sentences = [(line, finder.find(line)) for line in kept_sentences(r["answer"], r["entities"], finder)]
        if len(sentences) < 2:
            continue
        for c in range(copies):
            k = rng.randint(1, len(sentences) - 1)
            chosen = sorted(rng.sample(range(len(sentences)), k))
            named = {e for i in chosen for e in sentences[i][1]}
            entities = [e for e in r["entities"] if e in named]
            answer = "\n".join(sentences[i][0] for i in chosen)
            out.append(
                r
                | {
                    "study_id": f"{r['study_id']}#subset{c}",
                    "entities": entities,
                    "answer": answer,
                    "prompt": student_prompt(r["report"], entities),
                }
            )
    return out


def split_held_out(study_ids: Sequence[str], fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """(train, held-out) by a seeded shuffle; at least one of each when there are two or more reports."""
    ids = sorted(set(study_ids))
    if len(ids) < 2:
        raise ValueError(
            f"need at least 2 seed distillations to train and evaluate a student, got {len(ids)}"
        )
    random.Random(seed).shuffle(ids)
    n_held = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(ids[n_held:]), set(ids[:n_held])


# ------------------------------------------------------------------------------------------- agreement


def agreement(
    requested: Sequence[Sequence[str]],
    teacher: Sequence[str],
    system: Sequence[str],
    finder: parse.EntityFinder,
) -> dict[str, float | int]:
    """Entity-level agreement of `system` answers with `teacher` answers (LLM.md §4, polarity part).

    Pairs are (report, requested entity) for which the teacher wrote a well-formed sentence. A system answer
    without a well-formed sentence for the entity counts as wrong.
    """
    pairs = right = exact = covered = sentences = bad = reports_right = 0
    for entities, t_text, s_text in zip(requested, teacher, system, strict=True):
        t_parsed, s_parsed = parse.parse_response(t_text, finder), parse.parse_response(s_text, finder)
        t_cert, s_cert = parse.entity_certainties(t_parsed), parse.entity_certainties(s_parsed)
        t_sent = {e: p.text for e, p in parse.first_well_formed(t_parsed).items()}
        s_sent = {e: p.text for e, p in parse.first_well_formed(s_parsed).items()}
        sentences += len(s_parsed)
        bad += sum(not p.well_formed for p in s_parsed)
        all_right = True
        for e in entities:
            if e not in t_cert:
                continue
            pairs += 1
            covered += e in s_cert
            ok = s_cert.get(e) == t_cert[e]
            right += ok
            all_right &= ok
            exact += s_sent.get(e) is not None and norm(s_sent[e]) == norm(t_sent[e])
        reports_right += all_right
    return {
        "n_reports": len(teacher),
        "n_entities": pairs,
        "polarity_acc": right / max(pairs, 1),
        "exact_sentence_rate": exact / max(pairs, 1),
        "unparseable_rate": bad / max(sentences, 1),
        "coverage": covered / max(pairs, 1),
        "report_exact": reports_right / max(len(teacher), 1),
    }


def norm(sentence: str) -> str:
    return " ".join(sentence.lower().split())


def all_absent_answer(entities: Sequence[str]) -> str:
    """The trivial baseline: every requested entity declared absent."""
    return "\n".join(f"There is no {e}." for e in entities)


class StudentTooWeakError(RuntimeError):
    """The student's held-out agreement is below `finetune_student.min_agreement`."""


def check_student(
    evals: Sequence[dict], min_agreement: float | None, log: logging.Logger | logging.LoggerAdapter
) -> None:
    """Log the student's held-out agreement beside the all-absent baseline; warn when it is below the
    baseline and raise StudentTooWeakError when it is below `min_agreement`.

    A student that does worse than answering every entity "absent" writes wrong certainties into the whole
    corpus, and bulk_distill cannot tell: this is the last point where the numbers are side by side.
    """
    by_system = {e["system"]: e for e in evals}
    student, baseline = by_system["student"]["polarity_acc"], by_system["all_absent"]["polarity_acc"]
    pairs = by_system["student"]["n_entities"]
    log.info(
        "held-out polarity agreement: student %.3f, all-absent baseline %.3f (%d entities)",
        student,
        baseline,
        pairs,
    )
    if min_agreement is not None and student < min_agreement:
        raise StudentTooWeakError(
            f"finetune_student: the student's held-out polarity agreement {student:.3f} is below "
            f"finetune_student.min_agreement {min_agreement:g} (all-absent baseline {baseline:.3f}, "
            f"{pairs} entities): the stage fails so that bulk_distill does not use this student; its outputs "
            "are in finetune_student/.attempt/"
        )
    if student < baseline:
        log.warning(
            "the student's held-out polarity agreement %.3f is below the all-absent baseline %.3f (%d "
            "entities): answering every entity 'absent' would do better, and bulk_distill will distil the "
            "corpus with this student; set finetune_student.min_agreement to stop here",
            student,
            baseline,
            pairs,
        )


# ------------------------------------------------------------------------------------------- stage


def run_relative(path: Path, run_dir: Path) -> str:
    """A path inside the run directory is stored relative to it, so a moved run directory still works."""
    path, run_dir = Path(path).resolve(), Path(run_dir).resolve()
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def run(ctx: StageContext, cfg: Config) -> None:
    seed, device = ctx.config.run.seed, resolve_device(ctx.config.run.device)
    table = ctx.read("seed_distill/seed_distillations")
    rows = table.select(["study_id", "report", "entities", "raw_response"]).to_pylist()
    finder = parse.EntityFinder(sorted({e for r in rows for e in r["entities"]}))
    for r in rows:
        r["answer"] = clean_answer(r["raw_response"], finder)
        r["prompt"] = student_prompt(r["report"], r["entities"])
    unusable = [r["study_id"] for r in rows if not r["answer"]]
    if unusable:
        ctx.log.warning(
            "%d seed rows have no well-formed teacher sentence; not used, e.g. %s",
            len(unusable),
            unusable[:3],
        )
    rows = [r for r in rows if r["answer"]]
    train_ids, held_ids = split_held_out([r["study_id"] for r in rows], cfg.held_out, seed)
    train_rows = [r for r in rows if r["study_id"] in train_ids]
    held_rows = sorted((r for r in rows if r["study_id"] in held_ids), key=lambda r: r["study_id"])

    tiny = isinstance(cfg.base, TinyBase)
    if tiny:
        texts = [train_rows[0]["prompt"]] + [r["report"] for r in rows] + [r["answer"] for r in train_rows]
        base_path = build_tiny_base(texts, cfg.base.dims, ctx.path(TINY_BASE_DIR), seed, cfg.max_positions())
        if cfg.base.warmup.epochs > 0:  # stands in for Vicuna's language pre-training; report texts only
            warm = warm_up_base(
                base_path, [r["report"] for r in train_rows], cfg.base.warmup, cfg.generation.max_prompt, seed
            )
            ctx.log.info(
                "warmed up the tiny base on %d training reports in %.1f s: LM loss %.3f",
                len(train_rows),
                warm.seconds,
                warm.curve[-1].loss,
            )
    else:
        base_path = Path(cfg.base.path)
    model, tokenizer = load_base(base_path, device)

    extra = entity_subset_rows(train_rows, cfg.entity_subset_copies, finder, seed)
    if extra:
        ctx.log.info("%d entity-subset training examples added to %d reports", len(extra), len(train_rows))
    examples, skipped = [], []
    for r in [*train_rows, *extra]:
        try:
            examples.append(
                encode_example(
                    tokenizer,
                    r["study_id"],
                    r["prompt"],
                    r["answer"],
                    cfg.train.max_len,
                    cfg.generation.max_prompt,
                )
            )
        except ValueError as err:
            skipped.append(str(err))
    if skipped:
        ctx.log.warning(
            "%d training examples skipped (too long for max_len=%d), e.g. %s",
            len(skipped),
            cfg.train.max_len,
            skipped[0],
        )
    student = attach_lora(model, cfg.lora, seed)
    due = ctx.every(seconds=10)  # every step is in student_loss; the log gets a line per 10 s
    result = train_student(
        student,
        examples,
        cfg.train,
        tokenizer.pad_token_id,
        device,
        progress=lambda p: (
            due() and ctx.log.info("step %d epoch %.2f loss %.4f lr %.2e", p.step, p.epoch, p.loss, p.lr)
        ),
        seed=seed,
    )
    ctx.log.info(
        "trained %d/%d params on %d examples in %.1f s: loss %.3f -> %.3f",
        result.trainable_params,
        result.total_params,
        len(examples),
        result.seconds,
        result.curve[0].loss,
        result.curve[-1].loss,
    )
    # where the base is once the stage's outputs are promoted (a hub id or a user's path stays as given)
    final_base = (ctx.stage_dir / TINY_BASE_DIR).resolve() if tiny else cfg.base.path
    adapter_dir = save_adapter(student, tokenizer, ctx.path(ADAPTER_DIR), final_base)

    backend = TransformersBackend(student, tokenizer, cfg.generation)
    prompts, requested = [r["prompt"] for r in held_rows], [r["entities"] for r in held_rows]
    teacher = [r["answer"] for r in held_rows]
    t0 = time.perf_counter()
    outputs = backend.generate(prompts)
    greedy_rate = len(held_rows) / max(time.perf_counter() - t0, 1e-9)
    evals = [
        {
            "system": "student_greedy",
            **agreement(requested, teacher, outputs, finder),
            "reports_per_s": greedy_rate,
        }
    ]
    if cfg.decoding == "entity_complete":
        complete = EntityCompletion(
            student_prompt, backend.generate, backend.answer_logprobs, cfg.reprompt_rounds
        )
        texts, counts = complete([r["report"] for r in held_rows], requested, outputs, finder)
        rate = len(held_rows) / max(time.perf_counter() - t0, 1e-9)
        ctx.log.info("entity-complete decoding on held-out reports: %s", counts)
        evals.append(
            {"system": "student", **agreement(requested, teacher, texts, finder), "reports_per_s": rate}
        )
    else:
        evals.append(evals[0] | {"system": "student"})
    evals.append(
        {
            "system": "all_absent",
            **agreement(requested, teacher, [all_absent_answer(e) for e in requested], finder),
            "reports_per_s": 0.0,
        }
    )
    for e in evals:
        ctx.log.info("held-out agreement %s", e)

    ctx.write("student_loss", [p.__dict__ for p in result.curve])
    ctx.write("student_eval", evals)
    ctx.write(
        "student_model",
        [
            {
                "adapter_dir": run_relative(ctx.stage_dir / ADAPTER_DIR, ctx.run_dir),
                "base_model": run_relative(ctx.stage_dir / TINY_BASE_DIR, ctx.run_dir)
                if tiny
                else str(base_path),
                "adapter_sha256": sha256_file(adapter_dir / "adapter_model.safetensors"),
                "lora_r": cfg.lora.r,
                "lora_alpha": cfg.lora.alpha,
                "max_prompt": cfg.generation.max_prompt,
                "max_new_tokens": cfg.generation.max_new_tokens,
                "decoding": cfg.decoding,
                "reprompt_rounds": cfg.reprompt_rounds,
                "n_train": len(examples),
                "n_heldout": len(held_rows),
                "n_skipped": len(skipped),
            }
        ],
    )
    check_student(evals, cfg.min_agreement, ctx.log)


STAGE = Stage(
    name="finetune_student",
    version="4",
    config=Config,
    run=run,
    summary="LoRA fine-tuning of the student LLM on the seed distillations, held-out agreement",
    reads=("seed_distill/seed_distillations",),
    writes={"student_loss": StudentLoss, "student_eval": StudentEval, "student_model": StudentModel},
    files=(ADAPTER_DIR, TINY_BASE_DIR),
    optional=(TINY_BASE_DIR,),  # written only for the built-in tiny base; a real base stays where it is
    gpu=True,
)
