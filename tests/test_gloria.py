"""GLoRIA model, losses, training/resume, attention windows, localization and the train_gloria stage."""

from __future__ import annotations

import errno
import itertools
import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pydantic
import pytest
import torch

from models.checkpoints import CheckpointWriteError
from models.gloria.attention import (
    argmax_cells,
    best_windows,
    entity_positions,
    fallback_windows,
    localization,
    matches_entity,
    random_localization,
    rasterize_boxes,
    to_grid,
    window_sums,
)
from models.gloria.model import (
    Gloria,
    GloriaConfig,
    aggregate_words,
    attention_weights,
    encode_texts,
    global_loss,
    group_subwords,
    local_loss,
    region_scores,
)
from models.gloria.train import (
    ImageTextData,
    TrainConfig,
    affirmed_words,
    extract_attention,
    square_uint8,
    train_gloria,
)
from models.text.wordpiece import train_wordpiece

from .conftest import REPO_ROOT

torch.set_num_threads(1)

TEXTS = [
    "there is a small left pleural effusion",
    "there may be right basal atelectasis",
    "heart size is normal and there is no pneumothorax",
    "there is cardiomegaly with mild edema",
]
TINY = GloriaConfig(
    encoder="small",
    image_size=32,
    small_width=8,
    embed_dim=16,
    vocab_size=120,
    text_hidden=16,
    text_layers=2,
    text_heads=2,
    text_intermediate=32,
    max_tokens=24,
)


@pytest.fixture(scope="module")
def tokenizer():
    extra = ["there is a left opacity", "there is a right effusion"]
    return train_wordpiece((TEXTS + extra) * 5, vocab_size=120, min_frequency=1)


# ---------------------------------------------------------------------------------------------- words


def test_group_subwords_sums_pieces_and_stops_at_sep():
    tokens = ["[CLS]", "pleu", "##ral", "eff", "##us", "##ion", "is", "##small", "[SEP]", "late", "[PAD]"]
    index, words = group_subwords(tokens)
    assert words == ["pleural", "effusion", "issmall"]
    assert index == [-1, 0, 0, 1, 1, 1, 2, 2, -1, -1, -1]


def test_group_subwords_leading_piece_starts_a_word():
    index, words = group_subwords(["[CLS]", "##ab", "cd", "##e", "[SEP]"])
    assert words == ["ab", "cde"] and index == [-1, 0, 1, 1, -1]


def test_aggregate_words_sums_token_vectors():
    hidden = torch.arange(12, dtype=torch.float).view(1, 6, 2)  # tokens t0..t5, vectors [2t, 2t+1]
    word_index = torch.tensor([[-1, 0, 0, 1, -1, -1]])
    out = aggregate_words(hidden, word_index, n_max=3)
    assert out.shape == (1, 3, 2)
    assert out[0].tolist() == [[2 + 4, 3 + 5], [6, 7], [0, 0]]


def test_encode_texts_words_match_whitespace_words(tokenizer):
    batch = encode_texts(tokenizer, TEXTS, max_tokens=24)
    assert batch.words == [t.split() for t in TEXTS]
    assert batch.n_words.tolist() == [len(t.split()) for t in TEXTS]
    assert (batch.input_ids[:, 0] == tokenizer.token_to_id("[CLS]")).all()
    truncated = encode_texts(tokenizer, TEXTS[2:3], max_tokens=5)
    assert truncated.input_ids.shape == (1, 5) and truncated.n_words.item() <= 3


# ---------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("mode", ["double", "single"])
def test_attention_weights_sum_to_one_over_regions(mode):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 5, 7, generator=g) * 4
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    attn = attention_weights(scores, mask[..., None], 4.0, mode)
    assert attn.shape == (3, 5, 7)
    assert torch.allclose(attn.sum(-1), torch.ones(3, 5), atol=1e-6)
    assert (attn >= 0).all()


def test_double_softmax_is_normalised_over_words_first():
    scores = torch.tensor([[[0.0, 5.0], [0.0, -5.0]]])  # 2 words × 2 regions
    mask = torch.ones(1, 2, 1, dtype=torch.bool)
    attn = attention_weights(scores, mask, 4.0, "double")
    p_word0 = torch.softmax(torch.tensor([[0.0, 0.0], [5.0, -5.0]]), dim=1)[:, 0]  # per region, over words
    expected = torch.softmax(4 * p_word0, dim=0)
    assert torch.allclose(attn[0, 0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="softmax must be"):
        attention_weights(scores, mask, 4.0, "triple")  # type: ignore[arg-type]


def test_global_loss_is_low_for_matched_pairs():
    x = torch.eye(4) * 3
    assert global_loss(x, x, 10.0) < 0.01
    assert global_loss(x, x.roll(1, 0), 10.0) > 10.0


def test_local_loss_prefers_matching_words():
    torch.manual_seed(0)
    regions = torch.randn(4, 8, 6)  # 4 images, 8-d, 6 regions
    words = regions[:, :, :3].transpose(1, 2).clone()  # each caption's words are its own image's regions
    mask = torch.ones(4, 3, dtype=torch.bool)
    matched = local_loss(regions, words, mask, TINY)
    shuffled = local_loss(regions, words.roll(1, 0), mask, TINY)
    assert torch.isfinite(matched) and matched < shuffled


def test_padded_words_do_not_change_the_local_loss():
    torch.manual_seed(1)
    regions, words = torch.randn(3, 8, 5), torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    base = local_loss(regions, words, mask, TINY)
    noisy = words.clone()
    noisy[0, 2:] = 100.0
    noisy[1, 3] = -50.0
    assert torch.allclose(base, local_loss(regions, noisy, mask, TINY), atol=1e-5)


def test_cosine_scores_ignore_feature_norms():
    g = torch.Generator().manual_seed(0)
    regions, words = torch.randn(2, 8, 5, generator=g), torch.randn(3, 4, 8, generator=g)
    dot = region_scores(regions, words, "dot")
    assert dot.shape == (2, 3, 4, 5)
    assert torch.allclose(dot[1, 2], words[2] @ regions[1], atol=1e-5)
    sink = regions.clone()
    sink[:, :, 0] *= 50.0  # one huge-norm region ("sink"): its dot scores grow 50x, its cosines do not
    assert torch.allclose(region_scores(sink, words, "dot")[..., 0], 50 * dot[..., 0], atol=1e-4)
    cos = region_scores(sink, words, "cosine")
    assert torch.allclose(cos, region_scores(regions, words, "cosine"), atol=1e-5)
    assert cos.abs().max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="scores must be"):
        region_scores(regions, words, "l1")  # type: ignore[arg-type]


def test_affirmed_local_loss_uses_only_focus_words_and_pairs():
    torch.manual_seed(0)
    regions = torch.randn(4, 8, 6)
    words = torch.randn(4, 3, 8)
    words[:, 0] = regions[:, :, 0]  # word 0 of caption i is a region of image i: a perfect match
    mask = torch.ones(4, 3, dtype=torch.bool)
    focus = torch.zeros(4, 3, dtype=torch.bool)
    focus[:3, 0] = True  # captions 0-2 affirm a finding (word 0); caption 3 affirms none
    loss = local_loss(regions, words, mask, TINY, focus)
    noisy = words.clone()
    noisy[:, 1:] = torch.randn(4, 2, 8) * 10  # other words and caption 3 do not count
    noisy[3] = torch.randn(3, 8)
    assert torch.allclose(loss, local_loss(regions, noisy, mask, TINY, focus), atol=1e-5)
    shuffled = words.clone()
    shuffled[:3, 0] = words[[1, 2, 0], 0]
    assert loss < local_loss(regions, shuffled, mask, TINY, focus)
    none = local_loss(regions, words, mask, TINY, torch.zeros(4, 3, dtype=torch.bool))
    assert none.item() == 0.0


def test_affirmed_words_marks_entity_words_only():
    words = [["there", "is", "left", "effusions"], ["there", "is", "no", "mass"], ["cardiomegaly"]]
    focus = affirmed_words(words, [["effusion"], [], ["cardiomegaly", "edema"]], None, n_max=4)
    assert focus.tolist() == [
        [False, False, False, True],
        [False, False, False, False],
        [True, False, False, False],
    ]


def test_model_shapes_and_empty_caption_error(tokenizer):
    torch.manual_seed(0)
    model = Gloria(TINY)
    text = encode_texts(tokenizer, TEXTS, TINY.max_tokens)
    out = model(torch.randn(4, 1, 32, 32), text)
    assert out.regions.shape == (4, 16, 4, 4) and out.image_global.shape == (4, 16)
    assert out.words.shape == (4, int(text.n_words.max()), 16)
    attn = model.word_attention(out)
    assert attn.shape == (4, out.words.shape[1], 4, 4)
    assert torch.allclose(attn.flatten(2).sum(-1), torch.ones(4, attn.shape[1]), atol=1e-5)
    empty = encode_texts(tokenizer, ["", "heart"], TINY.max_tokens)
    with pytest.raises(ValueError, match="at least one word"):
        model(torch.randn(2, 1, 32, 32), empty)


def test_resnet50_geometry_is_gloria():
    cfg = GloriaConfig(
        embed_dim=8, vocab_size=50, text_hidden=8, text_layers=1, text_heads=1, text_intermediate=8
    )
    regions, glob = Gloria(cfg).image_encoder(torch.zeros(1, 1, 299, 299))
    assert regions.shape == (1, 8, 19, 19) and glob.shape == (1, 8)


# ---------------------------------------------------------------------------------------------- training


def synthetic_pairs(n: int, size: int = 32) -> tuple[np.ndarray, list[str]]:
    """Bright blob on the left or right half; the text says which (a learnable image-text pairing)."""
    rng = np.random.default_rng(0)
    images = (rng.random((n, size, size)) * 60).astype(np.uint8)
    texts = []
    for i in range(n):
        left = i % 2 == 0
        r, c = rng.integers(4, size - 12), rng.integers(2, size // 2 - 10) + (0 if left else size // 2)
        images[i, r : r + 8, c : c + 8] = 230
        texts.append("there is a left opacity" if left else "there is a right effusion")
    return images, texts


def test_losses_fall_and_are_finite(tokenizer):
    torch.manual_seed(0)
    images, texts = synthetic_pairs(32)
    rows = train_gloria(
        Gloria(TINY), ImageTextData(images, texts), tokenizer, TrainConfig(epochs=6, batch_size=8, lr=2e-3)
    )
    assert len(rows) == 6 * 4
    for key in ("loss", "loss_local", "loss_global"):
        values = np.array([r[key] for r in rows])
        assert np.isfinite(values).all()
        assert values[-4:].mean() < values[:4].mean() - 0.1, key
    lrs = [r["lr"] for r in rows]
    assert lrs[0] < lrs[3] and lrs[-1] < lrs[4]  # warm-up then cosine decay


def test_checkpoint_resume_reproduces_an_uninterrupted_run(tokenizer, tmp_path, caplog):
    images, texts = synthetic_pairs(16)
    data = ImageTextData(images, texts)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3)
    torch.manual_seed(0)
    full = train_gloria(Gloria(TINY), data, tokenizer, cfg)

    def stop_after_first(epoch: int, rows: list[dict]) -> None:
        if epoch == 0:
            raise KeyboardInterrupt

    ckpt = tmp_path / "gloria.pt"
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train_gloria(Gloria(TINY), data, tokenizer, cfg, ckpt, on_epoch=stop_after_first)
    torch.manual_seed(123)  # a fresh process: different init, must be overwritten by the checkpoint
    resumed = train_gloria(Gloria(TINY), data, tokenizer, cfg, ckpt)
    assert [r["step"] for r in resumed] == list(range(6))
    assert np.allclose([r["loss"] for r in resumed], [r["loss"] for r in full], atol=1e-5)
    # a checkpoint of other settings is not resumed (the engine's one rule): a warning naming them, a fresh
    # start
    longer = TrainConfig(epochs=4, batch_size=8, lr=1e-3)
    torch.manual_seed(0)
    fresh = train_gloria(Gloria(TINY), data, tokenizer, longer)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        restarted = train_gloria(Gloria(TINY), data, tokenizer, longer, ckpt)
    assert f"{ckpt} was made with other settings (epochs): starting from scratch" in caplog.text
    assert [r["loss"] for r in restarted] == pytest.approx([r["loss"] for r in fresh], abs=1e-6)


@pytest.mark.parametrize(
    "err",
    [
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_a_full_disk_while_checkpointing_is_one_clear_line(tokenizer, tmp_path, monkeypatch, err):
    """Reliability #14f: the second epoch's save fails like a full disk; the first epoch's checkpoint
    stays."""
    images, texts = synthetic_pairs(16)
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs) -> None:
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK partial")
        raise err

    monkeypatch.setattr(torch, "save", save)
    ckpt = tmp_path / "gloria.pt"
    with pytest.raises(CheckpointWriteError) as raised:
        train_gloria(
            Gloria(TINY), ImageTextData(images, texts), tokenizer, TrainConfig(epochs=2, batch_size=8), ckpt
        )
    assert str(raised.value).startswith(f"no space left on device writing checkpoint {ckpt}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gloria.pt"]  # no gloria.pt.tmp
    assert torch.load(ckpt, weights_only=True)["state"]["epoch"] == 0


def test_affirmed_local_words_train_on_entity_words(tokenizer):
    images, texts = synthetic_pairs(16)
    data = ImageTextData(images, texts)
    entities = [["opacity"] if i % 4 == 0 else [] for i in range(16)]  # 4 of 16 pairs affirm a finding
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, local_words="affirmed")
    torch.manual_seed(0)
    affirmed = train_gloria(Gloria(TINY), data, tokenizer, cfg, entities=entities)
    torch.manual_seed(0)
    plain = train_gloria(Gloria(TINY), data, tokenizer, TrainConfig(epochs=2, batch_size=8, lr=1e-3))
    assert len(affirmed) == len(plain) == 4
    assert all(np.isfinite(r["loss"]) for r in affirmed)
    assert np.isclose(affirmed[0]["loss_global"], plain[0]["loss_global"], atol=1e-5)  # same init and batch
    assert not np.isclose(affirmed[0]["loss_local"], plain[0]["loss_local"], atol=1e-3)
    none = train_gloria(Gloria(TINY), data, tokenizer, cfg, entities=[[]] * 16)
    assert all(r["loss_local"] == 0.0 for r in none)  # nothing affirmed: only the global loss trains
    with pytest.raises(ValueError, match="entity lists"):
        train_gloria(Gloria(TINY), data, tokenizer, cfg, entities=entities[:3])
    with pytest.raises(ValueError, match="local_words='affirmed' needs the affirmed entities"):
        train_gloria(Gloria(TINY), data, tokenizer, cfg)


def test_too_few_pairs_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="at least 2"):
        train_gloria(
            Gloria(TINY), ImageTextData(np.zeros((1, 32, 32), np.uint8), ["x"]), tokenizer, TrainConfig()
        )


def test_square_uint8_pads_centred():
    image = np.ones((20, 10), dtype=np.float32)
    out = square_uint8(image, 20)
    assert out.shape == (20, 20) and out.dtype == np.uint8
    assert out[:, :5].max() == 0 and out[:, 15:].max() == 0 and out[:, 5:15].min() == 255


def test_extract_attention_uses_positive_entity_words(tokenizer):
    torch.manual_seed(0)
    images, texts = synthetic_pairs(4)
    data = ImageTextData(images, texts)
    positives = [["opacity"], ["effusion"], ["nodule"], []]
    result = extract_attention(Gloria(TINY), data, tokenizer, positives, grid=8, batch_size=3, max_tokens=24)
    assert result.grid_maps.shape == (4, 8, 8)
    assert np.allclose(result.grid_maps.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert result.entity_found.tolist() == [True, True, False, False]
    assert result.entities == [["opacity"], ["effusion"], [], []]


@pytest.mark.parametrize("scores", ["dot", "cosine"])
def test_mean_attention_is_the_mean_of_own_attention_over_images(tokenizer, scores):
    torch.manual_seed(0)
    model = Gloria(
        TINY.model_copy(update={"scores": scores})
    ).eval()  # word_attention and region_scores agree
    images, _ = synthetic_pairs(3)
    batch = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    text = encode_texts(tokenizer, [TEXTS[0]] * 3, max_tokens=24)  # the same caption on 3 images
    with torch.no_grad():
        out = model(batch, text)
        own = model.word_attention(out).flatten(2)  # [3, W, R]
        regions = model.image_encoder(batch)[0].flatten(2)
        mean = model.mean_attention(regions, out.words[0], out.word_mask[0], chunk=2)
    assert mean.shape == own.shape[1:]
    assert torch.allclose(mean, own.mean(0), atol=1e-5)


def test_word_prior_makes_an_image_like_every_reference_image_uniform(tokenizer):
    torch.manual_seed(0)
    images, texts = synthetic_pairs(4)
    same = np.repeat(images[:1], 4, axis=0)  # every reference image is this image: nothing is image-specific
    data = ImageTextData(same, texts)
    positives = [["opacity"], ["effusion"], [], []]
    plain = extract_attention(Gloria(TINY), data, tokenizer, positives, 8, 3, 24)
    torch.manual_seed(0)
    corrected = extract_attention(Gloria(TINY), data, tokenizer, positives, 8, 3, 24, word_prior_images=3)
    assert np.abs(corrected.grid_maps[:2] - 1 / 64).max() < 1e-6  # entity pairs: ratio 1 everywhere
    assert np.allclose(corrected.grid_maps[2:], plain.grid_maps[2:], atol=1e-6)  # no entity word: unchanged
    assert np.abs(plain.grid_maps[:2] - 1 / 64).max() > 1e-4  # the uncorrected maps are not uniform
    assert corrected.entity_found.tolist() == [True, True, False, False]


# ---------------------------------------------------------------------------------------------- windows


def test_entity_matching_handles_inflections():
    assert matches_entity("effusions", "effusion") and matches_entity("opacities", "opacity")
    assert matches_entity("hyperinflation", "hyperinflated") and matches_entity("Edema", "edema")
    assert not matches_entity("mast", "mass") and not matches_entity("aortic", "abscess")
    assert entity_positions(["small", "effusions", "and", "edema"], ["edema", "effusion"]) == [1, 3]


def brute_force_window(grid_map: np.ndarray, k: int) -> tuple[int, int]:
    g = grid_map.shape[0]
    best, arg = -np.inf, (0, 0)
    for i, j in itertools.product(range(g - k + 1), repeat=2):
        s = grid_map[i : i + k, j : j + k].sum()
        if s > best + 1e-9:
            best, arg = s, (i, j)
    return arg


@pytest.mark.parametrize(("grid", "k"), [(14, 12), (8, 4), (7, 1), (5, 5)])
def test_box_filter_argmax_equals_brute_force(grid, k):
    maps = torch.rand(20, grid, grid, generator=torch.Generator().manual_seed(grid * 31 + k))
    rows, cols = best_windows(maps, k)
    for m, r, c in zip(maps.numpy(), rows.tolist(), cols.tolist(), strict=True):
        assert (r, c) == brute_force_window(m, k)
    assert window_sums(maps, k).shape == (20, grid - k + 1, grid - k + 1)


def test_every_window_placement_is_reachable_and_inside_the_grid():
    grid, k = 14, 12
    reached = set()
    for i, j in itertools.product(range(grid), repeat=2):
        m = torch.full((1, grid, grid), 0.01)
        m[0, i, j] = 1.0
        r, c = (int(x[0]) for x in best_windows(m, k))
        assert 0 <= r <= grid - k and 0 <= c <= grid - k
        assert r <= i < r + k and c <= j < c + k  # the peak is inside its window
        reached.add((r, c))
    assert reached == set(itertools.product(range(3), repeat=2))  # the official 9 placements
    with pytest.raises(ValueError, match="window size k=15"):
        best_windows(m, 15)


def test_fallback_windows():
    assert fallback_windows(3, 14, 12, "centre", 0).tolist() == [[1, 1]] * 3
    rand = fallback_windows(200, 8, 4, "random", 7)
    assert rand.min() == 0 and rand.max() == 4
    assert (rand == fallback_windows(200, 8, 4, "random", 7)).all()
    with pytest.raises(ValueError, match="fallback must be"):
        fallback_windows(1, 8, 4, "corner", 0)  # type: ignore[arg-type]


def test_argmax_cells_gives_each_maps_peak_row_and_column():
    maps = np.full((3, 8, 8), 0.01, np.float32)
    for i, (r, c) in enumerate([(0, 7), (5, 2), (7, 0)]):
        maps[i, r, c] = 1.0
    assert argmax_cells(maps).tolist() == [[0, 7], [5, 2], [7, 0]]


def test_to_grid_resamples_and_keeps_peak_location():
    m = torch.zeros(1, 19, 19)
    m[0, 3, 15] = 1.0
    g = to_grid(m, 14)
    assert g.shape == (1, 14, 14) and abs(float(g.sum()) - 1) < 1e-5
    r, c = divmod(int(g.flatten().argmax()), 14)
    assert abs(r - 3 * 14 / 19) <= 1 and abs(c - 15 * 14 / 19) <= 1


# ---------------------------------------------------------------------------------------------- localization


def test_localization_scores_hits_overlap_and_iou():
    lesion = rasterize_boxes([(0.0, 0.0, 0.25, 0.25)], 32)  # top-left 2×2 cells of an 8-grid
    lesions = np.stack([lesion, lesion])
    cells = np.array([[0, 1], [5, 5]])  # inside, outside
    windows = np.array([[0, 0], [4, 4]])  # k=4 window: covers the lesion fully / not at all
    score = localization(cells, windows, k=4, grid=8, lesions=lesions)
    assert score.n_images == 2 and score.pointing_rate == 0.5
    assert score.mean_window_overlap == pytest.approx(0.5)
    assert score.mean_window_iou == pytest.approx((4 / 16) / 2)
    base = random_localization(8, 4, lesion[None])  # exact expectation over all cells and placements
    assert base.pointing_rate == pytest.approx(4 / 64)
    assert base.mean_window_overlap == pytest.approx(
        0.3 * 0.3
    )  # rows: covered 1, 1/2, 0, 0, 0 of 5 placements
    with pytest.raises(ValueError, match="multiple of the grid"):
        localization(cells, windows, 4, 7, lesions)


# ---------------------------------------------------------------------------------------------- the stage


STAGE_CFG = {
    "text_source": "original",
    "model.encoder": "small",
    "model.image_size": 32,
    "model.small_width": 8,
    "model.embed_dim": 16,
    "model.vocab_size": 300,
    "model.text_hidden": 16,
    "model.text_layers": 1,
    "model.text_heads": 2,
    "model.text_intermediate": 32,
    "model.max_tokens": 32,
    "train.lr": 2e-3,
    "train.epochs": 2,
    "train.batch_size": 8,
    "train.num_workers": 0,
    "decode_workers": 2,
    "attention_batch": 16,
    "n_pictures": 2,
}  # dotted keys: the `--set train_gloria.<key>` paths


def nested(flat: dict) -> dict:
    """{"train.lr": x} -> {"train": {"lr": x}}: a config section from `--set`-style dotted keys."""
    out: dict = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


@pytest.fixture(scope="module")
def upstream_run(small_corpus, tmp_path_factory):
    """extract_reports + match_entities on the small corpus, plus two unusable images added to `images`."""
    from tasks.config import load_config
    from tasks.registry import get_stage
    from tasks.runner import run_stage
    from tests.context import seed_artifact

    run_dir = tmp_path_factory.mktemp("gloria_run")
    config = load_config(str(REPO_ROOT / "configs" / "demo.yaml"), [f"data.root={small_corpus}"])
    for stage in ("extract_reports", "match_entities"):
        run_stage(get_stage(stage), config, run_dir)
    images = pq.read_table(run_dir / "extract_reports" / "images.parquet").to_pylist()
    corrupt = run_dir / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    extra = [
        images[0] | {"image_id": "missing-img", "path": str(run_dir / "nope.jpg")},
        images[0] | {"image_id": "corrupt-img", "path": str(corrupt)},
    ]
    seed_artifact(run_dir, "extract_reports/images", images + extra)
    return run_dir, config, len(images), sum(r["split"] == "train" for r in images)


def run_gloria_stage(run_dir, config, drop=frozenset(), **overrides):
    """The stage on the tiny settings, `overrides` added and the keys in `drop` left at their defaults."""
    from tasks import train_gloria
    from tests.context import make_test_context, run_direct

    ctx = make_test_context(run_dir, config, "train_gloria")
    settings = {k: v for k, v in (STAGE_CFG | overrides).items() if k not in drop}
    return run_direct(ctx, train_gloria.Config(**nested(settings)))


def test_stage_writes_maps_windows_losses_localization_and_rejects(upstream_run):
    import pyarrow.parquet as pq

    from data_contracts.gloria import AttentionMap

    run_dir, config, n_images, n_train = upstream_run
    ctx = run_gloria_stage(run_dir, config)
    out = run_dir / "train_gloria"
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert {r["key"]: r["reason"] for r in rejects} == {
        "missing-img": "image: file does not exist",
        "corrupt-img": rejects[-1]["reason"],
    }
    assert rejects[-1]["reason"].startswith("image: ") and "corrupt" in rejects[-1]["source"]
    maps = pq.read_table(out / "attention_maps.parquet")
    assert (
        maps.schema.equals(AttentionMap.arrow_schema())
        and maps.schema.field("attention").type.value_type == "halffloat"
    )
    maps = maps.to_pylist()
    assert len(maps) == n_images
    for m in maps:
        assert (
            0 <= m["window_row"] <= 4
            and 0 <= m["window_col"] <= 4
            and m["window_size"] == 4
            and m["grid"] == 8
        )
        assert len(m["attention"]) == 64 and abs(sum(m["attention"]) - 1) < 0.02
        assert (m["fallback"] == "none") == bool(m["entities"])
        if m["fallback"] == "centre":
            assert (m["window_row"], m["window_col"]) == (2, 2)
        assert not set(m["entities"]) & {"contour", "silhouette", "cardiomediastinal"}
    losses = pq.read_table(out / "losses.parquet").to_pylist()
    assert [r["step"] for r in losses] == list(range(2 * (n_train // 8)))
    assert all(np.isfinite(r["loss"]) for r in losses)
    loc = {r["method"]: r for r in pq.read_table(out / "localization.parquet").to_pylist()}
    assert set(loc) == {"gloria", "random"} and loc["gloria"]["n_images"] == loc["random"]["n_images"] > 0
    assert 0 <= loc["gloria"]["pointing_rate"] <= 1 and 0 <= loc["random"]["mean_window_overlap"] <= 1
    assert len(list((out / "pictures").glob("*.png"))) == 2
    assert {"rejects", "losses", "attention_maps", "localization"} <= set(ctx.outputs)
    for name in ("gloria.safetensors", "gloria_config.json", "tokenizer.json"):
        assert (out / name).exists(), name
    assert len(list(out.glob("train_state_*.pt"))) == 1


def test_stage_reuses_a_checkpoint_and_random_fallback(upstream_run, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    run_dir, config, _, _ = upstream_run
    saved = tmp_path / "saved"
    shutil.copytree(run_dir / "train_gloria", saved)
    first = pq.read_table(saved / "attention_maps.parquet").to_pylist()
    run_gloria_stage(run_dir, config, checkpoint=str(saved), fallback="random", **{"train.epochs": 0})
    again = pq.read_table(run_dir / "train_gloria" / "attention_maps.parquet").to_pylist()
    for a, b in zip(first, again, strict=True):
        assert a["attention"] == b["attention"]  # same weights -> same maps
        if a["fallback"] == "none":
            assert (a["window_row"], a["window_col"]) == (b["window_row"], b["window_col"])
    assert {m["fallback"] for m in again} <= {"none", "random"}


def test_stage_text_source_rules(upstream_run, caplog):
    from tasks.base import MissingUpstreamError

    run_dir, config, _, _ = upstream_run
    with pytest.raises(MissingUpstreamError, match="needs 'bulk_distill/distilled_reports'"):
        run_gloria_stage(run_dir, config, text_source="distilled")
    with caplog.at_level("WARNING"):
        run_gloria_stage(run_dir, config, text_source="auto", n_pictures=0, **{"train.epochs": 1})
    assert any("ORIGINAL reports" in r.getMessage() for r in caplog.records)


def test_training_crops_are_seeded_squares_resized_back():
    """Issue 12 point 7: the official RandomCrop 224 of 256 (crop 0.875), corners aligned when resized
    back."""
    from models.gloria.train import random_crops

    ramp = torch.arange(64.0).repeat(64, 1)  # value = column index
    images = torch.stack([ramp, ramp.T])[:, None]  # [2, 1, 64, 64]: columns, then rows
    a = random_crops(images, 0.875, torch.Generator().manual_seed(3))
    b = random_crops(images, 0.875, torch.Generator().manual_seed(3))
    assert a.shape == images.shape and torch.equal(a, b)
    side = round(0.875 * 64)  # 56
    x0 = float(a[0, 0, 0, 0])  # the crop's first column
    assert x0 == int(x0) and 0 <= x0 <= 64 - side
    assert torch.allclose(a[0, 0, 0], torch.linspace(x0, x0 + side - 1, 64), atol=1e-4)
    assert torch.equal(random_crops(images, 1.0, torch.Generator().manual_seed(3)), images)


def test_official_optimizer_is_adam_with_l2_and_adamw_is_a_switch():
    from models.gloria.train import TrainConfig, make_optimizer

    model = torch.nn.Linear(2, 2)
    assert type(make_optimizer(model, TrainConfig())) is torch.optim.Adam
    assert type(make_optimizer(model, TrainConfig(optimizer="adamw"))) is torch.optim.AdamW
    assert TrainConfig().crop == 0.875


@pytest.fixture(scope="module")
def pretrained_folders(tmp_path_factory):
    """Stand-ins for the official initializations, made here: a seeded ResNet-50 state dict saved as
    torchvision saves ImageNet weights, and a tiny BERT folder (config.json, weights, vocab.txt) as
    Bio_ClinicalBERT is laid out."""
    import timm
    from transformers import BertConfig, BertModel

    from models.text.wordpiece import train_wordpiece
    from tests.real_data import iu_xray_texts

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    weights = root / "resnet50-imagenet.pth"
    torch.save(timm.create_model("resnet50").state_dict(), weights)
    vocab = train_wordpiece(iu_xray_texts()[:400], vocab_size=500).get_vocab()
    bert = root / "Bio_ClinicalBERT"
    BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(bert)
    (bert / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    return weights, bert


def test_gloria_starts_from_the_resnet_file_and_the_bert_folder(pretrained_folders):
    from safetensors.torch import load_file

    from models.gloria.model import Gloria, GloriaConfig, load_bert_tokenizer

    weights, bert = pretrained_folders
    cfg = GloriaConfig(image_size=64, embed_dim=16, image_checkpoint=str(weights), text_checkpoint=str(bert))
    model = Gloria(cfg)
    resnet = torch.load(weights, weights_only=True)
    backbone = dict(model.image_encoder.backbone.named_parameters())
    assert torch.equal(backbone["layer1.0.conv1.weight"], resnet["layer1.0.conv1.weight"])
    assert torch.allclose(backbone["conv1.weight"], resnet["conv1.weight"].sum(1, keepdim=True))  # grey input
    saved = load_file(bert / "model.safetensors")
    embeddings = model.text_encoder.bert.embeddings.word_embeddings.weight
    assert torch.equal(embeddings, saved[next(k for k in saved if k.endswith("word_embeddings.weight"))])
    assert model.text_encoder.word_proj.in_features == 16 and model.text_encoder.last_n_layers == 2
    tokenizer = load_bert_tokenizer(bert)
    assert tokenizer.get_vocab_size() == embeddings.shape[0]
    assert (
        tokenizer.encode("Pleural Effusion", add_special_tokens=False).tokens[0] == "pleural"
    )  # lower-cased
    random_init = Gloria(cfg.model_copy(update={"image_checkpoint": "random", "text_checkpoint": "random"}))
    assert not torch.equal(
        dict(random_init.image_encoder.backbone.named_parameters())["layer1.0.conv1.weight"],
        resnet["layer1.0.conv1.weight"],
    )


def test_the_stage_trains_from_the_official_initializations_and_saves_a_rebuildable_model(
    upstream_run, pretrained_folders, tmp_path
):
    import shutil

    from tasks.train_gloria import load_trained

    source, config, *_ = upstream_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("train_gloria"))
    weights, bert = pretrained_folders
    text_dims = {
        f"model.{k}" for k in ("vocab_size", "text_hidden", "text_layers", "text_heads", "text_intermediate")
    }
    with pytest.raises(
        pydantic.ValidationError,
        match=r"text_heads, text_hidden, text_intermediate, text_layers, "
        r"vocab_size: set by text_checkpoint's config.json .*text_checkpoint: random",
    ):
        run_gloria_stage(run_dir, config, **{"model.text_checkpoint": str(bert)})
    run_gloria_stage(
        run_dir,
        config,
        drop=text_dims,
        **{
            "model.encoder": "resnet50",
            "model.image_size": 64,
            "model.image_checkpoint": str(weights),
            "model.text_checkpoint": str(bert),
            "train.epochs": 1,
        },
    )
    out = run_dir / "train_gloria"
    saved = json.loads((out / "gloria_config.json").read_text())
    assert saved["text_hidden"] == 16 and saved["text_layers"] == 2
    assert saved["text_checkpoint"] == saved["image_checkpoint"] == "random"  # rebuilt without the folders
    model, tokenizer = load_trained(out)
    assert tokenizer.get_vocab_size() == saved["vocab_size"] == model.text_encoder.bert.config.vocab_size
    losses = pq.read_table(out / "losses.parquet").to_pylist()
    assert losses and all(np.isfinite(r["loss"]) for r in losses)
