"""Settings of one ECAMP pre-training run: optimisation, data loading, augmentation, checkpointing,
measurement.

The model's own settings are `ECAMPConfig` (models.ecamp.model), which travels with the weights; these travel
with the job (`models.ecamp.job`) and, minus the loader and measurement settings, with the resume checkpoint.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.engine.step import Amp
from models.seeds import Seed

# settings that change no batch and no step: a checkpoint made with other values is still resumed
LOADER_SETTINGS = (
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "prefetch_factor",
    "worker_timeout_s",
    "decode",
)
MEASURE_SETTINGS = ("reliance_pairs", "reliance_every_epoch")  # what is measured, not what is trained


class PretrainConfig(BaseModel):
    """Optimisation, data augmentation and checkpointing. Defaults follow the paper / official code."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(120, ge=1)
    max_steps: int | None = Field(
        None, ge=1, description="cap on optimiser steps (schedule length = the cap)"
    )
    warmup_epochs: float = Field(40, ge=0)
    cosine_epochs: float | None = Field(
        None, gt=0, description="cosine length; None = epochs (official: 200)"
    )
    batch_size: int = Field(256, ge=1, description="per process and micro-step")
    accum_iter: int = Field(8, ge=1, description="micro-batches per optimiser step")
    lr: float = Field(1.5e-4, gt=0, description="absolute lr (paper and official code: 1.5e-4)")
    blr: float | None = Field(
        None, gt=0, description="MAE rule instead of lr: lr = blr × effective batch / 256 (opt-in)"
    )
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = Field(None, gt=0)
    amp: Amp = "auto"
    ckpt_every: int = Field(1000, ge=1, description="optimiser steps between checkpoints (and at the end)")
    seed: Seed | None = Field(None, description="None: the caller's seed (the stage uses run.seed), else 0")
    # data loading: none of these changes a batch (every draw is seeded by seed, epoch and sample index)
    num_workers: int = Field(8, ge=0, description="DataLoader worker processes decoding and augmenting")
    pin_memory: bool | None = Field(None, description="page-locked batches (faster copies); None = on CUDA")
    persistent_workers: bool = Field(
        True, description="keep the workers across epochs (the sampler hands them the epoch with each index)"
    )
    prefetch_factor: int = Field(2, ge=1, description="batches each worker prepares ahead")
    worker_timeout_s: float = Field(
        600, gt=0, description="a batch the workers take longer for is an error, not a silent hang"
    )
    decode: Literal["worker", "device"] = Field(
        "worker",
        description="where images are decoded: in the workers (CPU), or JPEG bytes decoded and augmented on "
        "the training device (torchvision decode_jpeg; nvJPEG on CUDA), for uncached JPEG corpora",
    )
    init_checkpoint: str | None = Field(
        None,
        description="MAE ImageNet ViT-B weights to start from (official MAE .pth or timm safetensors; the "
        "official run.sh resumes mae_vit_base.pth), or 'random'; None = not chosen, which the stage refuses",
    )
    # data augmentation
    mean: float = Field(0.4721, description="grey-level normalisation (official MIMIC statistics)")
    std: float = Field(0.3037, gt=0)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    sr_window_follows_augmentation: bool = Field(
        True, description="move the SR window with the crop/flip (paper intent); official: static window"
    )
    # measurement: the text side's image reliance on held-out pairs (models.ecamp.reliance)
    reliance_pairs: int = Field(
        512,
        ge=0,
        description="held-out pairs the image reliance is measured on (one image per study); 0 = off",
    )
    reliance_every_epoch: bool = Field(False, description="measure after every epoch, not only at the end")

    @property
    def seed_value(self) -> int:
        return self.seed if self.seed is not None else 0

    def lr_for(self, effective_batch: int) -> float:
        """The paper's absolute lr, unless the MAE scaling rule was asked for (1.5e-4 → 4.8e-3 at 8,192)."""
        return self.blr * effective_batch / 256 if self.blr is not None else self.lr
