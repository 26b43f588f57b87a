"""Contracts of the `train_gloria` stage: entity attention maps + SR windows, loss curves, localization,
rejects."""

from __future__ import annotations

from typing import ClassVar, Literal

import pyarrow as pa

from data_contracts.base import Row


class AttentionMap(Row):
    """One image: the mean attention of its positive entity words on a grid×grid map, and the chosen SR
    window.

    The window covers rows window_row..window_row+window_size-1 and columns
    window_col..window_col+window_size-1 of the grid laid over the whole image padded to a square (the ViT
    patch grid of pretrain_ecamp). `fallback` says how the window was chosen: "none" (attention argmax),
    "centre" or "random" (no positive entity in the report, so no entity map; `attention` is then the mean
    over all words, kept for inspection).
    """

    contract: ClassVar[str] = "attention_maps"
    version: ClassVar[int] = 1
    arrow_overrides: ClassVar[dict[str, pa.DataType]] = {"attention": pa.list_(pa.float16())}
    image_id: str
    study_id: str
    entities: list[str]
    attention: list[float]  # row-major grid×grid, sums to 1
    grid: int
    window_row: int
    window_col: int
    window_size: int
    fallback: Literal["none", "centre", "random"]


class GloriaLoss(Row):
    """One optimiser step of GLoRIA training (loss curves)."""

    contract: ClassVar[str] = "gloria_losses"
    version: ClassVar[int] = 1
    epoch: int
    step: int
    lr: float
    loss: float
    loss_local: float
    loss_global: float


class Localization(Row):
    """How well attention finds the true lesions (demo corpus, where boxes are known), per method.

    pointing_rate: share of images whose attention argmax cell centre lies inside a true lesion box.
    mean_window_overlap: mean over images of the fraction of the lesion area (union of boxes) inside the
    window. mean_window_iou: mean IoU between the SR window and the lesion area.
    method "random": the exact expectation for a uniformly random peak cell and window placement.
    """

    contract: ClassVar[str] = "gloria_localization"
    version: ClassVar[int] = 1
    method: Literal["gloria", "random"]
    n_images: int
    grid: int
    window_size: int
    pointing_rate: float
    mean_window_overlap: float
    mean_window_iou: float
