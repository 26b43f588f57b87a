"""Export the pre-trained ECAMP encoder as safetensors that timm's `VisionTransformer` loads with strict=True.

The encoder's parameter names already equal timm's, so the file is the encoder state dict plus a header saying
which timm model to build (`timm_kwargs`). Downstream code (and users) call `load_timm_encoder(path)`; the
fixed sin-cos position embeddings travel as timm's learnable `pos_embed`, and there is no classifier head
(num_classes=0), so fine-tuning adds its own. The header asks for average pooling of the patch tokens (the
paper's global feature f_v^g; the CLS token is never trained by pre-training); `models.evaluate.encoders`
builds the fine-tuning model with a fresh `fc_norm` instead of the pre-trained `norm`, as the official
fine-tuning code does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save
from timm.models.vision_transformer import VisionTransformer

from models.checkpoints import describe_names, non_finite
from models.ecamp.model import ECAMP, ECAMPConfig

FORMAT = "ecamp-vit-encoder/1"


def timm_kwargs(cfg: ECAMPConfig) -> dict[str, Any]:
    """Arguments of the timm `VisionTransformer` with exactly the encoder's parameters (no head)."""
    return {
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "in_chans": cfg.in_chans,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "qkv_bias": True,
        "num_classes": 0,
        # downstream feature = mean of the patch tokens (paper §3.4 f_v^g); CLS is untrained
        "global_pool": "avg",
        # keep the pre-trained final `norm` on every token, then average: a strict load works
        "fc_norm": False,
        "class_token": True,
    }


def export_encoder(model: ECAMP, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the encoder weights to `path` (.safetensors) with the timm arguments and `extra` in the header.

    Non-finite weights are refused: a NaN encoder loads fine downstream and only fails there, far from the
    cause.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
    broken = non_finite(state)
    if broken:
        raise FloatingPointError(
            f"refusing to export {path}: non-finite encoder weights in {describe_names(broken)} "
            f"({len(broken)} of {len(state)} tensors)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "timm_kwargs": json.dumps(timm_kwargs(model.cfg)),
        "ecamp_config": model.cfg.model_dump_json(),
        **{k: json.dumps(v) for k, v in (extra or {}).items()},
    }
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_bytes(with_sorted_metadata(save(state, metadata=metadata)))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a partial file next to the export
        raise
    return path


def with_sorted_metadata(blob: bytes) -> bytes:
    """The same safetensors file with its `__metadata__` keys in sorted order.

    safetensors writes the metadata from a hash map, so two saves of the same weights and header differ in key
    order, and so in file hash; a downstream stage would then rerun for an identical encoder. Tensor entries
    and offsets are kept as written (they are already in a fixed order), and the header is padded to 8 bytes
    as safetensors pads it.
    """
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + size :]


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not an ECAMP encoder export (format {metadata.get('format')!r}, want {FORMAT!r})"
        )
    return metadata


def load_timm_encoder(path: str | Path, **overrides: Any) -> VisionTransformer:
    """Build the matching timm VisionTransformer and load the exported weights strictly.

    `overrides` change timm arguments that add no parameters (e.g. drop_path_rate, global_pool="avg").
    """
    kwargs = {**json.loads(read_metadata(path)["timm_kwargs"]), **overrides}
    model = VisionTransformer(**kwargs)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def write_model_card(
    path: str | Path,
    cfg: ECAMPConfig,
    facts: dict[str, Any],
    losses: list[dict[str, float]],
    lineage: dict[str, Any] | None = None,
) -> Path:
    """A short markdown card: what the weights are, how to load them, how they were trained, the loss curve
    ends."""
    path = Path(path)
    lines = [
        "# ECAMP pre-trained ViT encoder",
        "",
        "ViT encoder pre-trained with ECAMP (masked image modelling, context-guided super-resolution and "
        "entity-centred masked language modelling with multi-scale context fusion).",
        "",
        "## Load",
        "```python",
        "from models.ecamp.export import load_timm_encoder",
        "vit = load_timm_encoder('encoder.safetensors')  # timm VisionTransformer, strict load, no head",
        "```",
        "",
        "## Architecture",
        f"- ViT: img {cfg.img_size}, patch {cfg.patch_size}, width {cfg.embed_dim}, depth {cfg.depth}, "
        f"heads {cfg.num_heads}; fixed 2-D sin-cos position embeddings",
        f"- pre-training heads (not exported): decoder "
        f"{cfg.decoder_embed_dim}/{cfg.decoder_depth}/{cfg.decoder_num_heads}, SR "
        f"{'on' if cfg.sr else 'off'} at {cfg.hr_size}, text BERT {cfg.text_layers}×{cfg.text_hidden} "
        f"({cfg.text_heads} heads, FFN {cfg.text_ffn}), vocab {cfg.vocab_size}",
        f"- MSCF local {cfg.mscf_local}, global {cfg.mscf_global}; mask ratio {cfg.mask_ratio}",
        "",
        "## Training",
        *[f"- {k}: {v}" for k, v in facts.items()],
    ]
    if losses:
        first, last = losses[0], losses[-1]
        lines += [
            "",
            "## Losses (first → last optimiser step)",
            "",
            "| loss | first | last |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {first[k]:.4f} | {last[k]:.4f} |" for k in ("mim", "sr", "mlm", "total")]
        lines += reliance_lines(losses)
    if lineage:
        lines += lineage_lines(lineage)
    path.write_text("\n".join(lines) + "\n")
    return path


def reliance_lines(metrics: list[dict[str, Any]]) -> list[str]:
    """The card's image reliance of the text side: its last measurement (`models.ecamp.reliance`)."""
    measured = [m for m in metrics if m.get("heldout_acc_paired") is not None]
    if not measured:
        why = "no held-out pair" if not any("heldout_tokens" in m for m in metrics) else "no masked token"
        return ["", "## Image reliance of the text side", "", f"Not measured ({why})."]
    m = measured[-1]
    return [
        "",
        "## Image reliance of the text side",
        "",
        f"Masked entity and descriptor tokens of held-out pairs ({m['heldout_tokens']} tokens, step "
        f"{m['step']}), predicted with the paired image and with another pair's image (the batch rolled by "
        f"one):",
        "",
        "| | paired | mismatched | reliance |",
        "|---|---|---|---|",
        f"| accuracy | {m['heldout_acc_paired']:.4f} | {m['heldout_acc_mismatched']:.4f} | "
        f"{m['reliance_acc']:+.4f} |",
        f"| loss | {m['heldout_loss_paired']:.4f} | {m['heldout_loss_mismatched']:.4f} | "
        f"{m['reliance_loss']:+.4f} |",
    ]


def lineage_lines(lineage: dict[str, Any]) -> list[str]:
    """The card's provenance: the run that made the weights and the SHA-256 of every artifact it read."""
    lines = [
        "",
        "## Lineage",
        "",
        f"- run id: `{lineage.get('run_id')}`; run directory: `{lineage.get('run_dir')}`",
        f"- stage `{lineage.get('stage')}`, code `{lineage.get('code_version')}`, config "
        f"`{lineage.get('config_hash')}`",
        "",
        "| read | SHA-256 |",
        "|---|---|",
    ]
    reads = {**lineage.get("upstream", {}), **lineage.get("inputs", {})}
    return lines + [f"| `{ref}` | `{digest}` |" for ref, digest in reads.items()]
