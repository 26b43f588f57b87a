"""The one training loop every downstream head shares: warm-up + cosine, clipping, model choice on validation.

A task supplies the loss of a batch of training indices and a validation score; the loop owns the optimiser,
the schedule, the seeded batch order, early stopping and keeping the best weights (the model is chosen on
validation and reported on test, as the official scripts do). Progress is a tqdm bar per run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm


class FitConfig(BaseModel):
    """Optimiser and schedule of one downstream run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    optimizer: Literal["sgd", "adamw"] = "sgd"
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.01, gt=0, allow_inf_nan=False)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    clip_grad: float | None = Field(1.0, gt=0, description="gradient-norm clip (official: 1.0); null = none")
    patience: int = Field(20, ge=1, description="validations without improvement before stopping")
    min_steps: int = Field(0, ge=0, description="at least this many optimiser steps (1% subsets are tiny)")
    validations: int | None = Field(
        None,
        ge=1,
        description="validate at most this often, evenly spaced (null: after every epoch, official)",
    )


@dataclass
class FitResult:
    best_score: float
    best_epoch: int
    epochs_run: int
    losses: list[float] = field(default_factory=list)


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min((step - warmup) / max(1, total - warmup), 1.0)))


def make_optimizer(params: list[nn.Parameter], cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def epochs_for(n: int, cfg: FitConfig) -> int:
    """The configured epochs, raised so that a tiny subset still gets `min_steps` optimiser steps."""
    per_epoch = math.ceil(n / cfg.batch_size)
    return max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch))


def validation_due(epoch: int, epochs: int, validations: int | None) -> bool:
    """Every epoch, or `validations` evenly spaced epochs ending with the last (1 % subsets: 1-step epochs)."""
    if validations is None or validations >= epochs:
        return True
    return (epoch + 1) * validations // epochs != epoch * validations // epochs


def fit(
    model: nn.Module,
    batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    validate: Callable[[], float],
    n: int,
    cfg: FitConfig,
    seed: int,
    desc: str = "fit",
) -> FitResult:
    """Train the trainable parameters of `model` on `n` samples; leave it holding its best-validation weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    if n == 0:
        raise ValueError(f"{desc}: no training samples")
    gen = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(params, cfg)
    epochs = epochs_for(n, cfg)
    per_epoch = math.ceil(n / cfg.batch_size)
    total, warmup = epochs * per_epoch, round(cfg.warmup_epochs * per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    best = FitResult(-math.inf, -1, 0)
    best_state = copy.deepcopy(model.state_dict())
    stale = 0
    bar = tqdm(range(epochs), desc=desc, mininterval=2.0, leave=False, dynamic_ncols=True)
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for i in range(per_epoch):
            loss = batch_loss(order[i * cfg.batch_size : (i + 1) * cfg.batch_size], gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{desc}: non-finite loss at epoch {epoch}, batch {i} (lower the lr)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad is not None:
                nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            optimizer.step()
            scheduler.step()
            running += float(loss.detach())
        best.losses.append(running / per_epoch)
        best.epochs_run = epoch + 1
        if not validation_due(epoch, epochs, cfg.validations):
            continue
        model.eval()
        score = validate()
        if score > best.best_score:
            best.best_score, best.best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        bar.set_postfix(
            loss=f"{best.losses[-1]:.4f}", val=f"{score:.4f}", best=f"{best.best_score:.4f}", refresh=False
        )
        if stale >= cfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return best
