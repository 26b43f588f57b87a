"""ECAMP pre-training engine: data, optimiser, schedule, accumulation, AMP, DDP, exact checkpoint/resume, metrics.

No Prefect here: the stage wrapper (`tasks/pretrain_ecamp.py`) prepares a job folder and calls `train` in-process,
or launches this module under `torchrun` for several GPUs:

    torchrun --nproc_per_node 4 -m models.ecamp.pretrain --job runs/x/pretrain_ecamp/job

Exact resume means a run stopped after a checkpoint and restarted continues with bit-identical batches and losses.
That needs every random draw to be a function of where the run is, not of how it got there:
- augmentation draws are seeded per sample from (seed, epoch, index), so they do not depend on worker processes;
- text masking draws are seeded per batch from (seed, epoch, sample indices);
- the sampler permutation is seeded from (seed, epoch) and can start part-way into an epoch;
- the model's own draws (patch masking, dropout) are seeded per micro-batch from (seed, epoch, sample indices).

The same holds across world sizes: W processes with batch b and accumulation a make the same micro-batches as
one process with batch b and accumulation a·W (the sampler hands rank r every W-th micro-batch of the one-process
order), so every micro-batch's masks, losses and gradients are the same, and DDP's average is the same step.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image as PILImage
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from models.checkpoints import (
    CheckpointError,
    describe_names,
    non_finite,
    read_resume_file,
    read_state_dict,
    save_atomic,
)
from models.devices import resolve_device
from models.ecamp.model import ECAMP, ECAMPConfig
from models.ecamp.reliance import HeldOutBatch, heldout_batches, measure_reliance, reliance_line
from models.engine.schedule import warmup_cosine
from models.images import load_grayscale
from models.seeds import Seed

LOG = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
LOG_EVERY_S = 30.0  # seconds between progress lines in the run log
LOSSES = ("mim", "sr", "mlm", "total")
LOADER_SETTINGS = (
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "prefetch_factor",
    "worker_timeout_s",
    "decode",
)
JPEG_SUFFIXES = (".jpg", ".jpeg")
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
    amp: Literal["auto", "bf16", "off"] = Field(
        "auto",
        description="bf16 autocast on the training device (CUDA or CPU); auto = bf16 on CUDA, fp32 on CPU (a CPU "
        "without AVX512-BF16/AMX runs bf16 slower than fp32)",
    )
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
        description="where images are decoded: in the workers (CPU), or JPEG bytes decoded and augmented on the "
        "training device (torchvision decode_jpeg; nvJPEG on CUDA), for uncached JPEG corpora",
    )
    init_checkpoint: str | None = Field(
        None,
        description="MAE ImageNet ViT-B weights to start from (official MAE .pth or timm safetensors; the official "
        "run.sh resumes mae_vit_base.pth), or 'random'; None = not chosen, which the stage refuses",
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


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainRecord:
    """One training image with its texts and its SR window as fractions of the image padded to a square."""

    image_id: str
    study_id: str
    path: str
    text: str
    distilled: str | None
    window: tuple[float, float, float, float]  # top, left, bottom, right in [0, 1]
    source_size: tuple[int, int] | None = None  # (H, W) of the original when `path` is a smaller cached copy


@dataclass
class JoinedInputs:
    records: list[PretrainRecord]
    rejects: list[dict[str, str]]
    n_distilled: int
    n_attention: int


def centre_window(grid: int, size: int) -> tuple[float, float, float, float]:
    start = (grid - size) // 2
    return start / grid, start / grid, (start + size) / grid, (start + size) / grid


def join_inputs(
    images: pa.Table,
    reports: pa.Table,
    distilled: pa.Table | None,
    attention: pa.Table | None,
    splits: Sequence[str],
    model_cfg: ECAMPConfig,
) -> JoinedInputs:
    """Join images ↔ reports on study_id, distilled text on study_id and SR windows on image_id.

    Images of other splits are skipped (pre-training uses the training split); an image whose study has no report
    or an empty text is a reject with its reason. Missing distilled text / attention rows fall back per image (no
    distilled text; centre window) and are counted, so the caller can log how often that happened.
    """
    text_of = dict(
        zip(reports.column("study_id").to_pylist(), reports.column("text").to_pylist(), strict=True)
    )
    distilled_of: dict[str, str] = {}
    if distilled is not None:
        for sid, txt in zip(
            distilled.column("study_id").to_pylist(),
            distilled.column("distilled_text").to_pylist(),
            strict=True,
        ):
            if txt and txt.strip():
                distilled_of[sid] = txt
    window_of: dict[str, tuple[float, float, float, float]] = {}
    if attention is not None:
        cols = [
            attention.column(c).to_pylist() for c in ("image_id", "window_row", "window_col", "window_size")
        ]
        grids = (
            attention.column("grid").to_pylist()
            if "grid" in attention.column_names
            else [model_cfg.grid_size] * attention.num_rows
        )
        for iid, row, col, size, grid in zip(*cols, grids, strict=True):
            window_of[iid] = (row / grid, col / grid, (row + size) / grid, (col + size) / grid)
    fallback = centre_window(model_cfg.grid_size, model_cfg.sr_window)

    records, rejects = [], []
    n_distilled = n_attention = 0
    wanted = set(splits)
    for row in images.select(["image_id", "study_id", "path", "split"]).to_pylist():
        if row["split"] not in wanted:
            continue
        text = text_of.get(row["study_id"])
        if text is None:
            rejects.append({**_key(row), "reason": "no report for this study in extract_reports/reports"})
            continue
        if not text.strip():
            rejects.append({**_key(row), "reason": "the study's report text is empty"})
            continue
        dtext = distilled_of.get(row["study_id"])
        window = window_of.get(row["image_id"])
        n_distilled += dtext is not None
        n_attention += window is not None
        records.append(
            PretrainRecord(row["image_id"], row["study_id"], row["path"], text, dtext, window or fallback)
        )
    return JoinedInputs(records, rejects, n_distilled, n_attention)


def _key(row: dict[str, Any]) -> dict[str, str]:
    return {"image_id": row["image_id"], "study_id": row["study_id"]}


def decode_gray(path: str) -> torch.Tensor:
    """[1, H, W] float in [0, 1]; a cached image (`.npy`, models.ecamp.image_cache) memory-mapped, JPEG/PNG
    decoded by torchvision (fast), anything else by the project loader."""
    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path, mmap_mode="r")[None].astype(np.float32) / 255.0)
    if Path(path).suffix.lower() in {".jpg", ".jpeg", ".png"}:
        try:
            pixels = decode_image(read_file(path), mode=ImageReadMode.GRAY)
        except (RuntimeError, ValueError):
            pixels = None  # unusual PNG/JPEG flavour: the project loader decodes it or names the problem
        if pixels is not None:
            scale = 65535.0 if pixels.dtype == torch.uint16 else 255.0
            return pixels.float() / scale
    return torch.from_numpy(load_grayscale(path)).unsqueeze(0)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def scaled_crop(
    crop: tuple[int, int, int, int], source: tuple[int, int], target: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A crop (top, left, height, width) drawn on an image of size `source`, on its resized copy `target`."""
    if source == target:
        return crop
    sy, sx = target[0] / source[0], target[1] / source[1]
    top, left, height, width = crop
    return round(top * sy), round(left * sx), max(1, round(height * sy)), max(1, round(width * sx))


def box_after_crop(
    window: tuple[float, float, float, float],
    image_hw: tuple[int, int],
    crop: tuple[int, int, int, int],
    flipped: bool,
    out_size: int,
) -> tuple[int, int, int, int]:
    """Map a window given on the image padded (centred) to a square into pixels of the cropped, resized output."""
    h, w = image_hw
    side = max(h, w)
    pad_top, pad_left = (side - h) // 2, (side - w) // 2
    top, left, bottom, right = (
        window[0] * side - pad_top,
        window[1] * side - pad_left,
        window[2] * side - pad_top,
        window[3] * side - pad_left,
    )
    ci, cj, ch, cw = crop
    ys = [min(max((v - ci) * out_size / ch, 0.0), out_size) for v in (top, bottom)]
    xs = [min(max((v - cj) * out_size / cw, 0.0), out_size) for v in (left, right)]
    if flipped:
        xs = [out_size - xs[1], out_size - xs[0]]
    return round(ys[0]), round(xs[0]), round(ys[1]), round(xs[1])


class PretrainDataset(Dataset):
    """Decoded, augmented image pairs (high-res crop + its low-res version), texts and the SR window box.

    Indexed by (epoch, index), as the sampler yields them: the epoch travels with the index, so persistent workers
    (which keep their own copy of the dataset) draw each epoch's augmentation. With `decode: device` a sample is the
    JPEG's bytes and the drawn crop; `to_device` decodes and augments the batch there."""

    def __init__(self, records: Sequence[PretrainRecord], model_cfg: ECAMPConfig, cfg: PretrainConfig):
        if not records:
            raise ValueError("PretrainDataset: no training records (check the split and the upstream tables)")
        if cfg.decode == "device":
            for rec in records:
                if not rec.path.lower().endswith(JPEG_SUFFIXES):
                    raise ValueError(
                        f"pretrain_ecamp.train.decode=device decodes JPEG files only; image {rec.image_id} is "
                        f"{rec.path} (use decode=worker, which reads every format and the image cache)"
                    )
        self.records = list(records)
        self.model_cfg, self.cfg = model_cfg, cfg

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        rec = self.records[index]
        if self.cfg.decode == "device":
            encoded = read_file(rec.path)
            source = rec.source_size or jpeg_size(encoded, rec.path)
        else:
            gray = decode_gray(rec.path)
            source = rec.source_size or tuple(gray.shape[-2:])
        crop, flipped = self.draw(sample_seed(self.cfg.seed_value, epoch, index), source)
        sample = {
            "index": index,
            "epoch": epoch,
            "text": (rec.text, rec.distilled),
            "window": torch.tensor(self.window_box(rec.window, source, crop, flipped), dtype=torch.long),
        }
        if self.cfg.decode == "device":
            return {**sample, "jpeg": encoded, "crop": torch.tensor([*crop, flipped, *source])}
        high, low = self.image_pair(gray, crop, flipped, source)
        return {**sample, "imgs_hr": high, "imgs_lr": low}

    def draw(self, seed: int, source: tuple[int, int]) -> tuple[tuple[int, int, int, int], bool]:
        """RandomResizedCrop(scale, ratio) on an image of size `source` and a horizontal flip, from `seed` only.

        Drawn on the original's size even for a smaller cached copy (`PretrainRecord.source_size`), so a sample is
        the same region whether the image comes from the cache or not."""
        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            shape_only = torch.empty(1, 1, 1).expand(1, *source)  # get_params reads the shape only
            crop = RandomResizedCrop.get_params(shape_only, list(cfg.crop_scale), list(cfg.crop_ratio))
            flipped = cfg.hflip and bool(torch.rand(()) < 0.5)
        return tuple(crop), flipped  # type: ignore[return-value]

    def image_pair(
        self, gray: torch.Tensor, crop: tuple[int, int, int, int], flipped: bool, source: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised high-res crop and its low-res version, on whatever device `gray` [1, H, W] is."""
        hr, size = self.model_cfg.hr_size, self.model_cfg.img_size
        high = TF.resized_crop(
            gray,
            *scaled_crop(crop, source, tuple(gray.shape[-2:])),
            size=[hr, hr],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        if flipped:
            high = TF.horizontal_flip(high)
        low = F.interpolate(high[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
        return self.normalize(high), self.normalize(low)

    def window_box(
        self,
        window: tuple[float, float, float, float],
        source: tuple[int, int],
        crop: tuple[int, int, int, int],
        flipped: bool,
    ) -> tuple[int, int, int, int]:
        """The SR window in pixels of the high-res crop: it follows the crop and flip (or, officially, does not)."""
        size = self.model_cfg.hr_size
        if self.cfg.sr_window_follows_augmentation:
            return box_after_crop(window, source, crop, flipped, size)
        # official: the window stays where the attention map put it on the un-augmented image
        return tuple(round(v * size) for v in window)  # type: ignore[return-value]

    def normalize(self, gray: torch.Tensor) -> torch.Tensor:
        return ((gray - self.cfg.mean) / self.cfg.std).expand(self.model_cfg.in_chans, -1, -1).contiguous()

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """The batch on `device`; JPEG bytes (decode: device) decoded there in one call, then cropped and resized."""
        jpegs, sizes, crops = batch.pop("jpeg", None), batch.pop("jpeg_sizes", None), batch.pop("crop", None)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if jpegs is None:
            return batch
        decoded = decode_jpeg(list(jpegs.split(sizes.tolist())), mode=ImageReadMode.GRAY, device=device)
        pairs = []
        for gray, params in zip(decoded, crops.tolist(), strict=True):
            top, left, height, width, flipped, src_h, src_w = params
            pairs.append(
                self.image_pair(
                    gray.float() / 255.0, (top, left, height, width), bool(flipped), (src_h, src_w)
                )
            )
        batch["imgs_hr"] = torch.stack([p[0] for p in pairs])
        batch["imgs_lr"] = torch.stack([p[1] for p in pairs])
        return batch


def jpeg_size(encoded: torch.Tensor, path: str) -> tuple[int, int]:
    """(H, W) from a JPEG's header, without decoding it."""
    try:
        with PILImage.open(io.BytesIO(encoded.numpy().tobytes())) as image:
            width, height = image.size
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JPEG ({err})") from err
    return height, width


TextCollate = Callable[[Sequence[tuple[str, str | None]], np.random.Generator], dict[str, torch.Tensor]]


class PretrainCollator:
    """Stacks images and builds the MLM batch with a generator seeded by (seed, epoch, sample indices); JPEG bytes
    (decode: device) are concatenated with their sizes, decoded on the device by `PretrainDataset.to_device`."""

    def __init__(self, text_collate: TextCollate, seed: int):
        self.text_collate, self.seed = text_collate, seed

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        indices = [s["index"] for s in samples]
        rng = np.random.default_rng([self.seed, samples[0]["epoch"], *indices])
        encoded = "jpeg" in samples[0]
        stacked = ("crop", "window") if encoded else ("imgs_lr", "imgs_hr", "window")
        batch: dict[str, Any] = {k: torch.stack([s[k] for s in samples]) for k in stacked}
        batch["index"] = torch.tensor(indices)  # the model's draws are seeded by them (see `train`)
        if encoded:  # one tensor, not one per image: each tensor a worker sends costs a shared-memory handle
            batch["jpeg"] = torch.cat([s["jpeg"] for s in samples])
            batch["jpeg_sizes"] = torch.tensor([len(s["jpeg"]) for s in samples])
        batch.update(self.text_collate([s["text"] for s in samples], rng))
        return batch


class ResumableSampler(Sampler):
    """This rank's share of an epoch's permutation (seeded by seed + epoch), whole micro-batches at a time, able to
    start `start` samples into the share.

    The permutation cut into micro-batches of `batch_size` is the one-process order; rank r of W takes micro-batches
    r, r + W, r + 2W, ... So the micro-batches W ranks train on together are those one process would train on with
    W times the accumulation: same samples, same text masks, same losses (torch's DistributedSampler deals single
    samples round-robin instead, which mixes every micro-batch across ranks). Samples that fill no micro-batch on
    every rank are left out of the epoch, as DataLoader(drop_last=True) leaves out a last short batch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_size: int):
        self.n, self.num_replicas, self.rank = len(dataset), num_replicas, rank
        self.seed, self.batch_size = seed, batch_size
        self.batches = self.n // (batch_size * num_replicas)  # micro-batches per rank and epoch
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self) -> list[int]:
        """This rank's sample indices of the current epoch, in training order."""
        order = torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()
        b, w = self.batch_size, self.num_replicas
        return [
            i
            for k in range(self.batches)
            for i in order[(k * w + self.rank) * b : (k * w + self.rank + 1) * b]
        ]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(epoch, index) pairs: the epoch travels with the index to the (possibly persistent) workers."""
        return iter([(self.epoch, i) for i in self.shard()[self.start :]])

    def __len__(self) -> int:
        return self.batches * self.batch_size - self.start


# --------------------------------------------------------------------------------------------------------------
# optimisation
# --------------------------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and tokens (MAE/timm rule: parameters with ndim ≤ 1 or named tokens)."""
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
    """Load a pre-training checkpoint (MAE `{'model': ...}`, our own, a DDP one, or timm safetensors) into ECAMP.

    A key matches as is, or with our `encoder.` / `decoder.` prefix (MAE names its encoder and decoder parameters
    flat). A matching key of another shape is an error (a silently skipped tensor would train from random while
    the run claims MAE init). Returns (loaded keys, unexpected 'key: no such parameter'); the log lists both and
    the encoder keys the checkpoint did not have, as a warning when the match is partial. A checkpoint matching
    no parameter is an error: pre-training would start from random weights while the run claims an init.
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
            f"(e.g. {', '.join(unexpected[:3]) or 'no tensors'}); it is not an MAE/ECAMP pre-training checkpoint"
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


# --------------------------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """One process, or one of WORLD_SIZE processes started by torchrun (NCCL on CUDA, Gloo on CPU)."""
    use_cuda = resolve_device(device) == "cuda"  # `cuda` without CUDA: DeviceError, one line
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistInfo(
        rank, world, local_rank, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    )


def mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world
    return values


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if info.world == 1:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain types, so the checkpoint loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, keys.tolist(), pos, has_gauss, cached]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(model_cfg: ECAMPConfig, cfg: PretrainConfig, data_hash: str) -> dict[str, Any]:
    """What must not change for a checkpoint to be resumable (not the checkpoint cadence or worker count)."""
    keep = cfg.model_dump(exclude={"ckpt_every", *LOADER_SETTINGS, *MEASURE_SETTINGS})
    return {"model": model_cfg.model_dump(), "train": keep, "data": data_hash}


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic: a crash while writing leaves the previous checkpoint intact; so does a model gone non-finite
    (resuming it would only repeat the failure)."""
    broken = non_finite(payload["model"])
    if broken:
        raise FloatingPointError(
            f"refusing to save checkpoint {path}: non-finite weights in {describe_names(broken)}"
        )
    save_atomic(payload, path)


RESUME_KEYS = ("model", "optimizer", "scheduler", "state", "rng", "fingerprint", "world")


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    """A resume checkpoint this trainer wrote, read without running code; anything else is a CheckpointError."""
    return read_resume_file(
        path, RESUME_KEYS, "pre-training resume checkpoint", "delete it to start this training over"
    )


def check_finite_step(losses: dict[str, float], grad_norm: float, epoch: int, step: int) -> None:
    """Stop before an optimiser step that would write NaN/inf into the weights (GLoRIA's trainer does the same)."""
    bad = [f"{k}={v}" for k, v in losses.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"ECAMP loss is {losses['total']} at epoch {epoch}, step {step} (non-finite: {', '.join(bad)}); "
            "lower the learning rate or check the inputs"
        )
    if not math.isfinite(grad_norm):
        raise FloatingPointError(
            f"ECAMP gradient norm is {grad_norm} at epoch {epoch}, step {step} (losses finite); "
            "lower the learning rate or check the inputs"
        )


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


# --------------------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------------------
def autocast_for(amp: str, device: torch.device) -> torch.autocast:
    """bf16 autocast on the device's type (torch.autocast("cpu") on CPU), on when `amp` asks for it."""
    on = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


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
    log: logging.Logger = LOG,
    log_every_s: float = LOG_EVERY_S,
    heldout: Sequence[HeldOutBatch] = (),
) -> TrainResult:
    """Train until the schedule ends (or `stop_after` optimiser steps in total), resuming from out_dir/checkpoint.pt.

    With `heldout` batches (`models.ecamp.reliance`) the last step's metrics row (and each epoch's last with
    `reliance_every_epoch`) carries the text side's image reliance, measured on rank 0 without gradient.

    A progress line goes to `log` at most every `log_every_s` seconds (and at the last step): every step is in
    the metrics, and a run log of one line per step is one nobody reads.

    `stop_after` simulates a pre-empted job: it saves a checkpoint and returns with finished=False.
    `data_hash` identifies the training data: a checkpoint made on other data (or config) is not resumed.
    """
    info = init_distributed(device)  # first: a device this machine lacks is an error before any file is made
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed_value
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every rank builds the same initial model

    model = ECAMP(model_cfg)
    if cfg.init_checkpoint not in (None, RANDOM_INIT):
        load_partial(model, cfg.init_checkpoint, log)
    model.to(info.device)
    schedule = make_schedule(cfg, len(dataset), info.world)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=schedule.base_lr, betas=cfg.betas)
    min_ratio = cfg.min_lr / schedule.base_lr
    scheduler = warmup_cosine(optimizer, schedule.warmup_steps, schedule.cosine_steps, min_ratio)

    state, resumed_from = TrainState(), None
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.exists():
        payload = read_resume_checkpoint(ckpt_path)
        if payload["fingerprint"] != fingerprint(model_cfg, cfg, data_hash) or payload["world"] != info.world:
            log.warning(
                "%s was made with another config, data or world size: starting from scratch", ckpt_path
            )
        else:
            model.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
            state = TrainState(**payload["state"])
            set_rng_state(payload["rng"][info.rank])
            resumed_from = state.step
            log.info("resumed from %s at step %d (epoch %d)", ckpt_path, state.step, state.epoch)

    ddp = (
        DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        if info.world > 1
        else model
    )
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
    autocast = autocast_for(cfg.amp, info.device)

    def checkpoint() -> None:
        rngs = gather_objects(rng_state(), info)
        if info.main:
            save_checkpoint(
                ckpt_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "state": vars(state),
                    "rng": rngs,
                    "world": info.world,
                    "fingerprint": fingerprint(model_cfg, cfg, data_hash),
                },
            )

    bar = tqdm(
        total=schedule.total_steps,
        initial=state.step,
        disable=not (progress and info.main),
        desc="pretrain_ecamp",
    )
    model.train()
    micro_per_epoch = schedule.steps_per_epoch * cfg.accum_iter
    last_line = time.monotonic()
    while state.step < schedule.total_steps:
        sampler.set_epoch(state.epoch)
        sampler.start = state.batch_in_epoch * cfg.batch_size
        sums, t0 = torch.zeros(len(LOSSES), device=info.device), time.perf_counter()
        for batch in loader:
            # patch masking and dropout: a function of the micro-batch, whichever rank or run draws them
            torch.manual_seed(sample_seed(seed, state.epoch, *batch.pop("index").tolist()))
            batch = dataset.to_device(batch, info.device)
            last_micro = (state.batch_in_epoch + 1) % cfg.accum_iter == 0
            sync = ddp.no_sync() if (info.world > 1 and not last_micro) else nullcontext()
            with sync:
                with autocast:
                    losses = ddp(**batch)
                (losses["total"] / cfg.accum_iter).backward()
            sums += torch.stack([losses[k].detach().float() for k in LOSSES])
            state.batch_in_epoch += 1
            if not last_micro:
                continue
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad or float("inf"))
            means = mean_over_ranks(sums / cfg.accum_iter, info).tolist()
            check_finite_step(
                dict(zip(LOSSES, means, strict=True)), float(grad_norm), state.epoch, state.step + 1
            )
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            elapsed = time.perf_counter() - t0
            state.metrics.append(
                {
                    "step": state.step,
                    "epoch": state.epoch,
                    **dict(zip(LOSSES, means, strict=True)),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "samples_per_s": schedule.effective_batch / elapsed,
                    "step_time_s": elapsed,
                }
            )
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in zip(LOSSES, means, strict=True)})
            sums, t0 = torch.zeros_like(sums), time.perf_counter()
            done = state.step >= schedule.total_steps
            if info.main and (done or time.monotonic() - last_line >= log_every_s):
                log.info(progress_line(state.metrics[-1], schedule.total_steps))
                last_line = time.monotonic()
            stop = stop_after is not None and state.step >= stop_after
            epoch_end = state.batch_in_epoch >= micro_per_epoch
            if info.main and heldout and (done or (epoch_end and cfg.reliance_every_epoch)):
                state.metrics[-1].update(measure_reliance(model, heldout, info.device, seed))
                log.info(reliance_line(state.metrics[-1]))
            if epoch_end:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if done or stop or state.step % cfg.ckpt_every == 0:
                checkpoint()
            if done or stop or state.batch_in_epoch == 0:
                break
        if stop_after is not None and state.step >= stop_after and state.step < schedule.total_steps:
            bar.close()
            return TrainResult(model, state.metrics, schedule, resumed_from, False, ckpt_path)
    bar.close()
    return TrainResult(model, state.metrics, schedule, resumed_from, True, ckpt_path)


# --------------------------------------------------------------------------------------------------------------
# job folder + torchrun entry
# --------------------------------------------------------------------------------------------------------------
JOB_FILE = "job.json"
HELDOUT_FILE = "heldout.jsonl"  # pairs the image reliance is measured on (models.ecamp.reliance)


def write_job(
    job_dir: Path,
    model_cfg: ECAMPConfig,
    cfg: PretrainConfig,
    text_cfg: BaseModel,
    records: Sequence[PretrainRecord],
    tokenizer_path: Path,
    device: str,
    entity_words: Sequence[str],
    data_hash: str,
    heldout: Sequence[PretrainRecord] = (),
) -> Path:
    """Everything a (torchrun) training process needs, as plain files, so the stage can launch it as a command.

    The job's `data_hash` covers `data_hash` (the upstream artifacts), the records, the text masking config and
    the entity words: a checkpoint trained on other texts, windows or masking (e.g. another λ_neg) is never
    resumed, however finished it is."""
    job_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with (job_dir / "records.jsonl").open("w") as f:
        for rec in records:
            line = json.dumps(vars(rec)) + "\n"
            f.write(line)
            digest.update(line.encode())
    with (job_dir / HELDOUT_FILE).open("w") as f:  # measured on, never trained on: not in the data hash
        f.writelines(json.dumps(vars(rec)) + "\n" for rec in heldout)
    text = text_cfg.model_dump(mode="json")
    digest.update(json.dumps([data_hash, text, list(entity_words)], sort_keys=True).encode())
    job = {
        "model": model_cfg.model_dump(),
        "train": cfg.model_dump(),
        "text": text,
        "tokenizer": str(tokenizer_path),
        "device": device,
        "entity_words": list(entity_words),
        "data_hash": digest.hexdigest()[:16],
    }
    path = job_dir / JOB_FILE
    path.write_text(json.dumps(job, indent=2))
    return path


def read_records(path: Path) -> list[PretrainRecord]:
    out = []
    with path.open() as f:
        for line in f:
            d = json.loads(line)
            size = d.get("source_size")
            out.append(
                PretrainRecord(**{**d, "window": tuple(d["window"]), "source_size": size and tuple(size)})
            )
    return out


def run_job(
    job_dir: Path,
    out_dir: Path,
    progress: bool = True,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> TrainResult:
    """The one training entry point: the stage calls it in-process, and every torchrun process calls it."""
    from models.text.masking import TextCollator, TextMaskingConfig
    from models.text.wordpiece import load_wordpiece

    job = json.loads((job_dir / JOB_FILE).read_text())
    model_cfg, cfg = ECAMPConfig(**job["model"]), PretrainConfig(**job["train"])
    text_cfg = TextMaskingConfig(**job["text"])
    collate = TextCollator(load_wordpiece(job["tokenizer"]), text_cfg, job["entity_words"])
    dataset = PretrainDataset(read_records(job_dir / "records.jsonl"), model_cfg, cfg)
    heldout_path = job_dir / HELDOUT_FILE
    heldout = read_records(heldout_path) if heldout_path.exists() else []
    return train(
        model_cfg,
        cfg,
        dataset,
        collate,
        out_dir,
        device=job["device"],
        data_hash=job["data_hash"],
        progress=progress,
        log=log or LOG,
        heldout=heldout_set(heldout, dataset, collate, cfg),
    )


def heldout_image(rec: PretrainRecord, dataset: PretrainDataset) -> torch.Tensor:
    """The held-out image as the model sees it in training, without augmentation: whole, resized, normalised."""
    gray = decode_gray(rec.path)
    h, w = gray.shape[-2:]
    return dataset.image_pair(gray, (0, 0, h, w), False, (h, w))[1]


def heldout_set(
    records: Sequence[PretrainRecord], dataset: PretrainDataset, collate: Any, cfg: PretrainConfig
) -> list[HeldOutBatch]:
    """The fixed held-out batches of the image reliance measure (none when off or without records)."""
    if not records or cfg.reliance_pairs == 0:
        return []
    images = [heldout_image(rec, dataset) for rec in records]
    texts = [(rec.text, rec.distilled) for rec in records]
    return heldout_batches(images, texts, collate, cfg.seed_value, cfg.batch_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m models.ecamp.pretrain",
        description="Run one ECAMP pre-training job (prepared by the pretrain_ecamp stage). Under torchrun every "
        "process runs this; rank 0 writes checkpoint.pt and metrics.jsonl into --out.",
    )
    parser.add_argument(
        "--job", required=True, type=Path, help="job folder holding job.json and records.jsonl"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (checkpoint.pt, metrics.jsonl)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    result = run_job(args.job, args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        with (args.out / "metrics.jsonl").open("w") as f:
            for row in result.metrics:
                f.write(json.dumps(row) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
