"""The pre-training image cache (issue 12 point 9): decoded once at the working size, resumable, parallel, and
the augmented tensors equal to the uncached path's within interpolation tolerance at the same seed."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.ecamp.config import PretrainConfig
from models.ecamp.data import PretrainDataset, PretrainRecord, decode_gray
from models.ecamp.image_cache import build_image_cache, source_size, working_size
from models.ecamp.model import ECAMPConfig
from models.images import load_grayscale

from .real_data import REAL_DATA

torch.set_num_threads(1)
WINDOW = (0.25, 0.2, 0.75, 0.7)


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory) -> list[str]:
    """Real radiographs upscaled to 1,200 x 1,000 JPEGs (MIMIC-CXR-JPG's are ~3,000 x 2,500: same layout)."""
    folder = tmp_path_factory.mktemp("jpegs")
    paths = []
    for i, source in enumerate(sorted((REAL_DATA / "images").glob("*.png"))[:2]):
        pixels = np.clip(load_grayscale(source) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((1000, 1200), Image.Resampling.BICUBIC).save(
            buffer, "JPEG", quality=95
        )
        path = folder / f"img{i}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(str(path))
    assert len(paths) == 2, "tests/data/real/images needs two PNG radiographs"
    return paths


def test_working_size_keeps_the_aspect_and_never_enlarges():
    assert working_size(3000, 2500, 896) == (1075, 896)
    assert working_size(2500, 3000, 896) == (896, 1075)
    assert working_size(256, 256, 896) == (256, 256)


def test_the_cache_is_built_once_in_parallel_and_resumes(large_jpegs, tmp_path):
    folder = tmp_path / "cache"
    first = build_image_cache([*large_jpegs, large_jpegs[0]], folder, 448, workers=2)
    assert list(first) == large_jpegs  # one entry per distinct image
    shapes = {p: np.load(first[p], mmap_mode="r").shape for p in large_jpegs}
    assert all(s == (538, 448) for s in shapes.values()), shapes  # 1,200 x 1,000 -> short side 448
    assert {source_size(t) for t in first.values()} == {(1200, 1000)}  # the original's size, in the name
    stamps = {t: Path(t).stat().st_mtime_ns for t in first.values()}
    Path(next(iter(stamps))).unlink()  # an interrupted build: one image missing, one partial file left
    (folder / "x.npy.123.tmp").write_bytes(b"partial")
    again = build_image_cache(large_jpegs, folder, 448, workers=1)
    assert again == first
    assert [Path(t).stat().st_mtime_ns == s for t, s in stamps.items()] == [False, True]
    assert not list(folder.glob("*.tmp"))
    cached = decode_gray(first[large_jpegs[1]])
    assert (
        cached.dtype == torch.float32
        and cached.shape == (1, 538, 448)
        and 0 <= cached.min() <= cached.max() <= 1
    )


def test_a_small_image_is_cached_at_its_own_size_pixel_for_pixel(tmp_path):
    source = sorted((REAL_DATA / "images").glob("*.png"))[0]
    small = tmp_path / "small.png"
    Image.fromarray((load_grayscale(source)[:200, :180] * 255).astype(np.uint8)).save(small)
    [cached] = build_image_cache([str(small)], tmp_path / "cache", 448).values()
    assert torch.equal(decode_gray(cached), decode_gray(str(small)))


def test_augmented_samples_match_the_uncached_path_at_the_same_seed(large_jpegs, tmp_path):
    model = ECAMPConfig(
        img_size=112,
        hr_size=224,
        patch_size=16,
        embed_dim=32,
        depth=1,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        sr_window=3,
    )
    cached = build_image_cache(large_jpegs, tmp_path / "cache", 2 * model.hr_size)

    def dataset(use_cache: bool) -> PretrainDataset:
        records = [
            PretrainRecord(str(i), str(i), cached[p], "text", None, WINDOW, source_size(cached[p]))
            if use_cache
            else PretrainRecord(str(i), str(i), p, "text", None, WINDOW)
            for i, p in enumerate(large_jpegs)
        ]
        return PretrainDataset(records, model, PretrainConfig())

    plain, fast = dataset(False), dataset(True)
    for epoch in range(3):
        for i in range(len(large_jpegs)):
            a, b = plain[(epoch, i)], fast[(epoch, i)]
            assert a["imgs_hr"].shape == b["imgs_hr"].shape == (3, 224, 224)
            diff = (a["imgs_hr"] - b["imgs_hr"]).abs() * PretrainConfig().std  # back to [0, 1] pixel units
            assert float(diff.mean()) < 0.01 and float(diff.quantile(0.99)) < 0.05, (
                epoch,
                i,
                float(diff.mean()),
            )
            assert (a["window"] - b["window"]).abs().max() <= 2  # pixels of the 224 crop


@pytest.mark.slow  # spawned worker processes, each importing torch: 7 s
def test_a_large_build_runs_in_spawned_worker_processes_with_the_same_result(tmp_path):
    """Enough images for two processes (CHUNK each at least): spawned, not forked, and byte-equal to
    in-process."""
    from models.ecamp import image_cache

    source = load_grayscale(sorted((REAL_DATA / "images").glob("*.png"))[0])
    paths = []
    for i in range(2 * image_cache.CHUNK + 3):
        path = tmp_path / f"{i}.png"
        Image.fromarray((source[i : i + 300, :250] * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    parallel = build_image_cache(paths, tmp_path / "parallel", 64, workers=2)
    serial = build_image_cache(paths, tmp_path / "serial", 64, workers=1)
    for p in paths:
        assert np.array_equal(np.load(parallel[p]), np.load(serial[p])) and source_size(parallel[p]) == (
            300,
            250,
        )
