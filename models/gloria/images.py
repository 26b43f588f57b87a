"""GLoRIA's pixels: every image decoded once into a square uint8 array that training and attention share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from models.gloria.train import square_uint8
from models.images import ImageLoadError, load_grayscale

Progress = Callable[..., Iterable[Any]]  # tqdm-like: progress(iterable, total=..., desc=...)


def no_progress(items: Iterable[Any], **_: Any) -> Iterable[Any]:
    return items


def decode_square(path: str, size: int) -> np.ndarray | str:
    """The square uint8 image, or the reason it cannot be used."""
    try:
        return square_uint8(load_grayscale(path), size)
    except ImageLoadError as err:
        return err.reason
    except (OSError, ValueError) as err:
        return f"cannot decode image ({type(err).__name__}: {err})"


def decode_images(
    rows: list[dict[str, Any]], size: int, workers: int, out: Path, progress: Progress = no_progress
) -> tuple[np.ndarray, list[dict[str, Any]], list[dict[str, str]]]:
    """Decode every image (`rows[i]["path"]`) once into a uint8 memmap [N, size, size] at `out`: training
    and attention then read the same square pixels. The kept rows, and a reject for each failure."""
    array = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(rows), size, size))
    kept, rejects = [], []
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda r: decode_square(r["path"], size), rows)
        for row, result in progress(zip(rows, results, strict=True), total=len(rows), desc="decode images"):
            if isinstance(result, str):
                rejects.append({"source": row["path"], "key": row["image_id"], "reason": f"image: {result}"})
                continue
            array[len(kept)] = result
            kept.append(row)
    array.flush()
    return array[: len(kept)], kept, rejects
