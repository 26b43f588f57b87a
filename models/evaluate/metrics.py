"""Downstream metrics as the ECAMP fine-tuning code computes them (REFERENCE.md §3), from well-kept libraries.

Classification: mean per-class ROC AUC (multi-label) or accuracy (multi-class), via scikit-learn.
Segmentation: per-image Dice with the official empty-mask rule, averaged over images.
Detection: torchmetrics' COCO-style mAP over IoU 0.40..0.75, single class, with the official code's
image-filtering quirk available as `scored="official"` so our numbers can be compared with the paper's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import accuracy_score, roc_auc_score
from torchmetrics.detection import MeanAveragePrecision

# 0.40, 0.45, ..., 0.75 as exact two-decimal floats (a running sum of 0.05 drifts off them).
OFFICIAL_IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.40 + 0.05 * i, 2) for i in range(8))

Prediction = tuple[np.ndarray, np.ndarray]  # boxes [K, 4] xyxy, scores [K]


def mean_auc(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, dict[int, float]]:
    """Mean ROC AUC over the classes that can be scored, and the per-class AUCs.

    A class whose column holds only positives or only negatives has no AUC; it is left out of both the
    mean and the dict (rather than counted as 0.5 or crashing). [N] 1-D input is one binary class.
    """
    truth = np.asarray(y_true)
    prob = np.asarray(scores, dtype=np.float64)
    if truth.ndim == 1:
        truth, prob = truth[:, None], prob.reshape(-1, 1)
    if truth.shape != prob.shape or truth.ndim != 2:
        raise ValueError(f"y_true {truth.shape} and scores {prob.shape} must both be [N, C] (or both [N])")
    per_class = {
        c: float(roc_auc_score(truth[:, c], prob[:, c]))
        for c in range(truth.shape[1])
        if len(np.unique(truth[:, c])) == 2
    }
    if not per_class:
        raise ValueError("no class can be scored: every class has only positives or only negatives")
    return float(np.mean(list(per_class.values()))), per_class


def accuracy(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Share of samples whose highest-scoring class is the true class index (multi-class tasks)."""
    truth = np.asarray(y_true)
    prob = np.asarray(scores)
    if truth.ndim != 1 or prob.ndim != 2 or len(truth) != len(prob):
        raise ValueError(f"y_true must be [N] and scores [N, C]; got {truth.shape} and {prob.shape}")
    return float(accuracy_score(truth, prob.argmax(axis=1)))


def dice_per_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice 2|P∩T| / (|P|+|T|) of each image; [N] floats.

    Official rule (`train.py::get_dice`): an image with empty truth scores 1.0 when the prediction is
    empty too and 0.0 otherwise, so negative images reward predicting nothing.
    """
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"pred and truth must both be [N, H, W]; got {p.shape} and {t.shape}")
    inter = (p & t).sum(axis=(1, 2)).astype(np.float64)
    total = (p.sum(axis=(1, 2)) + t.sum(axis=(1, 2))).astype(np.float64)
    dice = np.divide(2.0 * inter, total, out=np.zeros_like(total), where=total > 0)
    dice[total == 0] = 1.0  # both empty; empty truth with a prediction already gives 2*0/|P| = 0
    return dice


def mean_dice(prob: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    """Mean per-image Dice of probabilities thresholded at `threshold` (strictly above = lesion)."""
    return float(dice_per_image(np.asarray(prob) > threshold, truth).mean())


def detection_map(
    preds: Sequence[Prediction],
    truths: Sequence[np.ndarray],
    iou_thresholds: Sequence[float] = OFFICIAL_IOU_THRESHOLDS,
    scored: Literal["all", "official"] = "all",
) -> float:
    """Single-class COCO mAP (101-point AP averaged over `iou_thresholds`) via torchmetrics.

    `scored="all"` gives every image to the metric: predictions on an image without truth are false
    positives and truth boxes without a prediction are misses. `scored="official"` reproduces the
    ECAMP detection code, which only adds images having at least one prediction AND at least one truth
    box, so missed lesions and false alarms on negative images cost nothing and mAP is inflated.
    Returns 0.0 (not torchmetrics' -1) when nothing can be scored: no image kept, or no truth box at all.
    """
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions but {len(truths)} ground truths")
    if scored not in ("all", "official"):
        raise ValueError(f"scored must be 'all' or 'official', not {scored!r}")
    pred_dicts, truth_dicts = [], []
    for (boxes, box_scores), truth in zip(preds, truths, strict=True):
        p = _boxes_tensor(boxes)
        t = _boxes_tensor(truth)
        if scored == "official" and (len(p) == 0 or len(t) == 0):
            continue
        s = torch.as_tensor(np.asarray(box_scores, dtype=np.float32).reshape(-1))
        if len(s) != len(p):
            raise ValueError(f"{len(p)} predicted boxes but {len(s)} scores")
        pred_dicts.append({"boxes": p, "scores": s, "labels": torch.zeros(len(p), dtype=torch.long)})
        truth_dicts.append({"boxes": t, "labels": torch.zeros(len(t), dtype=torch.long)})
    if not truth_dicts or all(len(t["boxes"]) == 0 for t in truth_dicts):
        return 0.0
    metric = MeanAveragePrecision(iou_thresholds=[float(x) for x in iou_thresholds])
    metric.update(pred_dicts, truth_dicts)
    return max(0.0, float(metric.compute()["map"]))


def _boxes_tensor(boxes: np.ndarray) -> torch.Tensor:
    array = np.asarray(boxes, dtype=np.float32)
    if array.size == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must be [K, 4] x1, y1, x2, y2; got shape {array.shape}")
    return torch.as_tensor(array)
