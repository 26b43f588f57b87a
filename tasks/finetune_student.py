"""Stage 4, `finetune_student`: LoRA-tune the student on the teacher's seed distillations (paper §3.1,
footnote 2).

seed_distillations -> Table 2 prompt in the Vicuna v1.1 template + the teacher's well-formed sentences ->
held-out split -> LoRA (peft) on the base (Vicuna-7B v1.5 from a local path, or the tiny Llama built here) ->
adapter dir (safetensors) + `student_model`, `student_loss` and `student_eval`: entity-level agreement with
the teacher on held-out seed reports, next to the trivial baseline that calls every entity absent. With
`decoding: entity_complete` (models/distill/complete.py) the student row is the completed answers and the
plain greedy answers are reported as `student_greedy` beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from data_contracts.files import sha256_file
from data_contracts.student import StudentEval, StudentLoss, StudentModel
from models.devices import resolve_device
from models.distill import parse
from models.distill.agreement import check_student, held_out_agreement
from models.distill.examples import entity_subset_rows, split_held_out, usable_seed_rows
from models.distill.generate import GenerationSettings, TransformersBackend
from models.distill.student import (
    LoraSettings,
    TinyDims,
    TrainResult,
    TrainSettings,
    WarmupSettings,
    attach_lora,
    build_tiny_base,
    encode_examples,
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
    """A tiny Llama built here from `LlamaConfig`, with a BPE tokenizer trained on the corpus (demo,
    tests)."""

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
        description="the LM the adapter is trained on: {kind: pretrained, path: ...} or {kind: tiny, dims, "
        "warmup}",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    decoding: Literal["greedy", "entity_complete"] = Field(
        "greedy",
        description="entity_complete: after greedy decoding, drop repeats and add each missing requested "
        "entity by re-prompting, then in the form the student scores most likely "
        "(models/distill/complete.py)",
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


def run_relative(path: Path, run_dir: Path) -> str:
    """A path inside the run directory is stored relative to it, so a moved run directory still works."""
    path, run_dir = Path(path).resolve(), Path(run_dir).resolve()
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def seed_rows(ctx: StageContext) -> tuple[list[dict], parse.EntityFinder]:
    """The seed distillations with their cleaned answers and prompts; rows without a usable answer are
    logged."""
    table = ctx.read("seed_distill/seed_distillations")
    rows = table.select(["study_id", "report", "entities", "raw_response"]).to_pylist()
    finder = parse.EntityFinder(sorted({e for r in rows for e in r["entities"]}))
    rows, unusable = usable_seed_rows(rows, finder)
    if unusable:
        ctx.log.warning(
            "%d seed rows have no well-formed teacher sentence; not used, e.g. %s",
            len(unusable),
            unusable[:3],
        )
    return rows, finder


def base_model(ctx: StageContext, cfg: Config, rows: list[dict], train_rows: list[dict], seed: int) -> Path:
    """The base LM's folder: the configured one, or the tiny Llama built (and optionally warmed up) here."""
    if not isinstance(cfg.base, TinyBase):
        return Path(cfg.base.path)
    texts = [train_rows[0]["prompt"]] + [r["report"] for r in rows] + [r["answer"] for r in train_rows]
    path = build_tiny_base(texts, cfg.base.dims, ctx.path(TINY_BASE_DIR), seed, cfg.max_positions())
    if cfg.base.warmup.epochs > 0:  # stands in for Vicuna's language pre-training; report texts only
        reports = [r["report"] for r in train_rows]
        warm = warm_up_base(path, reports, cfg.base.warmup, cfg.generation.max_prompt, seed)
        ctx.log.info(
            "warmed up the tiny base on %d training reports in %.1f s: LM loss %.3f",
            len(train_rows),
            warm.seconds,
            warm.curve[-1].loss,
        )
    return path


def training_examples(
    ctx: StageContext,
    cfg: Config,
    tokenizer: Any,
    train_rows: list[dict],
    finder: parse.EntityFinder,
    seed: int,
) -> tuple[list, list[str]]:
    """The encoded training examples (with the entity-subset copies) and why any were skipped."""
    extra = entity_subset_rows(train_rows, cfg.entity_subset_copies, finder, seed)
    if extra:
        ctx.log.info("%d entity-subset training examples added to %d reports", len(extra), len(train_rows))
    examples, skipped = encode_examples(
        tokenizer, [*train_rows, *extra], cfg.train.max_len, cfg.generation.max_prompt
    )
    if skipped:
        ctx.log.warning(
            "%d training examples skipped (too long for max_len=%d), e.g. %s",
            len(skipped),
            cfg.train.max_len,
            skipped[0],
        )
    return examples, skipped


def train(
    ctx: StageContext, cfg: Config, student: Any, examples: list, pad_id: int, device: str, seed: int
) -> TrainResult:
    """LoRA training with a progress line every 10 s (every step is in student_loss) and a closing summary."""
    due = ctx.every(seconds=10)
    result = train_student(
        student,
        examples,
        cfg.train,
        pad_id,
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
    return result


def run(ctx: StageContext, cfg: Config) -> None:
    seed, device = ctx.config.run.seed, resolve_device(ctx.config.run.device)
    rows, finder = seed_rows(ctx)
    train_ids, held_ids = split_held_out([r["study_id"] for r in rows], cfg.held_out, seed)
    train_rows = [r for r in rows if r["study_id"] in train_ids]
    held_rows = sorted((r for r in rows if r["study_id"] in held_ids), key=lambda r: r["study_id"])
    base_path = base_model(ctx, cfg, rows, train_rows, seed)
    model, tokenizer = load_base(base_path, device)

    examples, skipped = training_examples(ctx, cfg, tokenizer, train_rows, finder, seed)
    student = attach_lora(model, cfg.lora, seed)
    result = train(ctx, cfg, student, examples, tokenizer.pad_token_id, device, seed)
    # where the base is once the stage's outputs are promoted (a hub id or a user's path stays as given)
    tiny = isinstance(cfg.base, TinyBase)
    final_base = (ctx.stage_dir / TINY_BASE_DIR).resolve() if tiny else cfg.base.path
    adapter_dir = save_adapter(student, tokenizer, ctx.path(ADAPTER_DIR), final_base)

    backend = TransformersBackend(student, tokenizer, cfg.generation)
    completion = (backend.answer_logprobs, cfg.reprompt_rounds) if cfg.decoding == "entity_complete" else None
    evals, counts = held_out_agreement(held_rows, backend.generate, student_prompt, finder, completion)
    if counts is not None:
        ctx.log.info("entity-complete decoding on held-out reports: %s", counts)
    for e in evals:
        ctx.log.info("held-out agreement %s", e)

    ctx.write("student_loss", [p.__dict__ for p in result.curve])
    ctx.write("student_eval", evals)
    model_row = {
        "adapter_dir": run_relative(ctx.stage_dir / ADAPTER_DIR, ctx.run_dir),
        "base_model": run_relative(ctx.stage_dir / TINY_BASE_DIR, ctx.run_dir) if tiny else str(base_path),
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
    ctx.write("student_model", [model_row])
    check_student(evals, cfg.min_agreement, ctx.log)


STAGE = Stage(
    name="finetune_student",
    version="5",
    config=Config,
    run=run,
    summary="LoRA fine-tuning of the student LLM on the seed distillations, held-out agreement",
    reads=("seed_distill/seed_distillations",),
    writes={"student_loss": StudentLoss, "student_eval": StudentEval, "student_model": StudentModel},
    files=(ADAPTER_DIR, TINY_BASE_DIR),
    optional=(TINY_BASE_DIR,),  # written only for the built-in tiny base; a real base stays where it is
    gpu=True,
)
