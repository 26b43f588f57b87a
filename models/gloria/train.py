"""Training and inference loops for GLoRIA: data, crops, Adam(W) + warm-up/cosine, bf16 autocast,
checkpoint/resume.

One process: GLoRIA's global and local losses contrast each image with every report of its batch, so a batch
sharded over DDP ranks would train on smaller contrastive batches than one process (each rank's loss sees only
its share) unless the features were gathered across ranks; GLoRIA is the small model of the pipeline, trained
on one device.

Images are pre-decoded once into a uint8 [N, S, S] array (a memmap at scale) of the square-padded radiograph,
so training epochs and attention extraction never decode files again. Training sees random crops (`crop`,
the official RandomCrop 224 of 256); attention extraction sees the whole image, so its grid maps onto the
image without any crop to undo (REFERENCE §1.5 step 3). No Prefect here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from models.engine.distributed import one_process
from models.engine.resume import ResumeFile, seed_everything
from models.engine.schedule import warmup_cosine
from models.engine.step import Amp, StepGuard, autocast_for, optimizer_step
from models.gloria.attention import entity_positions, to_grid
from models.gloria.model import Gloria, TextBatch, encode_texts

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Optimisation settings. Official GLoRIA: Adam lr 5e-5, wd 1e-6, batch 48, 50 epochs, clip 0.25.

    The seed and device are the run's (arguments of `train_gloria`), the token budget is the model's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(50, ge=0)
    batch_size: int = Field(48, ge=2)
    optimizer: Literal["adam", "adamw"] = Field(
        "adam", description="adam (official GLoRIA: weight decay as an L2 term) or adamw (decoupled decay)"
    )
    lr: float = Field(5e-5, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(1e-6, ge=0)
    crop: float | None = Field(
        0.875,
        gt=0,
        le=1,
        description="random square crop of this fraction of the side, resized back, at training only "
        "(official: RandomCrop 224 of the 256 image = 0.875); null = the whole image",
    )
    warmup_epochs: float = Field(1.0, ge=0)
    grad_clip: float = Field(0.25, gt=0)
    num_workers: int = Field(0, ge=0, description="DataLoader workers")
    amp: Amp = "auto"
    local_words: Literal["all", "affirmed"] = Field(
        "all",
        description="words in the local loss: all (paper) or only those naming an affirmed finding "
        "(match_entities polarity), among the pairs that have one (see `local_loss` focus)",
    )


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------


def square_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W] float in [0, 1] -> zero-padded (centred) to a square, area-resized to [size, size] uint8."""
    h, w = image.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = image
    pil = Image.fromarray(np.clip(square * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(pil.resize((size, size), Image.Resampling.BOX))


class ImageTextData(Dataset):
    """Pairs of a pre-decoded square image (uint8 [N, S, S] array or memmap) and its cleaned report text."""

    def __init__(self, images: np.ndarray, texts: list[str]):
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        self.images, self.texts = images, texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int]:
        pixels = torch.from_numpy(np.asarray(self.images[i], dtype=np.float32)) / 255.0
        return ((pixels - 0.5) / 0.5)[None], self.texts[i], i  # GLoRIA's "half" normalisation


def random_crops(images: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Each image [B, C, S, S] cropped to a random square of side round(fraction·S) and resized back to S
    (bilinear, corners aligned: the official 224 crop upsampled to 299)."""
    side = images.shape[-1]
    crop = max(1, round(fraction * side))
    if crop == side:
        return images
    starts = torch.randint(0, side - crop + 1, (len(images), 2), generator=generator).tolist()
    cropped = torch.stack(
        [img[:, y : y + crop, x : x + crop] for img, (y, x) in zip(images, starts, strict=True)]
    )
    return F.interpolate(cropped, size=(side, side), mode="bilinear", align_corners=True)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_collate(tokenizer: Tokenizer, max_tokens: int) -> Callable:
    def collate(items: list[tuple[torch.Tensor, str, int]]) -> tuple[torch.Tensor, TextBatch, torch.Tensor]:
        images, texts, index = zip(*items, strict=True)
        return torch.stack(images), encode_texts(tokenizer, list(texts), max_tokens), torch.tensor(index)

    return collate


def affirmed_words(
    words: list[list[str]], entities: list[list[str]], forms: Mapping[str, str] | None, n_max: int
) -> torch.Tensor:
    """[B, n_max] bool: the words of each caption that name one of its affirmed `entities`
    (`entity_positions`)."""
    focus = torch.zeros(len(words), n_max, dtype=torch.bool)
    for b, (row, wanted) in enumerate(zip(words, entities, strict=True)):
        pos = [i for i in entity_positions(row, wanted, forms) if i < n_max]
        focus[b, pos] = True
    return focus


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------


WHAT = "GLoRIA training"


def resume_key(cfg: TrainConfig, seed: int) -> dict:
    """What a resume file must have been saved with: the same optimisation settings and seed."""
    return cfg.model_dump() | {"seed": seed}


def train_gloria(
    model: Gloria,
    data: ImageTextData,
    tokenizer: Tokenizer,
    cfg: TrainConfig,
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, list[dict]], None] | None = None,
    entities: list[list[str]] | None = None,
    forms: Mapping[str, str] | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> list[dict]:
    """Train `model` in place and return one loss row per optimiser step (epoch, step, lr, loss, ...).

    With `checkpoint`, the full state (model, optimiser, schedule, every RNG, loss history) is saved after
    each epoch and a run that finds it resumes after the last finished epoch; one saved with other settings or
    another seed is not resumed (a warning, then training from the start: `models.engine.resume`).
    `entities[i]` are the findings affirmed by report i (`forms`: see `entity_positions`); with
    `cfg.local_words="affirmed"` (which requires them) the local loss uses only their words
    (`affirmed_words`); "all" is the official all-word loss.
    """
    if len(data) < 2:
        raise ValueError(f"GLoRIA's contrastive losses need at least 2 image-report pairs, got {len(data)}")
    info = one_process(device)
    where = info.device
    seed_everything(seed)
    model.to(where).train()
    if cfg.local_words == "affirmed" and entities is None:
        raise ValueError("local_words='affirmed' needs the affirmed entities of every pair (entities=...)")
    if entities is not None and len(entities) != len(data):
        raise ValueError(f"{len(entities)} entity lists for {len(data)} pairs")
    batch = min(cfg.batch_size, len(data))
    steps_per_epoch = len(data) // batch
    total = cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(model, cfg)
    scheduler = warmup_cosine(optimizer, round(cfg.warmup_epochs * steps_per_epoch), total)
    rows: list[dict] = []
    start = 0
    resume = (
        ResumeFile(checkpoint, WHAT, resume_key(cfg, seed), info, log) if checkpoint is not None else None
    )
    saved = resume.load(model, optimizer, scheduler) if resume is not None else None
    if saved is not None:
        rows, start = saved["losses"], saved["epoch"] + 1
        log.info("resuming GLoRIA training from %s after epoch %d", checkpoint, saved["epoch"])
    collate = make_collate(tokenizer, model.cfg.max_tokens)
    autocast = autocast_for(cfg.amp, where)
    for epoch in range(start, cfg.epochs):
        loader_sampler = RandomSampler(data, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        loader = DataLoader(
            data,
            batch_size=batch,
            sampler=loader_sampler,
            drop_last=True,
            collate_fn=collate,
            num_workers=cfg.num_workers,
        )
        crops = torch.Generator().manual_seed(seed * 1000 + epoch)  # per epoch: a resumed run crops the same
        for images, text, index in loader:
            if cfg.crop is not None:
                images = random_crops(images, cfg.crop, crops)
            images, text = images.to(where, non_blocking=True), text.to(where)
            with autocast:
                out = model(images, text)
            focus = None
            if cfg.local_words == "affirmed":
                batch_entities = [entities[i] for i in index.tolist()]
                focus = affirmed_words(text.words, batch_entities, forms, out.word_mask.shape[1]).to(where)
            losses = model.losses(out, focus)
            losses["loss"].backward()
            values = {k: float(v.detach()) for k, v in losses.items()}
            guard = StepGuard("GLoRIA", values, epoch, len(rows) + 1)
            lr, _ = optimizer_step(model, optimizer, scheduler, cfg.grad_clip, guard)
            rows.append({"epoch": epoch, "step": len(rows), "lr": lr} | values)
        if resume is not None:
            resume.save(model, optimizer, scheduler, {"epoch": epoch, "losses": rows})
        if on_epoch is not None:
            on_epoch(epoch, rows)
    return rows


# ------------------------------------------------------------------------------------------------------------
# Attention extraction
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ImageAttention:
    """Per image: the grid map (mean over positive entity words, else over all words) and what it came
    from."""

    grid_maps: np.ndarray  # [N, grid, grid] float32, each sums to 1
    entity_found: np.ndarray  # [N] bool: at least one positive entity word was in the text
    entities: list[list[str]]  # the positive entities whose words were found


@torch.no_grad()
def reference_regions(
    model: Gloria, data: ImageTextData, n: int, batch_size: int, seed: int, device: str = "cpu"
) -> torch.Tensor:
    """Region features [M, D, R] of a seeded random subset of M = min(n, len(data)) images (for word
    priors)."""
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
    model.to(device).eval()
    out = []
    for start in range(0, len(pick), batch_size):
        images = torch.stack([data[i][0] for i in pick[start : start + batch_size]]).to(device)
        regions, _ = model.image_encoder(images)
        out.append(regions.flatten(2).float())
    return torch.cat(out)


@torch.no_grad()
def extract_attention(
    model: Gloria,
    data: ImageTextData,
    tokenizer: Tokenizer,
    positives: list[list[str]],
    grid: int,
    batch_size: int,
    max_tokens: int,
    device: str = "cpu",
    forms: Mapping[str, str] | None = None,
    word_prior_images: int = 0,
    seed: int = 0,
) -> ImageAttention:
    """Word→region attention of each pair, averaged over the words of its positive entities, on the ViT grid.

    `positives[i]` are the entities affirmed for pair i; `forms` maps surface words to entities (see
    `entity_positions`). A pair none of whose entity words is in its text gets the mean over all its words.
    With `word_prior_images` > 0, each entity word's map is first divided by that same word's mean map over
    that many (seeded) reference images and renormalised: p(region | word, image) / p(region | word), a PMI
    that removes where the word looks on every image (a learned position habit), keeping what this image adds.
    Pairs without an entity word keep the plain all-word mean.
    """
    if len(positives) != len(data):
        raise ValueError(f"{len(positives)} entity lists for {len(data)} images")
    model.to(device).eval()
    reference = None
    if word_prior_images > 0:
        reference = reference_regions(model, data, word_prior_images, batch_size, seed, device)
    loader = DataLoader(
        data,
        batch_size=batch_size,
        sampler=SequentialSampler(data),
        collate_fn=make_collate(tokenizer, max_tokens),
    )
    maps = np.zeros((len(data), grid, grid), dtype=np.float32)
    found = np.zeros(len(data), dtype=bool)
    matched: list[list[str]] = [[] for _ in range(len(data))]
    for images, text, index in loader:
        out = model(images.to(device), text.to(device))
        attn = model.word_attention(out).float()
        selected = []
        for b, i in enumerate(index.tolist()):
            words = text.words[b]
            pos = entity_positions(words, positives[i], forms)
            found[i] = bool(pos)
            matched[i] = sorted({e for e in positives[i] if entity_positions(words, [e], forms)})
            own = attn[b, pos or list(range(len(words)))]  # [k, h, w]
            if pos and reference is not None:
                prior = model.mean_attention(reference, out.words[b], out.word_mask[b])[pos]
                ratio = own.flatten(1) / prior.clamp(min=1e-12)
                own = (ratio / ratio.sum(1, keepdim=True)).view_as(own)
            selected.append(own.mean(0).cpu())
        maps[index.numpy()] = to_grid(torch.stack(selected), grid).numpy()
    return ImageAttention(maps, found, matched)
