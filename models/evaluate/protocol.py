"""The evaluation protocol: every initialization × task × label fraction × seed on one dataset, as result
rows.

The expensive parts are paid once: each split is decoded once (`pixels`), and a frozen encoder's features
once per initialization (once per seed for the random init, whose weights are the seed's), so the linear
probe, segmentation and detection heads train on cached tensors; the heads of one label fraction (every
initialization and seed) train as one group (`fit`). Fine-tuning alone runs the encoder every step, one run
at a time. Each run picks its weights on the validation split and reports the test split. The `pixels`
initialization has no encoder: its features are the pixels themselves (`models.evaluate.baseline`), cached
the same way; its classifier is a scikit-learn model fitted once per label subset, so it is a group of its
own.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from models.evaluate.baseline import PixelBaseline, downsampled, fit_pixel_classifier, pixel_tokens
from models.evaluate.classify import (
    Augment,
    Normalization,
    finetune,
    frozen_features,
    init_head,
    linear_probe,
    predict,
    probe_the_head,
    score,
)
from models.evaluate.datasets import Splits
from models.evaluate.detection import DetectionConfig, DetectionHead, decode, detection_loss
from models.evaluate.encoders import LoadReport, downstream_vit, load_init
from models.evaluate.fit import FitConfig, FitResult, fit
from models.evaluate.metrics import detection_map, mean_dice
from models.evaluate.pixels import Pixels
from models.evaluate.segment import SegConfig, predict_masks, train_segmentation

Protocol = Literal["finetune", "linear_probe", "segmentation", "detection"]
PROTOCOLS_OF_TASK: dict[str, tuple[str, ...]] = {
    "classification": ("finetune", "linear_probe"),
    "segmentation": ("segmentation",),
    "detection": ("detection",),
}


class DenseSettings(BaseModel):
    """A frozen-encoder dense task: its head and its optimiser (official: AdamW 5e-4, wd 0.05)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fit: FitConfig = Field(
        default_factory=lambda: FitConfig(
            optimizer="adamw", lr=5e-4, weight_decay=0.05, epochs=50, batch_size=16
        )
    )


class SegSettings(DenseSettings):
    head: SegConfig = Field(default_factory=SegConfig)


class DetSettings(DenseSettings):
    head: DetectionConfig = Field(default_factory=DetectionConfig)
    scored: Literal["all", "official"] = Field(
        "all",
        description="mAP over all test images, or the official code's images with a box and a prediction",
    )


class ProtocolConfig(BaseModel):
    """How each protocol trains (official recipes by default; the paper gives no fine-tuning settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    finetune: FitConfig = Field(default_factory=FitConfig)
    linear_probe: FitConfig = Field(
        default_factory=lambda: FitConfig(epochs=100, batch_size=256, lr=0.1, clip_grad=None)
    )
    finetune_head: Literal["fresh", "linear_probe"] = Field(
        "fresh",
        description="the head fine-tuning starts from: fresh (official) or a linear probe on the frozen "
        "features fitted first with the linear_probe settings (LP-FT)",
    )
    drop_path: float = Field(0.1, ge=0, lt=1)
    head_init_std: float = Field(2e-5, gt=0)
    augment: Augment = Field(default_factory=Augment)
    segmentation: SegSettings = Field(default_factory=SegSettings)
    detection: DetSettings = Field(default_factory=DetSettings)
    pixels: PixelBaseline = Field(default_factory=PixelBaseline)


@dataclass(frozen=True)
class Init:
    """One row of the results table: a name and the weights to start from (None: random, drawn from the seed);
    `pixels`: no encoder, the raw pixels are the features (the reference row)."""

    name: str
    path: Path | None
    pixels: bool = False


@dataclass(frozen=True)
class Job:
    """What to run on one dataset."""

    splits: Splits
    pixels: dict[str, Pixels]  # train / val / test
    protocols: tuple[str, ...]
    fractions: tuple[int, ...]
    seeds: tuple[int, ...]


Log = Callable[[str], None]


def lesion_free_test_warning(name: str, task: str, test: Pixels) -> str | None:
    """Why the test split's score of a dense task would say nothing about the head, or None.

    With no lesion in the test split, Dice gives each image 1 when the head marks nothing and 0 otherwise,
    so it measures only how rarely the head marks anything (a plausible 83.3 for 5 of 6 images left empty);
    mAP is 0 whatever the head predicts.
    """
    n = len(test.boxes)
    if task == "segmentation" and test.masks is not None and not bool(test.masks.any()):
        return (
            f"{name}: no image of the test split ({n}) has a lesion at the input size: its Dice only counts "
            "the images the head leaves empty and says nothing about segmentation"
        )
    if task == "detection" and not any(len(b) for b in test.boxes):
        return f"{name}: no image of the test split ({n}) has a box: its mAP is 0 whatever the head predicts"
    return None


def labels_of(splits: Splits, name: str) -> torch.Tensor:
    samples = getattr(splits, name)
    return torch.tensor([list(s.labels) for s in samples], dtype=torch.float32).reshape(len(samples), -1)


class FeatureCache:
    """Frozen encoders per (initialization, encoder seed) and their features per image list, shared by every
    dataset and protocol of a stage run. A pre-trained encoder is seed-independent; a random one is the
    seed's. The `pixels` init's features are the downsampled image (pooled) and its grey patches (tokens)."""

    def __init__(self, arch: dict[str, Any], norm: Normalization, pixel_size: int = 32):
        self.arch, self.norm, self.pixel_size = arch, norm, pixel_size
        self.encoders: dict[tuple[str, int], nn.Module] = {}
        self.store: dict[tuple[str, int, str, bool], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.pixel_scores: dict[tuple, tuple[float, FitResult]] = {}

    def encoder(self, init: Init, seed: int) -> nn.Module:
        key = (init.name, seed if init.path is None else 0)
        if key not in self.encoders:
            torch.manual_seed(key[1])
            model = downstream_vit(self.arch)
            load_init(model, init.path)
            self.encoders[key] = model
        return self.encoders[key]

    def pooled(self, init: Init, seed: int, pixels: Pixels) -> torch.Tensor:
        return self._features(init, seed, pixels, tokens=False)[0]

    def tokens(self, init: Init, seed: int, pixels: Pixels) -> torch.Tensor:
        return self._features(init, seed, pixels, tokens=True)[1]

    def pixel_classifier(
        self,
        px: dict[str, Pixels],
        y: dict[str, torch.Tensor],
        idx: torch.Tensor,
        multilabel: bool,
        n_classes: int,
        cfg: ProtocolConfig,
    ) -> tuple[float, FitResult]:
        """(test score, fit) of the `pixels` row's classifier on the `idx` subset: deterministic and free of
        any encoder, so fitted once per subset and shared by both classification tables and every seed."""
        key = (*(px[s].key for s in ("train", "val", "test")), tuple(idx.tolist()), cfg.pixels)
        if key not in self.pixel_scores:
            pixels_init = Init("pixels", None, pixels=True)
            feats = {s: self.pooled(pixels_init, 0, px[s]) for s in ("train", "val", "test")}
            model, fitted = fit_pixel_classifier(
                (feats["train"][idx], y["train"][idx]),
                (feats["val"], y["val"]),
                n_classes,
                multilabel,
                cfg.pixels,
            )
            self.pixel_scores[key] = (
                score(y["test"].numpy(), model.logits(feats["test"]), multilabel),
                fitted,
            )
        return self.pixel_scores[key]

    def _features(self, init: Init, seed: int, pixels: Pixels, tokens: bool) -> tuple:
        key = (init.name, seed if init.path is None and not init.pixels else 0, pixels.key, tokens)
        if key not in self.store and init.pixels:
            patch = self.arch["patch_size"]
            kept = pixel_tokens(pixels.images, patch, self.norm.mean, self.norm.std) if tokens else None
            self.store[key] = (downsampled(pixels.images, self.pixel_size), kept)
        if key not in self.store:
            model = self.encoder(init, seed)
            self.store[key] = frozen_features(model, pixels.images, self.norm, tokens=tokens)
        return self.store[key]


def groups_of(protocol: str, inits: list[Init], seeds: tuple[int, ...]) -> list[list[tuple[Init, int]]]:
    """The runs of one label fraction that train together. The frozen-feature heads: every (init, seed) as one
    group (they share the cached features and the step count; a step of one head is mostly loop overhead on a
    CPU). Fine-tuning: one run per group (the ViT's arithmetic is the cost, and a group holds every member's
    weights and activations at once)."""
    members = [(init, seed) for init in inits for seed in seeds]
    if protocol == "finetune":
        return [[m] for m in members]
    if protocol == "linear_probe":  # the pixels row's classifier is no head: each of its runs alone
        heads = [m for m in members if not m[0].pixels]
        return [[m] for m in members if m[0].pixels] + ([heads] if heads else [])
    return [members]


def run_job(
    job: Job,
    inits: list[Init],
    reports: dict[str, LoadReport],
    arch: dict[str, Any],
    norm: Normalization,
    cfg: ProtocolConfig,
    log: Log,
    cache: FeatureCache,
) -> Iterator[dict[str, Any]]:
    """Result rows of every (protocol, init, fraction, seed) of `job`, in that order, a protocol at a time
    (the stage writes them); within a protocol the runs of one fraction train as groups (`groups_of`)."""
    grid = arch["img_size"] // arch["patch_size"]
    for protocol in job.protocols:
        rows: dict[tuple[str, int, int], dict[str, Any]] = {}
        for fraction in job.fractions:
            idx = torch.tensor(job.splits.fractions[fraction], dtype=torch.long)
            for group in groups_of(protocol, inits, job.seeds):
                desc = f"{job.splits.name} {protocol} {fraction}%"
                if len(group) == 1:
                    desc += f" {group[0][0].name} s{group[0][1]}"
                results = run_group(job, protocol, group, idx, cache, arch, grid, norm, cfg, desc)
                for (init, seed), (metric, value, fitted) in zip(group, results, strict=True):
                    log(
                        f"{job.splits.name} {protocol} {init.name} {fraction}% s{seed}: {metric} {value:.4f} "
                        f"(best epoch {fitted.best_epoch + 1}/{fitted.epochs_run})"
                    )
                    rows[(init.name, fraction, seed)] = {
                        "task": protocol,
                        "dataset": job.splits.name,
                        "fraction": fraction,
                        "init": init.name,
                        "seed": seed,
                        "metric": metric,
                        "value": float(value),
                        "checkpoint_hash": reports[init.name].content_hash,
                        "n_train": int(len(idx)),
                        "n_test": len(job.splits.test),
                        "best_epoch": fitted.best_epoch + 1,
                        "epochs_run": fitted.epochs_run,
                    }
        for init in inits:
            for fraction in job.fractions:
                for seed in job.seeds:
                    yield rows[(init.name, fraction, seed)]


def run_group(
    job: Job,
    protocol: str,
    members: list[tuple[Init, int]],
    idx: torch.Tensor,
    cache: FeatureCache,
    arch: dict[str, Any],
    grid: int,
    norm: Normalization,
    cfg: ProtocolConfig,
    desc: str,
) -> list[tuple[str, float, Any]]:
    """Train one head per (init, seed) member on the `idx` subset of train, choose each on val, score it on
    test: (metric, value, FitResult) per member."""
    splits, px = job.splits, job.pixels
    seeds = [seed for _, seed in members]
    names = [f"{init.name} s{seed}" for init, seed in members]
    if protocol in ("finetune", "linear_probe"):
        multilabel, n_classes = splits.multilabel, len(splits.classes)
        y = {s: labels_of(splits, s) for s in ("train", "val", "test")}
        metric = "auc" if multilabel else "accuracy"
        if members[0][0].pixels:
            return [(metric, *cache.pixel_classifier(px, y, idx, multilabel, n_classes, cfg))]
        if protocol == "finetune":
            if len(members) != 1:
                raise ValueError(
                    f"{desc}: fine-tuning trains one run at a time, got a group of {len(members)}"
                )
            ((init, seed),) = members
            torch.manual_seed(seed)
            model = downstream_vit(arch, n_classes, cfg.drop_path)
            load_init(model, init.path)
            torch.manual_seed(seed)
            init_head(model, cfg.head_init_std)
            train = (px["train"].images[idx], y["train"][idx])
            val = (px["val"].images, y["val"])
            if cfg.finetune_head == "linear_probe":
                probe_the_head(
                    model, train, val, multilabel, cfg.linear_probe, norm, seed, cfg.head_init_std, desc
                )
            fitted = finetune(model, train, val, multilabel, cfg.finetune, cfg.augment, norm, seed, desc)
            test_score = score(y["test"].numpy(), predict(model, px["test"].images, norm), multilabel)
            return [(metric, test_score, fitted)]
        feats = {
            s: [cache.pooled(init, seed, px[s]) for init, seed in members] for s in ("train", "val", "test")
        }
        heads, fits = linear_probe(
            ([f[idx] for f in feats["train"]], y["train"][idx]),
            (feats["val"], y["val"]),
            n_classes,
            multilabel,
            cfg.linear_probe,
            seeds,
            cfg.head_init_std,
            desc,
            names,
        )
        with torch.inference_mode():
            test = y["test"].numpy()
            return [
                (metric, score(test, head(f).numpy(), multilabel), fitted)
                for head, f, fitted in zip(heads, feats["test"], fits, strict=True)
            ]
    tokens = {
        s: [cache.tokens(init, seed, px[s]) for init, seed in members] for s in ("train", "val", "test")
    }
    if protocol == "segmentation":
        masks = {s: px[s].masks for s in ("train", "val", "test")}
        heads, fits = train_segmentation(
            ([t[idx] for t in tokens["train"]], masks["train"][idx]),
            (tokens["val"], masks["val"]),
            grid,
            arch["img_size"],
            cfg.segmentation.head,
            cfg.segmentation.fit,
            seeds,
            desc,
            names,
        )
        threshold = cfg.segmentation.head.threshold
        return [
            ("dice", mean_dice(predict_masks(head, t), masks["test"].numpy(), threshold), fitted)
            for head, t, fitted in zip(heads, tokens["test"], fits, strict=True)
        ]
    if protocol == "detection":
        heads, fits = train_detection(
            tokens, px, idx, grid, arch["img_size"], cfg.detection, seeds, desc, names
        )
        test_boxes = px["test"].boxes
        return [
            ("map", detection_scores(head, t, test_boxes, arch["img_size"], cfg.detection), fitted)
            for head, t, fitted in zip(heads, tokens["test"], fits, strict=True)
        ]
    raise ValueError(
        f"unknown protocol '{protocol}' (protocols: finetune, linear_probe, segmentation, detection)"
    )


@torch.inference_mode()
def detect(
    head: DetectionHead, tokens: torch.Tensor, img_size: int, cfg: DetectionConfig, batch: int = 128
) -> list:
    head.eval()
    found = []
    for i in range(0, len(tokens), batch):
        found += decode(head(tokens[i : i + batch]), img_size, cfg)
    return found


def detection_scores(
    head: DetectionHead, tokens: torch.Tensor, boxes: list[torch.Tensor], img_size: int, settings: DetSettings
) -> float:
    preds = [(b.numpy(), s.numpy()) for b, s in detect(head, tokens, img_size, settings.head)]
    return detection_map(preds, [b.numpy() for b in boxes], scored=settings.scored)


def train_detection(
    tokens: dict[str, list[torch.Tensor]],
    px: dict[str, Pixels],
    idx: torch.Tensor,
    grid: int,
    img_size: int,
    settings: DetSettings,
    seeds: Sequence[int],
    desc: str,
    names: Sequence[str] | None = None,
) -> tuple[list[DetectionHead], list[Any]]:
    """Train one YOLO head per member on its cached tokens (`tokens[split][g]`) of the `idx` subset, starting
    from `seeds[g]`; each chosen on validation mAP."""
    heads = []
    for t, seed in zip(tokens["train"], seeds, strict=True):
        torch.manual_seed(seed)
        heads.append(DetectionHead(t.shape[-1], grid, img_size, settings.head))
    train_tokens = [t[idx] for t in tokens["train"]]
    train_boxes = [px["train"].boxes[i] for i in idx.tolist()]

    def batch_loss(members: list[int], batches: list[torch.Tensor], gens: list[torch.Generator]) -> list:
        losses = []
        for g, batch in zip(members, batches, strict=True):
            if len(batch) == 1:  # BatchNorm in the head needs two samples in training mode
                batch = batch.repeat(2)
            outputs = heads[g](train_tokens[g][batch])
            losses.append(
                detection_loss(outputs, [train_boxes[i] for i in batch.tolist()], img_size, settings.head)
            )
        return losses

    def validate(members: list[int]) -> list[float]:
        return [
            detection_scores(heads[g], tokens["val"][g], px["val"].boxes, img_size, settings) for g in members
        ]

    return heads, fit(heads, batch_loss, validate, len(idx), settings.fit, seeds, desc, names)


@dataclass
class JobInputs:
    """Everything `run_job` reads besides the job itself: what a worker process needs, picklable."""

    inits: list[Init]
    reports: dict[str, LoadReport]
    arch: dict[str, Any]
    norm: Normalization
    cfg: ProtocolConfig


def run_job_in_worker(job: Job, inputs: JobInputs, threads: int) -> tuple[list[dict[str, Any]], list[str]]:
    """One dataset's rows and log lines, in a worker process with `threads` torch threads.

    Why a process: fine-tuning a small ViT and the probe's steps leave the second core idle (their matrices
    are too small to split), while another dataset's heads could use it. Each run is seeded by itself, so its
    numbers do not depend on the worker it lands on; only the thread count changes float reductions."""
    torch.set_num_threads(threads)
    lines: list[str] = []
    cache = FeatureCache(inputs.arch, inputs.norm, inputs.cfg.pixels.size)
    rows = list(
        run_job(job, inputs.inits, inputs.reports, inputs.arch, inputs.norm, inputs.cfg, lines.append, cache)
    )
    return rows, lines


def run_jobs_in_parallel(jobs: list[Job], inputs: JobInputs, workers: int, log: Log) -> list[dict[str, Any]]:
    """Rows of every job (in job order), up to `workers` datasets at a time, each worker with its share of the
    cores. Each worker extracts its own frozen features (no cache across processes). A job's log lines come
    when it finishes, at once."""
    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        running = [pool.submit(run_job_in_worker, job, inputs, threads) for job in jobs]
        names = ", ".join(job.splits.name for job in jobs)
        log(
            f"{names}: in {workers} worker processes, {threads} torch thread(s) each; a set's lines come "
            f"when it ends"
        )
        results = []
        for future in running:
            rows, lines = future.result()
            for line in lines:
                log(line)
            results += rows
    return results
