"""Benchmark: what the JPEG "cut short and re-terminated" check costs per image, next to the header read.

`models.images.image_size` (the check extraction runs on every image) used to read the header and the last
bytes only; it now also entropy-decodes a sequential JPEG at 1/8 scale with its end marker replaced by
padding (`_decode_jpeg_to_last_block`). With `decode=True` the check is the full decode itself. Images:
the real NIH radiograph (tests/data/real) as a 512x512 JPEG, and upscaled to MIMIC-CXR-JPG size
(2544x3056) with 0 / 4 grey levels of noise (MIMIC JPGs average ~1.5 MB; the noise brings the file size
into that range). Times are the median of --repeats calls per image, in CPU ms (time.process_time:
the 2 development cores are shared, wall time mostly measures the neighbours; files are in the page cache).

    .venv/bin/python bench/image_check.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.images import image_size, load_grayscale  # noqa: E402

SOURCE = REPO / "tests" / "data" / "real" / "images" / "00000001_000.png"


def write_jpegs(folder: Path) -> list[Path]:
    """The benchmark images: 512x512 as is, 2544x3056 smooth and with noise."""
    src = Image.open(SOURCE)
    big = np.asarray(src.resize((2544, 3056), Image.BICUBIC), dtype=np.float32)
    rng = np.random.default_rng(0)
    paths = [folder / "512.jpg", folder / "2544x3056.jpg", folder / "2544x3056_noise4.jpg"]
    src.save(paths[0], quality=95)
    Image.fromarray(big.astype(np.uint8)).save(paths[1], quality=95)
    Image.fromarray(np.clip(big + rng.normal(0, 4, big.shape), 0, 255).astype(np.uint8)).save(
        paths[2], quality=95
    )
    return paths


def header_and_tail(path: Path) -> tuple[int, int]:
    """What `image_size` read before the scan check: the header, and the last 64 bytes for the end marker."""
    with Image.open(path) as im:
        width, height = im.size
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 64))
        f.read()
    return height, width


def median_ms(call: Callable[[Path], object], path: Path, repeats: int) -> float:
    call(path)  # warm the page cache
    times = []
    for _ in range(repeats):
        start = time.process_time()
        call(path)
        times.append(time.process_time() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("| image | file | header + end marker (before) | image_size (+ scan check) | load_grayscale |")
        print("|---|---|---|---|---|")
        for path in write_jpegs(Path(tmp)):
            header = median_ms(header_and_tail, path, args.repeats)
            checked = median_ms(image_size, path, args.repeats)
            full = median_ms(load_grayscale, path, max(3, args.repeats // 3))
            size_mb = path.stat().st_size / 1e6
            print(f"| {path.stem} | {size_mb:.2f} MB | {header:.2f} ms | {checked:.2f} ms | {full:.1f} ms |")


if __name__ == "__main__":
    main()
