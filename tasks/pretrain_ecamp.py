"""Stage 7, `pretrain_ecamp`: images + reports (+ distilled reports, + SR windows) → ECAMP encoder + loss
curves.

Reads `extract_reports/images` and `extract_reports/reports`, and when present
`bulk_distill/distilled_reports` (context distillation) and `train_gloria/attention_maps` (context-guided SR
windows). Without them it runs the matching ablation (original text only; SR on the centre window) and says so
with a WARNING, never silently.

The text side's image reliance (`models.ecamp.reliance`) is measured on held-out pairs, the images of
`heldout_splits` (MIMIC's `validate`), one per study: in the last metrics row, the model card and the log.

Outputs under `<run_dir>/pretrain_ecamp/`: `pretrain_metrics` (one row per optimiser step),
`pretrain_rejects`, `encoder.safetensors` (timm `VisionTransformer`, strict load; see `models.ecamp.export`),
`MODEL_CARD.md`, `tokenizer.json`, and `train/checkpoint.pt` (full training state: a failed run resumes from
it exactly). With `nproc > 1` training runs under `torchrun` (DDP), one process per GPU; with `nnodes > 1`
this stage's torchrun is one node of a c10d rendezvous at `rdzv_endpoint`, which the other nodes join with the
command it logs (README).

Ablations (Tables 7–9): `ecamp ablate --table 7 -c CONFIG --run-dir DIR` pre-trains one encoder per row
into `<run_dir>/pretrain_ecamp__<row>/`, reusing the upstream artifacts of DIR.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from data_contracts.pretrain import PretrainMetric, PretrainReject
from models.devices import resolve_device
from models.ecamp.config import PretrainConfig
from models.ecamp.data import PretrainRecord, join_inputs
from models.ecamp.export import export_encoder, write_model_card
from models.ecamp.image_cache import ImageCacheConfig, build_image_cache, source_size
from models.ecamp.job import run_job, write_job
from models.ecamp.model import ECAMP, ECAMPConfig
from models.ecamp.pretrain import CHECKPOINT, check_init_checkpoint, read_resume_checkpoint
from models.ecamp.reliance import heldout_records, reliance_line
from models.resources import REPO_ROOT
from models.text.entities import lexicon_from_rows
from models.text.masking import TextMaskingConfig
from models.text.wordpiece import save_wordpiece, train_wordpiece
from tasks.base import StageConfig, StageContext
from tasks.stage import Stage

IMAGES, REPORTS = "extract_reports/images", "extract_reports/reports"
DISTILLED, ATTENTION = "bulk_distill/distilled_reports", "train_gloria/attention_maps"
LEXICON = "match_entities/lexicon"
ENCODER, MODEL_CARD, TOKENIZER = "encoder.safetensors", "MODEL_CARD.md", "tokenizer.json"


class Config(StageConfig):
    """Defaults are the paper's: ViT-B/16 at 224 with SR at 448, 6-layer BERT, AdamW 1.5e-4, 120 epochs."""

    model: ECAMPConfig = Field(default_factory=ECAMPConfig)
    train: PretrainConfig = Field(default_factory=PretrainConfig)
    text: TextMaskingConfig = Field(default_factory=TextMaskingConfig)
    tokenizer_min_frequency: int = Field(2, ge=1)
    splits: list[str] = Field(
        default_factory=lambda: ["train"], description="image splits used for pre-training"
    )
    heldout_splits: list[str] = Field(
        default_factory=lambda: ["validate"],
        description="image splits of the held-out pairs the text side's image reliance is measured on",
    )
    nproc: int = Field(1, ge=1, description="processes per node; > 1 launches torchrun (DDP, one per GPU)")
    nnodes: int = Field(1, ge=1, description="machines; > 1 meets the other nodes' torchrun at rdzv_endpoint")
    rdzv_endpoint: str | None = Field(
        None, description="HOST:PORT of torchrun's c10d rendezvous when nnodes > 1 (a free port on one node)"
    )
    image_cache: ImageCacheConfig = Field(default_factory=ImageCacheConfig)

    @model_validator(mode="after")
    def _model_reads_the_text_length(self) -> Config:
        """The text length is one setting, `text.max_len`: the collator pads every batch to it, and the
        model's position table has exactly that many rows. `model.max_len` follows it; a different value is
        refused (an equal one is what a dumped config carries back)."""
        if "max_len" in self.model.model_fields_set and self.model.max_len != self.text.max_len:
            raise ValueError(
                f"model.max_len {self.model.max_len} differs from text.max_len {self.text.max_len}: the "
                f"position table follows text.max_len, set pretrain_ecamp.text.max_len only"
            )
        if self.model.max_len != self.text.max_len:
            self.model = ECAMPConfig.model_validate({**self.model.model_dump(), "max_len": self.text.max_len})
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if both := sorted(set(self.splits) & set(self.heldout_splits)):
            raise ValueError(f"splits {both} are both trained on (splits) and held out (heldout_splits)")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"nnodes {self.nnodes} needs rdzv_endpoint (HOST:PORT every node reaches, e.g. node0:29400)"
            )
        if self.train.decode == "device" and self.image_cache.enabled:
            raise ValueError(
                "train.decode=device decodes the original JPEGs on the training device every epoch, and the "
                "image cache replaces them with decoded arrays: choose one (set image_cache.enabled=false to "
                "decode on the device)"
            )
        return self


def run(ctx: StageContext, cfg: Config) -> None:
    images, reports = ctx.read(IMAGES), ctx.read(REPORTS)
    text_cfg, distilled = text_inputs(ctx, cfg)
    attention = sr_inputs(ctx, cfg)
    joined = join_inputs(images, reports, distilled, attention, cfg.splits, cfg.model)
    ctx.write("pretrain_rejects", joined.rejects)
    if joined.rejects:
        ctx.log.warning("%d images left out of pre-training (see pretrain_rejects)", len(joined.rejects))
    n = len(joined.records)
    if distilled is not None and joined.n_distilled < n:
        ctx.log.warning(
            "%d of %d training images have no (or an empty) distilled report: original text only",
            n - joined.n_distilled,
            n,
        )
    if attention is not None and joined.n_attention < n:
        ctx.log.warning(
            "%d of %d training images have no attention window: centre window", n - joined.n_attention, n
        )
    ctx.log.info("pre-training on %d images (splits %s)", n, cfg.splits)

    corpus = [r.text for r in joined.records] + [r.distilled for r in joined.records if r.distilled]
    tokenizer = train_wordpiece(corpus, cfg.model.vocab_size, cfg.tokenizer_min_frequency)
    tokenizer_path = save_wordpiece(tokenizer, ctx.path(TOKENIZER))
    model_cfg = cfg.model.model_copy(update={"vocab_size": tokenizer.get_vocab_size()})
    seed = cfg.train.seed if cfg.train.seed is not None else ctx.config.run.seed
    train_cfg = cfg.train.model_copy(update={"seed": seed})
    ctx.log.info(
        "tokenizer: %d entries (asked %d) -> %s", model_cfg.vocab_size, cfg.model.vocab_size, tokenizer_path
    )

    out_dir = ctx.scratch("train")  # checkpoint.pt: a failed attempt resumes from it exactly
    entity_words = sorted(lexicon_from_rows(ctx.read(LEXICON).to_pylist()).forms)
    stamps = dict(zip(images.column("path").to_pylist(), images.column("stamp").to_pylist(), strict=True))
    records = cached_records(ctx, cfg, joined.records, stamps)
    heldout = heldout_pairs(ctx, cfg, images, reports, distilled, attention, seed)
    job = write_job(
        ctx.scratch("job"),
        model_cfg,
        train_cfg,
        text_cfg,
        records,
        tokenizer_path,
        resolve_device(ctx.config.run.device),
        entity_words,
        data_fingerprint(ctx, tokenizer_path),
        heldout,
    )
    if cfg.nproc == 1 and cfg.nnodes == 1:
        result = run_job(job.parent, out_dir, log=ctx.log)
        model, metrics = result.model, result.metrics
    else:
        cmd = torchrun_command(job.parent, out_dir, cfg.nproc, cfg.nnodes, cfg.rdzv_endpoint, ctx.name)
        if cfg.nnodes > 1:
            ctx.log.info(
                "on each of the other %d nodes (run directory on shared storage), run: %s",
                cfg.nnodes - 1,
                " ".join(cmd),
            )
        model, metrics = run_torchrun(cmd, out_dir, model_cfg, ctx.log)
        if "heldout_tokens" in metrics[-1]:
            ctx.log.info(reliance_line(metrics[-1]))

    ctx.write("pretrain_metrics", metrics)
    facts = {
        "images": n,
        "distilled reports": joined.n_distilled,
        "attention windows": joined.n_attention,
        "text composition": text_cfg.text_composition,
        "optimiser steps": len(metrics),
        "effective batch": train_cfg.batch_size * train_cfg.accum_iter * cfg.nproc * cfg.nnodes,
        "seed": seed,
    }
    lineage = ctx.lineage_facts()  # run id and the hashes of every artifact read: in the header and the card
    # The header leaves out the run id, so the same weights from the same inputs are the same file: a resumed
    # or re-exported stage keeps its content hash and does not rerun evaluate. The card and the record keep
    # it.
    header = {k: v for k, v in lineage.items() if k != "run_id"}
    export_encoder(model, ctx.path(ENCODER), extra={"facts": facts, "lineage": header})
    write_model_card(ctx.path(MODEL_CARD), model_cfg, facts, metrics, lineage)
    ctx.log.info("encoder -> %s (on success)", ctx.stage_dir / ENCODER)


def heldout_pairs(
    ctx: StageContext, cfg: Config, images: Any, reports: Any, distilled: Any, attention: Any, seed: int
) -> list[PretrainRecord]:
    """The held-out pairs of the image reliance measure (one image per study), or none with a warning."""
    if cfg.train.reliance_pairs == 0 or not cfg.model.text_side:
        return []
    joined = join_inputs(images, reports, distilled, attention, cfg.heldout_splits, cfg.model)
    pairs = heldout_records(joined.records, seed, cfg.train.reliance_pairs)
    if len(pairs) < 2:
        ctx.log.warning(
            "%d held-out pairs in splits %s: the text side's image reliance is not measured (it needs 2)",
            len(pairs),
            cfg.heldout_splits,
        )
        return []
    ctx.log.info("image reliance: measured on %d held-out pairs (splits %s)", len(pairs), cfg.heldout_splits)
    return pairs


def cached_records(
    ctx: StageContext, cfg: Config, records: list[PretrainRecord], stamps: dict[str, str]
) -> list[PretrainRecord]:
    """The records reading their images from the image cache (built now where missing; kept across attempts
    in the stage's scratch folder; keyed by each image's stamp from `images`, so a replaced image is decoded
    again), or as they are when the cache is off."""
    cache = cfg.image_cache
    if not cache.enabled:
        return records
    short = cache.short_side or 2 * cfg.model.hr_size
    start = time.perf_counter()
    cached = build_image_cache(
        [r.path for r in records],
        ctx.scratch("image_cache"),
        short,
        cache.workers,
        progress=lambda it, total: ctx.progress(it, total=total, desc="image cache"),
        stamps=stamps,
    )
    ctx.log.info(
        "image cache: %d images at short side %d (%.1f s)", len(cached), short, time.perf_counter() - start
    )
    return [
        dataclasses.replace(r, path=cached[r.path], source_size=source_size(cached[r.path])) for r in records
    ]


def text_inputs(ctx: StageContext, cfg: Config) -> tuple[TextMaskingConfig, Any]:
    """The distilled reports if the text composition needs them; without them: original text only, with a
    warning."""
    if cfg.text.text_composition == "origin":
        ctx.log.info("text composition 'origin': distilled reports not used")
        return cfg.text, None
    if not ctx.has(DISTILLED):
        ctx.log.warning(
            "%s not found: context distillation OFF, pre-training on the original reports only "
            "(text_composition '%s' -> 'origin')",
            DISTILLED,
            cfg.text.text_composition,
        )
        return cfg.text.model_copy(update={"text_composition": "origin"}), None
    return cfg.text, ctx.read(DISTILLED)


def sr_inputs(ctx: StageContext, cfg: Config) -> Any:
    """The attention windows if SR is on; without them: the centre window of k cells, with a warning."""
    if not cfg.model.sr:
        ctx.log.info("SR branch off: attention maps not used")
        return None
    if not ctx.has(ATTENTION):
        k, grid = cfg.model.sr_window, cfg.model.grid_size
        ctx.log.warning(
            "%s not found: context-guided SR OFF, SR loss on the centre %dx%d window of the %dx%d grid",
            ATTENTION,
            k,
            k,
            grid,
            grid,
        )
        return None
    return ctx.read(ATTENTION)


def data_fingerprint(ctx: StageContext, tokenizer_path: Path) -> str:
    """Hash of the upstream artifacts and the tokenizer: a checkpoint made on other data is never resumed."""
    h = hashlib.sha256()
    for ref in sorted(ctx.upstream):
        h.update(f"{ref}={ctx.upstream[ref].content_hash};".encode())
    h.update(tokenizer_path.read_bytes())
    return h.hexdigest()[:16]


def torchrun_command(
    job_dir: Path, out_dir: Path, nproc: int, nnodes: int, rdzv_endpoint: str | None, rdzv_id: str
) -> list[str]:
    """The torchrun command of one node: standalone on one machine, else a c10d rendezvous every node joins
    with this same command (torchrun assigns the node ranks in the order they arrive)."""
    if nnodes == 1:
        launch = ["--standalone", f"--nproc-per-node={nproc}"]
    else:
        launch = [
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launch,
        "-m",
        "models.ecamp.job",
        "--job",
        str(job_dir),
        "--out",
        str(out_dir),
    ]


def run_torchrun(
    cmd: list[str], out_dir: Path, model_cfg: ECAMPConfig, log: logging.Logger
) -> tuple[ECAMP, list[dict[str, float]]]:
    """Train under torchrun and read back the model and the metrics rank 0 wrote (into `out_dir`, shared)."""
    log.info("launching: %s", " ".join(cmd))
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": path})
    payload = read_resume_checkpoint(out_dir / CHECKPOINT)
    model = ECAMP(model_cfg)
    model.load_state_dict(payload["model"])
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return model, metrics


# ------------------------------------------------------------------------------------------------------------
# ablations (Tables 7–9): each row is a list of `--set` overrides of this stage's section
# ------------------------------------------------------------------------------------------------------------
_T = "pretrain_ecamp."
_CD_OFF = [f"{_T}text.text_composition=origin"]
_DM_OFF = [f"{_T}text.descriptor_masking=false"]
_RF_OFF = [f"{_T}text.rebalance=false"]
_SR_OFF = [f"{_T}model.sr=false"]

ABLATIONS: dict[str, dict[str, list[str]]] = {
    "7": {  # CD DM RF SR Global Local, in the order of Table 7
        "base": _CD_OFF + _DM_OFF + _RF_OFF + _SR_OFF,
        "cd": _DM_OFF + _RF_OFF + _SR_OFF,
        "cd_dm": _RF_OFF + _SR_OFF,
        "cd_dm_rf": _SR_OFF,
        "no_cd": _CD_OFF,
        "no_dm": _DM_OFF,
        "no_rf": _RF_OFF,
        "no_local": [f"{_T}model.mscf_local=false"],
        "no_global": [f"{_T}model.mscf_global=false"],
        "full": [],
        "mim_only": _CD_OFF
        + _SR_OFF
        + [f"{_T}model.text_side=false"],  # not a paper row: evaluate's baseline
        "mim_sr": _CD_OFF + [f"{_T}model.text_side=false"],  # not a paper row: ECAMP without its text side
    },
    "8": {  # text composition (entity selection rows need other entity lists upstream: match_entities)
        "origin_alone": _CD_OFF,
        "dis_alone": [f"{_T}text.text_composition=distilled"],
        "hybrid": [],
    },
    "9": {f"lambda_{v}": [f"{_T}text.lambda_neg={v}"] for v in (0.025, 0.05, 0.1, 0.25, 0.5)},
}


def ablation_rows(table: str, rows: list[str] | None = None) -> dict[str, list[str]]:
    """The `--set` overrides of the chosen rows of a paper table (all rows by default), validated by name.

    Each row runs as this stage under the name `pretrain_ecamp__<row>` (see `flows.pipeline.ecamp_ablations`),
    so it is cached, traced and reuses the upstream artifacts of the run directory.
    """
    if table not in ABLATIONS:
        raise KeyError(f"unknown ablation table '{table}' (tables: {', '.join(ABLATIONS)})")
    chosen = rows or list(ABLATIONS[table])
    unknown = [r for r in chosen if r not in ABLATIONS[table]]
    if unknown:
        raise KeyError(f"table {table} has no rows {unknown} (rows: {', '.join(ABLATIONS[table])})")
    return {row: ABLATIONS[table][row] for row in chosen}


STAGE = Stage(
    name="pretrain_ecamp",
    version="5",
    config=Config,
    run=run,
    summary="ECAMP pre-training (MLM + MIM + context-guided SR + MSCF) → a timm-loadable ViT encoder",
    reads=(IMAGES, REPORTS, LEXICON, DISTILLED, ATTENTION),
    optional=(DISTILLED, ATTENTION),
    writes={"pretrain_rejects": PretrainReject, "pretrain_metrics": PretrainMetric},
    files=(ENCODER, MODEL_CARD, TOKENIZER),
    preflight=lambda config: check_init_checkpoint(config.pretrain_ecamp.train),
    gpu=True,
)
