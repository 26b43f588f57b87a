"""The one training loop every downstream head shares: warm-up + cosine, clipping, model choice on validation.

A task supplies the loss of a batch of training indices and a validation score; the loop owns the optimiser,
the schedule, the seeded batch order, early stopping and keeping the best weights (the model is chosen on
validation and reported on test, as the official scripts do). It trains a group of independent heads at once
(the seeds and initializations of one label fraction): each member keeps its own generator, clip, best
weights and stopping, so a head trains the same alone (a group of one) as in a group; the group shares the
loop, the optimiser step and one loss call per step. Progress is a tqdm bar per group.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from models.engine.schedule import warmup_cosine


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
    layer_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="ViT fine-tuning: block i of D trains at lr·decay^(D−i), the embeddings at "
        "lr·decay^(D+1), the head at lr (MAE/BEiT; 1.0 = one lr for all, the official recipe)",
    )
    head_lr: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="ViT fine-tuning: the lr of what sits above the blocks (fc_norm, head); null = lr",
    )


@dataclass
class FitResult:
    best_score: float
    best_epoch: int
    epochs_run: int
    losses: list[float] = field(default_factory=list)


# batch_loss(members, batches, generators) -> one scalar loss per member: the training indices of each listed
# member's batch and its generator (augmentation draws from it, as the batch order does)
BatchLoss = Callable[[list[int], list[torch.Tensor], list[torch.Generator]], Sequence[torch.Tensor]]
# validate(members) -> the validation score of each listed member (higher is better)
Validate = Callable[[list[int]], Sequence[float]]


def layer_depth(name: str, depth: int) -> int:
    """A ViT parameter's depth for layer decay: 0 for the embeddings, i + 1 for block i, depth + 1 above the
    blocks (final norms, head). Parameters of a model without `blocks` are all at the top."""
    if name.startswith(("patch_embed.", "cls_token", "pos_embed", "reg_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, cfg: FitConfig) -> list[dict]:
    """The trainable parameters of `model`, grouped by learning rate (one group without layer decay).

    Layer decay keeps what pre-training put in the lower blocks while the head and the top blocks adapt: with
    one lr, the first steps of a freshly initialised head send large gradients through every block.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    blocks = getattr(model, "blocks", None)
    if (cfg.layer_decay == 1.0 and cfg.head_lr is None) or blocks is None:
        return [{"params": [p for _, p in named], "lr": cfg.lr}]
    depth = len(blocks)
    groups: dict[int, list[nn.Parameter]] = {}
    for name, p in named:
        groups.setdefault(layer_depth(name, depth), []).append(p)
    top = cfg.head_lr if cfg.head_lr is not None else cfg.lr
    return [
        {"params": ps, "lr": top if d == depth + 1 else cfg.lr * cfg.layer_decay ** (depth + 1 - d)}
        for d, ps in sorted(groups.items())
    ]


def make_optimizer(groups: list[dict], cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def epochs_for(n: int, cfg: FitConfig) -> int:
    """The configured epochs, raised so that a tiny subset still gets `min_steps` optimiser steps."""
    per_epoch = math.ceil(n / cfg.batch_size)
    return max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch))


def validation_due(epoch: int, epochs: int, validations: int | None) -> bool:
    """Every epoch, or `validations` evenly spaced epochs ending with the last (1 % subsets: 1-step
    epochs)."""
    if validations is None or validations >= epochs:
        return True
    return (epoch + 1) * validations // epochs != epoch * validations // epochs


def fit(
    models: Sequence[nn.Module],
    batch_loss: BatchLoss,
    validate: Validate,
    n: int,
    cfg: FitConfig,
    seeds: Sequence[int],
    desc: str = "fit",
    names: Sequence[str] | None = None,
) -> list[FitResult]:
    """Train the trainable parameters of each of `models` on `n` samples, as one group, and leave each holding
    its best-validation weights.

    The members are independent runs that share a schedule: member g draws its batch order (and whatever
    `batch_loss` draws, e.g. augmentation) from its own generator seeded with `seeds[g]`, has its gradient
    clipped on its own, and is chosen and stopped on its own validation score. A member's run is therefore the
    same alone as in any group; together they pay the loop, the optimiser step and the validation once, and
    `batch_loss` can compute every member's loss in one call. A member that stops early is left out of the
    remaining steps (its parameters get no gradient, so the optimiser leaves them as they are).
    """
    if n == 0:
        raise ValueError(f"{desc}: no training samples")
    if len(models) != len(seeds) or not models:
        raise ValueError(f"{desc}: {len(models)} models but {len(seeds)} seeds")
    names = list(names) if names is not None else [f"seed {s}" for s in seeds]
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    optimizer = make_optimizer([group for m in models for group in param_groups(m, cfg)], cfg)
    epochs = epochs_for(n, cfg)
    per_epoch = math.ceil(n / cfg.batch_size)
    total, warmup = epochs * per_epoch, round(cfg.warmup_epochs * per_epoch)
    scheduler = warmup_cosine(optimizer, warmup, total)
    results = [FitResult(-math.inf, -1, 0) for _ in models]
    best_states = [copy.deepcopy(m.state_dict()) for m in models]
    stale = [0] * len(models)
    active = list(range(len(models)))
    bar = tqdm(range(epochs), desc=desc, mininterval=2.0, leave=False, dynamic_ncols=True)
    for epoch in bar:
        for g in active:
            models[g].train()
        orders = [torch.randperm(n, generator=gens[g]) for g in active]
        running = [0.0] * len(active)
        for i in range(per_epoch):
            batches = [order[i * cfg.batch_size : (i + 1) * cfg.batch_size] for order in orders]
            losses = batch_loss(active, batches, [gens[g] for g in active])
            for g, loss in zip(active, losses, strict=True):
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{desc} ({names[g]}): non-finite loss at epoch {epoch}, batch {i} (lower the lr)"
                    )
            optimizer.zero_grad(set_to_none=True)
            torch.stack(list(losses)).sum().backward()
            if cfg.clip_grad is not None:
                for g in active:
                    nn.utils.clip_grad_norm_(params[g], cfg.clip_grad)
            optimizer.step()
            scheduler.step()
            for k, loss in enumerate(losses):
                running[k] += float(loss.detach())
        for k, g in enumerate(active):
            results[g].losses.append(running[k] / per_epoch)
            results[g].epochs_run = epoch + 1
        if not validation_due(epoch, epochs, cfg.validations):
            continue
        for g in active:
            models[g].eval()
        scores = validate(active)
        for g, score in zip(list(active), scores, strict=True):
            if score > results[g].best_score:
                results[g].best_score, results[g].best_epoch, stale[g] = score, epoch, 0
                best_states[g] = copy.deepcopy(models[g].state_dict())
            else:
                stale[g] += 1
            if stale[g] >= cfg.patience:
                active.remove(g)
        bar.set_postfix(best=" ".join(f"{r.best_score:.3f}" for r in results), refresh=False)
        if not active:
            break
    for model, state in zip(models, best_states, strict=True):
        model.load_state_dict(state)
        model.eval()
    return results
