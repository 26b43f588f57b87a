"""Known lesion boxes (the demo corpus writes them): where GLoRIA's attention is scored, never trained on."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from models.gloria.attention import (
    Localization,
    argmax_cells,
    localization,
    random_localization,
    rasterize_boxes,
)


def read_lesion_boxes(path: Path | None) -> dict[str, list[tuple[int, int, int, int]]]:
    """image_id -> pixel boxes (x1, y1, x2, y2; x2/y2 exclusive); none without a lesion box file."""
    if path is None:
        return {}
    frame = pd.read_csv(path, dtype={"dicom_id": str})
    missing = {"dicom_id", "x1", "y1", "x2", "y2"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    boxes: dict[str, list[tuple[int, int, int, int]]] = defaultdict(list)
    for r in frame.itertuples(index=False):
        boxes[r.dicom_id].append((int(r.x1), int(r.y1), int(r.x2), int(r.y2)))
    return dict(boxes)


def unit_boxes(boxes: list[tuple[int, int, int, int]], height: int, width: int) -> list[tuple[float, ...]]:
    """Pixel boxes -> (y0, x0, y1, x1) fractions of the square the image was centred and zero-padded into."""
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return [
        ((y1 + top) / side, (x1 + left) / side, (y2 + top) / side, (x2 + left) / side)
        for x1, y1, x2, y2 in boxes
    ]


def score_localization(
    sizes: list[tuple[int, int]],
    boxes: list[list[tuple[int, int, int, int]]],
    grid_maps: np.ndarray,
    windows: np.ndarray,
    grid: int,
    k: int,
) -> tuple[Localization, Localization]:
    """GLoRIA's pointing and window overlap on images with known lesions, and the exact random expectation.
    `sizes`: (height, width) of each image, `boxes`: its pixel boxes; maps and windows on the `grid`."""
    size = grid * 16
    lesions = np.stack(
        [rasterize_boxes(unit_boxes(b, h, w), size) for (h, w), b in zip(sizes, boxes, strict=True)]
    )
    return localization(argmax_cells(grid_maps), windows, k, grid, lesions), random_localization(
        grid, k, lesions
    )
