"""Exact resume: the one checkpoint format every trainer writes, and the one rule for reading it back.

A resume checkpoint holds the model, optimiser and schedule, the trainer's own counters (`state`), every
random generator's state for every rank (Python, NumPy, torch, CUDA), the world size and a fingerprint of what
was trained (settings and data). A run that finds one continues exactly where it stopped.

A checkpoint whose fingerprint or world size differs from this run's is not resumed: the trainer logs a
warning naming the settings that differ and starts over, and its first save replaces the file. Stages keep
their checkpoints across runs, so a changed setting (another learning rate, other data) must start a new
training, not fail the stage nor continue the old one. A file that is not a resume checkpoint at all is an
error: it is someone else's file, and nothing overwrites it.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.checkpoints import describe_names, non_finite, read_resume_file, save_atomic
from models.engine.distributed import DistInfo, gather_objects

RESUME_KEYS = ("model", "optimizer", "scheduler", "state", "rng", "fingerprint", "world")
RESUME_FORMAT = 1  # raised when the payload changes; a file name keyed on it leaves older files behind


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (every device) from one seed: every rank builds the same initial model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain types, so the checkpoint loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, keys.tolist(), pos, has_gauss, cached]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(value: Any) -> Any:
    """JSON's view of a fingerprint (tuples and lists alike), so a saved one compares equal to a fresh one."""
    return json.loads(json.dumps(value, default=str))


def changed_keys(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fingerprint entries that differ (a whole value where the two are not both
    dicts)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += changed_keys(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [prefix.rstrip(".") or "fingerprint"]


def read_checkpoint(path: Path, what: str) -> dict[str, Any]:
    """A resume checkpoint of `what` ("ECAMP pre-training"), read without running code; anything else is a
    CheckpointError naming the file, the keys it lacks and how to start over."""
    return read_resume_file(
        path, RESUME_KEYS, f"resume checkpoint of {what}", f"delete it to start {what} over"
    )


class ResumeFile:
    """One trainer's resume checkpoint: `load` restores a matching one, `save` writes it atomically.

    `what` names the training in messages ("ECAMP pre-training"); `fingerprint` is what must not change for
    the file to be resumed (settings that change no step, such as worker counts or the checkpoint cadence,
    stay out).
    """

    def __init__(
        self, path: Path, what: str, fingerprint: dict[str, Any], info: DistInfo, log: logging.Logger
    ):
        self.path, self.what, self.info, self.log = Path(path), what, info, log
        self.fingerprint = plain(fingerprint)

    def load(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> dict[str, Any] | None:
        """The trainer's saved `state`, with model, optimiser, schedule and this rank's RNGs restored; None
        when there is no checkpoint or it was made with other settings (see the module docstring)."""
        if not self.path.exists():
            return None
        payload = read_checkpoint(self.path, self.what)
        differ = changed_keys(plain(payload["fingerprint"]), self.fingerprint)
        if payload["world"] != self.info.world:
            differ.append(f"world size {payload['world']} → {self.info.world}")
        if differ:
            self.log.warning(
                "%s was made with other settings (%s): starting from scratch",
                self.path,
                describe_names(differ, 6),
            )
            return None
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"][self.info.rank])
        return payload["state"]

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        state: dict[str, Any],
    ) -> None:
        """Called on every rank (each contributes its RNG state); rank 0 writes. A model gone non-finite is
        refused and the previous checkpoint kept: resuming it would only repeat the failure."""
        rngs = gather_objects(rng_state(), self.info)
        if not self.info.main:
            return
        weights = model.state_dict()
        broken = non_finite(weights)
        if broken:
            raise FloatingPointError(
                f"refusing to save checkpoint {self.path}: non-finite weights in {describe_names(broken)}"
            )
        payload = {
            "model": weights,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state,
            "rng": rngs,
            "world": self.info.world,
            "fingerprint": self.fingerprint,
        }
        save_atomic(payload, self.path)
