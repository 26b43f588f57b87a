"""Contract of the `evaluate` stage: one row per (task, dataset, label fraction, initialization, seed)."""

from __future__ import annotations

from typing import ClassVar, Literal

from data_contracts.base import Row


class EvalResult(Row):
    """A test-split score of one downstream run, chosen on validation.

    `checkpoint_hash` is the SHA-256 of the initialization's weights file ('random' for a random init,
    'pixels' for the no-encoder reference row), so a table row can always be traced to the exact encoder it
    measured. The `pixels` row's classifier has no epochs: its `best_epoch` / `epochs_run` are the chosen C's
    place in the grid (1-based) and the grid's length (`models.evaluate.baseline`).
    """

    contract: ClassVar[str] = "eval_results"
    version: ClassVar[int] = 1
    task: Literal["finetune", "linear_probe", "segmentation", "detection"]
    dataset: str
    fraction: int
    init: str
    seed: int
    metric: Literal["auc", "accuracy", "dice", "map"]
    value: float
    checkpoint_hash: str
    n_train: int
    n_test: int
    best_epoch: int
    epochs_run: int
