"""ECAMP pre-training engine and stage: schedule, windows under augmentation, data join, training, exact
resume."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image as PILImage

from data_contracts.gloria import AttentionMap
from data_contracts.io import read_artifact
from data_contracts.reports import Image, Report
from data_contracts.stamps import stat_stamp
from models.checkpoints import CheckpointWriteError, save_atomic
from models.devices import DeviceError
from models.ecamp.config import PretrainConfig
from models.ecamp.data import (
    PretrainCollator,
    PretrainDataset,
    PretrainRecord,
    ResumableSampler,
    box_after_crop,
    centre_window,
    decode_gray,
    join_inputs,
)
from models.ecamp.export import export_encoder, load_timm_encoder
from models.ecamp.job import main
from models.ecamp.model import ECAMP, ECAMPConfig
from models.ecamp.pretrain import (
    load_partial,
    loader_options,
    make_schedule,
    param_groups,
    train,
)
from models.engine.distributed import one_process
from models.engine.resume import ResumeFile
from models.engine.schedule import lr_factor, warmup_cosine
from models.images import load_grayscale
from models.resources import DEFAULT_ENTITY_LIST
from models.text.entities import lexicon_rows, load_entity_list
from models.text.masking import TextCollator, TextMaskingConfig
from models.text.wordpiece import train_wordpiece
from tasks import pretrain_ecamp
from tasks.config import load_config
from tests.context import make_test_context, run_direct, seed_artifact
from tests.real_data import REAL_DATA, iu_xray_texts

MODEL = dict(
    img_size=32,
    hr_size=64,
    patch_size=8,
    embed_dim=32,
    depth=1,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
    sr_window=2,
    text_hidden=32,
    text_layers=1,
    text_heads=2,
    text_ffn=64,
    max_len=48,
)
# MODEL as `--set` overrides of the stage; its position table follows text.max_len (one setting)
MODEL_SETTINGS = [
    *(f"pretrain_ecamp.model.{k}={v}" for k, v in MODEL.items() if k != "max_len"),
    f"pretrain_ecamp.text.max_len={MODEL['max_len']}",
]
DISTILLED = "There is no pleural effusion. There is mild cardiomegaly."


@pytest.fixture(scope="module")
def reports() -> list[str]:
    return [r for r in iu_xray_texts() if len(r) > 40][:40]


@pytest.fixture(scope="module")
def tokenizer(reports):
    return train_wordpiece(reports + [DISTILLED], vocab_size=400, min_frequency=1)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Non-square radiograph-like PNGs: a left-to-right ramp plus one bright blob at a random place."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(16):
        img = np.tile(np.linspace(30, 150, 40), (48, 1)) + rng.normal(0, 5, (48, 40))
        y, x = rng.integers(8, 36), rng.integers(8, 28)
        img[y - 6 : y + 6, x - 6 : x + 6] += 90
        path = root / f"im{i}.png"
        PILImage.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def model_cfg(tokenizer, **changes) -> ECAMPConfig:
    return ECAMPConfig(**{**MODEL, "vocab_size": tokenizer.get_vocab_size(), **changes})


def records(images, reports) -> list[PretrainRecord]:
    return [
        PretrainRecord(
            f"i{i}", f"s{i}", p, reports[i], DISTILLED if i % 2 else None, (0.25, 0.25, 0.75, 0.75)
        )
        for i, p in enumerate(images)
    ]


def collator(tokenizer):
    return TextCollator(tokenizer, TextMaskingConfig(max_len=48))


# ---- schedule and optimiser
# ------------------------------------------------------------------------------------
def test_lr_warmup_then_cosine():
    assert lr_factor(0, 4, 12, 0.0) == 0.25  # no step at lr 0
    assert lr_factor(2, 4, 12, 0.0) == 0.75
    assert lr_factor(3, 4, 12, 0.0) == 1.0
    assert lr_factor(4, 4, 12, 0.0) == 1.0
    assert lr_factor(8, 4, 12, 0.0) == pytest.approx(0.5)
    assert lr_factor(12, 4, 12, 0.1) == pytest.approx(0.1)
    assert lr_factor(20, 4, 12, 0.1) == pytest.approx(0.1)  # flat after the cosine


def test_every_trainer_uses_the_one_warmup_cosine_schedule():
    """Pre-training, GLoRIA and the downstream heads share models.engine.schedule: no module keeps its own."""
    root = Path(__file__).resolve().parent.parent / "models"
    own = [p for p in root.rglob("*.py") if "math.cos(" in p.read_text() and p.name != "schedule.py"]
    assert not own, f"a cosine schedule outside models/engine/schedule.py: {own}"
    for trainer in ("ecamp/pretrain.py", "gloria/train.py", "evaluate/fit.py"):
        assert "warmup_cosine(optimizer" in (root / trainer).read_text(), trainer


def test_the_default_lr_is_the_papers_absolute_one_and_the_mae_rule_is_opt_in():
    paper = PretrainConfig(batch_size=256, accum_iter=8)  # 4 GPUs x 256 x 8 = 8,192
    assert paper.lr_for(8192) == 1.5e-4
    assert paper.model_copy(update={"blr": 1.5e-4}).lr_for(8192) == pytest.approx(4.8e-3)


def test_schedule_counts_and_too_small_dataset():
    cfg = PretrainConfig(epochs=3, batch_size=4, accum_iter=2, warmup_epochs=1, blr=1e-3)
    s = make_schedule(cfg, 37, world=1)
    assert (s.steps_per_epoch, s.total_steps, s.warmup_steps, s.effective_batch) == (4, 12, 4, 8)
    assert s.base_lr == pytest.approx(1e-3 * 8 / 256)
    assert make_schedule(cfg.model_copy(update={"blr": None, "lr": 2e-4}), 37, 1).base_lr == 2e-4
    assert make_schedule(cfg.model_copy(update={"max_steps": 5, "cosine_epochs": 5}), 37, 1).total_steps == 5
    with pytest.raises(ValueError, match=r"7 training samples are fewer .*\(batch_size 4 × accum_iter 2"):
        make_schedule(cfg, 7, world=1)


def test_no_weight_decay_on_biases_norms_and_tokens():
    model = ECAMP(ECAMPConfig(**{**MODEL, "vocab_size": 50}))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.encoder.cls_token) in ids and id(model.decoder.mask_token) in ids
    assert (
        id(model.encoder.blocks[0].norm1.weight) in ids and id(model.encoder.blocks[0].attn.qkv.bias) in ids
    )
    assert id(model.encoder.blocks[0].attn.qkv.weight) not in ids
    assert id(model.encoder.pos_embed) not in ids | {id(p) for p in decay["params"]}  # fixed, not trained


# ---- SR window under augmentation
# ------------------------------------------------------------------------------
def test_box_after_crop_geometry():
    window = (0.25, 0.5, 0.75, 1.0)
    assert box_after_crop(window, (100, 100), (0, 0, 100, 100), False, 64) == (16, 32, 48, 64)
    assert box_after_crop(window, (100, 100), (0, 0, 100, 100), True, 64) == (16, 0, 48, 32)
    assert box_after_crop(window, (100, 100), (0, 50, 50, 50), False, 64) == (32, 0, 64, 64)
    assert box_after_crop(window, (100, 100), (0, 0, 40, 40), False, 64) == (
        40,
        64,
        64,
        64,
    )  # empty: cropped away
    # a 100x50 image sits in the middle of its 100x100 padded square: columns 25..75
    assert box_after_crop((0.0, 0.25, 1.0, 0.75), (100, 50), (0, 0, 100, 50), False, 64) == (0, 0, 64, 64)


@pytest.mark.parametrize("follow", [True, False])
def test_window_tracks_the_attended_region_through_crop_and_flip(tmp_path, follow):
    """A bright square exactly under the window: after augmentation the box must still cover bright pixels."""
    img = np.zeros((64, 64), dtype=np.uint8)
    img[16:48, 8:40] = 255  # window rows 0.25..0.75, cols 0.125..0.625
    path = tmp_path / "square.png"
    PILImage.fromarray(img).save(path)
    rec = PretrainRecord("a", "s", str(path), "x", None, (0.25, 0.125, 0.75, 0.625))
    cfg = PretrainConfig(sr_window_follows_augmentation=follow, crop_scale=(0.3, 0.6), mean=0.0, std=1.0)
    ds = PretrainDataset([rec], ECAMPConfig(**{**MODEL, "vocab_size": 50}), cfg)
    inside_means = []
    for epoch in range(12):
        s = ds[(epoch, 0)]
        top, left, bottom, right = s["window"].tolist()
        if bottom - top >= 4 and right - left >= 4:
            inside_means.append(float(s["imgs_hr"][0, top + 1 : bottom - 1, left + 1 : right - 1].mean()))
    if follow:
        assert len(inside_means) >= 6 and min(inside_means) > 0.95
    else:  # the official static window drifts off the square under crop + flip
        assert min(inside_means) < 0.5


# ---- data
# ------------------------------------------------------------------------------------------------------------
def test_decode_gray_matches_the_project_loader():
    for name in ("00000001_000.png", "tb0005.png", "Fake_MONOHR1.dcm"):
        path = REAL_DATA / "images" / name
        ours = decode_gray(str(path))
        ref = torch.from_numpy(load_grayscale(path))
        assert ours.shape == (1, *ref.shape) and ours.dtype == torch.float32
        assert (ours[0] - ref).abs().max() <= 1.5 / 255, name  # same polarity/scale (RGB luma may round)


def test_join_inputs_rejects_and_fallbacks():
    cfg = ECAMPConfig(**{**MODEL, "vocab_size": 50, "sr_window": 2})
    images = pa.table(
        {
            "image_id": ["a", "b", "c", "d", "e"],
            "study_id": ["1", "2", "3", "4", "1"],
            "path": ["pa", "pb", "pc", "pd", "pe"],
            "split": ["train", "train", "train", "test", "train"],
        }
    )
    reports = pa.table({"study_id": ["1", "2"], "text": ["no effusion.", "  "]})
    distilled = pa.table({"study_id": ["1"], "distilled_text": ["There is no effusion."]})
    attention = pa.table(
        {
            "image_id": ["a"],
            "window_row": [1],
            "window_col": [2],
            "window_size": [4],
            "grid": [8],
        }
    )
    joined = join_inputs(images, reports, distilled, attention, ["train"], cfg)
    assert [r.image_id for r in joined.records] == ["a", "e"]
    assert joined.records[0].window == (0.125, 0.25, 0.625, 0.75)
    assert joined.records[1].window == centre_window(4, 2) == (0.25, 0.25, 0.75, 0.75)
    assert joined.records[1].distilled == "There is no effusion."
    assert (joined.n_distilled, joined.n_attention) == (2, 1)
    assert joined.rejects == [
        {"image_id": "b", "study_id": "2", "reason": "the study's report text is empty"},
        {"image_id": "c", "study_id": "3", "reason": "no report for this study in extract_reports/reports"},
    ]


def test_dataset_samples_are_a_function_of_epoch_and_index(images, reports, tokenizer):
    cfg = PretrainConfig(mean=0.5, std=0.25)
    ds = PretrainDataset(records(images, reports), model_cfg(tokenizer), cfg)
    a, b = ds[(0, 3)], ds[(0, 3)]
    assert a["imgs_hr"].shape == (3, 64, 64) and a["imgs_lr"].shape == (3, 32, 32)
    assert torch.equal(a["imgs_hr"], b["imgs_hr"]) and torch.equal(a["window"], b["window"])
    assert torch.equal(a["imgs_hr"][0], a["imgs_hr"][2])  # grey replicated to 3 channels
    assert not torch.equal(ds[(1, 3)]["imgs_hr"], a["imgs_hr"])
    assert a["text"] == (reports[3], DISTILLED)
    with pytest.raises(ValueError, match="no training records"):
        PretrainDataset([], model_cfg(tokenizer), cfg)


# ---- training
# --------------------------------------------------------------------------------------------------
def test_all_three_losses_fall(images, reports, tokenizer, tmp_path):
    cfg = PretrainConfig(
        epochs=15, batch_size=8, accum_iter=1, warmup_epochs=1, lr=5e-3, num_workers=0, seed=0
    )
    ds = PretrainDataset(records(images, reports), model_cfg(tokenizer), cfg)
    result = train(model_cfg(tokenizer), cfg, ds, collator(tokenizer), tmp_path, progress=False)
    m = result.metrics
    assert result.finished and len(m) == 30 and [r["step"] for r in m] == list(range(1, 31))
    # mean of the last 5 steps vs the first 5 (measured: mim 0.56, sr 0.60, mlm 0.80 of the start)
    for key, most in (("mim", 0.7), ("sr", 0.7), ("mlm", 0.88), ("total", 0.85)):
        first, last = np.mean([r[key] for r in m[:5]]), np.mean([r[key] for r in m[-5:]])
        assert last < most * first, (key, first, last)
    assert all(math.isfinite(r["grad_norm"]) and r["samples_per_s"] > 0 for r in m)
    # warm-up over the first epoch's 2 steps: (s + 1) / 2 of the lr, then the cosine
    assert m[0]["lr"] == pytest.approx(2.5e-3) and m[1]["lr"] == pytest.approx(5e-3)
    assert max(r["lr"] for r in m) == pytest.approx(5e-3)


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(images, reports, tokenizer, tmp_path, caplog):
    cfg = PretrainConfig(
        epochs=3, batch_size=4, accum_iter=2, warmup_epochs=1, lr=1e-3, num_workers=0, seed=3
    )
    mcfg = model_cfg(tokenizer)
    ds = PretrainDataset(records(images, reports), mcfg, cfg)
    full = train(mcfg, cfg, ds, collator(tokenizer), tmp_path / "full", progress=False).metrics
    part = train(mcfg, cfg, ds, collator(tokenizer), tmp_path / "cut", progress=False, stop_after=3)
    assert not part.finished and len(part.metrics) == 3  # stopped mid-epoch (2 steps per epoch)
    resumed = train(mcfg, cfg, ds, collator(tokenizer), tmp_path / "cut", progress=False)
    assert resumed.resumed_from == 3 and resumed.finished
    assert len(resumed.metrics) == len(full) == 6
    for a, b in zip(full, resumed.metrics, strict=True):
        for key in ("mim", "sr", "mlm", "total", "lr", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-6, rel=0), (a["step"], key)
    # another seed makes the checkpoint stale: warned about and not resumed
    with caplog.at_level(logging.WARNING):
        other = train(
            mcfg,
            cfg.model_copy(update={"seed": 4}),
            ds,
            collator(tokenizer),
            tmp_path / "cut",
            progress=False,
            stop_after=1,
        )
    assert other.resumed_from is None
    assert (
        f"{tmp_path / 'cut' / 'checkpoint.pt'} was made with other settings (train.seed): starting from "
        f"scratch" in caplog.text
    )


def test_partial_init_from_an_mae_checkpoint(tmp_path):
    cfg = ECAMPConfig(**{**MODEL, "vocab_size": 50})
    donor = ECAMP(cfg)
    mae = {k.removeprefix("encoder."): v for k, v in donor.encoder.state_dict().items()}
    mae |= {k.removeprefix("decoder."): v for k, v in donor.decoder.state_dict().items()}
    mae["head.weight"] = torch.zeros(3)  # not in ECAMP
    torch.save({"model": mae, "args": {"note": "MAE layout"}}, tmp_path / "mae.pth")
    model = ECAMP(cfg)
    loaded, skipped = load_partial(model, tmp_path / "mae.pth")
    assert "encoder.blocks.0.attn.qkv.weight" in loaded and "decoder.mask_token" in loaded
    assert torch.equal(model.encoder.blocks[0].attn.qkv.weight, donor.encoder.blocks[0].attn.qkv.weight)
    assert skipped == ["head.weight: no such parameter"]
    mae["decoder_pred.weight"] = torch.zeros(5, 5)  # another model's shape: an error, never a silent skip
    torch.save({"model": mae}, tmp_path / "other.pth")
    with pytest.raises(
        ValueError, match=r"other.pth: shape mismatch .*decoder_pred.weight \(5, 5\) vs \(192, 32\)"
    ):
        load_partial(ECAMP(cfg), tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="init_checkpoint .* does not exist"):
        load_partial(model, tmp_path / "missing.pth")


def test_pre_training_must_choose_its_initialization_and_says_where_to_get_mae(tmp_path):
    from models.ecamp.pretrain import MAE_URL, check_init_checkpoint

    with pytest.raises(
        ValueError, match=r"init_checkpoint is not set: the official runs start from MAE ImageNet"
    ):
        check_init_checkpoint(PretrainConfig())
    with pytest.raises(FileNotFoundError) as err:
        check_init_checkpoint(PretrainConfig(init_checkpoint=str(tmp_path / "mae.pth")))
    assert str(err.value) == (
        f"pretrain_ecamp.train.init_checkpoint {tmp_path / 'mae.pth'} not found: the official runs start "
        f"from MAE ImageNet ViT-B: download {MAE_URL} and set pretrain_ecamp.train.init_checkpoint=<its "
        f"path>, or set pretrain_ecamp.train.init_checkpoint=random to pre-train from random weights"
    )
    check_init_checkpoint(PretrainConfig(init_checkpoint="random"))  # the explicit opt-out passes


def test_torchrun_entry_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--job" in capsys.readouterr().out


# ---- the loader: workers, persistence, pinning, prefetch, decoding on the device
# --------------------------------
def test_loader_options_follow_the_config():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader_options(PretrainConfig(num_workers=0), cpu) == {"num_workers": 0, "pin_memory": False}
    assert loader_options(PretrainConfig(num_workers=0), cuda) == {"num_workers": 0, "pin_memory": True}
    assert loader_options(PretrainConfig(num_workers=3, pin_memory=False, prefetch_factor=4), cuda) == {
        "num_workers": 3,
        "pin_memory": False,
        "persistent_workers": True,
        "prefetch_factor": 4,
        "timeout": 600,
    }


def test_persistent_workers_draw_each_epochs_augmentation(images, reports, tokenizer, tmp_path):
    """A persistent worker keeps its own copy of the dataset, which an epoch set in the main process never
    reaches: the epoch travels with each index from the sampler, so 3 epochs on 2 persistent workers = 3
    epochs in-process."""
    mcfg = model_cfg(tokenizer)
    base = dict(epochs=3, batch_size=4, accum_iter=1, warmup_epochs=0, lr=1e-3, seed=5)
    runs = {}
    for name, workers in (("in_process", 0), ("persistent", 2)):
        cfg = PretrainConfig(**base, num_workers=workers, persistent_workers=True)
        ds = PretrainDataset(records(images, reports), mcfg, cfg)
        runs[name] = train(mcfg, cfg, ds, collator(tokenizer), tmp_path / name, progress=False).metrics
    assert len(runs["persistent"]) == len(runs["in_process"]) == 12
    for a, b in zip(runs["in_process"], runs["persistent"], strict=True):
        assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
        for key in ("mim", "sr", "mlm", "total", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-6, rel=0), (a["step"], key)
    sampler = ResumableSampler(
        PretrainDataset(records(images, reports), mcfg, PretrainConfig()), 1, 0, seed=5, batch_size=4
    )
    sampler.set_epoch(2)
    assert {epoch for epoch, _ in sampler} == {2} and sorted(i for _, i in sampler) == list(range(16))


def jpeg_records(images, reports, folder: Path) -> list[PretrainRecord]:
    folder.mkdir(exist_ok=True)
    out = []
    for rec in records(images, reports):
        path = folder / f"{rec.image_id}.jpg"
        PILImage.open(rec.path).save(path, quality=90)
        out.append(dataclasses.replace(rec, path=str(path)))
    return out


def test_decoding_on_the_device_gives_the_worker_path_batches(images, reports, tokenizer, tmp_path):
    """decode=device: the workers only read the JPEG's bytes and draw the crop; the device decodes and
    augments. On CPU both decoders are libjpeg, so the batches are equal; on CUDA (nvJPEG) bench/gpu.py
    measures the gap."""
    mcfg, recs = model_cfg(tokenizer), jpeg_records(images, reports, tmp_path / "jpeg")
    batches = {}
    for decode in ("worker", "device"):
        cfg = PretrainConfig(mean=0.5, std=0.25, decode=decode)
        ds = PretrainDataset(recs, mcfg, cfg)
        samples = [ds[(1, i)] for i in (0, 3, 7)]
        assert ("jpeg" in samples[0]) == (decode == "device")
        batch = PretrainCollator(collator(tokenizer), seed=0)(samples)
        batches[decode] = ds.to_device(batch, torch.device("cpu"))
    worker, device = batches["worker"], batches["device"]
    assert set(device) == set(worker) and device["imgs_hr"].shape == (3, 3, 64, 64)
    assert device["imgs_lr"].shape == (3, 3, 32, 32)
    for key in ("imgs_hr", "imgs_lr", "window", "input_ids"):
        assert torch.allclose(device[key].float(), worker[key].float(), atol=1e-5), key
    assert not torch.equal(worker["imgs_hr"][0], worker["imgs_hr"][1])  # really three different crops


def test_training_with_device_decoding_equals_training_with_worker_decoding(
    images, reports, tokenizer, tmp_path
):
    """The device path through 2 persistent workers (its bytes cross processes: one tensor per batch, since a
    tensor per image exhausted the shared-memory handles and hung the loader) against the worker path
    in-process."""
    mcfg, recs = model_cfg(tokenizer), jpeg_records(images, reports, tmp_path / "jpeg")
    base = dict(epochs=2, batch_size=4, accum_iter=1, warmup_epochs=0, lr=1e-3, seed=1)
    metrics = {}
    for decode, workers in (("worker", 0), ("device", 2)):
        cfg = PretrainConfig(**base, decode=decode, num_workers=workers, worker_timeout_s=60)
        ds = PretrainDataset(recs, mcfg, cfg)
        metrics[decode] = train(mcfg, cfg, ds, collator(tokenizer), tmp_path / decode, progress=False).metrics
    assert len(metrics["device"]) == 8
    for a, b in zip(metrics["worker"], metrics["device"], strict=True):
        assert a["total"] == pytest.approx(b["total"], abs=1e-5), a["step"]


def test_device_decoding_refuses_what_it_cannot_decode(images, reports, tokenizer, tmp_path):
    cfg = PretrainConfig(decode="device")
    with pytest.raises(ValueError, match=r"decode=device decodes JPEG files only; image i0 is .*im0\.png"):
        PretrainDataset(records(images, reports), model_cfg(tokenizer), cfg)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    ds = PretrainDataset(
        [PretrainRecord("b", "s", str(broken), "x", None, (0, 0, 1, 1))], model_cfg(tokenizer), cfg
    )
    with pytest.raises(ValueError, match=r"broken\.jpg: not a readable JPEG"):
        ds[(0, 0)]
    with pytest.raises(
        ValueError, match=r"train.decode=device decodes the original JPEGs .*\(set image_cache\.enabled=false"
    ):
        load_config(None, ["pretrain_ecamp.train.decode=device"])
    config = load_config(
        None, ["pretrain_ecamp.train.decode=device", "pretrain_ecamp.image_cache.enabled=false"]
    )
    assert config.pretrain_ecamp.train.decode == "device"


# ---- the stage
# -------------------------------------------------------------------------------------------------
def write_upstream(run_dir, images, reports, with_attention: bool, validate: int = 0) -> None:
    """Images 0..n-2 train (the last `validate` of them validate instead), n-1 test, plus an orphan image."""
    n = len(images)

    def split(i: int) -> str:
        return "test" if i == n - 1 else "validate" if i >= n - 1 - validate else "train"

    seed_artifact(
        run_dir,
        "extract_reports/images",
        [
            Image(
                image_id=f"i{i}",
                study_id=f"s{i}",
                subject_id="p",
                split=split(i),
                path=p,
                view="PA",
                height=48,
                width=40,
                stamp=stat_stamp(p),
            )
            for i, p in enumerate(images)
        ]
        + [
            Image(
                image_id="orphan",
                study_id="none",
                subject_id="p",
                split="train",
                path=images[0],
                view="PA",
                height=48,
                width=40,
                stamp=stat_stamp(images[0]),
            )
        ],
    )
    seed_artifact(
        run_dir,
        "extract_reports/reports",
        [
            Report(
                study_id=f"s{i}",
                subject_id="p",
                split="train",
                findings=reports[i],
                impression="",
                text=reports[i],
                source_path="x",
            )
            for i in range(n)
        ],
    )
    seed_artifact(run_dir, "match_entities/lexicon", lexicon_rows(load_entity_list(DEFAULT_ENTITY_LIST)))
    if with_attention:
        seed_artifact(
            run_dir,
            "train_gloria/attention_maps",
            [
                AttentionMap(
                    image_id=f"i{i}",
                    study_id=f"s{i}",
                    entities=["effusion"],
                    attention=[1 / 16] * 16,
                    grid=4,
                    window_row=i % 3,
                    window_col=0,
                    window_size=2,
                    fallback="none",
                )
                for i in range(n)
            ],
        )


@pytest.mark.parametrize("with_attention", [False, True])
def test_stage_writes_metrics_encoder_and_says_what_it_fell_back_to(
    tmp_path, images, reports, caplog, with_attention
):
    write_upstream(tmp_path, images, reports, with_attention)
    config = load_config(
        None,
        [
            *MODEL_SETTINGS,
            "pretrain_ecamp.model.vocab_size=400",
            "pretrain_ecamp.text.max_len=48",
            "pretrain_ecamp.tokenizer_min_frequency=1",
            "pretrain_ecamp.train.epochs=2",
            "pretrain_ecamp.train.batch_size=4",
            "pretrain_ecamp.train.accum_iter=1",
            "pretrain_ecamp.train.warmup_epochs=1",
            "pretrain_ecamp.train.num_workers=0",
            "run.device=cpu",
        ],
    )
    ctx = make_test_context(tmp_path, config, stage="pretrain_ecamp")
    with caplog.at_level(logging.INFO):
        run_direct(ctx, config.pretrain_ecamp)
    assert "context distillation OFF" in caplog.text
    assert ("context-guided SR OFF" in caplog.text) is not with_attention
    assert (
        "0 held-out pairs in splits ['validate']: the text side's image reliance is not measured"
        in caplog.text
    )
    metrics = read_artifact(ctx.stage_dir / "pretrain_metrics.parquet").to_pylist()
    assert [r["step"] for r in metrics] == list(range(1, 7))  # 15 train images // 4 = 3 steps × 2 epochs
    rejects = read_artifact(ctx.stage_dir / "pretrain_rejects.parquet").to_pylist()
    assert rejects == [
        {
            "image_id": "orphan",
            "study_id": "none",
            "reason": "no report for this study in extract_reports/reports",
        }
    ]
    vit = load_timm_encoder(ctx.stage_dir / "encoder.safetensors")
    assert vit.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 17, 32)
    card = (ctx.stage_dir / "MODEL_CARD.md").read_text()
    assert f"attention windows: {15 if with_attention else 0}" in card
    assert "## Image reliance of the text side\n\nNot measured (no held-out pair)." in card
    assert all(r["reliance_acc"] is None for r in metrics)
    assert (ctx.stage_dir / "tokenizer.json").exists() and (
        ctx.stage_dir / "train" / "checkpoint.pt"
    ).exists()
    trained_on = [
        json.loads(line) for line in (ctx.stage_dir / "job" / "records.jsonl").read_text().splitlines()
    ]
    assert all(
        Path(r["path"]).parent == ctx.stage_dir / "image_cache" for r in trained_on
    )  # each image decoded once
    assert all(r["path"].endswith(".npy") and len(r["source_size"]) == 2 for r in trained_on)


def test_the_stage_measures_image_reliance_on_held_out_studies(tmp_path, images, reports, caplog):
    """Issue 23 item 2: held-out pairs (the validate split) give the last metrics row, the card and the log
    the text side's accuracy and loss with the paired and a mismatched image; the held-out images are not
    trained on."""
    write_upstream(tmp_path, images, reports, with_attention=False, validate=4)
    config = load_config(
        None,
        [
            *MODEL_SETTINGS,
            "pretrain_ecamp.model.vocab_size=400",
            "pretrain_ecamp.text.max_len=48",
            "pretrain_ecamp.tokenizer_min_frequency=1",
            "pretrain_ecamp.train.epochs=2",
            "pretrain_ecamp.train.batch_size=4",
            "pretrain_ecamp.train.accum_iter=1",
            "pretrain_ecamp.train.warmup_epochs=1",
            "pretrain_ecamp.train.num_workers=0",
            "pretrain_ecamp.train.reliance_every_epoch=true",
            "run.device=cpu",
        ],
    )
    ctx = make_test_context(tmp_path, config, stage="pretrain_ecamp")
    with caplog.at_level(logging.INFO):
        run_direct(ctx, config.pretrain_ecamp)
    assert "image reliance: measured on 4 held-out pairs (splits ['validate'])" in caplog.text
    metrics = read_artifact(ctx.stage_dir / "pretrain_metrics.parquet").to_pylist()
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]  # 11 train images // 4 = 2 steps x 2 epochs
    measured = [r["step"] for r in metrics if r["reliance_acc"] is not None]
    assert measured == [2, 4]  # every epoch's last step
    last = metrics[-1]
    assert last["reliance_acc"] == pytest.approx(last["heldout_acc_paired"] - last["heldout_acc_mismatched"])
    assert last["reliance_loss"] == pytest.approx(
        last["heldout_loss_mismatched"] - last["heldout_loss_paired"]
    )
    assert last["heldout_tokens"] > 0
    assert (
        f"image reliance at step 4 ({last['heldout_tokens']} held-out entity/descriptor tokens)"
        in caplog.text
    )
    card = (ctx.stage_dir / "MODEL_CARD.md").read_text()
    assert "## Image reliance of the text side" in card
    assert f"| accuracy | {last['heldout_acc_paired']:.4f} | {last['heldout_acc_mismatched']:.4f} |" in card
    trained_on = (ctx.stage_dir / "job" / "records.jsonl").read_text()
    held = [json.loads(line) for line in (ctx.stage_dir / "job" / "heldout.jsonl").read_text().splitlines()]
    assert sorted(r["image_id"] for r in held) == ["i11", "i12", "i13", "i14"]
    assert all(f'"{r["image_id"]}"' not in trained_on for r in held)


def test_a_finished_checkpoint_is_not_resumed_under_another_masking(tmp_path, images, reports, caplog):
    """A forced or resumed stage continues its kept checkpoint only when it would train the same thing: the
    text side's settings (here Eq. 3's λ_neg) are part of what a checkpoint was made on."""
    write_upstream(tmp_path, images, reports, with_attention=False)
    base = [
        *MODEL_SETTINGS,
        "pretrain_ecamp.model.vocab_size=400",
        "pretrain_ecamp.text.max_len=48",
        "pretrain_ecamp.tokenizer_min_frequency=1",
        "pretrain_ecamp.train.epochs=1",
        "pretrain_ecamp.train.batch_size=4",
        "pretrain_ecamp.train.accum_iter=1",
        "pretrain_ecamp.train.warmup_epochs=0",
        "pretrain_ecamp.train.num_workers=0",
        "run.device=cpu",
    ]
    encoder = tmp_path / "pretrain_ecamp" / "encoder.safetensors"
    for lambda_neg, expected in ((0.05, "resumed from"), (0.25, "starting from scratch")):
        run_direct(
            make_test_context(tmp_path, config := load_config(None, base), stage="pretrain_ecamp"),
            config.pretrain_ecamp,
        )
        first = encoder.read_bytes()
        caplog.clear()
        again = load_config(None, [*base, f"pretrain_ecamp.text.lambda_neg={lambda_neg}"])
        ctx = make_test_context(tmp_path, again, stage="pretrain_ecamp")
        ctx.run_id = "another-flow-run"
        with caplog.at_level(logging.INFO):
            run_direct(ctx, again.pretrain_ecamp)
        assert expected in caplog.text, (lambda_neg, caplog.text)
        # issue 27 item 7: the same weights re-exported by another run are the same file, so evaluate stays
        # cached
        assert (encoder.read_bytes() == first) is (lambda_neg == 0.05)


def test_ablation_rows_are_valid_overrides():
    import yaml

    for table, rows in pretrain_ecamp.ABLATIONS.items():
        for row, overrides in rows.items():
            section = load_config(None, overrides).pretrain_ecamp.model_dump()
            for override in overrides:  # each override reaches the field it names
                key, value = override.removeprefix("pretrain_ecamp.").split("=", 1)
                group, field = key.split(".")
                assert section[group][field] == yaml.safe_load(value), (table, row, override)
    t7 = pretrain_ecamp.ABLATIONS["7"]
    base = load_config(None, t7["base"]).pretrain_ecamp
    assert base.text.text_composition == "origin" and not base.text.descriptor_masking
    assert not base.text.rebalance and not base.model.sr
    mim_sr = load_config(None, t7["mim_sr"]).pretrain_ecamp.model  # ECAMP's image side alone: SR kept
    assert mim_sr.sr and not mim_sr.text_side
    assert (
        load_config(None, pretrain_ecamp.ABLATIONS["9"]["lambda_0.25"]).pretrain_ecamp.text.lambda_neg == 0.25
    )
    assert pretrain_ecamp.ablation_rows("9", ["lambda_0.1"]) == {
        "lambda_0.1": ["pretrain_ecamp.text.lambda_neg=0.1"]
    }
    with pytest.raises(KeyError, match="table 7 has no rows"):
        pretrain_ecamp.ablation_rows("7", ["nope"])
    with pytest.raises(KeyError, match="unknown ablation table '10'"):
        pretrain_ecamp.ablation_rows("10")


# ---- failures: non-finite losses and weights, a full disk
# -----------------------------------------------------
def tiny_train_cfg(**changes) -> PretrainConfig:
    base = dict(epochs=2, batch_size=4, accum_iter=1, warmup_epochs=0, lr=1e-3, num_workers=0, seed=0)
    return PretrainConfig(**{**base, **changes})


def test_an_infinite_lr_stops_at_the_first_non_finite_loss(images, reports, tokenizer, tmp_path):
    """Reliability #13: lr=inf used to train on and export an all-NaN encoder."""
    cfg, mcfg = tiny_train_cfg(lr=math.inf), model_cfg(tokenizer)
    ds = PretrainDataset(records(images, reports), mcfg, cfg)
    with pytest.raises(FloatingPointError) as err:
        train(mcfg, cfg, ds, collator(tokenizer), tmp_path / "train", progress=False)
    assert str(err.value).startswith("ECAMP loss is nan at epoch 0, step 2 (non-finite: mim=nan, ")
    assert "total=nan); lower the learning rate" in str(err.value)
    assert list((tmp_path / "train").iterdir()) == []  # no checkpoint of the broken weights


def test_the_stage_exports_no_encoder_when_the_loss_goes_non_finite(tmp_path, images, reports):
    write_upstream(tmp_path, images, reports, with_attention=False)
    config = load_config(
        None,
        [
            *MODEL_SETTINGS,
            "pretrain_ecamp.model.vocab_size=400",
            "pretrain_ecamp.text.max_len=48",
            "pretrain_ecamp.tokenizer_min_frequency=1",
            "pretrain_ecamp.train.epochs=2",
            "pretrain_ecamp.train.batch_size=4",
            "pretrain_ecamp.train.accum_iter=1",
            "pretrain_ecamp.train.num_workers=0",
            "pretrain_ecamp.train.lr=.inf",
            "run.device=cpu",
        ],
    )
    ctx = make_test_context(tmp_path, config, stage="pretrain_ecamp")
    with pytest.raises(FloatingPointError, match=r"^ECAMP loss is nan at epoch 0, step \d+ \(non-finite: "):
        run_direct(ctx, config.pretrain_ecamp)
    left = sorted(p.name for p in tmp_path.rglob("*"))  # the stage folder and its attempt folders
    assert not {"encoder.safetensors", "encoder.tmp", "MODEL_CARD.md", "checkpoint.pt"} & set(left), left


def test_export_refuses_non_finite_weights(tmp_path):
    model = ECAMP(ECAMPConfig(**{**MODEL, "vocab_size": 50}))
    with torch.no_grad():
        model.encoder.blocks[0].attn.qkv.weight[0, 0] = float("nan")
        model.encoder.norm.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError) as err:
        export_encoder(model, tmp_path / "encoder.safetensors")
    assert str(err.value) == (
        f"refusing to export {tmp_path / 'encoder.safetensors'}: non-finite encoder weights in "
        f"blocks.0.attn.qkv.weight, norm.bias (2 of {len(model.encoder.state_dict())} tensors)"
    )
    assert list(tmp_path.iterdir()) == []


TORCH_DISK_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def failing_save(err: BaseException):
    """torch.save that writes a few bytes, then fails the way a full disk makes it fail."""

    def save(obj, f, *args, **kwargs) -> None:
        f.write(b"PK\x03\x04 partial")
        raise err

    return save


@pytest.mark.parametrize("err", [TORCH_DISK_FULL, OSError(errno.ENOSPC, "No space left on device")])
def test_a_full_disk_while_checkpointing_is_one_clear_line(
    images, reports, tokenizer, tmp_path, monkeypatch, err
):
    """Reliability #14f: torch's `enforce fail at inline_container.cc` and a leftover .tmp file, before."""
    cfg, mcfg = tiny_train_cfg(epochs=1), model_cfg(tokenizer)
    ds = PretrainDataset(records(images, reports), mcfg, cfg)
    out = tmp_path / "train"
    train(mcfg, cfg, ds, collator(tokenizer), out, progress=False, stop_after=1)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    monkeypatch.setattr(torch, "save", failing_save(err))
    with pytest.raises(CheckpointWriteError) as raised:
        train(mcfg, cfg, ds, collator(tokenizer), out, progress=False, stop_after=2)
    assert str(raised.value).startswith(f"no space left on device writing checkpoint {out / 'checkpoint.pt'}")
    assert "the partial file was removed" in str(raised.value) and "\n" not in str(raised.value)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]  # no checkpoint.pt.tmp
    monkeypatch.undo()
    kept = torch.load(out / "checkpoint.pt", weights_only=True)
    assert kept["state"]["step"] == saved["state"]["step"] == 1  # the previous checkpoint, intact


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path):
    model = ECAMP(ECAMPConfig(**{**MODEL, "vocab_size": 50}))
    with torch.no_grad():
        model.decoder.mask_token.fill_(float("nan"))
    optimizer = torch.optim.AdamW(model.parameters())
    resume = ResumeFile(
        tmp_path / "checkpoint.pt", "ECAMP pre-training", {}, one_process("cpu"), logging.getLogger()
    )
    with pytest.raises(
        FloatingPointError, match=r"refusing to save checkpoint .*: non-finite weights in decoder"
    ):
        resume.save(model, optimizer, warmup_cosine(optimizer, 1, 2), {"step": 1})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux /dev/full")
def test_a_really_full_device_gives_the_same_line(tmp_path):
    """No monkeypatch: the temp file is a link to /dev/full, whose every write fails with ENOSPC."""
    (tmp_path / "checkpoint.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(
        CheckpointWriteError, match=r"^no space left on device writing checkpoint .*checkpoint\.pt;"
    ):
        save_atomic({"w": torch.zeros(100_000)}, tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


def test_cuda_without_cuda_is_a_device_error_before_any_file(
    images, reports, tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg, mcfg = tiny_train_cfg(), model_cfg(tokenizer)
    ds = PretrainDataset(records(images, reports), mcfg, cfg)
    with pytest.raises(DeviceError, match=r"^run.device is 'cuda' but torch sees no CUDA device"):
        train(mcfg, cfg, ds, collator(tokenizer), tmp_path / "train", device="cuda", progress=False)
    assert not (tmp_path / "train").exists()
