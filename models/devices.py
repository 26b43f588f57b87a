"""Which torch device a stage runs on, from `run.device`."""

from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """`run.device` asks for a device this machine does not have."""


def resolve_device(setting: str) -> str:
    """`auto` picks CUDA when torch sees it; `cuda` without a CUDA device is a one-line error, not a crash
    deep inside the first `.to()`."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise DeviceError("run.device is 'cuda' but torch sees no CUDA device; use run.device=cpu or auto")
    return setting
