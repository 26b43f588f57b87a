"""Benchmark ECAMP pre-training steps on CPU: step time, samples/s and peak memory per model size.

    .venv/bin/python bench/pretrain.py                 # demo, vitb_width, paper (each in its own process)
    .venv/bin/python bench/pretrain.py --only paper --steps 3
    .venv/bin/python bench/pretrain.py --only paper --steps 3 --threads 1 --amp bf16   # bf16 autocast on CPU

One optimiser step = forward (MIM + SR + MSCF/MLM) + backward + AdamW, on synthetic tensors of the real shapes
(the MLM labels/weights come from the real text collator on IU X-ray reports, so ~the paper's share of
positions is predicted). `cpu_s_per_step` (process CPU time, all threads) is reported beside the wall time
because the development machine is shared: wall time there measures the neighbours as much as the code. Each
size runs in a fresh process so its peak RSS (resource.getrusage) is its own. The official ECAMP model was
measured at 8.4 s/step for the paper size at batch 4 on this kind of 2-core CPU. Also measured: the data
pipeline (decode + RandomResizedCrop to 448 + low-res + window) on the real radiographs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SIZES = {
    "demo": dict(
        batch=16,
        model=dict(
            img_size=64,
            hr_size=128,
            patch_size=8,
            embed_dim=64,
            depth=2,
            num_heads=4,
            decoder_embed_dim=64,
            decoder_depth=2,
            decoder_num_heads=4,
            sr_window=4,
            vocab_size=1000,
            text_hidden=64,
            text_layers=2,
            text_heads=4,
            text_ffn=128,
            max_len=128,
        ),
    ),
    # ViT-B width (768, 12 heads) but shallow, with a 2-layer 768-wide BERT: the per-layer cost at paper width
    "vitb_width": dict(batch=8, model=dict(depth=4, decoder_depth=2, text_layers=2)),
    # the paper model: ViT-B/16 at 224, SR at 448, decoder 512/4/16, BERT 6 × 768, 30k vocab, 256 tokens
    "paper": dict(batch=4, model=dict()),
}


def bench_size(name: str, steps: int, threads: int, amp: str = "off") -> dict:
    import numpy as np
    import torch

    from models.ecamp.model import ECAMP, ECAMPConfig
    from models.ecamp.pretrain import param_groups
    from models.engine.step import autocast_for
    from models.text.masking import TextCollator, TextMaskingConfig
    from models.text.wordpiece import train_wordpiece
    from tests.real_data import iu_xray_texts

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = SIZES[name]
    cfg = ECAMPConfig(**spec["model"])
    batch = spec["batch"]
    reports = iu_xray_texts()
    tokenizer = train_wordpiece(reports, vocab_size=min(cfg.vocab_size, 3000), min_frequency=2)
    collate = TextCollator(tokenizer, TextMaskingConfig(max_len=cfg.max_len))
    model = ECAMP(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    rng = np.random.default_rng(0)

    def make_batch(i: int) -> dict:
        texts = [(reports[(i * batch + j) % len(reports)], None) for j in range(batch)]
        b = collate(texts, rng)
        b["imgs_lr"] = torch.randn(batch, 3, cfg.img_size, cfg.img_size)
        b["imgs_hr"] = torch.randn(batch, 3, cfg.hr_size, cfg.hr_size)
        k = cfg.sr_window * 2 * cfg.patch_size
        b["window"] = torch.tensor([[0, 0, k, k]] * batch)
        return b

    times, cpu = [], []
    for i in range(steps + 1):  # the first step (allocations, lazy init) is not timed
        b = make_batch(i)
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast_for(amp, torch.device("cpu")):
            losses = model(**b)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    step = float(np.median(times))
    return {
        "size": name,
        "batch": batch,
        "threads": threads,
        "amp": amp,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "step_s_median": round(step, 3),
        "step_s_min": round(min(times), 3),
        "samples_per_s": round(batch / step, 2),
        "cpu_s_per_step": round(float(np.median(cpu)), 3),  # CPU time of all threads: robust to a shared box
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "predicted_tokens_share": round(float((b["labels"] != -100).float().mean()), 3),
    }


def bench_data(n: int) -> dict:
    """Samples/s of decode + augment at the paper size on the three real radiographs (one process)."""
    import torch

    from models.ecamp.config import PretrainConfig
    from models.ecamp.data import PretrainDataset, PretrainRecord
    from models.ecamp.model import ECAMPConfig
    from tests.real_data import REAL_DATA

    torch.set_num_threads(1)
    paths = sorted(str(p) for p in (REAL_DATA / "images").iterdir())
    recs = [
        PretrainRecord(str(i), str(i), p, "x", None, (1 / 14, 1 / 14, 13 / 14, 13 / 14))
        for i, p in enumerate(paths)
    ]
    ds = PretrainDataset(recs, ECAMPConfig(), PretrainConfig())
    t0 = time.perf_counter()
    for i in range(n):
        ds[(i // len(recs), i % len(recs))]
    dt = time.perf_counter() - t0
    return {"size": "data_pipeline_448", "samples": n, "samples_per_s": round(n / dt, 1), "images": paths}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=[*SIZES, "data"], help="run one size in this process")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per size (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the target CPU has 2 cores)")
    parser.add_argument("--amp", choices=["off", "bf16"], default="off", help="bf16 autocast (--only runs)")
    args = parser.parse_args()
    if args.only:
        out = (
            bench_data(30)
            if args.only == "data"
            else bench_size(args.only, args.steps, args.threads, args.amp)
        )
        print(json.dumps(out))
        return
    print(f"load average before: {os.getloadavg()}")
    for name in [*SIZES, "data"]:
        steps = min(args.steps, 3) if name == "paper" else args.steps
        cmd = [
            sys.executable,
            __file__,
            "--only",
            name,
            "--steps",
            str(steps),
            "--threads",
            str(args.threads),
        ]
        res = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        if res.returncode:
            print(f"{name}: FAILED\n{res.stderr[-2000:]}")
            continue
        print(res.stdout.strip().splitlines()[-1])
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
