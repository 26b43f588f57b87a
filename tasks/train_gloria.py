"""Stage 6, `train_gloria`: re-train GLoRIA on (distilled) reports, then entity attention maps and SR windows.

images + report text (distilled, or original as a documented fallback) -> decode every image once into a
square uint8 array (unreadable ones become `rejects`) -> WordPiece tokenizer -> GLoRIA training (resumable)
-> per image: attention of its positive entity words (from `match_entities/entity_mentions`) on the ViT grid
-> SR window (k×k box-filter argmax; no positive entity: `fallback`) -> `attention_maps`, `losses`, Fig.
6-style overlays, and, where lesion boxes are known (demo corpus), `localization` against a random-window
baseline. Demo-scale options (paper defaults off): cosine attention scores, a local loss on affirmed-finding
words only (`local_words`, from the same match_entities polarity that picks the attention words), and a
per-word prior (`word_prior_images`). Lesion boxes are only ever used for the localization score.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from data_contracts.gloria import AttentionMap, GloriaLoss, Localization
from data_contracts.reports import Reject
from models.devices import resolve_device
from models.engine.resume import RESUME_FORMAT
from models.filenames import printable, safe_stem
from models.gloria.attention import (
    ANATOMY_ENTITIES,
    best_windows,
    fallback_windows,
    save_overlay,
)
from models.gloria.images import decode_images
from models.gloria.lesions import read_lesion_boxes, score_localization, unit_boxes
from models.gloria.model import (
    RANDOM_INIT,
    Gloria,
    GloriaConfig,
    bert_dims,
    check_initializations,
    chosen,
    clean_report,
    load_bert_tokenizer,
)
from models.gloria.train import ImageAttention, ImageTextData, TrainConfig, extract_attention, train_gloria
from models.text.entities import lexicon_from_rows
from models.text.wordpiece import load_wordpiece, save_wordpiece, train_wordpiece
from tasks.base import StageConfig, StageContext
from tasks.config import stable_hash
from tasks.stage import Stage

IMAGES, ORIGINAL, DISTILLED = (
    "extract_reports/images",
    "extract_reports/reports",
    "bulk_distill/distilled_reports",
)
MENTIONS, LEXICON = "match_entities/entity_mentions", "match_entities/lexicon"
WEIGHTS, MODEL_CONFIG, TOKENIZER = "gloria.safetensors", "gloria_config.json", "tokenizer.json"
PICTURES = "pictures"
Boxes = dict[str, list[tuple[int, int, int, int]]]  # image_id -> lesion boxes in pixels (x1, y1, x2, y2)


class Config(StageConfig):
    """Defaults are the paper scale (official GLoRIA on ResNet-50, ECAMP's 12-of-14 window)."""

    text_source: Literal["distilled", "original", "auto"] = Field(
        "distilled", description="auto = distilled if bulk_distill ran, else original with a WARNING"
    )
    train_splits: list[str] = Field(default_factory=lambda: ["train"], description="splits GLoRIA trains on")
    model: GloriaConfig = Field(default_factory=GloriaConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    decode_workers: int = Field(8, ge=1, description="threads decoding images into the square array")
    fallback: Literal["centre", "random"] = "centre"
    word_prior_images: int = Field(
        0,
        ge=0,
        description="divide each entity word's map by its mean map over this many reference images "
        "(extract_attention); 0 = off (paper)",
    )
    ignore_entities: list[str] = Field(
        default_factory=lambda: list(ANATOMY_ENTITIES),
        description="entities never used for the SR window: anatomy words whose 'positive' mentions are "
        "normal",
    )
    attention_batch: int = Field(64, ge=1)
    n_pictures: int = Field(6, ge=0)
    checkpoint: str | None = Field(None, description="a train_gloria stage dir to reuse instead of training")
    lesion_boxes: str | None = Field(
        None, description="boxes.csv; None = <data.root>/downstream/boxes.csv if any"
    )


# ------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------


def report_texts(ctx: StageContext, cfg: Config) -> tuple[dict[str, str], str]:
    """study_id -> report text from the configured source, and the name of the source used."""
    source = cfg.text_source
    if source == "auto":
        source = "distilled" if ctx.has(DISTILLED) else "original"
        if source == "original":
            ctx.log.warning(
                "text_source=auto: %s not found, training GLoRIA on the ORIGINAL reports", DISTILLED
            )
    if source == "distilled":
        table = ctx.read(DISTILLED).select(["study_id", "distilled_text"]).to_pydict()
        return dict(zip(table["study_id"], table["distilled_text"], strict=True)), source
    table = ctx.read(ORIGINAL).select(["study_id", "text"]).to_pydict()
    return dict(zip(table["study_id"], table["text"], strict=True)), source


def positive_entities(ctx: StageContext, ignore: list[str]) -> dict[str, list[str]]:
    """study_id -> entities with at least one affirmed (polarity positive) mention, minus `ignore`."""
    table = ctx.read(MENTIONS).select(["study_id", "entity", "polarity"]).to_pydict()
    found: dict[str, set[str]] = defaultdict(set)
    for study, entity, polarity in zip(table["study_id"], table["entity"], table["polarity"], strict=True):
        if polarity == "positive" and entity not in ignore:
            found[study].add(entity)
    return {k: sorted(v) for k, v in found.items()}


def lesion_box_file(config: Any) -> Path | None:
    """The lesion-box CSV: `train_gloria.lesion_boxes`, else `<data.root>/downstream/boxes.csv` if present."""
    if config.train_gloria.lesion_boxes:
        return Path(config.train_gloria.lesion_boxes)
    root = config.data.root if config.data.source == "mimic" else None
    found = Path(root) / "downstream" / "boxes.csv" if root else None
    return found if found is not None and found.exists() else None


# ------------------------------------------------------------------------------------------------------------
# Model: train or reuse
# ------------------------------------------------------------------------------------------------------------


def load_trained(folder: Path) -> tuple[Gloria, Any]:
    """A GLoRIA model and tokenizer saved by an earlier run of this stage (`checkpoint` config)."""
    for name in (WEIGHTS, MODEL_CONFIG, TOKENIZER):
        if not (folder / name).exists():
            raise FileNotFoundError(f"train_gloria.checkpoint: {folder / name} not found")
    model = Gloria(GloriaConfig(**json.loads((folder / MODEL_CONFIG).read_text())))
    model.load_state_dict(load_file(folder / WEIGHTS))
    return model, load_wordpiece(folder / TOKENIZER)


def resume_state(ctx: StageContext, cfg: Config, texts: list[str]) -> Path:
    """The resume file for exactly this config, seed and training data; stale ones from other settings go."""
    key = stable_hash([cfg.model_dump(mode="json"), ctx.config.run.seed, texts, RESUME_FORMAT])
    path = ctx.scratch(f"train_state_{key}.pt")
    for old in ctx.stage_dir.glob("train_state_*.pt"):
        if old != path:
            old.unlink()
    return path


def train_or_load(
    ctx: StageContext,
    cfg: Config,
    data: ImageTextData,
    texts: list[str],
    device: str,
    entities: list[list[str]] | None = None,
    forms: dict[str, str] | None = None,
) -> tuple[Gloria, Any, list[dict]]:
    if cfg.checkpoint:
        model, tokenizer = load_trained(Path(cfg.checkpoint))
        for name in (WEIGHTS, MODEL_CONFIG, TOKENIZER):  # the outputs are always this run's model
            shutil.copyfile(Path(cfg.checkpoint) / name, ctx.path(name))
        ctx.log.info("reusing GLoRIA from %s (no training)", cfg.checkpoint)
        return model, tokenizer, []
    torch.manual_seed(ctx.config.run.seed)
    if chosen(cfg.model.text_checkpoint):  # Bio_ClinicalBERT's own vocabulary and weights
        tokenizer = load_bert_tokenizer(cfg.model.text_checkpoint)
        model = Gloria(cfg.model)
        ctx.log.info(
            "text encoder from %s, image encoder from %s",
            cfg.model.text_checkpoint,
            cfg.model.image_checkpoint,
        )
        # the saved config rebuilds this architecture without the checkpoint folders (weights:
        # gloria.safetensors)
        mcfg = cfg.model.model_copy(update=bert_dims(cfg.model.text_checkpoint))
    else:
        tokenizer = train_wordpiece(texts, vocab_size=cfg.model.vocab_size)
        mcfg = cfg.model.model_copy(update={"vocab_size": tokenizer.get_vocab_size()})
        model = Gloria(mcfg)
    mcfg = mcfg.model_copy(update={"text_checkpoint": RANDOM_INIT, "image_checkpoint": RANDOM_INIT})
    save_wordpiece(tokenizer, ctx.path(TOKENIZER))

    def report(epoch: int, rows: list[dict]) -> None:
        last = [r for r in rows if r["epoch"] == epoch]
        ctx.log.info("epoch %d: loss %.3f", epoch, float(np.mean([r["loss"] for r in last])))

    rows = train_gloria(
        model,
        data,
        tokenizer,
        cfg.train,
        checkpoint=resume_state(ctx, cfg, texts),
        on_epoch=report,
        entities=entities,
        forms=forms,
        seed=ctx.config.run.seed,
        device=device,
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ctx.path(WEIGHTS))
    ctx.path(MODEL_CONFIG).write_text(mcfg.model_dump_json(indent=1))
    return model, tokenizer, rows


# ------------------------------------------------------------------------------------------------------------
# Stage
# ------------------------------------------------------------------------------------------------------------


class WindowGeometry(NamedTuple):
    """Where the SR windows live: pre-training's ViT patch grid and its window side, both in grid cells. They
    are pretrain_ecamp's settings (`model.grid_size`, `model.sr_window`), read here, so they exist once."""

    grid: int
    k: int


GRID, WINDOW = "pretrain_ecamp.model.grid_size", "pretrain_ecamp.model.sr_window"


def run(ctx: StageContext, cfg: Config) -> None:
    geo = WindowGeometry(ctx.config.setting(GRID), ctx.config.setting(WINDOW))
    seed, device = ctx.config.run.seed, resolve_device(ctx.config.run.device)
    texts, source = report_texts(ctx, cfg)
    positives = positive_entities(ctx, cfg.ignore_entities)
    rejects: list[dict[str, str]] = []
    candidates = []
    for row in ctx.read(IMAGES).to_pylist():
        text = clean_report(texts.get(row["study_id"], ""))
        if not text:
            why = "no report text" if row["study_id"] not in texts else "report text has no words"
            rejects.append(
                {
                    "source": row["path"],
                    "key": row["image_id"],
                    "reason": f"study {row['study_id']}: {why} ({source})",
                }
            )
        else:
            candidates.append(row | {"text": text})
    size = cfg.model.image_size
    pixels, rows, bad = decode_images(
        candidates, size, cfg.decode_workers, ctx.scratch(f"images_{size}.npy"), ctx.progress
    )
    rejects += bad
    if rejects:
        ctx.log.warning("%d images rejected (see rejects), e.g. %s", len(rejects), rejects[0]["reason"])
    ctx.write("rejects", rejects)

    train_idx = [i for i, r in enumerate(rows) if r["split"] in cfg.train_splits]
    train_data = ImageTextData(pixels[train_idx], [rows[i]["text"] for i in train_idx])
    lexicon = lexicon_from_rows(ctx.read(LEXICON).to_pylist())
    forms = {f: e for f, e in lexicon.forms.items() if " " not in f}
    train_entities = [positives.get(rows[i]["study_id"], []) for i in train_idx]
    model, tokenizer, losses = train_or_load(
        ctx, cfg, train_data, train_data.texts, device, train_entities, forms
    )
    ctx.write("losses", losses)  # empty when a trained checkpoint is reused

    all_data = ImageTextData(pixels, [r["text"] for r in rows])
    wanted = [positives.get(r["study_id"], []) for r in rows]
    attn = extract_attention(
        model,
        all_data,
        tokenizer,
        wanted,
        geo.grid,
        cfg.attention_batch,
        cfg.model.max_tokens,
        device,
        forms,
        cfg.word_prior_images,
        seed,
    )
    windows = fallback_windows(len(rows), geo.grid, geo.k, cfg.fallback, seed)
    best_r, best_c = best_windows(torch.from_numpy(attn.grid_maps), geo.k)
    found = attn.entity_found
    windows[found] = np.stack([best_r.numpy(), best_c.numpy()], axis=1)[found]
    ctx.write(
        "attention_maps",
        [
            {
                "image_id": r["image_id"],
                "study_id": r["study_id"],
                "entities": attn.entities[i],
                "attention": attn.grid_maps[i].ravel().tolist(),
                "grid": geo.grid,
                "window_row": int(windows[i, 0]),
                "window_col": int(windows[i, 1]),
                "window_size": geo.k,
                "fallback": "none" if found[i] else cfg.fallback,
            }
            for i, r in enumerate(rows)
        ],
    )
    ctx.log.info(
        "attention maps: %d images, %d with a positive entity, fallback %s for the rest",
        len(rows),
        int(found.sum()),
        cfg.fallback,
    )
    seen = Attended(rows, pixels, attn, windows)
    boxes = read_lesion_boxes(lesion_box_file(ctx.config))
    write_localization(ctx, geo, seen, boxes)
    draw_pictures(ctx, cfg.n_pictures, geo, seen, texts, boxes)


@dataclass(frozen=True)
class Attended:
    """What the attention step found for the kept images: rows, square pixels, maps and SR windows."""

    rows: list[dict[str, Any]]
    pixels: np.ndarray
    attn: ImageAttention
    windows: np.ndarray


def write_localization(ctx: StageContext, geo: WindowGeometry, seen: Attended, boxes: Boxes) -> None:
    """Pointing rate and window overlap on images with known lesions, GLoRIA vs the exact random expectation
    (no rows without a lesion box file)."""
    scored = [i for i, r in enumerate(seen.rows) if r["image_id"] in boxes]
    if not scored:
        ctx.write("localization", [])
        return
    gloria, rand = score_localization(
        [(seen.rows[i]["height"], seen.rows[i]["width"]) for i in scored],
        [boxes[seen.rows[i]["image_id"]] for i in scored],
        seen.attn.grid_maps[scored],
        seen.windows[scored],
        geo.grid,
        geo.k,
    )
    out = [
        {"method": name, "grid": geo.grid, "window_size": geo.k} | score._asdict()
        for name, score in (("gloria", gloria), ("random", rand))
    ]
    ctx.write("localization", out)
    ctx.log.info(
        "localization on %d images: pointing %.3f (random %.3f), window overlap %.3f (random %.3f)",
        gloria.n_images,
        gloria.pointing_rate,
        rand.pointing_rate,
        gloria.mean_window_overlap,
        rand.mean_window_overlap,
    )


def draw_pictures(
    ctx: StageContext, n: int, geo: WindowGeometry, seen: Attended, texts: dict[str, str], boxes: Boxes
) -> None:
    """Fig. 6-style overlays for the first `n` images (by image_id) that have a positive entity."""
    rows, attn, windows = seen.rows, seen.attn, seen.windows
    order = sorted(
        (i for i in range(len(rows)) if attn.entity_found[i]),
        key=lambda i: (rows[i]["image_id"] not in boxes, rows[i]["image_id"]),
    )
    folder = ctx.path(PICTURES)
    folder.mkdir(exist_ok=True)
    for i in order[:n]:
        row = rows[i]
        entities = attn.entities[i]
        sentences = re.split(r"(?<=[.!?])\s+", texts.get(row["study_id"], ""))
        shown = [s for s in sentences if any(e[:4] in s.lower() for e in entities)] or sentences
        lesion = unit_boxes(boxes.get(row["image_id"], []), row["height"], row["width"])
        save_overlay(
            folder / f"{safe_stem(row['image_id'])}.png",
            seen.pixels[i] / 255.0,
            attn.grid_maps[i],
            (int(windows[i, 0]), int(windows[i, 1]), geo.k),
            f"{printable(row['image_id'])[:18]}: {', '.join(entities)}",
            shown,
            lesion,
        )


STAGE = Stage(
    name="train_gloria",
    version="2",
    config=Config,
    run=run,
    summary="GLoRIA on image-report pairs; its entity-word attention places each image's SR window (Fig. 6)",
    reads=(IMAGES, ORIGINAL, MENTIONS, LEXICON, DISTILLED),
    optional=(DISTILLED,),
    writes={
        "rejects": Reject,
        "losses": GloriaLoss,
        "attention_maps": AttentionMap,
        "localization": Localization,
    },
    files=(WEIGHTS, MODEL_CONFIG, TOKENIZER, PICTURES),
    sections=("data", GRID, WINDOW),
    input_files=lambda config: [p for p in [lesion_box_file(config)] if p is not None],
    inputs_hint="train_gloria.lesion_boxes",
    preflight=lambda config: check_initializations(config.train_gloria.model),
    gpu=True,
)
