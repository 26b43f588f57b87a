"""Segmentation on a frozen ViT (official SegViT, REFERENCE.md §3.2), trained on patch tokens computed once.

`Linear(D, D)` on the patch tokens -> a D×g×g map -> (conv 3×3, BN, ReLU, up ×2) blocks -> 1 channel at the
input size. The paper's ViT-B/16 at 224 has g = 14 and four blocks of 512/256/128/64 channels; a smaller
patch needs fewer blocks (log2 of the patch size), so `channels` must have that many entries. Loss:
10·focal(γ=2) − log(soft Dice), on sigmoid outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.evaluate.fit import FitConfig, FitResult, fit
from models.evaluate.metrics import mean_dice
from models.evaluate.tokens import DenseHeadConfig, token_norm


class SegConfig(DenseHeadConfig):
    channels: tuple[int, ...] = Field((512, 256, 128, 64), description="one per ×2 block: log2(patch) blocks")
    focal_weight: float = Field(10.0, ge=0)
    focal_gamma: float = Field(2.0, ge=0)
    threshold: float = Field(0.5, gt=0, lt=1)


class SegHead(nn.Module):
    def __init__(self, embed_dim: int, grid: int, img_size: int, cfg: SegConfig):
        super().__init__()
        n_up = math.log2(img_size / grid)
        if n_up != int(n_up) or int(n_up) != len(cfg.channels):
            raise ValueError(
                f"segmentation: {img_size} px from a {grid}x{grid} grid needs log2({img_size}/{grid}) = "
                f"{n_up:g} up-sampling blocks, but channels has {len(cfg.channels)} ({list(cfg.channels)})"
            )
        self.grid = grid
        self.token_norm = token_norm(embed_dim, cfg)
        self.proj = nn.Linear(embed_dim, embed_dim)
        blocks, width = [], embed_dim
        for c in cfg.channels:
            blocks += [
                nn.Conv2d(width, c, 3, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            ]
            width = c
        self.decoder = nn.Sequential(*blocks, nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, g², D] -> logits [B, S, S]."""
        b, n, d = tokens.shape
        if n != self.grid * self.grid:
            raise ValueError(f"segmentation head: {n} tokens, expected {self.grid}² = {self.grid**2}")
        x = self.proj(self.token_norm(tokens)).transpose(1, 2).reshape(b, d, self.grid, self.grid)
        return self.decoder(x)[:, 0]


def seg_loss(logits: torch.Tensor, target: torch.Tensor, cfg: SegConfig) -> torch.Tensor:
    """focal_weight · focal(γ) − log(soft Dice), the official MixedLoss."""
    t = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * t + (1 - p) * (1 - t)
    focal = ((1 - p_t) ** cfg.focal_gamma * bce).mean()
    dice = (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return cfg.focal_weight * focal - torch.log(dice)


@torch.inference_mode()
def predict_masks(head: SegHead, tokens: torch.Tensor, batch: int = 128) -> np.ndarray:
    head.eval()
    outs = [torch.sigmoid(head(tokens[i : i + batch])) for i in range(0, len(tokens), batch)]
    return torch.cat(outs).numpy()


def train_segmentation(
    train: tuple[Sequence[torch.Tensor], torch.Tensor],
    val: tuple[Sequence[torch.Tensor], torch.Tensor],
    grid: int,
    img_size: int,
    cfg: SegConfig,
    fit_cfg: FitConfig,
    seeds: Sequence[int],
    desc: str = "segmentation",
    names: Sequence[str] | None = None,
) -> tuple[list[SegHead], list[FitResult]]:
    """Train one SegHead per member on (its cached tokens, the shared bool masks); each chosen on validation
    Dice. Member g reads `train[0][g]` / `val[0][g]` (its encoder's tokens) and starts from `seeds[g]`."""
    tokens, masks = train
    heads = []
    for t, seed in zip(tokens, seeds, strict=True):
        torch.manual_seed(seed)
        heads.append(SegHead(t.shape[-1], grid, img_size, cfg))
    val_tokens, val_masks = val[0], val[1].numpy()

    def batch_loss(members: list[int], batches: list[torch.Tensor], gens: list[torch.Generator]) -> list:
        losses = []
        for g, idx in zip(members, batches, strict=True):
            if len(idx) == 1:  # BatchNorm needs two samples in training mode
                idx = idx.repeat(2)
            losses.append(seg_loss(heads[g](tokens[g][idx]), masks[idx], cfg))
        return losses

    def validate(members: list[int]) -> list[float]:
        return [mean_dice(predict_masks(heads[g], val_tokens[g]), val_masks, cfg.threshold) for g in members]

    return heads, fit(heads, batch_loss, validate, len(masks), fit_cfg, seeds, desc, names)
