"""Does the text side read the image? Masked-token accuracy with the paired image vs with another pair's
image.

The MLM can learn to fill entity and descriptor words from the report alone (the corpus's habits) and never
use the visual features MSCF hands it; then the text side adds nothing to the encoder. Measured on held-out
pairs, without gradient: each batch's entity and descriptor tokens that the masking hides are predicted twice,
once with each report's own image and once with the batch's images rolled by one (every report gets another
study's image), with the same text masking and the same patch masks, so the image is the only difference.
Reliance is the drop: accuracy paired − mismatched, and loss mismatched − paired (both ~0 for a text side that
ignores the image, and exactly 0 when every image is the same).

Held-out pairs keep one image per study (the views of one study share a report: rolled onto each other they
would not be mismatched), are shuffled by the seed (the images table lists a study's views together) and
capped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from models.ecamp.model import ECAMP
from models.text.masking import IGNORE_INDEX, TextCollator

RELIANCE_KEYS = (
    "heldout_tokens",
    "heldout_acc_paired",
    "heldout_acc_mismatched",
    "heldout_loss_paired",
    "heldout_loss_mismatched",
    "reliance_acc",
    "reliance_loss",
)


class HasStudy(Protocol):
    study_id: str


R = TypeVar("R", bound=HasStudy)


@dataclass(frozen=True)
class HeldOutBatch:
    """One held-out batch, fixed for the whole run: low-res images, the masked text, and which positions
    count."""

    imgs_lr: torch.Tensor  # [B, C, S, S], normalised as in training, no augmentation
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], -100 where nothing is predicted
    focus: torch.Tensor  # [B, L] bool: masked entity or descriptor pieces


def heldout_records(records: Sequence[R], seed: int, max_pairs: int) -> list[R]:
    """One record per study (the first), in a seeded random order, at most `max_pairs`."""
    first: dict[str, R] = {}
    for rec in records:
        first.setdefault(rec.study_id, rec)
    chosen = list(first.values())
    order = np.random.default_rng([seed, 1]).permutation(len(chosen))
    return [chosen[i] for i in order[:max_pairs]]


def heldout_batches(
    images: Sequence[torch.Tensor],
    texts: Sequence[tuple[str, str | None]],
    collator: TextCollator,
    seed: int,
    batch_size: int,
) -> list[HeldOutBatch]:
    """Batches of at least two pairs (a roll of one pair would pair it with itself); masking seeded per
    batch."""
    if len(images) != len(texts):
        raise ValueError(f"held-out pairs: {len(images)} images but {len(texts)} texts")
    if len(images) < 2:
        return []
    size = max(2, batch_size)
    starts = list(range(0, len(images), size))
    if len(images) - starts[-1] == 1:  # a last batch of one joins the one before
        starts.pop()
    ends = [*starts[1:], len(images)]
    batches = []
    for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
        masked = collator.mask(list(texts[a:b]), np.random.default_rng([seed, 2, i]))
        tensors = masked.as_tensors()
        focus = np.zeros(tensors["labels"].shape, dtype=bool)
        width = masked.masked.shape[1]
        focus[:, :width] = (
            masked.masked & (masked.entity | masked.descriptor) & (masked.labels != IGNORE_INDEX)
        )
        batches.append(
            HeldOutBatch(
                torch.stack(list(images[a:b])),
                tensors["input_ids"],
                tensors["attention_mask"],
                tensors["labels"],
                torch.from_numpy(focus),
            )
        )
    return batches


@torch.no_grad()
def measure_reliance(
    model: ECAMP, batches: Sequence[HeldOutBatch], device: torch.device, seed: int
) -> dict[str, Any]:
    """The `RELIANCE_KEYS` of `model` on `batches` (nothing when it has no text side or no batch).

    Runs in eval mode (no dropout) under a forked RNG, so training resumes with the draws it would have
    had."""
    if model.text is None or not batches:
        return {}
    was_training = model.training
    model.eval()
    n, correct, loss = 0, [0, 0], [0.0, 0.0]
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        for i, batch in enumerate(batches):
            focus = batch.focus.to(device)
            labels = batch.labels.to(device)[focus]
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            paired = batch.imgs_lr.to(device)
            for j, imgs in enumerate((paired, paired.roll(1, dims=0))):
                torch.manual_seed(seed + i)  # the same patch masks for both images
                logits = model.mlm_logits(imgs, ids, mask, focus).float()
                correct[j] += int((logits.argmax(-1) == labels).sum())
                loss[j] += float(F.cross_entropy(logits, labels, reduction="sum"))
            n += int(labels.numel())
    model.train(was_training)
    if n == 0:
        return {"heldout_tokens": 0}
    acc, mean_loss = [c / n for c in correct], [v / n for v in loss]
    return {
        "heldout_tokens": n,
        "heldout_acc_paired": acc[0],
        "heldout_acc_mismatched": acc[1],
        "heldout_loss_paired": mean_loss[0],
        "heldout_loss_mismatched": mean_loss[1],
        "reliance_acc": acc[0] - acc[1],
        "reliance_loss": mean_loss[1] - mean_loss[0],
    }


def reliance_line(row: dict[str, Any]) -> str:
    """One log line of a measured step."""
    if row.get("heldout_acc_paired") is None:
        return (
            f"image reliance at step {row['step']}: no masked entity/descriptor token in the held-out pairs"
        )
    return (
        f"image reliance at step {row['step']} ({row['heldout_tokens']} held-out entity/descriptor tokens): "
        f"acc {row['heldout_acc_paired']:.3f} paired vs {row['heldout_acc_mismatched']:.3f} mismatched "
        f"(+{row['reliance_acc']:.3f}), loss {row['heldout_loss_paired']:.3f} vs "
        f"{row['heldout_loss_mismatched']:.3f} (+{row['reliance_loss']:.3f})"
    ).replace("+-", "-")
