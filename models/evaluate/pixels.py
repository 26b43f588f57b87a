"""Decode a downstream split once, at the encoder's input size, and keep it as uint8 in memory.

Every initialization, task, label fraction and seed then reads the same pixels: the decode (the costly part
on radiographs of 2,000+ px) is paid once per image, not once per run. Masks and boxes are brought to the same
size here, so heads and metrics only ever see input-size coordinates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models.evaluate.datasets import DatasetError, Sample, rle_decode
from models.images import load_grayscale


@dataclass(frozen=True)
class Pixels:
    """One split at the input size: images uint8 [N, S, S]; masks bool [N, S, S] or None; boxes per image
    as float [M, 4] xyxy in input pixels. `key` names the image list, so datasets that share their images
    (RSNA classification/segmentation/detection, the demo's three sets) share their frozen features."""

    images: torch.Tensor
    masks: torch.Tensor | None
    boxes: list[torch.Tensor]
    key: str


def resize_gray(pixels: np.ndarray, size: int) -> np.ndarray:
    """[H, W] float in [0, 1] -> [size, size] uint8, bicubic (the whole image: no crop, as the paper's 224
    input)."""
    im = Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC))


def mask_of(sample: Sample, height: int, width: int, size: int) -> np.ndarray:
    """The sample's lesion mask at the input size: a mask file, a SIIM RLE, or its boxes filled (RSNA).

    A mask file must have its image's size: stretched to fit, a mask of another image, or of a crop or
    a resize of this one, would mark the wrong pixels and still give a plausible Dice.
    """
    if sample.mask is not None:
        with Image.open(sample.mask) as im:
            if im.size != (width, height):
                raise DatasetError(
                    sample.mask,
                    None,
                    f"mask is {im.width}x{im.height} px but its image {sample.image} is {width}x{height} px "
                    "(width x height): a mask must have its image's size",
                )
            full = np.asarray(im.convert("L")) > 0
    elif sample.rle is not None:
        full = rle_decode(sample.rle, height, width)
    else:
        full = np.zeros((height, width), dtype=bool)
        for x1, y1, x2, y2 in sample.boxes:
            full[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = True
    im = Image.fromarray(full.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(im) > 127


def scaled_boxes(sample: Sample, height: int, width: int, size: int) -> torch.Tensor:
    """The sample's boxes in input pixels; DatasetError for a box that reaches outside its image (boxes of
    another image size, or of another image, would be scaled into the wrong place without a sign)."""
    for k, (x1, y1, x2, y2) in enumerate(sample.boxes, start=1):
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise DatasetError(
                sample.image,
                None,
                f"box {k} [{x1:g}, {y1:g}, {x2:g}, {y2:g}] (x1, y1, x2, y2) reaches outside the image of "
                f"{width}x{height} px (width x height): boxes are in the image's own pixels",
            )
    boxes = torch.tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4)
    return boxes * torch.tensor([size / width, size / height, size / width, size / height])


def decode_split(samples: Sequence[Sample], size: int, task: str, workers: int = 2) -> Pixels:
    """Decode every sample (threads: PIL and the JPEG decoder release the GIL) into one `Pixels`."""

    def one(sample: Sample) -> tuple[np.ndarray, np.ndarray | None, torch.Tensor]:
        gray = load_grayscale(sample.image)
        h, w = gray.shape
        mask = mask_of(sample, h, w, size) if task == "segmentation" else None
        return resize_gray(gray, size), mask, scaled_boxes(sample, h, w, size)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        decoded = list(pool.map(one, samples))
    images = torch.from_numpy(np.stack([d[0] for d in decoded])) if decoded else torch.zeros(0, size, size)
    masks = None
    if task == "segmentation":
        masks = torch.from_numpy(np.stack([d[1] for d in decoded])) if decoded else torch.zeros(0, size, size)
    key = hashlib.sha256("\n".join(f"{s.image}" for s in samples).encode() + f"@{size}".encode()).hexdigest()
    return Pixels(images.to(torch.uint8), masks, [d[2] for d in decoded], key)


def normalize(images: torch.Tensor, mean: float, std: float, channels: int = 3) -> torch.Tensor:
    """uint8 [B, S, S] -> float [B, C, S, S] with the pre-training's grey-level statistics."""
    x = (images.float() / 255.0 - mean) / std  # out of place: a float input is not changed under its caller
    return x.unsqueeze(1).expand(-1, channels, -1, -1).contiguous()
