"""An ECAMP pre-training job as plain files, and the one entry point that runs it, in-process or under
torchrun.

The pretrain_ecamp stage writes the job folder (settings, records, tokenizer path, held-out pairs) and calls
`run_job` in-process, or launches this module on several processes:

    torchrun --nproc_per_node 4 -m models.ecamp.job --job runs/x/pretrain_ecamp/job --out
    runs/x/pretrain_ecamp/train
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist
from pydantic import BaseModel

from models.ecamp.config import PretrainConfig
from models.ecamp.data import PretrainDataset, PretrainRecord, heldout_set, read_records
from models.ecamp.model import ECAMPConfig
from models.ecamp.pretrain import LOG, TrainResult, train

JOB_FILE = "job.json"
HELDOUT_FILE = "heldout.jsonl"  # pairs the image reliance is measured on (models.ecamp.reliance)


def write_job(
    job_dir: Path,
    model_cfg: ECAMPConfig,
    cfg: PretrainConfig,
    text_cfg: BaseModel,
    records: Sequence[PretrainRecord],
    tokenizer_path: Path,
    device: str,
    entity_words: Sequence[str],
    data_hash: str,
    heldout: Sequence[PretrainRecord] = (),
) -> Path:
    """Everything a (torchrun) training process needs, as plain files, so the stage can launch it as a
    command.

    The job's `data_hash` covers `data_hash` (the upstream artifacts), the records, the text masking config
    and the entity words: a checkpoint trained on other texts, windows or masking (e.g. another λ_neg) is
    never resumed, however finished it is."""
    job_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with (job_dir / "records.jsonl").open("w") as f:
        for rec in records:
            line = json.dumps(vars(rec)) + "\n"
            f.write(line)
            digest.update(line.encode())
    with (job_dir / HELDOUT_FILE).open("w") as f:  # measured on, never trained on: not in the data hash
        f.writelines(json.dumps(vars(rec)) + "\n" for rec in heldout)
    text = text_cfg.model_dump(mode="json")
    digest.update(json.dumps([data_hash, text, list(entity_words)], sort_keys=True).encode())
    job = {
        "model": model_cfg.model_dump(),
        "train": cfg.model_dump(),
        "text": text,
        "tokenizer": str(tokenizer_path),
        "device": device,
        "entity_words": list(entity_words),
        "data_hash": digest.hexdigest()[:16],
    }
    path = job_dir / JOB_FILE
    path.write_text(json.dumps(job, indent=2))
    return path


def run_job(
    job_dir: Path,
    out_dir: Path,
    progress: bool = True,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> TrainResult:
    """The one training entry point: the stage calls it in-process, and every torchrun process calls it."""
    from models.text.masking import TextCollator, TextMaskingConfig
    from models.text.wordpiece import load_wordpiece

    job = json.loads((job_dir / JOB_FILE).read_text())
    model_cfg, cfg = ECAMPConfig(**job["model"]), PretrainConfig(**job["train"])
    text_cfg = TextMaskingConfig(**job["text"])
    collate = TextCollator(load_wordpiece(job["tokenizer"]), text_cfg, job["entity_words"])
    dataset = PretrainDataset(read_records(job_dir / "records.jsonl"), model_cfg, cfg)
    heldout_path = job_dir / HELDOUT_FILE
    heldout = read_records(heldout_path) if heldout_path.exists() else []
    return train(
        model_cfg,
        cfg,
        dataset,
        collate,
        out_dir,
        device=job["device"],
        data_hash=job["data_hash"],
        progress=progress,
        log=log or LOG,
        heldout=heldout_set(heldout, dataset, collate, cfg),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m models.ecamp.job",
        description="Run one ECAMP pre-training job (prepared by the pretrain_ecamp stage). Under torchrun "
        "every process runs this; rank 0 writes checkpoint.pt and metrics.jsonl into --out.",
    )
    parser.add_argument(
        "--job", required=True, type=Path, help="job folder holding job.json and records.jsonl"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (checkpoint.pt, metrics.jsonl)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    result = run_job(args.job, args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        with (args.out / "metrics.jsonl").open("w") as f:
            for row in result.metrics:
                f.write(json.dumps(row) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
