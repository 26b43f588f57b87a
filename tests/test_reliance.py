"""The text side's image reliance: on a corpus where a masked word is visible only in the image, it is clearly
above zero after short training, and exactly zero when the images carry nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from models.ecamp.config import PretrainConfig
from models.ecamp.data import PretrainDataset, PretrainRecord, heldout_set
from models.ecamp.model import ECAMPConfig
from models.ecamp.pretrain import train
from models.ecamp.reliance import HeldOutBatch, heldout_records, measure_reliance, reliance_line
from models.text.masking import TextCollator, TextMaskingConfig
from models.text.wordpiece import train_wordpiece

torch.set_num_threads(1)
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
    max_len=16,
    mask_ratio=0.5,
    sr=False,
)
SIDES = ("left", "right")


def side_corpus(folder, n: int, seed: int) -> list[PretrainRecord]:
    """Noise images with the left or right half brighter; the report names the side, and nothing else differs:
    "there is a left opacity." The side is a descriptor of "opacity", so it is always masked."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(seed)
    records = []
    for i in range(n):
        side = int(gen.integers(2))
        img = gen.normal(90, 20, (48, 48))
        img[:, 24 * side : 24 * side + 24] += 100
        path = folder / f"{seed}_{i}.png"
        PILImage.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        text = f"there is a {SIDES[side]} opacity."
        records.append(
            PretrainRecord(f"i{seed}_{i}", f"s{seed}_{i}", str(path), text, None, (0.0, 0.0, 1.0, 1.0))
        )
    return records


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("side")
    train_records, held = side_corpus(root / "train", 64, 0), side_corpus(root / "held", 32, 1)
    tokenizer = train_wordpiece([r.text for r in train_records], vocab_size=60, min_frequency=1)
    collator = TextCollator(tokenizer, TextMaskingConfig(max_len=16, text_composition="origin"), ["opacity"])
    model_cfg = ECAMPConfig(**MODEL, vocab_size=tokenizer.get_vocab_size())
    cfg = PretrainConfig(
        epochs=60,
        batch_size=16,
        accum_iter=1,
        warmup_epochs=2,
        lr=3e-3,
        num_workers=0,
        seed=0,
        hflip=False,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
    )  # the side stays
    dataset = PretrainDataset(train_records, model_cfg, cfg)
    batches = heldout_set(held, dataset, collator, cfg)
    result = train(model_cfg, cfg, dataset, collator, root / "out", progress=False, heldout=batches)
    return {"result": result, "batches": batches}


def test_reliance_is_clearly_above_zero_when_the_side_is_only_in_the_image(trained):
    metrics = trained["result"].metrics
    assert len(metrics) == 240 and all(
        "reliance_acc" not in m for m in metrics[:-1]
    )  # measured at the end only
    last = metrics[-1]
    # 32 reports x the 2 descriptors ("a", the side: always masked) + "opacity" (masked at 75 %)
    assert 64 < last["heldout_tokens"] < 96
    assert last["heldout_acc_paired"] > 0.9, last  # measured 1.00
    assert last["reliance_acc"] > 0.1, last  # measured 0.25 (1.00 vs 0.75: the side is 32 of the 89 tokens)
    assert last["reliance_loss"] > 0.5, last  # measured 1.33 (0.007 vs 1.337)
    assert last["reliance_acc"] == pytest.approx(last["heldout_acc_paired"] - last["heldout_acc_mismatched"])
    assert reliance_line(last).startswith(
        f"image reliance at step 240 ({last['heldout_tokens']} held-out entity/descriptor tokens): acc "
    )


def test_reliance_is_zero_when_the_images_are_blank_and_measuring_changes_no_draw(trained):
    model = trained["result"].model
    blank = [
        HeldOutBatch(torch.zeros_like(b.imgs_lr), b.input_ids, b.attention_mask, b.labels, b.focus)
        for b in trained["batches"]
    ]
    state = torch.get_rng_state()
    measured = measure_reliance(model, blank, torch.device("cpu"), seed=0)
    assert torch.equal(torch.get_rng_state(), state) and model.training  # training would go on unchanged
    assert measured["reliance_acc"] == 0.0 and abs(measured["reliance_loss"]) < 1e-6, measured
    assert measured["heldout_acc_paired"] < 0.9  # without the image the side is a guess
    again = measure_reliance(model, trained["batches"], torch.device("cpu"), seed=0)
    last = trained["result"].metrics[-1]
    assert {k: last[k] for k in again} == again  # the same numbers as at the end of training


def test_held_out_pairs_keep_one_image_per_study_in_a_seeded_order():
    recs = [PretrainRecord(f"i{k}", f"s{k // 2}", "p", "t", None, (0, 0, 1, 1)) for k in range(10)]
    chosen = heldout_records(recs, seed=0, max_pairs=4)
    assert len(chosen) == 4 and len({r.study_id for r in chosen}) == 4
    assert all(int(r.image_id[1:]) % 2 == 0 for r in chosen)  # each study's first image
    assert chosen == heldout_records(recs, seed=0, max_pairs=4) != heldout_records(recs, seed=1, max_pairs=4)
