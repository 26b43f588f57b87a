"""The `pixels` reference row: what the downstream heads reach with no encoder at all, from the raw pixels.

Pre-training is worth something only if its features beat the pixels they were computed from, so every table
carries this row (a reviewer's scikit-learn logistic regression on 32×32 images beat every demo encoder):
- classification (both tables): scikit-learn's `LogisticRegression` (L2, lbfgs; one per class for multi-label
  sets, multinomial for multi-class ones) on the image downsampled to `size`×`size` grey levels (area average
  of the decoded input), each pixel standardised with the statistics of the run's training subset; the inverse
  regularisation C is chosen on the validation score from `c_grid`, as the other rows choose their epoch.
  Why not the linear probe's own loop: with a step budget it under-fits on a thousand pixels unless its
  optimiser is tuned per dataset (the tests' constructed set: test AUC 0.85-0.91 for AdamW at lr 1e-3 to 3e-2
  and 100 steps, 1.00 for lbfgs at any C), while the exact, convex, deterministic fit has nothing to tune but
  C (demo classification, 100 %: 77.9 / 77.4 / 75.2 AUC at C = 0.005 / 0.05 / 0.5). It does not depend
  on the seed, so it is fitted once per label subset and the same number stands in the fine-tune table too:
  there is no encoder to fine-tune. For this row `best_epoch` is the chosen C's place in the grid.
- segmentation and detection: the protocol's own head, trained the same way, on "pixel tokens": each token is
  the normalised grey patch at that grid cell (patch_size² values, the ViT's patch embedding left out), so the
  row says what the head learns from pixels alone, and the encoder rows what the encoder adds to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from models.evaluate.classify import score
from models.evaluate.fit import FitResult

PIXELS = "pixels"


class PixelBaseline(BaseModel):
    """How the `pixels` row's classifier reads and is regularised (the dense tasks use their own head
    settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(32, ge=1, description="side of the downsampled grey image the linear classifier reads")
    c_grid: tuple[float, ...] = Field(
        (0.005, 0.05, 0.5),
        min_length=1,
        description="LogisticRegression inverse L2 strengths tried; the best on validation is kept",
    )
    max_iter: int = Field(1000, ge=1, description="lbfgs iterations per fit")

    @field_validator("c_grid")
    @classmethod
    def _positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if bad := [c for c in value if not c > 0]:
            raise ValueError(f"c_grid holds inverse regularisation strengths > 0, got {bad}")
        return value


def downsampled(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, S, S] -> float [N, size²] in [0, 1]: the area average of each size×size cell (S ≥ size)."""
    if images.shape[-1] < size:
        raise ValueError(f"pixels baseline: images of {images.shape[-1]} px cannot be downsampled to {size}")
    x = images.float().unsqueeze(1) / 255.0
    return F.adaptive_avg_pool2d(x, size).flatten(1)


def pixel_tokens(images: torch.Tensor, patch: int, mean: float, std: float) -> torch.Tensor:
    """uint8 [N, S, S] -> float [N, (S/p)², p²]: normalised grey patches in the ViT's row-major token
    order."""
    n, size = images.shape[0], images.shape[-1]
    if size % patch:
        raise ValueError(f"pixels baseline: {size} px is not a multiple of the patch size {patch}")
    g = size // patch
    x = (images.float() / 255.0 - mean) / std
    return x.reshape(n, g, patch, g, patch).permute(0, 1, 3, 2, 4).reshape(n, g * g, patch * patch)


@dataclass
class PixelClassifier:
    """A fitted scaler and one scikit-learn model per class (multi-label) or one multinomial model; a class
    the training subset never shows (or always shows) gets a constant logit."""

    scaler: StandardScaler
    models: list[
        LogisticRegression | float
    ]  # multi-label: one per class; multi-class: one; a float: the label
    # value the training subset always has (a constant logit; multi-class: that class is always predicted)
    multilabel: bool
    num_classes: int

    def logits(self, feats: torch.Tensor) -> np.ndarray:
        """[N, C] scores: decision functions (multi-label), log-probabilities (multi-class)."""
        x = self.scaler.transform(feats.numpy())
        if self.multilabel:
            return np.stack(
                [np.full(len(x), m) if isinstance(m, float) else m.decision_function(x) for m in self.models],
                axis=1,
            )
        out = np.full((len(x), self.num_classes), -1e9)
        model = self.models[0]
        if isinstance(model, float):  # one class only in training: it is always predicted
            out[:, int(model)] = 0.0
        else:
            out[:, model.classes_.astype(int)] = model.predict_log_proba(x)
        return out


def fit_linear(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> LogisticRegression | float:
    """One L2 logistic regression, or the constant logit when `y` holds a single value (sklearn refuses
    it)."""
    values = np.unique(y)
    if len(values) == 1:
        return float(values[0])
    return LogisticRegression(C=c, max_iter=max_iter).fit(x, y)


def fit_pixel_classifier(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    multilabel: bool,
    cfg: PixelBaseline,
) -> tuple[PixelClassifier, FitResult]:
    """Standardise with the training subset, fit one model per C of the grid, keep the best on validation."""
    feats, labels = train
    scaler = StandardScaler().fit(feats.numpy())
    x, y = scaler.transform(feats.numpy()), labels.numpy()
    val_labels = val[1].numpy()
    best: tuple[float, int, PixelClassifier] | None = None
    for i, c in enumerate(cfg.c_grid):
        if multilabel:
            models = [fit_linear(x, y[:, k], c, cfg.max_iter) for k in range(num_classes)]
        else:
            models = [fit_linear(x, y.reshape(-1).astype(int), c, cfg.max_iter)]
        model = PixelClassifier(scaler, models, multilabel, num_classes)
        value = score(val_labels, model.logits(val[0]), multilabel)
        if best is None or value > best[0]:
            best = (value, i, model)
    assert best is not None  # c_grid is never empty
    return best[2], FitResult(best[0], best[1], len(cfg.c_grid))
