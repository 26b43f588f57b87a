"""Classification heads: full fine-tuning of the ViT, and the linear probe on frozen features computed once.

Fine-tuning follows the official recipe (REFERENCE.md §3.1): `Linear(D, C)` initialised with std 2e-5 on the
average-pooled patch tokens through a fresh `fc_norm`, drop-path, SGD with warm-up + cosine, gradient clip,
RandomResizedCrop + horizontal flip; BCE for multi-label sets, cross-entropy for multi-class ones. The linear
probe freezes everything but the head (the official probe script forgets to) and, since nothing before the
head changes, trains on pooled features extracted once: seconds instead of hours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.evaluate.fit import FitConfig, FitResult, fit
from models.evaluate.metrics import accuracy, mean_auc
from models.evaluate.pixels import normalize


class Normalization(BaseModel):
    """Grey-level statistics of the pre-training (the official MIMIC values)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: float = 0.4721
    std: float = Field(0.3029, gt=0)


class Augment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_scale_min: float = Field(0.08, gt=0, le=1, description="RandomResizedCrop area range lower end")
    flip: bool = True


def init_head(model: VisionTransformer, std: float = 2e-5) -> None:
    nn.init.trunc_normal_(model.head.weight, std=std)
    nn.init.zeros_(model.head.bias)


def crop_box(size: int, scale_min: float, gen: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (area in [scale_min, 1], aspect in [3/4, 4/3]) drawn from `gen`."""
    for _ in range(10):
        area = size * size * (scale_min + (1 - scale_min) * float(torch.rand((), generator=gen)))
        ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * float(torch.rand((), generator=gen)))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= size and 0 < h <= size:
            top = int(torch.randint(0, size - h + 1, (), generator=gen))
            left = int(torch.randint(0, size - w + 1, (), generator=gen))
            return top, left, h, w
    return 0, 0, size, size


def augment(images: torch.Tensor, cfg: Augment, gen: torch.Generator) -> torch.Tensor:
    """uint8 [B, S, S] -> uint8 [B, S, S]: RandomResizedCrop back to S, then a horizontal flip with p=0.5."""
    size = images.shape[-1]
    out = []
    for img in images:
        top, left, h, w = crop_box(size, cfg.crop_scale_min, gen)
        crop = img[top : top + h, left : left + w].float()[None, None]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        if cfg.flip and float(torch.rand((), generator=gen)) < 0.5:
            crop = crop.flip(-1)
        out.append(crop.round().clamp(0, 255).to(torch.uint8))
    return torch.stack(out)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits, labels.long().reshape(-1))


def score(labels: np.ndarray, logits: np.ndarray, multilabel: bool) -> float:
    """Mean per-class AUC (multi-label) or accuracy (multi-class): what model choice and the table use."""
    return mean_auc(labels, logits)[0] if multilabel else accuracy(labels.reshape(-1), logits)


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, norm: Normalization, batch: int = 256) -> np.ndarray:
    model.eval()
    outs = [
        model(normalize(images[i : i + batch], norm.mean, norm.std)) for i in range(0, len(images), batch)
    ]
    return torch.cat(outs).float().numpy()


def finetune(
    model: VisionTransformer,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    multilabel: bool,
    fit_cfg: FitConfig,
    aug: Augment,
    norm: Normalization,
    seed: int,
    desc: str = "fine-tune",
) -> FitResult:
    """Fine-tune every weight of `model` (a fresh head) on (uint8 images, labels); keep the best-on-val
    weights."""
    images, labels = train
    val_labels = val[1].numpy()

    def batch_loss(members: list[int], batches: list[torch.Tensor], gens: list[torch.Generator]) -> list:
        (idx,), (gen,) = batches, gens
        x = normalize(augment(images[idx], aug, gen), norm.mean, norm.std)
        return [classification_loss(model(x), labels[idx], multilabel)]

    def validate(members: list[int]) -> list[float]:
        return [score(val_labels, predict(model, val[0], norm), multilabel)]

    # A group of one: the ViT's arithmetic is the cost, which training seeds together does not lower on CPU
    # (bench/eval_batched.py), while holding every member's weights and activations at once would.
    return fit([model], batch_loss, validate, len(images), fit_cfg, [seed], desc)[0]


@torch.inference_mode()
def frozen_features(
    model: VisionTransformer, images: torch.Tensor, norm: Normalization, batch: int = 128, tokens: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pooled [N, D], patch tokens [N, L, D] or None) of the frozen model: the probe's input and the dense
    tasks' input. Tokens are 196× the pooled size at ViT-B/16: kept only when a dense task needs them."""
    model.eval()
    pooled, kept = [], []
    for i in range(0, len(images), batch):
        feats = model.forward_features(normalize(images[i : i + batch], norm.mean, norm.std))
        pooled.append(model.forward_head(feats, pre_logits=True))
        if tokens:
            kept.append(feats[:, model.num_prefix_tokens :])
    d = model.embed_dim
    if not pooled:
        return torch.zeros(0, d), torch.zeros(0, model.patch_embed.num_patches, d) if tokens else None
    return torch.cat(pooled), torch.cat(kept) if tokens else None


def probe_the_head(
    model: VisionTransformer,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    multilabel: bool,
    probe_cfg: FitConfig,
    norm: Normalization,
    seed: int,
    head_std: float = 2e-5,
    desc: str = "probe the head",
) -> FitResult:
    """LP-FT (Kumar et al., 2022): set `model.head` to a linear probe trained on the model's own frozen
    features.

    Fine-tuning from a fresh head spends its first steps fitting the head while the head's large gradients run
    through every block; from the probe's head the blocks adapt a classifier that already works. With few
    fine-tuning steps, as on a CPU, this decides whether fine-tuning keeps up with the probe at all.
    """
    train_features = frozen_features(model, train[0], norm, tokens=False)[0]
    val_features = frozen_features(model, val[0], norm, tokens=False)[0]
    n_classes = model.head.out_features
    heads, fits = linear_probe(
        ([train_features], train[1]),
        ([val_features], val[1]),
        n_classes,
        multilabel,
        probe_cfg,
        [seed],
        head_std,
        desc,
    )
    with torch.no_grad():
        model.head.weight.copy_(heads[0].weight)
        model.head.bias.copy_(heads[0].bias)
    return fits[0]


def linear_probe(
    train: tuple[Sequence[torch.Tensor], torch.Tensor],
    val: tuple[Sequence[torch.Tensor], torch.Tensor],
    num_classes: int,
    multilabel: bool,
    fit_cfg: FitConfig,
    seeds: Sequence[int],
    head_std: float = 2e-5,
    desc: str = "linear probe",
    names: Sequence[str] | None = None,
) -> tuple[list[nn.Linear], list[FitResult]]:
    """Train `Linear(D, C)` heads on cached pooled features (nothing before them can change), one per member:
    member g reads features `train[0][g]` / `val[0][g]` (its encoder's) and starts from `seeds[g]`. The labels
    are shared. The heads train as one group: a step of one is microseconds, so the loop is the cost."""
    feats, labels = train
    heads = []
    for f, seed in zip(feats, seeds, strict=True):
        torch.manual_seed(seed)
        head = nn.Linear(f.shape[1], num_classes)
        nn.init.trunc_normal_(head.weight, std=head_std)
        nn.init.zeros_(head.bias)
        heads.append(head)
    val_feats, val_labels = val[0], val[1].numpy()

    def batch_loss(members: list[int], batches: list[torch.Tensor], gens: list[torch.Generator]) -> list:
        return [
            classification_loss(heads[g](feats[g][idx]), labels[idx], multilabel)
            for g, idx in zip(members, batches, strict=True)
        ]

    def validate(members: list[int]) -> list[float]:
        with torch.inference_mode():
            return [score(val_labels, heads[g](val_feats[g]).numpy(), multilabel) for g in members]

    n = len(labels)
    return heads, fit(heads, batch_loss, validate, n, fit_cfg, seeds, desc, names)
