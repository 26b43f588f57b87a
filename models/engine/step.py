"""What every optimiser step needs whatever the model: mixed precision, the non-finite guard, the update
itself, and progress lines a person reads."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

Amp = Annotated[
    Literal["auto", "bf16", "off"],
    Field(
        description="bf16 autocast on the training device (CUDA or CPU); auto = bf16 on CUDA, fp32 on CPU "
        "(a CPU without AVX512-BF16/AMX runs bf16 slower than fp32)"
    ),
]  # every trainer's `amp` setting


def autocast_for(amp: str, device: torch.device) -> torch.autocast:
    """bf16 autocast on the device's type (torch.autocast("cpu") on CPU), on when `amp` asks for it: "bf16",
    or "auto" on CUDA (a CPU without AVX512-BF16/AMX runs bf16 slower than fp32)."""
    on = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


@dataclass
class StepGuard:
    """Stops before an optimiser step that would write NaN/inf into the weights, naming the trainer, where the
    run is (1-based step) and every non-finite loss; `losses["total"]` (or the first loss) is the one
    quoted."""

    what: str
    losses: dict[str, float]
    epoch: int
    step: int

    def check(self, grad_norm: float) -> None:
        where = f"at epoch {self.epoch}, step {self.step}"
        bad = [f"{k}={v}" for k, v in self.losses.items() if not math.isfinite(v)]
        if bad:
            total = self.losses.get("total", next(iter(self.losses.values())))
            raise FloatingPointError(
                f"{self.what} loss is {total} {where} (non-finite: {', '.join(bad)}); "
                "lower the learning rate or check the inputs"
            )
        if not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"{self.what} gradient norm is {grad_norm} {where} (losses finite); "
                "lower the learning rate or check the inputs"
            )


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    clip: float | None,
    guard: StepGuard,
) -> tuple[float, float]:
    """Clip (or only measure) the gradient norm, refuse a non-finite step (`StepGuard`), update, clear
    the gradients, advance the schedule. Returns (the lr the step ran at, the gradient norm before
    clipping)."""
    grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf")))
    guard.check(grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return lr, grad_norm


class ProgressLog:
    """A line to the run log at most every `every_s` seconds (and whenever forced, e.g. at the last step):
    every step is in the metrics, and a run log of one line per step is one nobody reads."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter, every_s: float, enabled: bool = True):
        self.log, self.every_s, self.enabled = log, every_s, enabled
        self.last = time.monotonic()

    def __call__(self, line: Callable[[], str], force: bool = False) -> None:
        if self.enabled and (force or time.monotonic() - self.last >= self.every_s):
            self.log.info(line())
            self.last = time.monotonic()
