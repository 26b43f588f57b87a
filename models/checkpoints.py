"""Helpers shared by the trainers: checkpoint reads and writes, and which weights went non-finite.

Every torch file is read with `weights_only=True`: a pickle can name any Python callable, and loading a `.pth`
from the internet or from a run directory on shared storage must never run code. Our own checkpoints hold
only tensors and plain types, so they need nothing more; official MAE checkpoints also hold their training
arguments as an `argparse.Namespace`, the one global allowed besides torch's defaults.
"""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# torch's zip writer reports a failed write (a full disk, for a path) with these, not with an errno
TORCH_WRITE_FAILURES = ("inline_container.cc", "file write failed", "iostream error")


# the globals real weights files need beyond tensors and plain types (MAE's `args`)
TRUSTED_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


class CheckpointError(ValueError):
    """A weights or checkpoint file that cannot or may not be read: one line naming the file and why."""


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


def convert_command(path: Path) -> str:
    """The one-line command that writes a torch file's tensors to safetensors, which hold no code."""
    return f"python -m models.checkpoints convert '{path}'"


class Inert:
    """Stands in for a global that torch's weights-only unpickler does not know, so that a file's tensors can
    be read without constructing or calling anything else the file names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def load_as_data(path: Path) -> Any:
    """A torch file's contents with every global outside torch's weights-only safelist replaced by `Inert`.

    Still `weights_only=True`: torch keeps refusing the globals of modules that run code (`os`, `posix`,
    `subprocess`, ...), which no stand-in may replace, so a file that calls them stays unreadable.
    """
    unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    stand_ins = [(type("Inert", (Inert,), {}), name) for name in unknown]
    with torch.serialization.safe_globals([*TRUSTED_GLOBALS, *stand_ins]):
        return torch.load(path, map_location="cpu", weights_only=True)


def state_of(payload: Any) -> Any:
    """Where a torch file keeps its weights: MAE's `{"model": ...}`, our `{"state_dict": ...}`, or the file's
    top-level dict itself; None for a payload that is no dict."""
    if not isinstance(payload, dict):
        return None
    return payload.get("model", payload.get("state_dict", payload))


def convert_to_safetensors(path: Path, out: Path) -> int:
    """Write the tensors of `path` (`{"model": ...}`, `{"state_dict": ...}` or a flat dict) to `out`, reading
    the file as data only (`load_as_data`); the number of tensors written."""
    from safetensors.torch import save_file

    try:
        payload = load_as_data(path)
    except pickle.UnpicklingError as err:
        name = refused_global(str(err)) or first_line(err)
        raise CheckpointError(
            f"{path}: cannot be converted: it calls '{name}', which runs code; do not use this file"
        ) from None
    except (EOFError, RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable torch file ({first_line(err)})") from None
    state = state_of(payload)
    items = state.items() if isinstance(state, dict) else ()
    tensors = {k: v.detach().clone().contiguous() for k, v in items if torch.is_tensor(v)}
    if not tensors:
        raise CheckpointError(
            f"{path}: no tensors under 'model', 'state_dict' or the top level: nothing to convert"
        )
    save_file(tensors, str(out))
    return len(tensors)


def refused_global(message: str) -> str | None:
    """The global torch's weights-only unpickler refused, read from its error message."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    return found.group(1) if found else None


def load_torch_file(path: str | Path, remedy: str | None = None) -> Any:
    """A torch file's contents, read without running code (`weights_only=True` + `TRUSTED_GLOBALS`).

    A file that needs any other global gets a CheckpointError naming the file, the refused global and the
    command that converts its tensors to safetensors as data (or `remedy`, for a resume file, which is no
    weights file); there is deliberately no switch to load it anyway. An empty, truncated or non-torch file is
    a CheckpointError too, not torch's internal message.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(TRUSTED_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = refused_global(str(err))
        if name is None:
            raise CheckpointError(f"{path}: not a readable torch file ({first_line(err)})") from None
        remedy = remedy or (
            "convert it once to safetensors (its tensors are read as data; nothing it names is run) and use "
            f"that file instead: {convert_command(path)}"
        )
        raise CheckpointError(
            f"{path}: refused to load: it needs the Python global '{name}', which weights do not need and "
            f"which could run code on this machine; {remedy}"
        ) from None
    except (EOFError, RuntimeError, KeyError, ValueError, OSError) as err:
        if isinstance(err, OSError) and not path.is_file():
            raise
        why = "empty file" if path.stat().st_size == 0 else first_line(err) or type(err).__name__
        raise CheckpointError(
            f"{path}: not a readable torch file (truncated or another format: {why})"
        ) from None


def read_resume_file(path: str | Path, keys: tuple[str, ...], what: str, remedy: str) -> dict[str, Any]:
    """A trainer's own resume file, read without running code: a dict holding every one of `keys`, else a
    CheckpointError naming the file, `what` it is not, the keys it lacks and the `remedy`."""
    payload = load_torch_file(path, remedy=remedy)
    missing = [k for k in keys if k not in payload] if isinstance(payload, dict) else list(keys)
    if missing:
        raise CheckpointError(f"{path}: not a {what} (no {', '.join(repr(k) for k in missing)}); {remedy}")
    return payload


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors (ECAMP export, timm) or a torch file (official MAE `.pth`,
    `{"model": state}`; our own `{"state_dict": ...}`), with DDP's `module.` prefix removed.

    Torch files go through `load_torch_file`, so a file that would run code is refused. Any file that is not a
    state dict raises CheckpointError naming it.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a weights file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        state = state_of(load_torch_file(path))
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict (nor a dict with 'model' / 'state_dict' of tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a text, empty or truncated file is a CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(err)})") from None


def main(argv: list[str] | None = None) -> None:
    import argparse as ap

    parser = ap.ArgumentParser(
        prog="python -m models.checkpoints",
        description="Convert a torch weights file to safetensors, reading it as data (no code in it runs).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="write the tensors of a .pth/.pt file to a .safetensors file")
    convert.add_argument("path", type=Path)
    convert.add_argument("--out", type=Path, default=None, help="default: the same name with .safetensors")
    args = parser.parse_args(argv)
    out = args.out or args.path.with_suffix(".safetensors")
    try:
        n = convert_to_safetensors(args.path, out)
    except (CheckpointError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {out} ({n} tensors)")


if __name__ == "__main__":
    main()
