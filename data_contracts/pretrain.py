"""Contracts of the `pretrain_ecamp` stage: per-step loss curves and throughput, and the samples it could not
use."""

from __future__ import annotations

from typing import ClassVar

from data_contracts.base import Row


class PretrainMetric(Row):
    """One optimiser step of ECAMP pre-training (losses averaged over the accumulated micro-batches and
    ranks).

    `samples_per_s` counts every sample of the step (batch × accumulation × world size) over the step's wall
    time; `sr` is 0 when the SR branch is switched off.

    The `heldout_*` and `reliance_*` columns are set on the steps where the text side's image reliance was
    measured (the last step, and each epoch's last with `reliance_every_epoch`), null elsewhere and when no
    held-out pair exists (`models.ecamp.reliance`): masked-token accuracy and mean cross-entropy on the entity
    and descriptor tokens of held-out pairs, with the paired image and with another pair's image;
    `reliance_acc` = acc paired − acc mismatched, `reliance_loss` = loss mismatched − loss paired (both > 0
    when the MLM uses the image).
    """

    contract: ClassVar[str] = "pretrain_metrics"
    version: ClassVar[int] = 2
    step: int
    epoch: int
    mim: float
    sr: float
    mlm: float
    total: float
    lr: float
    grad_norm: float
    samples_per_s: float
    step_time_s: float
    heldout_tokens: int | None = None
    heldout_acc_paired: float | None = None
    heldout_acc_mismatched: float | None = None
    heldout_loss_paired: float | None = None
    heldout_loss_mismatched: float | None = None
    reliance_acc: float | None = None
    reliance_loss: float | None = None


class PretrainReject(Row):
    """An image the stage left out of pre-training, with the reason (never dropped silently)."""

    contract: ClassVar[str] = "pretrain_rejects"
    version: ClassVar[int] = 1
    image_id: str
    study_id: str
    reason: str
