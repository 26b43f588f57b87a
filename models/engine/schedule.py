"""The learning-rate schedule every trainer uses: linear warm-up, then half-cosine down to a floor.

One formula for pre-training, GLoRIA and the downstream heads. During warm-up the multiplier of step s
(0-based) is (s + 1) / warmup, so no step runs at lr 0 and step warmup − 1 runs at the full lr. (MAE's
per-iteration rule, which the official ECAMP code uses, is s / warmup: its first step changes nothing, and a
short run that validates after it can keep its untrained initialisation as "best".)
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, cosine_end: int, min_ratio: float = 0.0) -> float:
    """The lr multiplier at optimiser step `step` (0-based): linear warm-up over `warmup` steps, then
    half-cosine from 1 to `min_ratio` at step `cosine_end`, flat after it (a schedule shorter than the run
    keeps its floor)."""
    if step < warmup:
        return (step + 1) / warmup
    if cosine_end <= warmup:
        return 1.0
    progress = min((step - warmup) / (cosine_end - warmup), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup: int, cosine_end: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a scheduler stepped once per optimiser step (its state resumes with the optimiser's)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, cosine_end, min_ratio))
