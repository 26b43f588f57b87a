"""Student generation throughput on CPU: batched greedy decoding (left padding + KV cache) vs one prompt at a
time.

Prompts are the real Table 2 prompts (Vicuna template) of IU X-ray reports from tests/data/real. The
student is the demo-sized tiny Llama with an attached (untrained) LoRA adapter, so both modes decode the
same number of tokens; what is measured is the serving path, not answer quality.

    .venv/bin/python bench/student_generate.py --reports 32 --batch 16 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages and tests

from models.distill import parse  # noqa: E402
from models.distill.generate import GenerationSettings, TransformersBackend  # noqa: E402
from models.distill.prompt import build_messages  # noqa: E402
from models.distill.student import (  # noqa: E402
    LoraSettings,
    TinyDims,
    attach_lora,
    build_tiny_base,
    load_base,
    vicuna_prompt,
)
from tests.real_data import REPO_ROOT, iu_xray_texts  # noqa: E402

ENTITIES = REPO_ROOT / "configs" / "entities" / "table1.txt"


def real_prompts(n: int) -> list[str]:
    entities = [
        ln.strip() for ln in ENTITIES.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    finder = parse.EntityFinder(entities)
    prompts = []
    for text in iu_xray_texts():
        found = finder.find(text)
        if text and found:
            prompts.append(vicuna_prompt(build_messages(text, found)))
        if len(prompts) == n:
            break
    return prompts


def time_generate(backend: TransformersBackend, prompts: list[str]) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    out = backend.generate(prompts)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=192)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = real_prompts(args.reports)
    dims = TinyDims(vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_base(prompts, dims, Path(tmp), seed=0, max_positions=1024)
        model, tok = load_base(base)
    student = attach_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0), seed=0).eval()
    results = {}
    for batch in (args.batch, 1):
        backend = TransformersBackend(
            student,
            tok,
            GenerationSettings(
                batch_size=batch, max_new_tokens=args.max_new_tokens, max_prompt=args.max_prompt
            ),
        )
        time_generate(backend, prompts[: min(4, len(prompts))])  # warm-up
        seconds, out = time_generate(backend, prompts)
        new_tokens = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in out)
        results[batch] = (seconds, out, new_tokens)
        print(
            f"batch {batch:>3}: {len(prompts) / seconds:7.2f} reports/s  {new_tokens / seconds:8.1f} new "
            f"tokens/s"
        )
    same = results[args.batch][1] == results[1][1]
    ratio = results[1][0] / results[args.batch][0]
    print(f"speed-up batched/sequential: {ratio:.2f}x; identical answers: {same}")


if __name__ == "__main__":
    main()
