"""bulk_distill's student throughput: the in-process transformers backend vs a vLLM server, side by side.

    .venv/bin/python bench/bulk_throughput.py                         # the demo's student shape, 96 reports
    .venv/bin/python bench/bulk_throughput.py --reports 512 --concurrency 64 --shape vicuna7b   # on a GPU

The student is a Llama built from `LlamaConfig` with random weights (no download) and a LoRA adapter: the
demo's tiny shape (configs/demo.yaml `finetune_student.base.dims`, head_dim 64) or Vicuna-7B's shape. Random
weights do not stop early, so every answer runs to `--max-new` tokens: both backends do the same work per
report. The prompts are the Table 2 prompts of real IU X-ray reports (tests/data/real), cut to `--max-prompt`
tokens as in training. vLLM runs from the serving environment (`make serve-env`), fp32 on CPU and bf16 on a
GPU.

Prints one JSON line per backend (reports/s, generated tokens/s); copy them to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.distill.generate import (  # noqa: E402
    GenerationSettings,
    OpenAIBackend,
    TransformersBackend,
    VllmSettings,
    start_vllm_server,
)
from models.distill.student import (  # noqa: E402
    LoraSettings,
    TinyDims,
    attach_lora,
    build_tiny_base,
    load_base,
    load_student,
    save_adapter,
    student_prompt,
)
from models.distill.teacher_http import ClientConfig  # noqa: E402
from models.resources import DEFAULT_ENTITY_LIST  # noqa: E402
from models.text.entities import EntityMatcher, load_entity_list  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tests.real_data import iu_xray_texts  # noqa: E402

VICUNA_7B = TinyDims(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)


def prompts_of(n: int) -> list[str]:
    texts = [t for t in iu_xray_texts() if t]
    mentions = EntityMatcher(load_entity_list(DEFAULT_ENTITY_LIST)).match(
        [str(i) for i in range(len(texts))], texts
    )
    by_report: dict[int, list[str]] = {}
    for sid, entity in zip(
        mentions.column("study_id").to_pylist(), mentions.column("entity").to_pylist(), strict=True
    ):
        by_report.setdefault(int(sid), [])
        if entity not in by_report[int(sid)]:
            by_report[int(sid)].append(entity)
    ids = sorted(by_report)[:n]
    return [student_prompt(texts[i], by_report[i]) for i in ids]


def build_student(
    shape: str, folder: Path, texts: list[str], max_positions: int, rank: int
) -> tuple[Path, Path]:
    dims = (
        VICUNA_7B
        if shape == "vicuna7b"
        else load_config(ROOT / "configs" / "demo.yaml").finetune_student.base.dims
    )
    base = build_tiny_base(texts, dims, folder / "base", seed=0, max_positions=max_positions)
    model, tokenizer = load_base(base)
    student = attach_lora(model, LoraSettings(r=rank, alpha=rank, dropout=0.0), seed=0)
    return base, save_adapter(student, tokenizer, folder / "adapter", base_model=base)


def generated_tokens(tokenizer, answers: list[str]) -> int:
    return sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=int, default=96)
    parser.add_argument("--shape", choices=["demo", "vicuna7b"], default="demo")
    parser.add_argument("--max-prompt", type=int, default=136)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="transformers backend: prompts per generate()")
    parser.add_argument("--concurrency", type=int, default=32, help="vLLM: requests in flight")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    prompts = prompts_of(args.reports)
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = build_student(
            args.shape, Path(tmp), prompts, args.max_prompt + args.max_new, args.rank
        )
        model, tokenizer = load_student(base, adapter, device)
        common = {"shape": args.shape, "reports": len(prompts), "max_new": args.max_new, "device": device}
        if not args.skip_transformers:
            settings = GenerationSettings(
                batch_size=args.batch, max_new_tokens=args.max_new, max_prompt=args.max_prompt
            )
            t0 = time.perf_counter()
            answers = TransformersBackend(model, tokenizer, settings).generate(prompts)
            s = time.perf_counter() - t0
            tokens = generated_tokens(tokenizer, answers)
            print(
                json.dumps(
                    {
                        "backend": "transformers",
                        "batch": args.batch,
                        **common,
                        "seconds": round(s, 1),
                        "reports_per_s": round(len(prompts) / s, 2),
                        "tokens_per_s": round(tokens / s, 1),
                    }
                )
            )
        del model
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        vllm = VllmSettings(
            port=port,
            dtype="bfloat16" if cuda else "float32",
            max_lora_rank=args.rank,
            max_model_len=args.max_prompt + args.max_new,
            env={} if cuda else {"VLLM_CPU_KVCACHE_SPACE": "1"},
        )
        t0 = time.perf_counter()
        with start_vllm_server(base, adapter, vllm, Path(tmp) / "vllm.log") as server:
            startup = time.perf_counter() - t0
            client = ClientConfig(
                base_url=server.base_url,
                model="student",
                api_key_env="ECAMP_BENCH_NO_KEY",
                rpm=None,
                tpm=None,
                concurrency=args.concurrency,
                max_tokens=args.max_new,
                temperature=0.0,
                max_retries=1,
            )
            t0 = time.perf_counter()
            answers = OpenAIBackend(client, None, tokenizer, args.max_prompt).generate(prompts)
            s = time.perf_counter() - t0
        tokens = generated_tokens(tokenizer, answers)
        print(
            json.dumps(
                {
                    "backend": "vllm",
                    "concurrency": args.concurrency,
                    **common,
                    "startup_s": round(startup, 1),
                    "seconds": round(s, 1),
                    "reports_per_s": round(len(prompts) / s, 2),
                    "tokens_per_s": round(tokens / s, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
