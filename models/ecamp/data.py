"""ECAMP pre-training data: the joined image-report records, the seeded augmentation, the batch and its order.

Exact resume needs every random draw to be a function of where the run is, not of how it got there:
- augmentation draws are seeded per sample from (seed, epoch, index), so they do not depend on worker
  processes;
- text masking draws are seeded per batch from (seed, epoch, sample indices);
- the sampler permutation is seeded from (seed, epoch) and can start part-way into an epoch.
The model's own draws (patch masking, dropout) are seeded per micro-batch by the trainer
(models.ecamp.pretrain, `train_one_epoch`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch.utils.data import Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from models.ecamp.config import PretrainConfig
from models.ecamp.model import ECAMPConfig
from models.ecamp.reliance import HeldOutBatch, heldout_batches
from models.images import load_grayscale

JPEG_SUFFIXES = (".jpg", ".jpeg")


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

    Images of other splits are skipped (pre-training uses the training split); an image whose study has no
    report or an empty text is a reject with its reason. Missing distilled text / attention rows fall back per
    image (no distilled text; centre window) and are counted, so the caller can log how often that happened.
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
    """Map a window given on the image padded (centred) to a square into pixels of the cropped, resized
    output."""
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


class WorkerDecode:
    """`decode: worker`: the loader's workers decode and augment; the batch only moves to the device."""

    def check(self, records: Sequence[PretrainRecord]) -> None:
        """Every format the project loader reads, and the image cache: nothing to refuse."""

    def read(self, rec: PretrainRecord) -> tuple[torch.Tensor, tuple[int, int]]:
        gray = decode_gray(rec.path)
        return gray, rec.source_size or tuple(gray.shape[-2:])

    def finish(
        self,
        dataset: PretrainDataset,
        gray: torch.Tensor,
        crop: tuple[int, int, int, int],
        flipped: bool,
        source: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        high, low = dataset.image_pair(gray, crop, flipped, source)
        return {"imgs_hr": high, "imgs_lr": low}

    def on_device(
        self, dataset: PretrainDataset, batch: dict[str, Any], device: torch.device
    ) -> dict[str, Any]:
        return batch


class DeviceDecode:
    """`decode: device`: the workers read a JPEG's bytes and draw its crop; the training device decodes the
    whole batch in one call (nvJPEG on CUDA) and augments it there. For uncached JPEG corpora, where CPU
    decoding is the bottleneck."""

    def check(self, records: Sequence[PretrainRecord]) -> None:
        for rec in records:
            if not rec.path.lower().endswith(JPEG_SUFFIXES):
                raise ValueError(
                    f"pretrain_ecamp.train.decode=device decodes JPEG files only; image {rec.image_id} is "
                    f"{rec.path} (use decode=worker, which reads every format and the image cache)"
                )

    def read(self, rec: PretrainRecord) -> tuple[torch.Tensor, tuple[int, int]]:
        encoded = read_file(rec.path)
        return encoded, rec.source_size or jpeg_size(encoded, rec.path)

    def finish(
        self,
        dataset: PretrainDataset,
        encoded: torch.Tensor,
        crop: tuple[int, int, int, int],
        flipped: bool,
        source: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        return {"jpeg": encoded, "crop": torch.tensor([*crop, flipped, *source])}

    def on_device(
        self, dataset: PretrainDataset, batch: dict[str, Any], device: torch.device
    ) -> dict[str, Any]:
        jpegs, sizes, crops = batch.pop("jpeg"), batch.pop("jpeg_sizes"), batch.pop("crop")
        decoded = decode_jpeg(list(jpegs.split(sizes.tolist())), mode=ImageReadMode.GRAY, device=device)
        pairs = []
        for gray, params in zip(decoded, crops.tolist(), strict=True):
            top, left, height, width, flipped, src_h, src_w = params
            pairs.append(
                dataset.image_pair(
                    gray.float() / 255.0, (top, left, height, width), bool(flipped), (src_h, src_w)
                )
            )
        batch["imgs_hr"] = torch.stack([p[0] for p in pairs])
        batch["imgs_lr"] = torch.stack([p[1] for p in pairs])
        return batch


DECODERS = {"worker": WorkerDecode, "device": DeviceDecode}


class PretrainDataset(Dataset):
    """Decoded, augmented image pairs (high-res crop + its low-res version), texts and the SR window box.

    Indexed by (epoch, index), as the sampler yields them: the epoch travels with the index, so persistent
    workers (which keep their own copy of the dataset) draw each epoch's augmentation. Where images are
    decoded is the `decoder`'s one choice (`WorkerDecode`, `DeviceDecode`); the crop is drawn here either
    way."""

    def __init__(self, records: Sequence[PretrainRecord], model_cfg: ECAMPConfig, cfg: PretrainConfig):
        if not records:
            raise ValueError("PretrainDataset: no training records (check the split and the upstream tables)")
        self.records = list(records)
        self.model_cfg, self.cfg = model_cfg, cfg
        self.decoder = DECODERS[cfg.decode]()
        self.decoder.check(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        rec = self.records[index]
        payload, source = self.decoder.read(rec)
        crop, flipped = self.draw(sample_seed(self.cfg.seed_value, epoch, index), source)
        return {
            "index": index,
            "epoch": epoch,
            "text": (rec.text, rec.distilled),
            "window": torch.tensor(self.window_box(rec.window, source, crop, flipped), dtype=torch.long),
            **self.decoder.finish(self, payload, crop, flipped, source),
        }

    def draw(self, seed: int, source: tuple[int, int]) -> tuple[tuple[int, int, int, int], bool]:
        """RandomResizedCrop(scale, ratio) on an image of size `source` and a horizontal flip, from `seed`
        only.

        Drawn on the original's size even for a smaller cached copy (`PretrainRecord.source_size`), so a
        sample is the same region whether the image comes from the cache or not."""
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
        """The SR window in pixels of the high-res crop: it follows the crop and flip (or, officially, does
        not)."""
        size = self.model_cfg.hr_size
        if self.cfg.sr_window_follows_augmentation:
            return box_after_crop(window, source, crop, flipped, size)
        # official: the window stays where the attention map put it on the un-augmented image
        return tuple(round(v * size) for v in window)  # type: ignore[return-value]

    def normalize(self, gray: torch.Tensor) -> torch.Tensor:
        return ((gray - self.cfg.mean) / self.cfg.std).expand(self.model_cfg.in_chans, -1, -1).contiguous()

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """The batch on `device`, decoded and augmented there first when the decoder leaves that to the
        device."""
        batch = self.decoder.on_device(self, batch, device)
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
    """Stacks the samples' tensors and builds the MLM batch with a generator seeded by (seed, epoch, sample
    indices). Variable-length tensors (a JPEG's bytes under `decode: device`) are concatenated, with their
    sizes."""

    RAGGED = (
        "jpeg",
    )  # one tensor, not one per image: each tensor a worker sends costs a shared-memory handle
    NOT_TENSORS = ("index", "epoch", "text")

    def __init__(self, text_collate: TextCollate, seed: int):
        self.text_collate, self.seed = text_collate, seed

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        indices = [s["index"] for s in samples]
        rng = np.random.default_rng([self.seed, samples[0]["epoch"], *indices])
        batch: dict[str, Any] = {}
        for key in samples[0]:
            if key in self.RAGGED:
                batch[key] = torch.cat([s[key] for s in samples])
                batch[f"{key}_sizes"] = torch.tensor([len(s[key]) for s in samples])
            elif key not in self.NOT_TENSORS:
                batch[key] = torch.stack([s[key] for s in samples])
        batch["index"] = torch.tensor(indices)  # the model's draws are seeded by them (see `train_one_epoch`)
        batch.update(self.text_collate([s["text"] for s in samples], rng))
        return batch


class ResumableSampler(Sampler):
    """This rank's share of an epoch's permutation (seeded by seed + epoch), whole micro-batches at a time,
    able to start `start` samples into the share.

    The permutation cut into micro-batches of `batch_size` is the one-process order; rank r of W takes
    micro-batches r, r + W, r + 2W, ... So the micro-batches W ranks train on together are those one process
    would train on with W times the accumulation: same samples, same text masks, same losses (torch's
    DistributedSampler deals single samples round-robin instead, which mixes every micro-batch across ranks).
    Samples that fill no micro-batch on every rank are left out of the epoch, as DataLoader(drop_last=True)
    leaves out a last short batch."""

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


def heldout_image(rec: PretrainRecord, dataset: PretrainDataset) -> torch.Tensor:
    """The held-out image as the model sees it in training, without augmentation: whole, resized,
    normalised."""
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
