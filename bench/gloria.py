"""Benchmark GLoRIA re-training on CPU: demo training and attention-extraction rates, paper-scale step time.

    .venv/bin/python bench/gloria.py                  # demo + paper (each in its own process)
    .venv/bin/python bench/gloria.py --only paper --batch 8 --steps 2

Demo: the `configs/demo.yaml` model (small CNN at 64 px, 1-layer BERT) trained by `models.gloria.train` on 160
image-report pairs (random 64 px images, the IU X-ray dev reports as text, which are longer than the demo's),
then attention maps for 200 images (demo switches: single softmax, cosine scores, affirmed-word local
loss, per-word prior over the 200 images). Paper: ResNet-50 + BERT-base (12 × 768, 97 tokens), one optimiser
step (forward, global + local loss, backward, AdamW) at `--size` px; the epoch over MIMIC-CXR's 377,110 images
is projected from the per-image step time. Rates use CPU seconds of the process (`time.process_time`) because
the shared machine's load makes wall time noisy; wall time is reported too. Peak RSS by resource.getrusage.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIMIC_IMAGES = 377_110
DEMO_MODEL = dict(
    encoder="small",
    image_size=64,
    small_width=8,
    embed_dim=32,
    text_hidden=32,
    text_layers=1,
    text_heads=2,
    text_intermediate=64,
    max_tokens=48,
    softmax="single",
    scores="cosine",
)
DEMO_POSITIVES = ["effusion", "opacity", "cardiomegaly"]  # affirmed-word local loss and the attention maps


def iu_reports() -> list[str]:
    from models.gloria.model import clean_report
    from tests.real_data import iu_xray_texts

    texts = [clean_report(t) for t in iu_xray_texts()]
    return [t for t in texts if t]


def timed(fn) -> tuple[object, float, float]:  # noqa: ANN001
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def bench_demo(epochs: int) -> dict:
    import numpy as np
    import torch

    from models.gloria.model import Gloria, GloriaConfig
    from models.gloria.train import ImageTextData, TrainConfig, extract_attention, train_gloria
    from models.text.wordpiece import train_wordpiece

    torch.set_num_threads(1)
    texts = iu_reports()
    tokenizer = train_wordpiece(texts, vocab_size=1000)
    torch.manual_seed(0)
    model = Gloria(GloriaConfig(vocab_size=tokenizer.get_vocab_size(), **DEMO_MODEL))
    images = np.random.default_rng(0).integers(0, 256, size=(200, 64, 64), dtype=np.uint8)
    train = ImageTextData(images[:160], texts[:160])
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=2e-3, local_words="affirmed")
    entities = [DEMO_POSITIVES] * len(train.texts)
    rows, cpu, wall = timed(lambda: train_gloria(model, train, tokenizer, cfg, entities=entities))
    n_train = len(rows) * 16
    data = ImageTextData(images, texts[:200])
    positives = [DEMO_POSITIVES] * 200
    _, a_cpu, a_wall = timed(
        lambda: extract_attention(model, data, tokenizer, positives, 8, 32, 48, word_prior_images=200)
    )
    return {
        "size": "demo",
        "train_images_per_cpu_s": n_train / cpu,
        "train_images_per_wall_s": n_train / wall,
        "train_cpu_s": cpu,
        "train_steps": len(rows),
        "attention_images_per_cpu_s": 200 / a_cpu,
        "attention_images_per_wall_s": 200 / a_wall,
        "peak_rss_mb": peak_rss_mb(),
    }


def bench_paper(batch: int, size: int, steps: int) -> dict:
    import torch

    from models.gloria.model import Gloria, GloriaConfig, encode_texts
    from models.text.wordpiece import train_wordpiece

    torch.set_num_threads(1)
    texts = iu_reports()
    tokenizer = train_wordpiece(texts, vocab_size=3000)
    torch.manual_seed(0)
    model = Gloria(GloriaConfig(image_size=size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=1e-6)
    images = torch.randn(batch, 1, size, size)
    text = encode_texts(tokenizer, sorted(texts, key=len)[-batch:], 97)  # the longest reports: 97 tokens

    def step() -> float:
        loss = model.losses(model(images, text))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss)

    timed(step)  # warm-up (allocator, first-call overheads)
    cpu = wall = 0.0
    for _ in range(steps):
        _, c, w = timed(step)
        cpu, wall = cpu + c, wall + w
    per_image = cpu / (steps * batch)
    return {
        "size": f"paper_{size}px_batch{batch}",
        "step_cpu_s": cpu / steps,
        "step_wall_s": wall / steps,
        "cpu_s_per_image": per_image,
        "projected_step_cpu_s_at_batch48": per_image * 48,
        "projected_epoch_cpu_h_377k": per_image * MIMIC_IMAGES / 3600,
        "tokens": int(text.input_ids.shape[1]),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["demo", "paper"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if args.only == "demo":
        print(json.dumps(bench_demo(args.epochs)))
        return
    if args.only == "paper":
        print(json.dumps(bench_paper(args.batch, args.size, args.steps)))
        return
    for which in ("demo", "paper"):
        cmd = [
            sys.executable,
            __file__,
            "--only",
            which,
            "--epochs",
            str(args.epochs),
            "--batch",
            str(args.batch),
            "--size",
            str(args.size),
            "--steps",
            str(args.steps),
        ]
        out = (
            subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
            .stdout.strip()
            .splitlines()
        )
        print(json.dumps(json.loads(out[-1]), indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
