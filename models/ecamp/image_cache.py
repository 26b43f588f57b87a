"""Each training image decoded once, at a working resolution, as a memory-mappable uint8 array.

WHY: at MIMIC-CXR-JPG size (~3,000 x 2,500 px) decoding a JPEG costs more CPU than the whole augmentation,
every epoch, for every image: 120 epochs decode each image 120 times (bench/RESULTS.md "datapath"). The cache
decodes it once, shrinks it so that its short side is `short_side` (by default twice the SR input, so even a
crop of a fifth of the image is resized down, not up) and stores it as `.npy`, which `decode_gray`
memory-maps. Smaller images are kept at their size. Building is resumable (one atomic file per image, existing
ones skipped) and runs over worker processes with a progress bar.

A cached file is named after its source's path and stamp (`data_contracts.stamps`: the one `images` carries),
so an image replaced in place is decoded again, never served from the old pixels, and the cached copy of
its old content is removed; listing the folder once is all it takes (no per-image stat or read).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from data_contracts.stamps import stat_stamp

CACHE_SUFFIX = ".npy"
CHUNK = 16  # images a worker process takes at a time
_log = logging.getLogger(__name__)


class ImageCacheConfig(BaseModel):
    """Whether and how `pretrain_ecamp` caches its decoded images (in its scratch folder, kept across
    attempts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="decode each image once into a uint8 .npy at the working size")
    short_side: int | None = Field(
        None, ge=16, description="short side of the cached images; None = 2 x the SR input (model.hr_size)"
    )
    workers: int = Field(8, ge=1, description="processes decoding images while the cache is built")


def cache_prefix(path: str, stamp: str, short_side: int) -> str:
    """The start of the cached file's name for `path` with content `stamp` at `short_side`:
    `<hash of the path>-<hash of the stamp>_<short_side>` (hashes: never a collision, any path is a name);
    the original's size follows it, `<prefix>_<H>x<W>.npy`, so the cache itself says what it was made from."""
    path_key = hashlib.sha256(path.encode()).hexdigest()[:24]
    return f"{path_key}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}_{short_side}"


def _source_key(prefix: str) -> str:
    """The part of a prefix that names the source and the size, not its content: `<path
    hash>_<short_side>`."""
    head, short_side = prefix.rsplit("_", 1)
    return f"{head.split('-', 1)[0]}_{short_side}"


def source_size(cached: str) -> tuple[int, int]:
    """(H, W) of the original of a cached file, read from its name."""
    height, width = Path(cached).stem.rsplit("_", 1)[1].split("x")
    return int(height), int(width)


def working_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the short side at `short_side`, aspect kept; never enlarged."""
    scale = short_side / min(height, width)
    if scale >= 1:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def cache_one(job: tuple[str, str, int]) -> str:
    """Decode `source` (the training loader's decoder), shrink it with area averaging, write uint8 atomically
    as `<prefix>_<H>x<W>.npy`; returns that path."""
    from models.ecamp.data import decode_gray

    source, prefix, short_side = job
    gray = decode_gray(source)[0].numpy()
    height, width = working_size(*gray.shape, short_side)
    pixels = np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if (height, width) != gray.shape:
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BOX))
    target = f"{prefix}_{gray.shape[0]}x{gray.shape[1]}{CACHE_SUFFIX}"
    partial = f"{target}.{os.getpid()}.tmp"
    with open(partial, "wb") as f:
        np.save(f, pixels)
    os.replace(partial, target)
    return target


def entry_problem(path: Path, short_side: int) -> str | None:
    """Why a cached file is not what `cache_one` writes (None when it is): a uint8 C-order array of the
    working size its name implies, and nothing after it. Only the header is read (no pixels, no pickle), so
    a 0-byte, cut-short, object (pickled) or reshaped file is found at the cost of one small read."""
    try:
        expected = working_size(*source_size(path.name), short_side)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            header_end = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError) as err:  # ValueError: no .npy magic, a bad header, a name without HxW
        return f"is unreadable ({err})"
    if dtype != np.uint8 or fortran or shape != expected:
        order = ", Fortran order" if fortran else ""
        return f"holds an array of {dtype}{order} and shape {shape}, not uint8 {expected}"
    if size != header_end + expected[0] * expected[1]:
        return f"has {size - header_end} bytes of pixels, not {expected[0] * expected[1]}"
    return None


def build_image_cache(
    paths: Sequence[str],
    folder: Path,
    short_side: int,
    workers: int = 1,
    progress: Callable[[Iterable, int], Iterable] = lambda it, total: it,
    stamps: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """source path -> cached .npy path for every distinct image; only the missing ones, and the cached ones
    that are not what `cache_one` writes (`entry_problem`: a header read each), are decoded. `stamps`: each
    source's stamp (the `images` table's); a source without one is stat'ed for its first-seen stamp. A cached
    copy of another content of the same source at this size is removed."""
    stamps = stamps or {}
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(
        f"*{CACHE_SUFFIX}.*.tmp"
    ):  # a killed build's partial file (one builder: the run lock)
        stale.unlink()
    found = {n.rsplit("_", 1)[0]: n for n in os.listdir(folder) if n.endswith(CACHE_SUFFIX)}
    prefixes = {p: cache_prefix(p, stamps.get(p) or stat_stamp(p), short_side) for p in dict.fromkeys(paths)}
    wanted = {_source_key(x): x for x in prefixes.values()}
    for prefix, name in list(found.items()):
        if wanted.get(_source_key(prefix), prefix) != prefix:  # the same image at this size, replaced since
            (folder / name).unlink()
            del found[prefix]
    for prefix in [x for x in prefixes.values() if x in found]:  # in input order
        if problem := entry_problem(folder / found[prefix], short_side):
            _log.warning("image cache: %s %s: decoding its image again", folder / found[prefix], problem)
            (folder / found.pop(prefix)).unlink()
    cached = {p: str(folder / found[x]) for p, x in prefixes.items() if x in found}
    todo = [(p, str(folder / x), short_side) for p, x in prefixes.items() if x not in found]
    processes = min(workers, len(todo) // CHUNK)  # a few dozen images are not worth starting interpreters
    if processes > 1:
        # spawn, not fork: a forked copy of a process running torch's thread pools can deadlock
        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
        made: Iterable[str] = pool.map(cache_one, todo, chunksize=CHUNK)
    else:
        made = map(cache_one, todo)
    try:
        for (source, _, _), target in zip(todo, progress(made, len(todo)), strict=True):
            cached[source] = target
    finally:
        if processes > 1:
            pool.shutdown()
    return {p: cached[p] for p in prefixes}
