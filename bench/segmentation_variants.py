"""Experiment (issue 10): why ECAMP does not beat random init at 10 % segmentation on the demo, by variants of
the segmentation protocol on demo-seg: random / mim_only / ecamp x fractions 1, 10 x seeds 0, 1, 2.

    .venv/bin/python bench/segmentation_variants.py --run-dir runs/demo baseline epochs43 block0 ...

`--run-dir` is a finished `make demo` run (its two encoders); `--data` the downstream corpus (default
demo_data/downstream). Results: bench/RESULTS.md "evaluate".

Reuses the evaluate stage's own pieces (load_config -> ProtocolConfig, load_splits, decode_split,
FeatureCache, run_job -> run_group -> train_segmentation -> fit) so the baseline reproduces the stage. Each
variant changes one thing against the baseline:

  baseline   the stage as configured (tokens = last block output; downstream_vit's final norm is Identity;
             token_norm on and a floor of 300 steps, as configs/demo.yaml sets them)
  official   the official SegViT head: token_norm off (the demo head before token_norm)
  official43 official, 43 epochs and a floor of 100 steps (the 10 % head converged, 1 % at 100 steps)
  epochs43   43 epochs and a floor of 100 steps
  long       segmentation fit epochs 10, min_steps 300
  steps100   segmentation fit min_steps 100 (10 %: 15 epochs, 105 steps; the demo floor before 74a869a)
  steps200   segmentation fit min_steps 200 (10 %: 29 epochs, 203 steps)
  lowlr      segmentation fit lr 5e-4
  block0     tokens = output of blocks[0] (residual stream, no norm) instead of blocks[1]'s
  avg01      tokens = mean of blocks[0] and blocks[1] outputs
  cat01      tokens = concat of blocks[0] and blocks[1] outputs (D = 128: the head's Linear is 128x128)
  noproj     SegHead without its first Linear (tokens go straight to the first conv)
  lastnorm   tokens = last block output through the checkpoint's pre-trained final LayerNorm (random: a fresh
  LN)

Rows go to <out>/runs_<variant>.jsonl (appended as they finish) and a summary line per variant to stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import models.evaluate.segment as segment
from models.evaluate.classify import Normalization, normalize
from models.evaluate.datasets import DatasetSpec, load_splits
from models.evaluate.encoders import export_arch, read_state
from models.evaluate.pixels import decode_split
from models.evaluate.protocol import FeatureCache, Init, Job, run_job
from tasks.config import load_config

ROOT = Path(__file__).resolve().parent.parent
FRACTIONS, SEEDS = (1, 10), (0, 1, 2)


# ---------------------------------------------------------------- feature extraction variants
# mode -> patch tokens from the outputs of blocks 0 and 1 (timm forward_intermediates, no final norm)
TOKENS = {
    "last": lambda outs: outs[-1],  # = the stage's tokens (downstream_vit's final norm is Identity)
    "block0": lambda outs: outs[0],
    "avg01": lambda outs: (outs[0] + outs[1]) / 2,
    "cat01": lambda outs: torch.cat([outs[0], outs[1]], dim=-1),
    "lastnorm": lambda outs: outs[-1],  # then the checkpoint's final LayerNorm (below)
}


def block_tokens(model, images: torch.Tensor, norm: Normalization, mode: str, init: Init, batch: int = 128):
    """Patch tokens of the frozen model, taken per `mode`."""
    model.eval()
    final_ln = nn.Identity()
    if mode == "lastnorm":
        final_ln = nn.LayerNorm(model.embed_dim, eps=1e-6)
        if init.path is not None:
            state = read_state(init.path)
            final_ln.load_state_dict({"weight": state["norm.weight"], "bias": state["norm.bias"]})
    kept = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = normalize(images[i : i + batch], norm.mean, norm.std)
            outs = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
            kept.append(final_ln(TOKENS[mode](outs)).clone())
    return torch.cat(kept)


class ModeCache(FeatureCache):
    """The stage's FeatureCache, with the token extraction swapped per `mode` ('stage' = untouched)."""

    def __init__(self, arch, norm, mode: str):
        super().__init__(arch, norm)
        self.mode = mode

    def _features(self, init, seed, pixels, tokens):
        if self.mode == "stage" or not tokens:
            return super()._features(init, seed, pixels, tokens)
        key = (init.name, seed if init.path is None else 0, pixels.key, tokens)
        if key not in self.store:
            model = self.encoder(init, seed)
            self.store[key] = (None, block_tokens(model, pixels.images, self.norm, self.mode, init))
        return self.store[key]


class NoProjHead(segment.SegHead):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.proj = nn.Identity()


OFFICIAL = {"token_norm": False}
VARIANTS = {
    # name: (feature mode, fit overrides, head class, head-config overrides)
    "baseline": ("stage", {}, None, {}),
    "official": ("stage", {}, None, OFFICIAL),
    "official43": ("stage", {"epochs": 43, "min_steps": 100}, None, OFFICIAL),
    "long": ("stage", {"epochs": 10, "min_steps": 300}, None, {}),
    "lowlr": ("stage", {"lr": 5e-4}, None, {}),
    "epochs43": ("stage", {"epochs": 43, "min_steps": 100}, None, {}),  # 301 steps at 10 %, 100 at 1 %
    "steps100": ("stage", {"min_steps": 100}, None, {}),  # the demo floor before 74a869a
    "steps200": ("stage", {"min_steps": 200}, None, {}),  # 203 steps at 10 %, 200 at 1 %
    "block0": ("block0", {}, None, {}),
    "avg01": ("avg01", {}, None, {}),
    "cat01": ("cat01", {}, None, {}),
    "noproj": ("stage", {}, NoProjHead, {}),
    "lastnorm": ("lastnorm", {}, None, {}),
    "last_check": ("last", {}, None, {}),  # sanity: my extraction == the stage's
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variants", nargs="*", default=["baseline"], choices=sorted(VARIANTS))
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished demo run (its encoders)")
    parser.add_argument("--data", type=Path, default=ROOT / "demo_data" / "downstream")
    parser.add_argument("--out", type=Path, default=Path("segmentation_variants"))
    args = parser.parse_args()
    enc = {
        "mim_only": args.run_dir / "pretrain_ecamp__mim_only" / "encoder.safetensors",
        "ecamp": args.run_dir / "pretrain_ecamp" / "encoder.safetensors",
    }
    run(args.variants, enc, args.data, args.out)


def run(names: list[str], enc: dict[str, Path], data: Path, out: Path) -> None:
    torch.set_num_threads(2)
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    ev = cfg.evaluate
    arch = export_arch(enc["ecamp"])
    tr = cfg.pretrain_ecamp.train
    norm = Normalization(mean=tr.mean, std=tr.std)
    spec = DatasetSpec(name="demo-seg", kind="synth", task="segmentation", path=data)
    t0 = time.time()
    splits = load_splits(spec)
    pixels = {
        s: decode_split(getattr(splits, s), arch["img_size"], splits.task, 2)
        for s in ("train", "val", "test")
    }
    job = Job(splits, pixels, ("segmentation",), FRACTIONS, SEEDS)
    print(
        f"data: train {len(splits.train)} val {len(splits.val)} test {len(splits.test)} "
        f"subsets { {f: len(splits.fractions[f]) for f in FRACTIONS} } ({time.time() - t0:.0f}s)",
        flush=True,
    )
    inits = [Init("random", None), Init("mim_only", enc["mim_only"]), Init("ecamp", enc["ecamp"])]
    print_token_scales(FeatureCache(arch, norm), inits, pixels["val"])
    reports = {i.name: type("R", (), {"content_hash": i.name})() for i in inits}
    out.mkdir(exist_ok=True)
    caches: dict[str, ModeCache] = {}
    orig_head = segment.SegHead
    for name in names:
        mode, fit_over, head_cls, head_over = VARIANTS[name]
        seg = ev.protocol.segmentation
        seg = seg.model_copy(
            update={"fit": seg.fit.model_copy(update=fit_over), "head": seg.head.model_copy(update=head_over)}
        )
        pcfg = ev.protocol.model_copy(update={"segmentation": seg})
        cache = caches.setdefault(mode, ModeCache(arch, norm, mode))
        segment.SegHead = head_cls or orig_head
        t1 = time.time()
        rows = []
        path = out / f"runs_{name}.jsonl"
        path.write_text("")
        for row in run_job(
            job, inits, reports, arch, norm, pcfg, lambda m: print("  " + m, flush=True), cache
        ):
            row["variant"] = name
            rows.append(row)
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        segment.SegHead = orig_head
        wall = time.time() - t1
        print(
            f"== {name}: fit {pcfg.segmentation.fit.model_dump(include={'lr', 'epochs', 'min_steps'})} mode "
            f"{mode} head {(head_cls or orig_head).__name__} token_norm {seg.head.token_norm}: {wall:.0f}s",
            flush=True,
        )
        summarize(rows, name, wall, out)


def print_token_scales(cache: FeatureCache, inits: list[Init], pixels) -> None:
    """Per-channel statistics of each encoder's frozen tokens (validation images, seed 0): what token_norm
    evens."""
    for init in inits:
        tokens = cache.tokens(init, 0, pixels)
        flat = tokens.reshape(-1, tokens.shape[-1])
        std, mean = flat.std(0), flat.mean(0)
        print(
            f"tokens {init.name}: channel std min/median/max "
            f"{std.min():.3f}/{std.median():.3f}/{std.max():.3f}, "
            f"largest |channel mean| {mean.abs().max():.2f}",
            flush=True,
        )


def summarize(rows, name, wall, out: Path) -> None:
    summary = {"variant": name, "wall_s": round(wall)}
    for frac in FRACTIONS:
        stats = {}
        for init in ("random", "mim_only", "ecamp"):
            v = np.array([r["value"] for r in rows if r["fraction"] == frac and r["init"] == init]) * 100
            stats[init] = (v.mean(), v.std())
            summary[f"{init}@{frac}"] = f"{v.mean():.1f}±{v.std():.1f}"
        d = stats["ecamp"][0] - stats["random"][0]
        spread = max(stats["ecamp"][1], stats["random"][1])
        summary[f"E-R@{frac}"] = (
            f"{d:+.1f} (spread {spread:.1f}, comb {np.hypot(stats['ecamp'][1], stats['random'][1]):.1f})"
        )
        summary[f"best@{frac}"] = [
            f"{r['init'][0]}{r['seed']}:{r['best_epoch']}/{r['epochs_run']}"
            for r in rows
            if r["fraction"] == frac
        ]
    print("SUMMARY " + json.dumps(summary), flush=True)
    with (out / "summary.jsonl").open("a") as f:
        f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
