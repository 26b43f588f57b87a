"""Benchmark: the pre-training data path per CPU core on MIMIC-CXR-JPG-size images, without and with the image
cache.

    .venv/bin/python bench/datapath.py [--images 8] [--epochs 3]

One sample = what `PretrainDataset.__getitem__` does for the paper model (decode, RandomResizedCrop to 448,
flip, bicubic 224 low-res input, SR window, normalisation). Images: JPEGs of 3,000 x 2,500 (quality 95)
upscaled from the repository's real radiographs. Rates are samples per CPU-second of this process with one
torch thread (a DataLoader worker is one process): samples/s per core. Also printed: the one-time cost of
caching an image (decode + area resize to short side 896 + write), how far the cached samples are from the
uncached ones at the same seed, and the projection for the paper's 377,110 images x 120 epochs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu import mimic_size_jpegs, write_jpegs  # noqa: E402

from models.ecamp.config import PretrainConfig  # noqa: E402
from models.ecamp.data import PretrainDataset, PretrainRecord  # noqa: E402
from models.ecamp.image_cache import build_image_cache, source_size  # noqa: E402
from models.ecamp.model import ECAMPConfig  # noqa: E402

PAPER_IMAGES, PAPER_EPOCHS = 377_110, 120
WINDOW = (1 / 14, 1 / 14, 13 / 14, 13 / 14)


def samples_per_cpu_second(dataset: PretrainDataset, epochs: int) -> tuple[float, list[torch.Tensor]]:
    out = []
    start = time.process_time()
    for epoch in range(epochs):
        out += [dataset[(epoch, i)]["imgs_hr"] for i in range(len(dataset))]
    return len(out) / (time.process_time() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cores", type=int, default=16, help="CPU cores of a GPU host, for the projection")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, train = ECAMPConfig(), PretrainConfig()  # the paper's sizes: 224 input, 448 SR
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), mimic_size_jpegs(args.images))
        plain = PretrainDataset(
            [PretrainRecord(str(i), str(i), p, "t", None, WINDOW) for i, p in enumerate(paths)], model, train
        )
        before, reference = samples_per_cpu_second(plain, args.epochs)
        start = time.process_time()
        cached = build_image_cache(paths, Path(tmp) / "cache", 2 * model.hr_size, workers=1)
        cache_s = (time.process_time() - start) / len(paths)
        fast = PretrainDataset(
            [
                PretrainRecord(str(i), str(i), cached[p], "t", None, WINDOW, source_size(cached[p]))
                for i, p in enumerate(paths)
            ],
            model,
            train,
        )
        after, samples = samples_per_cpu_second(fast, args.epochs)
    diff = torch.stack([(a - b).abs().mean() for a, b in zip(reference, samples, strict=True)]) * train.std
    hours = {rate: PAPER_IMAGES * PAPER_EPOCHS / (rate * args.cores) / 3600 for rate in (before, after)}
    print(f"{args.images} JPEGs of 3000x2500, {args.epochs} epochs, one thread (samples per CPU-second)")
    print(f"uncached (decode every epoch)   : {before:8.1f} samples/s per core")
    print(f"cached (short side 896, .npy)   : {after:8.1f} samples/s per core   {after / before:5.1f}x")
    print(f"cache build, once per image     : {cache_s * 1000:8.1f} ms CPU")
    print(
        f"cached vs uncached, same seed   : mean |diff| {float(diff.mean()):.4f} (max "
        f"{float(diff.max()):.4f}) of [0, 1]"
    )
    print(
        f"paper, {PAPER_IMAGES:,} images x {PAPER_EPOCHS} epochs on {args.cores} cores: "
        f"{hours[before]:.0f} h uncached, {hours[after]:.0f} h cached "
        f"+ {PAPER_IMAGES * cache_s / args.cores / 3600:.1f} h to build the cache"
    )


if __name__ == "__main__":
    main()
