"""The LoRA student of context distillation (paper §3.1: a Vicuna-7B fine-tuned on 10,000 teacher outputs).

The student sees exactly the teacher's prompt (Table 2) rendered in the Vicuna v1.1 conversation template and
learns to write the teacher's answer; the loss covers only the answer tokens. The base is loaded from a
directory with `AutoModelForCausalLM` / `AutoTokenizer`, whether it is `lmsys/vicuna-7b-v1.5` on disk or the
tiny Llama built here from `LlamaConfig` with a byte-level BPE tokenizer trained on the corpus, so the demo
runs the paper's code path. Only LoRA parameters are trained; the adapter is saved as safetensors so vLLM can
serve it (`--lora-modules`).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from models.distill.prompt import build_messages
from models.engine.schedule import warmup_cosine
from models.engine.step import Amp, StepGuard, autocast_for, optimizer_step

IGNORE_INDEX = -100  # label value the causal-LM loss skips (prompt and padding positions)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ------------------------------------------------------------------------------------------------------------
# Vicuna v1.1 conversation template (FastChat `vicuna_v1.1`: roles USER/ASSISTANT, sep " ", sep2 "</s>")
# ------------------------------------------------------------------------------------------------------------
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna_prompt(messages: Sequence[dict[str, str]]) -> str:
    """Render OpenAI-style chat messages (the teacher's prompt) as one Vicuna v1.1 prompt ending in
    "ASSISTANT:".

    System messages replace Vicuna's default system text; consecutive user messages form one USER turn (the
    template has a single turn here). BOS is not written: the tokenizer adds it, as FastChat expects.
    """
    system = [m["content"].strip() for m in messages if m["role"] == "system"]
    user = [m["content"].strip() for m in messages if m["role"] == "user"]
    others = sorted({m["role"] for m in messages} - {"system", "user"})
    if others:
        raise ValueError(f"vicuna_prompt: unsupported message roles {others}; expected system/user only")
    if not user:
        raise ValueError("vicuna_prompt: the prompt has no user message")
    system_text = "\n".join(system) if system else VICUNA_SYSTEM
    return f"{system_text} USER: {chr(10).join(user)} ASSISTANT:"


def student_prompt(report: str, entities: Sequence[str]) -> str:
    """The teacher's Table 2 prompt for this report, in the Vicuna v1.1 template (shared by train and
    bulk)."""
    return vicuna_prompt(build_messages(report, entities))


# ------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------
class TinyDims(BaseModel):
    """Size of the tiny Llama built when no real base model is given (demo and tests)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(2000, ge=300, description="BPE vocabulary trained on the reports")
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(128, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    tie_word_embeddings: bool = Field(
        True,
        description="output = input embeddings: copying a report word is the easy direction for a random "
        "base",
    )
    embedding_std: float = Field(
        0.5,
        gt=0,
        description="HF's 0.02 gives tied logits ~0.1 wide: a softmax that LoRA on the linear layers could "
        "never sharpen",
    )
    initializer_range: float = Field(
        0.02, gt=0, description="std of the frozen random linear layers (HF default)"
    )


class LoraSettings(BaseModel):
    """peft LoRA hyper-parameters. vLLM serves only r in {1,8,16,32,64,...} with bias "none" and no saved
    modules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = tuple(LLAMA_LINEAR_MODULES)


class TrainSettings(BaseModel):
    """Optimisation of the adapter: AdamW with linear warm-up and cosine decay, gradient accumulation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(2e-4, gt=0, allow_inf_nan=False)
    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(8, ge=1)
    max_len: int = Field(2048, ge=16, description="tokens of prompt + answer; longer examples are skipped")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    log_every: int = Field(1, ge=1, description="optimizer steps between progress log lines")
    amp: Amp = "auto"


@dataclass
class Example:
    """One tokenised training example: prompt then answer; labels are IGNORE_INDEX on the prompt."""

    key: str
    input_ids: list[int]
    labels: list[int]


@dataclass
class LossPoint:
    step: int
    epoch: float
    loss: float
    lr: float
    tokens: int


@dataclass
class TrainResult:
    curve: list[LossPoint] = field(default_factory=list)
    steps: int = 0
    trainable_params: int = 0
    total_params: int = 0
    seconds: float = 0.0


class AdapterLoadError(RuntimeError):
    """A LoRA adapter directory that cannot be used; says which directory and why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot load LoRA adapter from {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


# ------------------------------------------------------------------------------------------------------------
# Tokenizer and tiny base model
# ------------------------------------------------------------------------------------------------------------
def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown bytes) with Llama's specials <unk>, <s>, </s> and a BOS post-processor.

    Padding uses <unk> as FastChat does, so no token is ever added (vLLM rejects adapters with resized
    embeddings).
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def build_tiny_base(
    texts: Sequence[str], dims: TinyDims, out_dir: Path, seed: int, max_positions: int
) -> Path:
    """Train a tokenizer on `texts`, initialise a Llama from `LlamaConfig` and save both as a loadable base
    dir.

    `max_positions` is what the stage will feed it: the longer of a training example and prompt + answer.
    """
    if not texts:
        raise ValueError("build_tiny_base: no texts to train the tokenizer on")
    tokenizer = train_bpe_tokenizer(texts, dims.vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_hidden_layers,
        num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_attention_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=dims.tie_word_embeddings,
        initializer_range=dims.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model = LlamaForCausalLM(config)
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=dims.embedding_std)
    model.save_pretrained(out_dir)
    return out_dir


class WarmupSettings(BaseModel):
    """Plain causal-LM training of the whole tiny base on report texts before LoRA (0 epochs: none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: float = Field(0.0, ge=0, description="0: no warm-up")
    lr: float = Field(3e-3, gt=0, allow_inf_nan=False)
    batch_size: int = Field(16, ge=1)


def warm_up_base(
    base_dir: Path, texts: Sequence[str], settings: WarmupSettings, max_len: int, seed: int = 0
) -> TrainResult:
    """Train every weight of the tiny base as a causal LM on `texts` and save it back into `base_dir`.

    Why: Vicuna comes to LoRA with language pre-training; a randomly initialised tiny Llama does not, and LoRA
    on a random frozen base has to learn report language and the task at once. This warm-up stands in for that
    pre-training. It must only ever see REPORT TEXTS (never the teacher's answers), so the student still
    learns the task from the seed distillations alone. Each text is one sequence (BOS + text + EOS, cut to
    max_len).
    """
    if not texts:
        raise ValueError("warm_up_base: no report texts to warm the base up on")
    model, tokenizer = load_base(base_dir)
    examples = []
    for i, text in enumerate(texts):
        ids = tokenizer(" ".join(text.split()), add_special_tokens=True)["input_ids"][: max_len - 1]
        ids = ids + [tokenizer.eos_token_id]
        examples.append(Example(f"warmup-{i}", ids, [IGNORE_INDEX] + ids[1:]))
    for p in model.parameters():
        p.requires_grad_(True)
    train = TrainSettings(
        lr=settings.lr,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        grad_accum=1,
        max_len=max_len,
        warmup_ratio=0.05,
        log_every=10**9,
    )
    result = train_student(model, examples, train, tokenizer.pad_token_id, seed=seed)
    model.save_pretrained(base_dir)
    return result


def load_base(path: Path | str, device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer from a local directory (tiny Llama or Vicuna-7B alike).

    On CUDA the weights are loaded in bf16 (paper scale); on CPU in fp32. Padding falls back to <unk>
    (FastChat).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"base model directory {path} has no config.json (expected a HF model directory)"
        )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model, tokenizer


# ------------------------------------------------------------------------------------------------------------
# Examples: loss on the answer only
# ------------------------------------------------------------------------------------------------------------
def encode_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str, budget: int) -> list[int]:
    """Prompt ids with BOS, cut from the LEFT to `budget` tokens (BOS kept) when longer.

    The end of the prompt holds the report, the entity list and "ASSISTANT:", so a small student with a short
    context keeps what it must read; training and generation cut the same way. At paper scale nothing is cut.
    """
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(ids) <= budget:
        return ids
    if budget < 2:
        raise ValueError(f"prompt budget {budget} leaves no room for the prompt")
    return ids[:1] + ids[len(ids) - budget + 1 :]


def encode_example(
    tokenizer: PreTrainedTokenizerFast, key: str, prompt: str, answer: str, max_len: int, max_prompt: int
) -> Example:
    """Tokenise prompt and answer separately so the label boundary is exact; append EOS to the answer."""
    answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    if len(answer_ids) + 2 > max_len:  # room for BOS and at least one prompt token
        raise ValueError(
            f"example {key}: answer of {len(answer_ids)} tokens does not fit max_len={max_len} with its "
            f"prompt"
        )
    prompt_ids = encode_prompt(tokenizer, prompt, min(max_prompt, max_len - len(answer_ids)))
    return Example(key, prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, rows: Sequence[dict], max_len: int, max_prompt: int
) -> tuple[list[Example], list[str]]:
    """`encode_example` of every row (study_id, prompt, answer); rows too long for `max_len` are skipped, and
    why is returned for each (the stage reports how many)."""
    examples, skipped = [], []
    for r in rows:
        try:
            examples.append(
                encode_example(tokenizer, r["study_id"], r["prompt"], r["answer"], max_len, max_prompt)
            )
        except ValueError as err:
            skipped.append(str(err))
    return examples, skipped


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input ids with pad_id, labels with IGNORE_INDEX, attention mask 0 on padding."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------------------------------------------------
# LoRA and training
# ------------------------------------------------------------------------------------------------------------
def attach_lora(model: PreTrainedModel, lora: LoraSettings, seed: int) -> PeftModel:
    """Wrap the base with LoRA adapters (base weights frozen); seeded so adapter init is reproducible."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, config)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def length_grouped_batches(
    examples: Sequence[Example], batch_size: int, rng: random.Random
) -> list[list[Example]]:
    """Shuffle, then batch examples of similar length together (less padding), then shuffle the batches."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    chunk = batch_size * 16
    batches: list[list[Example]] = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: len(examples[i].input_ids))
        batches += [
            [examples[i] for i in group[j : j + batch_size]] for j in range(0, len(group), batch_size)
        ]
    rng.shuffle(batches)
    return batches


def train_student(
    model: PeftModel,
    examples: Sequence[Example],
    settings: TrainSettings,
    pad_id: int,
    device: str = "cpu",
    progress=None,
    seed: int = 0,
) -> TrainResult:
    """AdamW on the trainable (LoRA) parameters, on the shared engine (warm-up + cosine, bf16 autocast per
    `settings.amp`, clipping and the non-finite guard); one loss point per optimizer step, with the lr it ran
    at.

    The loss of an optimizer step is the mean over its answer tokens (token-weighted across accumulated
    batches), so long answers count as much per token as short ones.
    """
    import time

    if not examples:
        raise ValueError("train_student: no training examples")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    batches_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total_batches = max(1, round(batches_per_epoch * settings.epochs))
    total_steps = math.ceil(total_batches / settings.grad_accum)
    scheduler = warmup_cosine(optimizer, round(settings.warmup_ratio * total_steps), total_steps)
    autocast = autocast_for(settings.amp, torch.device(device))
    trainable, total = count_params(model)
    result = TrainResult(trainable_params=trainable, total_params=total)
    start = time.perf_counter()

    model.train()
    batches: list[list[Example]] = []
    step_loss, step_tokens, done = 0.0, 0, 0
    pending: list[dict[str, torch.Tensor]] = []
    for b in range(total_batches):
        if not batches:
            batches = length_grouped_batches(examples, settings.batch_size, rng)
        pending.append(pad_batch(batches.pop(), pad_id))
        if len(pending) < settings.grad_accum and b < total_batches - 1:
            continue
        n_tokens = sum(int((p["labels"][:, 1:] != IGNORE_INDEX).sum()) for p in pending)
        for batch in pending:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                batch["labels"][:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            (loss_sum / n_tokens).backward()
            step_loss += float(loss_sum.detach())
        step_tokens = n_tokens
        done += len(pending)
        pending = []
        guard = StepGuard(
            "student",
            {"loss": step_loss / step_tokens},
            epoch=done // batches_per_epoch,
            step=result.steps + 1,
        )
        lr, _ = optimizer_step(model, optimizer, scheduler, settings.max_grad_norm, guard)
        result.steps += 1
        if result.steps % settings.log_every == 0 or done == total_batches:
            result.curve.append(
                LossPoint(
                    step=result.steps,
                    epoch=done / batches_per_epoch,
                    loss=step_loss / step_tokens,
                    lr=lr,
                    tokens=step_tokens,
                )
            )
            if progress is not None:
                progress(result.curve[-1])
        step_loss = 0.0
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------------------------
# Adapter save / load
# ------------------------------------------------------------------------------------------------------------
def save_adapter(
    model: PeftModel, tokenizer: PreTrainedTokenizerFast, out_dir: Path, base_model: str | Path | None = None
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors and the tokenizer (vLLM's --lora-modules layout).

    `base_model`: where the base will be once the caller's outputs are in place, written as the config's
    `base_model_name_or_path` (peft records the folder it was loaded from, which may be a temporary one)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if base_model is not None:
        config_path = out_dir / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(base_model)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def check_adapter_dir(adapter_dir: Path) -> dict:
    """Validate an adapter directory before peft touches it; returns its adapter_config as a dict.

    peft's own errors for a truncated or missing file are obscure (or, for a missing weights file, it may load
    a silently untrained adapter), so the layout and both files are checked here first.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterLoadError(adapter_dir, "directory does not exist")
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise AdapterLoadError(adapter_dir, f"missing file(s) {', '.join(missing)}")
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(adapter_dir, f"adapter_config.json is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise AdapterLoadError(
            adapter_dir, f"adapter_config.json holds a JSON {type(config).__name__}, not an object"
        )
    for key in ("r", "lora_alpha", "target_modules", "peft_type"):
        if key not in config:
            raise AdapterLoadError(adapter_dir, f"adapter_config.json lacks '{key}'")
    if problem := _adapter_config_problem(config):
        raise AdapterLoadError(adapter_dir, f"adapter_config.json: {problem}")
    try:
        weights = load_file(adapter_dir / "adapter_model.safetensors")
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterLoadError(adapter_dir, f"adapter_model.safetensors is corrupt ({err})") from err
    if not any("lora_" in name for name in weights):
        raise AdapterLoadError(adapter_dir, "adapter_model.safetensors holds no LoRA weights")
    return config


def _adapter_config_problem(config: dict) -> str | None:
    """The first of the keys peft relies on that holds a value of the wrong kind (peft fails on it with a
    TypeError deep inside), or None."""
    r, alpha, targets = config["r"], config["lora_alpha"], config["target_modules"]
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        return f"'r' is {r!r}, not a positive integer"
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        return f"'lora_alpha' is {alpha!r}, not a number"
    if not (
        isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        return f"'target_modules' is {targets!r}, not a module name or a list of them"
    if config["peft_type"] != "LORA":
        return f"'peft_type' is {config['peft_type']!r}, not 'LORA'"
    return None


def load_student(
    base_path: Path | str, adapter_dir: Path, device: str = "cpu"
) -> tuple[PeftModel, PreTrainedTokenizerFast]:
    """Base model + trained adapter, ready for generation (eval mode); raises AdapterLoadError with the
    reason."""
    check_adapter_dir(adapter_dir)
    model, tokenizer = load_base(base_path, device)
    try:
        student = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise AdapterLoadError(Path(adapter_dir), f"does not fit base model {base_path} ({err})") from err
    student.eval()
    return student, tokenizer
