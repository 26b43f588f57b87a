"""The downstream ViT, built from one initialization: random, an ECAMP export, or any timm-loadable
checkpoint.

Classification uses the paper's global feature f_v^g: timm's average of the patch tokens through a *fresh*
`fc_norm` (the official fine-tuning code deletes the pre-trained `norm`); the CLS token, never trained by
pre-training, is not used. The frozen tasks (linear probe, segmentation, detection) read the same model's
tokens. Every load says which keys it used and which it left, and a shape mismatch is an error: a silently
half-loaded encoder would be scored as if it were the pre-trained one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from timm.models.vision_transformer import VisionTransformer

from data_contracts.files import sha256_file
from models.checkpoints import CheckpointError, read_state_dict
from models.ecamp.export import FORMAT

PREFIXES = ("module.", "model.", "encoder.")


@dataclass(frozen=True)
class LoadReport:
    """What an initialization load did: the source, its content hash, and the keys it did not use or fill."""

    source: str
    content_hash: str
    loaded: int = 0
    missing: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{self.source}: {self.loaded} tensors loaded"]
        if self.missing:
            parts.append(f"fresh (not in the checkpoint): {', '.join(self.missing)}")
        if self.unused:
            shown = ", ".join(self.unused[:6]) + (
                f" … (+{len(self.unused) - 6})" if len(self.unused) > 6 else ""
            )
            parts.append(f"unused checkpoint keys: {shown}")
        return "; ".join(parts)


def export_arch(path: Path) -> dict[str, Any] | None:
    """The timm arguments in an ECAMP export's header, or None for any other file."""
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:  # a text, empty or cut-short file
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(err).strip()})") from None
    if meta.get("format") != FORMAT:
        return None
    return json.loads(meta["timm_kwargs"])


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """`models.checkpoints.read_state_dict` with the wrapper prefixes (`model.`, `encoder.`) removed too."""
    if not path.is_file():
        raise FileNotFoundError(f"initialization checkpoint not found: {path}")
    state = read_state_dict(path)
    out = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def downstream_vit(arch: dict[str, Any], num_classes: int = 0, drop_path: float = 0.0) -> VisionTransformer:
    """The fine-tuning ViT: average pooling of the patch tokens, fresh `fc_norm`, no final `norm`, a new
    head."""
    kwargs = {**arch, "global_pool": "avg", "fc_norm": True, "num_classes": num_classes}
    return VisionTransformer(**kwargs, drop_path_rate=drop_path)


def load_init(model: VisionTransformer, path: Path | None) -> LoadReport:
    """Load the encoder weights of `path` into `model` (None: keep the random init), reporting every key."""
    if path is None:
        return LoadReport("random init", "random", 0)
    state = read_state(path)
    target = model.state_dict()
    usable = {k: v for k, v in state.items() if k in target}
    if not usable:
        raise CheckpointError(
            f"{path}: no ViT encoder keys (e.g. 'blocks.0.attn.qkv.weight') in the checkpoint"
        )
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in usable.items()
        if v.shape != target[k].shape
    ]
    if wrong:
        raise CheckpointError(f"{path}: shape mismatch with the configured ViT: {'; '.join(wrong[:4])}")
    model.load_state_dict(usable, strict=False)
    missing = tuple(k for k in target if k not in usable)
    encoder_missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if encoder_missing:
        raise CheckpointError(
            f"{path}: encoder weights missing from the checkpoint: {', '.join(encoder_missing[:6])}"
        )
    unused = tuple(sorted(k for k in state if k not in target))
    notes = []
    if any(k.startswith("norm.") for k in unused):
        notes.append("pre-trained final norm replaced by a fresh fc_norm (official fine-tuning)")
    return LoadReport(str(path), sha256_file(path), len(usable), missing, unused, notes)
