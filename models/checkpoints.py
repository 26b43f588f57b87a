"""Helpers shared by the trainers: checkpoint writes, and which weights went non-finite."""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# torch's zip writer reports a failed write (a full disk, for a path) with these, not with an errno
TORCH_WRITE_FAILURES = ("inline_container.cc", "file write failed", "iostream error")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written: the message names the file and says why, in one line."""


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


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT from Python, or torch's own wording for a write that did not go through."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, RuntimeError) and any(s in str(err) for s in TORCH_WRITE_FAILURES)


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """torch.save to `<name>.tmp`, then rename: a crash mid-write leaves the previous checkpoint intact.

    The file is written through a Python file object so a full disk surfaces as ENOSPC rather than as torch's
    `enforce fail at inline_container.cc`; either way the partial temp file is removed and the error says so.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise CheckpointWriteError(disk_full_message(path, err)) from err
        raise


def disk_full_message(path: Path, err: BaseException) -> str:
    torch_says = f" (torch: {str(err).splitlines()[0]})" if isinstance(err, RuntimeError) else ""
    return (
        f"no space left on device writing checkpoint {path}{torch_says}; the partial file was removed and "
        "any previous checkpoint is intact: free space and rerun to resume"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors (ECAMP export, timm) or a torch file (official MAE `.pth`,
    `{"model": state}`; our own `{"state_dict": ...}`), with DDP's `module.` prefix removed.

    Official MAE checkpoints also hold an argparse Namespace, so the torch file is read with
    weights_only=False: load only files you trust. A payload with no state dict raises ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        state = (
            payload.get("model", payload.get("state_dict", payload)) if isinstance(payload, dict) else None
        )
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict (nor a dict with 'model' / 'state_dict')")
    return {k.removeprefix("module."): v for k, v in state.items()}
