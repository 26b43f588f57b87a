"""Helpers shared by the trainers: checkpoint writes, and which weights went non-finite."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def non_finite(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in a state dict that hold NaN or ±inf."""
    return [
        name
        for name, value in state.items()
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def describe_names(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
