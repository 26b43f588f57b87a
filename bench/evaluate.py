"""Benchmark downstream evaluation of the paper-size encoder on CPU (paper §4.2) and project one full run.

    .venv/bin/python bench/evaluate.py                      # ViT-B/16 at 224 px, batch 8, 5 timed steps
    .venv/bin/python bench/evaluate.py --small              # tiny ViT (64 px, patch 8, 2 x 64): smoke run
    .venv/bin/python bench/evaluate.py --batch 16 --steps 3 --threads 2

Measured, on synthetic tensors of the real shapes (no image decoding or augmentation, no pre-trained weights):
1. fine-tuning: timm ViT-B/16 (mean of patch tokens + fc_norm, Linear(768, 14) head, drop_path 0.1), one
   forward + BCEWithLogits + backward + gradient clip 1.0 + SGD (momentum 0.9) step per batch, fp32;
2. frozen feature extraction: `forward_features` + pooling under `torch.inference_mode()`, the cost that the
   linear probe, segmentation and detection pay once per image when their encoder is frozen and its features
   are cached;
3. linear probe on cached features: Linear(768, 14) on pre-computed [N, 768] pooled features, same optimiser,
   on 1 torch thread (its ops are tiny; more threads only add synchronisation, and stall badly under load).
One warm-up step/batch is not timed; rates use the median wall time of the timed steps (the probe: the mean of
300 steps, at `--batch` and at the official batch 96). Process CPU time (all threads, `time.process_time`) is
shown beside it because the development machine is shared.

Projection: ChestX-ray14 at 1% labels with the official recipe (ECAMP `Fine-tuning/Classification/run_ft.sh`
and `run_lp.sh`: 3000 steps at batch 96; `train.py` validates after every epoch, i.e. every
ceil(785 / 96) = 9 steps, and tests once at the end). Per-image costs measured at `--batch` are assumed to
hold at batch 96 (train) and 512/1024 (eval). Three ways are projected: fine-tuning; the linear probe as the
official code runs it (`--mode LinearProbe`: the frozen encoder still runs forward on every training and
validation image, with augmentation); and the linear probe on cached features (one extraction pass over
train + val + test, then the probe schedule on the cached features).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from timm.models.vision_transformer import VisionTransformer

ROOT = Path(__file__).resolve().parent.parent

# ChestX-ray14 split sizes. MRM's DatasetsSplits/NIH_ChestX-ray (RL4M/MRM-pytorch): train_1.txt 785 lines,
# train_list.txt 78,468, val_list.txt 11,219, test_list.txt 22,433 (112,120 images in all). ECAMP's
# Fine-tuning/Classification/datasets/ChestX-ray14/train_list_1.txt is the same 785 images (with the
# images_0xx/ folder prefix); ECAMP ships no val/test list for ChestX-ray14, so MRM's are the ones used.
CXR14_TRAIN_1PCT = 785
CXR14_TRAIN_FULL = 78_468
CXR14_VAL = 11_219
CXR14_TEST = 22_433
NUM_CLASSES = 14
# Official recipe for ChestX-ray14, 1% (run_ft.sh and run_lp.sh): --num_steps 3000 --train_batch_size 96,
# --learning_rate 3e-2, SGD momentum 0.9, weight decay 0, gradient clip 1.0 (train.py defaults).
FT_STEPS = 3000
FT_BATCH = 96
FT_LR = 3e-2
STEPS_PER_EPOCH = math.ceil(CXR14_TRAIN_1PCT / FT_BATCH)  # DataLoader without drop_last: 9
VALIDATIONS = FT_STEPS // STEPS_PER_EPOCH  # `global_step % len(train_loader) == 0`: 333 passes over val

PAPER = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
SMALL = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def build_vit(small: bool) -> VisionTransformer:
    from timm.models.vision_transformer import VisionTransformer

    spec = SMALL if small else PAPER
    return VisionTransformer(
        **spec, global_pool="avg", fc_norm=True, num_classes=NUM_CLASSES, drop_path_rate=0.1
    )


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def bench_finetune(model: VisionTransformer, batch: int, size: int, steps: int) -> dict:
    """Wall and CPU seconds of one fine-tuning step (forward, loss, backward, clip, SGD) at `batch`."""
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=FT_LR, momentum=0.9, weight_decay=0.0)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    images = [torch.randn(batch, 3, size, size) for _ in range(steps + 1)]
    labels = [torch.randint(0, 2, (batch, NUM_CLASSES)).float() for _ in range(steps + 1)]
    model.train()
    walls, cpus = [], []
    for i in range(steps + 1):  # step 0 is the warm-up (allocator, lazy init): not timed
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn(model(images[i]), labels[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if i:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    optimizer.zero_grad(set_to_none=True)
    return {
        "batch": batch,
        "step_wall_s": median(walls),
        "step_cpu_s": median(cpus),
    }


def bench_extract(model: VisionTransformer, batch: int, size: int, steps: int) -> dict:
    """Wall and CPU seconds of one frozen-encoder batch: forward_features + pooled [B, D] features."""
    import torch

    images = [torch.randn(batch, 3, size, size) for _ in range(steps + 1)]
    model.eval()
    walls, cpus = [], []
    with torch.inference_mode():
        for i in range(steps + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            tokens = model.forward_features(images[i])
            pooled = model.forward_head(tokens, pre_logits=True)  # mean of patch tokens + fc_norm
            if i:
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
    assert pooled.shape == (batch, model.embed_dim)
    return {
        "batch": batch,
        "step_wall_s": median(walls),
        "step_cpu_s": median(cpus),
    }


def train_probe(features: torch.Tensor, labels: torch.Tensor, batch: int, steps: int) -> tuple[float, float]:
    """Train Linear(D, 14) on cached features for `steps` steps; returns (wall s, CPU s) of the timed loop."""
    import torch

    head = torch.nn.Linear(features.shape[1], NUM_CLASSES)
    torch.nn.init.trunc_normal_(head.weight, std=2e-5)  # as the official head init
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=FT_LR, momentum=0.9, weight_decay=0.0)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    n = features.shape[0]
    order = torch.randperm(n)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        start = (i * batch) % n
        if start + batch > n:  # a new epoch over the cached features
            order = torch.randperm(n)
            start = 0
        idx = order[start : start + batch]
        loss = loss_fn(head(features[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_probe(dim: int, batch: int, steps: int = 300) -> dict:
    """Linear probe on cached [N, dim] features: mean seconds of one step at `batch` over `steps` steps."""
    import torch

    features = torch.randn(CXR14_TRAIN_1PCT, dim)
    labels = torch.randint(0, 2, (CXR14_TRAIN_1PCT, NUM_CLASSES)).float()
    train_probe(features, labels, batch, 20)  # warm-up
    wall, cpu = train_probe(features, labels, batch, steps)
    return {"batch": batch, "step_wall_s": wall / steps, "step_cpu_s": cpu / steps}


def bench_probe_eval(dim: int) -> dict:
    """One validation pass of the probe over the cached features of the whole val split."""
    import torch

    head = torch.nn.Linear(dim, NUM_CLASSES)
    val_features = torch.randn(CXR14_VAL, dim)
    with torch.inference_mode():
        head(val_features)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        (head(val_features).sigmoid() > 0.5).float().mean()
        return {"val_pass_wall_s": time.perf_counter() - t0, "val_pass_cpu_s": time.process_time() - c0}


def project(ft: dict, ex: dict, probe96: dict, probe_eval: dict) -> list[dict]:
    """Seconds (wall and CPU) of one ChestX-ray14 1% evaluation under the official recipe, three ways."""
    train_images = FT_STEPS * CXR14_TRAIN_1PCT / STEPS_PER_EPOCH  # 333.3 epochs of 785 (last batch: 17)
    eval_images = VALIDATIONS * CXR14_VAL + CXR14_TEST
    cached_images = CXR14_TRAIN_1PCT + CXR14_VAL + CXR14_TEST  # one extraction pass each
    rows = []
    for key in ("wall", "cpu"):
        ft_img = ft[f"step_{key}_s"] / ft["batch"]  # seconds per image
        ex_img = ex[f"step_{key}_s"] / ex["batch"]
        eval_passes = VALIDATIONS + CXR14_TEST / CXR14_VAL  # the test pass costed as 2.0 val passes
        probe_s = FT_STEPS * probe96[f"step_{key}_s"] + eval_passes * probe_eval[f"val_pass_{key}_s"]
        rows.append(
            {
                "key": key,
                "finetune": train_images * ft_img + eval_images * ex_img,
                "finetune_train": train_images * ft_img,
                "finetune_eval": eval_images * ex_img,
                "lp_official": (train_images + eval_images) * ex_img,
                "lp_cached": cached_images * ex_img + probe_s,
                "lp_cached_extract": cached_images * ex_img,
                "lp_cached_probe": probe_s,
            }
        )
    return rows


def fmt_rate(x: float) -> str:
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8, help="images per fine-tune / extraction / probe step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one untimed warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument(
        "--small", action="store_true", help="tiny ViT (64 px, patch 8, 2 x 64) for a smoke run"
    )
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    spec = SMALL if args.small else PAPER
    size, dim = spec["img_size"], spec["embed_dim"]
    name = "small" if args.small else "paper"
    load_before = os.getloadavg()

    model = build_vit(args.small)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    t_start = time.perf_counter()
    ft = bench_finetune(model, args.batch, size, args.steps)
    ex = bench_extract(model, args.batch, size, args.steps)
    # The probe's ops are tiny (a [B, 768] x [768, 14] GEMM): extra intra-op threads only add synchronisation,
    # and on a shared machine a descheduled OpenMP worker stalls every op by a time slice (measured here at
    # load ~3.5: 0.3 ms per step with 1 thread, 1-40 ms with 2). So the probe runs on 1 thread.
    torch.set_num_threads(1)
    probe = bench_probe(dim, args.batch)
    probe96 = bench_probe(dim, FT_BATCH)
    probe_eval = bench_probe_eval(dim)
    torch.set_num_threads(threads)
    elapsed = time.perf_counter() - t_start
    load_after = os.getloadavg()

    print(
        f"encoder: {name} ViT (img {size}, patch {spec['patch_size']}, dim {dim}, depth {spec['depth']}, "
        f"{params_m:.1f} M params), fp32, CPU, torch {torch.__version__}, {threads} torch threads (probe: 1) "
        f"on {os.cpu_count()} CPUs"
    )
    print(
        f"batch {args.batch}, {args.steps} timed steps (median) after 1 warm-up step; figures are wall-clock "
        f"(other processes may share the CPU); load average before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f}"
    )
    print()
    ft_rate = args.batch / ft["step_wall_s"]
    rows = [
        ("fine-tune step (fwd+bwd+clip+SGD)", ft),
        ("frozen feature extraction", ex),
        ("linear probe, cached features (1 thr)", probe),
        ("  same, at the official batch", probe96),
    ]
    header = (
        f"{'measure':<36} {'batch':>5} {'wall s/step':>12} {'CPU s/step':>11} {'images/s':>10} "
        f"{'vs fine-tune':>13}"
    )
    print(header)
    print("-" * len(header))
    rates = {}
    for label, res in rows:
        rate = res["batch"] / res["step_wall_s"]
        rates[label] = rate
        print(
            f"{label:<36} {res['batch']:>5} {res['step_wall_s']:>12.4g} {res['step_cpu_s']:>11.4g} "
            f"{fmt_rate(rate):>10} {rate / ft_rate:>12,.1f}x"
        )
    ex_rate = rates["frozen feature extraction"]
    probe_rate = rates["linear probe, cached features (1 thr)"]
    print(
        f"per image: fine-tune step {1000 / ft_rate:.1f} ms, extraction {1000 / ex_rate:.1f} ms "
        f"({ex_rate / ft_rate:.1f}x cheaper), cached-feature probe {1e6 / probe_rate:.1f} us"
    )
    print(
        f"probe, official schedule on cached features ({FT_STEPS} steps x batch {FT_BATCH}, from 300 timed "
        f"steps): {FT_STEPS * probe96['step_wall_s']:.2f} s wall; one validation pass over {CXR14_VAL:,} "
        f"cached features: {probe_eval['val_pass_wall_s'] * 1000:.2f} ms"
    )

    wall, cpu = project(ft, ex, probe96, probe_eval)
    print()
    print(f"PROJECTION (not measured): one ChestX-ray14 1% evaluation on this machine, {threads} threads")
    assumptions = [
        f"split (MRM/ECAMP lists): {CXR14_TRAIN_1PCT} train (train_list_1) / {CXR14_VAL:,} val / "
        f"{CXR14_TEST:,} test images (full train list {CXR14_TRAIN_FULL:,})",
        f"recipe (run_ft.sh / run_lp.sh): {FT_STEPS} steps x batch {FT_BATCH} = "
        f"{FT_STEPS / STEPS_PER_EPOCH:.1f} epochs of {STEPS_PER_EPOCH} steps; validation after every epoch "
        f"({VALIDATIONS} passes over val), one test pass",
        "no early stop; official train.py may stop sooner (patience 20 validations) or later (it only stops "
        f"at an epoch end with step % {FT_STEPS} == 0: step {math.lcm(FT_STEPS, STEPS_PER_EPOCH)} "
        f"with {STEPS_PER_EPOCH}-step epochs)",
        f"per-image cost at batch {args.batch} taken to hold at batch {FT_BATCH} and at the eval batch; "
        "eval forwards costed as feature extraction; image decoding/augmentation not included",
    ]
    for line in assumptions:
        print(f"  assumption: {line}")
    header = f"  {'way':<52} {'wall h':>8} {'CPU-core h':>11}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    proj_rows = [
        ("fine-tune (official run_ft.sh)", "finetune"),
        ("  of which training steps", "finetune_train"),
        ("  of which validation + test forwards", "finetune_eval"),
        ("linear probe as run_lp.sh runs it (encoder fwd/step)", "lp_official"),
        ("linear probe on cached features", "lp_cached"),
        ("  of which one extraction pass, train+val+test", "lp_cached_extract"),
        ("  of which probe schedule + validations", "lp_cached_probe"),
    ]
    for label, key in proj_rows:
        print(f"  {label:<52} {wall[key] / 3600:>8.3g} {cpu[key] / 3600:>11.3g}")
    print(
        f"  fine-tune vs cached-feature probe: {wall['finetune'] / wall['lp_cached']:.0f}x the wall time; "
        f"the cached probe's training + validations take {wall['lp_cached_probe']:.1f} s"
    )
    print(f"(benchmark wall time {elapsed:.0f} s)")
    print()
    print(
        f"RESULT evaluate size={name} threads={threads} batch={args.batch} steps={args.steps} "
        f"finetune_img_s={ft_rate:.2f} extract_img_s={ex_rate:.2f} probe_img_s={probe_rate:.0f} "
        f"probe_b{FT_BATCH}_img_s={FT_BATCH / probe96['step_wall_s']:.0f} "
        f"extract_vs_finetune={ex_rate / ft_rate:.1f}x probe_vs_finetune={probe_rate / ft_rate:.0f}x "
        f"proj_cxr14_1pct_finetune_h={wall['finetune'] / 3600:.2f} "
        f"proj_lp_official_h={wall['lp_official'] / 3600:.2f} "
        f"proj_lp_cached_h={wall['lp_cached'] / 3600:.3g} "
        f"(wall-clock, load {load_before[0]:.1f}->{load_after[0]:.1f})"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
