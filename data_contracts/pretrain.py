"""Contracts of the `pretrain_ecamp` stage: per-step loss curves and throughput, and the samples it could not use."""

from __future__ import annotations

from typing import ClassVar

from data_contracts.base import Row


class PretrainMetric(Row):
    """One optimiser step of ECAMP pre-training (losses averaged over the accumulated micro-batches and ranks).

    `samples_per_s` counts every sample of the step (batch × accumulation × world size) over the step's wall time;
    `sr` is 0 when the SR branch is switched off.
    """

    contract: ClassVar[str] = "pretrain_metrics"
    version: ClassVar[int] = 1
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


class PretrainReject(Row):
    """An image the stage left out of pre-training, with the reason (never dropped silently)."""

    contract: ClassVar[str] = "pretrain_rejects"
    version: ClassVar[int] = 1
    image_id: str
    study_id: str
    reason: str
