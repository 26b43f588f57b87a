"""The ECAMP pre-training trainer: its model, its optimiser and its loop, on the shared engine
(models.engine).

The engine gives the schedule, exact checkpoint/resume, DDP, autocast, the non-finite guard and progress
lines; this module keeps what is ECAMP's own: the initial weights, the parameter groups, the batch order
across ranks and what one step computes. The data is `models.ecamp.data`; the job folder and the torchrun
entry point are `models.ecamp.job`. No Prefect here.

Exact resume: the model's own draws (patch masking, dropout) are seeded per micro-batch from (seed, epoch,
sample indices), and the data's draws are functions of the same (see `models.ecamp.data`). The same holds
across world sizes: W processes with batch b and accumulation a make the same micro-batches as one process
with batch b and accumulation a·W (`ResumableSampler`), so every micro-batch's masks, losses and gradients are
the same, and DDP's average is the same step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models.checkpoints import CheckpointError, read_state_dict
from models.ecamp.config import LOADER_SETTINGS, MEASURE_SETTINGS, PretrainConfig
from models.ecamp.data import PretrainCollator, PretrainDataset, ResumableSampler, TextCollate, sample_seed
from models.ecamp.model import ECAMP, ECAMPConfig
from models.ecamp.reliance import HeldOutBatch, measure_reliance, reliance_line
from models.engine.distributed import DistInfo, init_distributed, mean_over_ranks, wrap_ddp
from models.engine.resume import ResumeFile, read_checkpoint, seed_everything
from models.engine.schedule import warmup_cosine
from models.engine.step import ProgressLog, StepGuard, autocast_for, optimizer_step

LOG = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
LOG_EVERY_S = 30.0  # seconds between progress lines in the run log
LOSSES = ("mim", "sr", "mlm", "total")
WHAT = "ECAMP pre-training"


# ------------------------------------------------------------------------------------------------------------
# optimisation
# ------------------------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and tokens (MAE/timm rule: parameters with ndim ≤ 1 or named
    tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    cosine_steps: int
    base_lr: float
    effective_batch: int


def progress_line(metrics: dict[str, float], total_steps: int) -> str:
    losses = " ".join(f"{k} {metrics[k]:.3f}" for k in LOSSES)
    return (
        f"step {metrics['step']}/{total_steps} epoch {metrics['epoch']}: {losses}, lr {metrics['lr']:.2e}, "
        f"{metrics['samples_per_s']:.1f} samples/s"
    )


def make_schedule(cfg: PretrainConfig, n_samples: int, world: int) -> Schedule:
    per_rank_batches = (n_samples // world) // cfg.batch_size
    steps_per_epoch = per_rank_batches // cfg.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(
            f"{n_samples} training samples are fewer than one optimiser step needs "
            f"(batch_size {cfg.batch_size} × accum_iter {cfg.accum_iter} × world size {world})"
        )
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    effective = cfg.batch_size * cfg.accum_iter * world
    cosine = round(cfg.cosine_epochs * steps_per_epoch) if cfg.cosine_epochs else total
    return Schedule(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        cosine_steps=cosine,
        base_lr=cfg.lr_for(effective),
        effective_batch=effective,
    )


# ------------------------------------------------------------------------------------------------------------
# initial weights
# ------------------------------------------------------------------------------------------------------------
RANDOM_INIT = "random"
MAE_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"


def check_init_checkpoint(cfg: PretrainConfig, key: str = "pretrain_ecamp.train.init_checkpoint") -> None:
    """Before any training: the initialization is chosen, and a checkpoint path exists (what to do if not)."""
    how = (
        f"the official runs start from MAE ImageNet ViT-B: download {MAE_URL} and set {key}=<its path>, "
        f"or set {key}=random to pre-train from random weights"
    )
    if cfg.init_checkpoint is None:
        raise ValueError(f"{key} is not set: {how}")
    if cfg.init_checkpoint != RANDOM_INIT and not Path(cfg.init_checkpoint).is_file():
        raise FileNotFoundError(f"{key} {cfg.init_checkpoint} not found: {how}")


def load_partial(
    model: nn.Module, path: str | Path, log: logging.Logger = LOG
) -> tuple[list[str], list[str]]:
    """Load a pre-training checkpoint (MAE `{'model': ...}`, our own, a DDP one, or timm safetensors) into
    ECAMP.

    A key matches as is, or with our `encoder.` / `decoder.` prefix (MAE names its encoder and decoder
    parameters flat). A matching key of another shape is an error (a silently skipped tensor would train from
    random while the run claims MAE init). Returns (loaded keys, unexpected 'key: no such parameter'); the log
    lists both and the encoder keys the checkpoint did not have, as a warning when the match is partial. A
    checkpoint matching no parameter is an error: pre-training would start from random weights while the run
    claims an init.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"init_checkpoint {path} does not exist")
    own = model.state_dict()
    loaded, unexpected, wrong, update = [], [], [], {}
    for key, value in read_state_dict(path).items():
        target = next((k for k in (key, f"encoder.{key}", f"decoder.{key}") if k in own), None)
        if target is None:
            unexpected.append(f"{key}: no such parameter")
        elif own[target].shape != value.shape:
            wrong.append(f"{key} {tuple(value.shape)} vs {tuple(own[target].shape)}")
        else:
            update[target] = value
            loaded.append(target)
    if wrong:
        raise ValueError(
            f"init_checkpoint {path}: shape mismatch with the configured model: {'; '.join(wrong[:6])}"
        )
    missing = [k for k in own if k.startswith("encoder.") and k not in update]
    if not loaded:
        raise CheckpointError(
            f"init_checkpoint {path}: none of its {len(unexpected)} tensors matches a parameter of the model "
            f"(e.g. {', '.join(unexpected[:3]) or 'no tensors'}); it is not an MAE/ECAMP pre-training "
            f"checkpoint"
        )
    model.load_state_dict(update, strict=False)
    level = logging.WARNING if unexpected or missing else logging.INFO
    log.log(
        level,
        "init_checkpoint %s: loaded %d tensors; unexpected %d: %s; encoder keys not in it (fresh) %d: %s",
        path,
        len(loaded),
        len(unexpected),
        ", ".join(unexpected[:10]) or "-",
        len(missing),
        ", ".join(missing[:10]) or "-",
    )
    return loaded, unexpected


# ------------------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------------------
def fingerprint(model_cfg: ECAMPConfig, cfg: PretrainConfig, data_hash: str) -> dict[str, Any]:
    """What must not change for a checkpoint to be resumable (not the checkpoint cadence or worker count)."""
    keep = cfg.model_dump(exclude={"ckpt_every", *LOADER_SETTINGS, *MEASURE_SETTINGS})
    return {"model": model_cfg.model_dump(), "train": keep, "data": data_hash}


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    """A resume checkpoint this trainer wrote (the stage reads back the one a torchrun job left)."""
    return read_checkpoint(path, WHAT)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this rank consumed in the current epoch
    metrics: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainResult:
    model: ECAMP
    metrics: list[dict[str, float]]
    schedule: Schedule
    resumed_from: int | None
    finished: bool
    checkpoint: Path


# ------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------
def loader_options(cfg: PretrainConfig, device: torch.device) -> dict[str, Any]:
    """DataLoader keyword arguments from the config (workers, pinning, persistence, prefetch, timeout)."""
    options: dict[str, Any] = {
        "num_workers": cfg.num_workers,
        "pin_memory": device.type == "cuda" if cfg.pin_memory is None else cfg.pin_memory,
    }
    if cfg.num_workers > 0:  # torch refuses both without workers
        options.update(
            persistent_workers=cfg.persistent_workers,
            prefetch_factor=cfg.prefetch_factor,
            timeout=cfg.worker_timeout_s,
        )
    return options


@dataclass
class Trainer:
    """Everything one epoch touches, built once by `train`."""

    cfg: PretrainConfig
    info: DistInfo
    model: ECAMP
    ddp: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    schedule: Schedule
    dataset: PretrainDataset
    sampler: ResumableSampler
    loader: DataLoader
    resume: ResumeFile
    progress: ProgressLog
    bar: tqdm
    heldout: Sequence[HeldOutBatch]
    log: logging.Logger | logging.LoggerAdapter

    def checkpoint(self, state: TrainState) -> None:
        self.resume.save(self.model, self.optimizer, self.scheduler, vars(state))


def train_one_epoch(t: Trainer, state: TrainState, stop_after: int | None) -> bool:
    """Run the rest of the current epoch (or up to `stop_after` steps, or the schedule's end); True when
    stopped there. Losses are averaged over the accumulated micro-batches and the ranks before they are
    logged."""
    cfg, info, seed = t.cfg, t.info, t.cfg.seed_value
    micro_per_epoch = t.schedule.steps_per_epoch * cfg.accum_iter
    autocast = autocast_for(cfg.amp, info.device)
    t.sampler.set_epoch(state.epoch)
    t.sampler.start = state.batch_in_epoch * cfg.batch_size
    sums, t0 = torch.zeros(len(LOSSES), device=info.device), time.perf_counter()
    for batch in t.loader:
        # patch masking and dropout: a function of the micro-batch, whichever rank or run draws them
        torch.manual_seed(sample_seed(seed, state.epoch, *batch.pop("index").tolist()))
        batch = t.dataset.to_device(batch, info.device)
        last_micro = (state.batch_in_epoch + 1) % cfg.accum_iter == 0
        with t.ddp.no_sync() if (info.world > 1 and not last_micro) else nullcontext():
            with autocast:
                losses = t.ddp(**batch)
            (losses["total"] / cfg.accum_iter).backward()
        sums += torch.stack([losses[k].detach().float() for k in LOSSES])
        state.batch_in_epoch += 1
        if not last_micro:
            continue
        means = dict(zip(LOSSES, mean_over_ranks(sums / cfg.accum_iter, info).tolist(), strict=True))
        guard = StepGuard("ECAMP", means, state.epoch, state.step + 1)
        lr, grad_norm = optimizer_step(t.model, t.optimizer, t.scheduler, cfg.clip_grad, guard)
        state.step += 1
        elapsed = time.perf_counter() - t0
        state.metrics.append(
            {
                "step": state.step,
                "epoch": state.epoch,
                **means,
                "lr": lr,
                "grad_norm": grad_norm,
                "samples_per_s": t.schedule.effective_batch / elapsed,
                "step_time_s": elapsed,
            }
        )
        t.bar.update(1)
        t.bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
        sums, t0 = torch.zeros_like(sums), time.perf_counter()
        done = state.step >= t.schedule.total_steps
        t.progress(lambda: progress_line(state.metrics[-1], t.schedule.total_steps), force=done)
        stop = stop_after is not None and state.step >= stop_after
        epoch_end = state.batch_in_epoch >= micro_per_epoch
        if info.main and t.heldout and (done or (epoch_end and cfg.reliance_every_epoch)):
            state.metrics[-1].update(measure_reliance(t.model, t.heldout, info.device, seed))
            t.log.info(reliance_line(state.metrics[-1]))
        if epoch_end:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if done or stop or state.step % cfg.ckpt_every == 0:
            t.checkpoint(state)
        if done or stop or state.batch_in_epoch == 0:
            return stop and not done
    return False


def train(
    model_cfg: ECAMPConfig,
    cfg: PretrainConfig,
    dataset: PretrainDataset,
    text_collate: TextCollate,
    out_dir: str | Path,
    *,
    device: str = "auto",
    data_hash: str = "",
    stop_after: int | None = None,
    progress: bool = True,
    log: logging.Logger | logging.LoggerAdapter = LOG,
    log_every_s: float = LOG_EVERY_S,
    heldout: Sequence[HeldOutBatch] = (),
) -> TrainResult:
    """Train until the schedule ends (or `stop_after` optimiser steps in total), resuming from
    out_dir/checkpoint.pt.

    With `heldout` batches (`models.ecamp.reliance`) the last step's metrics row (and each epoch's last with
    `reliance_every_epoch`) carries the text side's image reliance, measured on rank 0 without gradient.

    `stop_after` simulates a pre-empted job: it saves a checkpoint and returns with finished=False.
    `data_hash` identifies the training data: a checkpoint made on other data (or config) is not resumed.
    """
    info = init_distributed(device)  # first: a device this machine lacks is an error before any file is made
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed_value
    seed_everything(seed)  # every rank builds the same initial model

    model = ECAMP(model_cfg)
    if cfg.init_checkpoint not in (None, RANDOM_INIT):
        load_partial(model, cfg.init_checkpoint, log)
    model.to(info.device)
    schedule = make_schedule(cfg, len(dataset), info.world)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=schedule.base_lr, betas=cfg.betas)
    min_ratio = cfg.min_lr / schedule.base_lr
    scheduler = warmup_cosine(optimizer, schedule.warmup_steps, schedule.cosine_steps, min_ratio)

    resume = ResumeFile(out_dir / CHECKPOINT, WHAT, fingerprint(model_cfg, cfg, data_hash), info, log)
    saved = resume.load(model, optimizer, scheduler)
    state = TrainState(**saved) if saved is not None else TrainState()
    resumed_from = state.step if saved is not None else None
    if saved is not None:
        log.info("resumed from %s at step %d (epoch %d)", resume.path, state.step, state.epoch)

    sampler = ResumableSampler(dataset, info.world, info.rank, seed, cfg.batch_size)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=PretrainCollator(text_collate, seed),
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),  # keeps iterator creation off the global RNG
        **loader_options(cfg, info.device),
    )
    bar = tqdm(
        total=schedule.total_steps,
        initial=state.step,
        disable=not (progress and info.main),
        desc="pretrain_ecamp",
    )
    trainer = Trainer(
        cfg,
        info,
        model,
        wrap_ddp(model, info),
        optimizer,
        scheduler,
        schedule,
        dataset,
        sampler,
        loader,
        resume,
        ProgressLog(log, log_every_s, enabled=info.main),
        bar,
        heldout,
        log,
    )
    model.train()
    stopped = False
    while state.step < schedule.total_steps and not stopped:
        stopped = train_one_epoch(trainer, state, stop_after)
    bar.close()
    return TrainResult(model, state.metrics, schedule, resumed_from, not stopped, resume.path)
