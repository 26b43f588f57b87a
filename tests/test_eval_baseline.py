"""The `pixels` reference row: features that are the pixels, the classifier on them, and its rows in a job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.evaluate.baseline import PixelBaseline, downsampled, fit_pixel_classifier, pixel_tokens
from models.evaluate.classify import Normalization, score
from models.evaluate.datasets import Sample, Splits
from models.evaluate.encoders import LoadReport
from models.evaluate.fit import FitConfig
from models.evaluate.pixels import Pixels
from models.evaluate.protocol import FeatureCache, Init, Job, ProtocolConfig, SegSettings, run_job
from models.evaluate.report import plot_results, results_table
from models.evaluate.segment import SegConfig
from tests.test_eval_heads import TINY

torch.set_num_threads(1)
ARCH = {"img_size": 32, "patch_size": 8, "in_chans": 3, "embed_dim": 32, "depth": 1, "num_heads": 2}
NORM = Normalization()


def test_pixel_tokens_are_the_grey_patches_in_the_vits_token_order():
    images = torch.arange(2 * 16 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(2, 16, 16)
    tokens = pixel_tokens(images, 4, mean=0.5, std=0.25)
    assert tokens.shape == (2, 16, 16)  # a 4x4 grid of 4x4 patches
    for b, row, col in ((0, 0, 0), (1, 2, 3), (1, 3, 1)):
        patch = images[b, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].float() / 255.0
        torch.testing.assert_close(tokens[b, 4 * row + col], ((patch - 0.5) / 0.25).flatten())
    with pytest.raises(ValueError, match="pixels baseline: 16 px is not a multiple of the patch size 5"):
        pixel_tokens(images, 5, 0.5, 0.25)


def test_downsampled_is_the_area_average_of_each_cell():
    images = torch.zeros(1, 4, 4, dtype=torch.uint8)
    images[0, :2, :2] = 255  # the top-left cell of a 2x2 downsampling is white, the rest black
    images[0, 2:, 2:] = torch.tensor([[0, 255], [255, 0]], dtype=torch.uint8)  # the bottom-right half grey
    torch.testing.assert_close(downsampled(images, 2), torch.tensor([[1.0, 0.0, 0.0, 0.5]]))
    with pytest.raises(ValueError, match="images of 4 px cannot be downsampled to 8"):
        downsampled(images, 8)


def bright_region_set(n: int, seed: int, delta: int = 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """32x32 noise images; label c is 1 when region c (top-left / bottom-right 8x8) is `delta` grey levels
    brighter. Masks: the bright regions. A change of 30 in noise of std 40 is hard to see pixel by pixel."""
    gen = np.random.default_rng(seed)
    labels = gen.integers(0, 2, (n, 2))
    images = gen.normal(110, 40, (n, 32, 32))
    masks = np.zeros((n, 32, 32), dtype=bool)
    for i in range(n):
        if labels[i, 0]:
            masks[i, 4:12, 4:12] = True
        if labels[i, 1]:
            masks[i, 20:28, 18:26] = True
    images = np.clip(images + delta * masks, 0, 255).round().astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels).float(), torch.from_numpy(masks)


def test_the_pixel_classifier_finds_a_brighter_region_choosing_c_on_validation():
    train_x, train_y, _ = bright_region_set(200, 0)
    val_x, val_y, _ = bright_region_set(100, 1)
    test_x, test_y, _ = bright_region_set(200, 2)
    model, fitted = fit_pixel_classifier(
        (downsampled(train_x, 16), train_y), (downsampled(val_x, 16), val_y), 2, True, PixelBaseline(size=16)
    )
    auc = score(test_y.numpy(), model.logits(downsampled(test_x, 16)), multilabel=True)
    assert auc > 0.9, auc  # measured 1.00
    np.testing.assert_allclose(model.scaler.mean_, downsampled(train_x, 16).mean(dim=0).numpy(), rtol=1e-6)
    # C is chosen on validation: on a harder set (60 images, +10 grey levels) each C scores differently there
    hard = [bright_region_set(n, seed, delta=10) for n, seed in ((60, 0), (100, 1))]
    train, val = [(downsampled(x, 32), y) for x, y, _ in hard]
    grid = (1e-4, 0.05, 1e4)
    alone = [
        fit_pixel_classifier(train, val, 2, True, PixelBaseline(c_grid=(c,)))[1].best_score for c in grid
    ]
    assert len(set(alone)) == 3  # measured 0.708, 0.697, 0.690
    _, fitted = fit_pixel_classifier(train, val, 2, True, PixelBaseline(c_grid=grid))
    assert (fitted.best_score, fitted.best_epoch, fitted.epochs_run) == (max(alone), int(np.argmax(alone)), 3)


def test_a_class_the_subset_never_shows_gets_a_constant_score():
    train_x, train_y, _ = bright_region_set(40, 0)
    train_y[:, 1] = 0  # no image of the training subset has class b
    val_x, val_y, _ = bright_region_set(20, 1)
    model, _ = fit_pixel_classifier(
        (downsampled(train_x, 8), train_y), (downsampled(val_x, 8), val_y), 2, True, PixelBaseline(size=8)
    )
    logits = model.logits(downsampled(val_x, 8))
    assert logits.shape == (20, 2) and np.all(logits[:, 1] == 0.0) and logits[:, 0].std() > 0
    multiclass = train_y[:, :1]  # a one-class multi-class subset: that class always
    model, _ = fit_pixel_classifier(
        (downsampled(train_x, 8), torch.zeros(40, 1)),
        (downsampled(val_x, 8), multiclass[:20]),
        3,
        False,
        PixelBaseline(size=8),
    )
    assert model.logits(downsampled(val_x, 8)).argmax(axis=1).tolist() == [0] * 20


def job_of(task: str, n: tuple[int, int, int], delta: int = 30) -> Job:
    """A Job over the constructed set: class labels for classification, masks for segmentation."""
    names = ("train", "val", "test")
    parts = {
        name: bright_region_set(k, seed, delta) for seed, (name, k) in enumerate(zip(names, n, strict=True))
    }
    samples = {
        name: tuple(
            Sample(Path(f"/nonexistent/{name}{i}.png"), tuple(int(v) for v in y[i])) for i in range(len(y))
        )
        for name, (_, y, _) in parts.items()
    }
    splits = Splits(
        "bright",
        task,
        ("a", "b"),
        True,
        samples["train"],
        samples["val"],
        samples["test"],
        {10: tuple(range(0, n[0], 10)), 100: tuple(range(n[0]))},
    )
    masks = task == "segmentation"
    pixels = {
        name: Pixels(x, m if masks else None, [torch.zeros(0, 4)] * len(x), f"{task}-{name}")
        for name, (x, _, m) in parts.items()
    }
    protocols = ("finetune", "linear_probe") if task == "classification" else ("segmentation",)
    return Job(splits, pixels, protocols, (10, 100), (0, 1))


def test_the_pixels_row_runs_in_a_job_beside_an_encoder_and_is_cached_once():
    fit = FitConfig(epochs=3, batch_size=32, warmup_epochs=0, min_steps=4)
    cfg = ProtocolConfig(finetune=fit, linear_probe=fit, pixels=PixelBaseline(size=16))
    inits = [Init("pixels", None, pixels=True), Init("random", None)]
    reports = {
        "pixels": LoadReport("raw pixels, no encoder", "pixels"),
        "random": LoadReport("random", "random"),
    }
    arch = {**ARCH, "embed_dim": TINY.embed_dim}
    cache = FeatureCache(arch, NORM, pixel_size=16)
    rows = list(
        run_job(
            job_of("classification", (200, 100, 200)), inits, reports, arch, NORM, cfg, lambda _: None, cache
        )
    )
    assert len(rows) == 2 * 2 * 2 * 2  # protocols x inits x fractions x seeds
    mine = {(r["task"], r["fraction"], r["seed"]): r for r in rows if r["init"] == "pixels"}
    assert {r["checkpoint_hash"] for r in mine.values()} == {"pixels"}
    assert all(mine[("linear_probe", 100, s)]["value"] > 0.9 for s in (0, 1))  # measured 1.00
    for (task, fraction, seed), row in mine.items():  # one model per subset, in both tables, for every seed
        assert row["value"] == mine[("linear_probe", fraction, 0)]["value"], (task, fraction, seed)
    assert len(cache.pixel_scores) == 2  # fitted once per label subset
    random_probe = [r["value"] for r in rows if r["init"] == "random" and r["task"] == "linear_probe"]
    assert max(random_probe) < 0.9  # a random ViT's pooled feature does not see it (measured 0.5-0.6)
    pixel_keys = [k for k in cache.store if k[0] == "pixels"]
    assert sorted(k[1:] for k in pixel_keys) == [
        (0, "classification-test", False),
        (0, "classification-train", False),
        (0, "classification-val", False),
    ]  # computed once for both seeds and both protocols
    assert [k for k in cache.encoders if k[0] == "pixels"] == []  # no encoder was built for it


def test_the_pixels_row_segments_with_the_protocols_head_on_grey_patches():
    fit = FitConfig(optimizer="adamw", lr=2e-3, epochs=20, batch_size=32, warmup_epochs=0)
    seg = SegSettings(head=SegConfig(channels=(8, 8, 8), token_norm=True), fit=fit)
    cfg = ProtocolConfig(segmentation=seg)
    inits = [Init("pixels", None, pixels=True)]
    job = job_of("segmentation", (120, 40, 40), delta=80)
    rows = list(
        run_job(
            job,
            inits,
            {"pixels": LoadReport("p", "pixels")},
            ARCH,
            NORM,
            cfg,
            lambda _: None,
            FeatureCache(ARCH, NORM),
        )
    )
    assert [(r["task"], r["metric"], r["fraction"]) for r in rows] == [
        ("segmentation", "dice", 10),
        ("segmentation", "dice", 10),
        ("segmentation", "dice", 100),
        ("segmentation", "dice", 100),
    ]
    assert all(r["value"] > 0.85 for r in rows if r["fraction"] == 100), rows  # measured 0.91, 0.93


def test_the_table_says_what_the_pixels_row_is_and_the_plot_draws_it(tmp_path):
    rows = [
        {"task": t, "metric": m, "dataset": "d", "init": i, "fraction": 10, "seed": 0, "value": 0.6}
        for t, m in (("linear_probe", "auc"), ("segmentation", "dice"))
        for i in ("pixels", "ecamp")
    ]
    table = results_table(rows, pixel_size=24)
    assert "| pixels | 60.0 ± 0.0 |" in table
    assert "pixels: a linear model on the 24×24 image, no encoder" in table
    assert "pixels: the same head on the raw grey patches, no encoder" in table
    assert "pixels:" not in results_table([r for r in rows if r["init"] == "ecamp"])
    assert plot_results(rows, tmp_path / "p.png").is_file()
