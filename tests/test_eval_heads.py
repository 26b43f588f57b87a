"""The downstream heads and the encoder they start from: pooling, loading, training, the probe's frozen
encoder."""

from __future__ import annotations

import argparse

import pytest
import torch

from models.ecamp.export import export_encoder, load_timm_encoder
from models.ecamp.model import ECAMP, ECAMPConfig
from models.evaluate.classify import (
    Augment,
    Normalization,
    finetune,
    frozen_features,
    init_head,
    linear_probe,
    predict,
    probe_the_head,
    score,
)
from models.evaluate.encoders import CheckpointError, downstream_vit, export_arch, load_init
from models.evaluate.fit import FitConfig, param_groups
from models.evaluate.pixels import normalize
from models.evaluate.segment import SegConfig, SegHead, train_segmentation
from models.resources import CONFIG_DIR

TINY = ECAMPConfig(
    img_size=32,
    hr_size=64,
    patch_size=8,
    embed_dim=32,
    depth=2,
    num_heads=4,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=4,
    sr_window=2,
    vocab_size=50,
    text_hidden=32,
    text_layers=1,
    text_heads=2,
    text_ffn=64,
    max_len=16,
)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    model = ECAMP(TINY)
    with torch.no_grad():  # a trained-looking final norm, so that dropping it is visible
        model.encoder.norm.weight.uniform_(0.5, 1.5)
        model.encoder.norm.bias.uniform_(-0.5, 0.5)
    return export_encoder(model, tmp_path_factory.mktemp("enc") / "encoder.safetensors")


def test_the_export_pools_the_mean_of_the_normed_patch_tokens(export):
    vit = load_timm_encoder(export).eval()  # strict load of the file's own header
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(x)  # [B, 1 + 16, D], after timm's final norm
        pooled = vit.forward_head(tokens, pre_logits=True)
    assert tokens.shape == (3, 17, 32)
    torch.testing.assert_close(pooled, tokens[:, 1:].mean(dim=1))
    assert not torch.allclose(pooled, tokens[:, 0])  # not the (untrained) CLS token


def test_downstream_vit_replaces_the_norm_by_a_fresh_fc_norm_on_the_patch_mean(export):
    model = downstream_vit(export_arch(export), num_classes=5).eval()
    report = load_init(model, export)
    assert report.loaded == len(model.state_dict()) - 4  # all but fc_norm.{weight,bias}, head.{weight,bias}
    assert set(report.missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert report.unused == ("norm.bias", "norm.weight")
    assert "fresh fc_norm" in report.notes[0]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(pooled, torch.nn.functional.layer_norm(tokens[:, 1:].mean(1), (32,), eps=1e-6))
    reference = load_timm_encoder(export)
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, reference.blocks[1].mlp.fc2.weight)


def test_mae_style_checkpoint_loads_and_reports_its_unused_keys(export, tmp_path):
    state = {k: v for k, v in load_timm_encoder(export).state_dict().items()}
    state |= {"decoder_embed.weight": torch.zeros(4, 4), "mask_token": torch.zeros(1, 1, 4)}
    path = tmp_path / "mae_vit.pth"
    args = argparse.Namespace(
        model="mae_vit_base_patch16", norm_pix_loss=True
    )  # official MAE files carry this
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "args": args}, path)
    model = downstream_vit(export_arch(export))
    report = load_init(model, path)
    assert "decoder_embed.weight" in report.unused and "mask_token" in report.unused
    assert len(report.content_hash) == 64


def test_a_checkpoint_of_another_shape_is_refused_naming_the_file_and_key(export, tmp_path):
    wide = dict(export_arch(export), embed_dim=64)
    with pytest.raises(
        CheckpointError,
        match=r"encoder.safetensors: shape mismatch with the configured ViT: blocks.0.attn.proj.bias \(32,\) "
        r"vs \(64,\)",
    ):
        load_init(downstream_vit(wide), export)
    empty = tmp_path / "nothing.pth"
    torch.save({"model": {"foo": torch.zeros(1)}}, empty)
    with pytest.raises(CheckpointError, match="nothing.pth: no ViT encoder keys"):
        load_init(downstream_vit(export_arch(export)), empty)


def separable_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n, 32, 32] where class 1 has a bright left half: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n, 1), generator=g)
    images = torch.randint(0, 80, (n, 32, 32), generator=g, dtype=torch.uint8)
    images[labels[:, 0] == 1, :, :16] += 150
    return images, labels


def test_finetuning_lowers_the_loss_and_keeps_the_best_validation_weights(export):
    torch.manual_seed(0)
    model = downstream_vit(export_arch(export), num_classes=1, drop_path=0.1)
    load_init(model, export)
    init_head(model)
    train, val = separable_images(64, 0), separable_images(32, 1)
    cfg = FitConfig(epochs=8, batch_size=16, lr=0.05, warmup_epochs=1)
    result = finetune(
        model, train, val, True, cfg, Augment(crop_scale_min=0.8, flip=False), Normalization(), seed=0
    )
    assert result.losses[-1] < 0.7 * result.losses[0], result.losses
    assert result.best_score > 0.9
    assert result.epochs_run == 8 and 0 <= result.best_epoch < 8


def test_the_linear_probe_trains_only_the_head_on_cached_features(export):
    model = downstream_vit(export_arch(export))
    load_init(model, export)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = separable_images(64, 0)
    val_images, val_labels = separable_images(32, 1)
    pooled, tokens = frozen_features(model, images, Normalization())
    val_pooled, _ = frozen_features(model, val_images, Normalization())
    assert pooled.shape == (64, 32) and tokens.shape == (64, 16, 32)
    (head,), (result,) = linear_probe(
        ([pooled], labels),
        ([val_pooled], val_labels),
        1,
        True,
        FitConfig(epochs=30, batch_size=64, lr=0.5, clip_grad=None),
        seeds=[0],
    )
    assert result.losses[-1] < result.losses[0]
    assert result.best_score > 0.8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the encoder never moved
    assert head.weight.abs().max() > 1e-3  # from std 2e-5: the head did


def test_the_segmentation_head_needs_one_block_per_doubling_and_its_loss_falls():
    with pytest.raises(ValueError, match=r"log2\(32/4\) = 3 up-sampling blocks, but channels has 4"):
        SegHead(16, 4, 32, SegConfig())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(32, 16, 16, generator=g)
    masks = torch.zeros(32, 32, 32, dtype=torch.bool)
    for i in range(32):  # the lesion is the left or the right half, as the sign of one token feature says
        if tokens[i, 0, 0] > 0:
            masks[i, :, :16] = True
        else:
            masks[i, :, 16:] = True
    cfg = SegConfig(channels=(16, 8, 8))
    fit = FitConfig(optimizer="adamw", lr=5e-3, weight_decay=0.05, epochs=15, batch_size=8)
    (head,), (result,) = train_segmentation(
        ([tokens], masks), ([tokens[:8]], masks[:8]), 4, 32, cfg, fit, seeds=[0]
    )
    assert head(tokens[:2]).shape == (2, 32, 32)
    assert result.losses[-1] < 0.6 * result.losses[0], result.losses
    assert result.best_score > 0.6


def test_validations_are_evenly_spaced_and_always_include_the_last_epoch():
    from models.evaluate.fit import validation_due

    assert [e for e in range(100) if validation_due(e, 100, 10)] == [9, 19, 29, 39, 49, 59, 69, 79, 89, 99]
    assert [e for e in range(7) if validation_due(e, 7, 3)] == [2, 4, 6]
    assert all(validation_due(e, 5, None) for e in range(5))  # official: after every epoch
    assert all(validation_due(e, 5, 9) for e in range(5))


def test_the_pipeline_runs_the_mim_only_row_just_before_evaluate_when_asked():
    from flows.pipeline import ablations_for
    from tasks.config import load_config
    from tasks.pretrain_ecamp import ablation_rows

    demo = load_config(CONFIG_DIR / "demo.yaml")
    assert ablations_for("evaluate", demo) == ["mim_only"]
    assert ablations_for("pretrain_ecamp", demo) == []
    assert (
        ablations_for("evaluate", load_config(CONFIG_DIR / "demo.yaml", ["evaluate.inits=[random, ecamp]"]))
        == []
    )
    row = ablation_rows("7", ["mim_only"])["mim_only"]
    assert "pretrain_ecamp.model.text_side=false" in row and "pretrain_ecamp.model.sr=false" in row


def test_the_mim_only_model_has_no_text_side_and_its_loss_is_the_mim_loss():
    cfg = TINY.model_copy(update={"text_side": False, "sr": False})
    torch.manual_seed(0)
    model = ECAMP(cfg)
    assert model.text is None and not any(k.startswith("text.") for k in model.state_dict())
    n = 2
    ids = torch.randint(5, 50, (n, 16))
    losses = model(
        torch.randn(n, 3, 32, 32),
        torch.randn(n, 3, 64, 64),
        ids,
        torch.ones_like(ids),
        ids,
        torch.ones(n, 16),
        torch.tensor([[0, 0, 64, 64]] * n),
    )
    assert float(losses["mlm"]) == 0.0 and float(losses["sr"]) == 0.0
    assert torch.equal(losses["total"], losses["mim"]) and float(losses["mim"]) > 0


def test_normalize_gives_the_pre_training_statistics_and_leaves_its_input_alone():
    pixels = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    x = normalize(pixels, mean=0.2, std=0.5)
    assert x.shape == (1, 3, 2, 2) and torch.equal(x[0, 0], x[0, 2])
    assert torch.allclose(x[0, 0], torch.tensor([[-0.4, 1.6], [0.0, 0.4]]), atol=1e-6)
    as_float = pixels.float()  # a float input used to be divided in place under its caller
    assert torch.allclose(normalize(as_float, mean=0.2, std=0.5), x) and torch.equal(as_float, pixels.float())


def lesion_tokens(seed: int = 0, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens whose first feature's sign says whether the lesion is the left or the right half."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, 16, 16, generator=g)
    masks = torch.zeros(n, 32, 32, dtype=torch.bool)
    left = tokens[:, 0, 0] > 0
    masks[left, :, :16] = True
    masks[~left, :, 16:] = True
    return tokens, masks


@pytest.mark.parametrize("token_norm", [True, False])
def test_with_token_norm_the_head_trains_alike_on_tokens_of_any_scale(token_norm):
    """A pre-trained encoder's tokens may sit at 5x a random one's scale, with large offsets: with token_norm
    the head's whole training (losses, chosen validation score) is the same for tokens and 20·tokens + 5, so
    a fixed step budget treats every encoder alike; without it (the official head) training differs."""
    tokens, masks = lesion_tokens()
    scale = torch.linspace(5, 40, 16)  # per channel
    shifted = tokens * scale + 5.0
    cfg = SegConfig(channels=(16, 8, 8), token_norm=token_norm)
    fit = FitConfig(optimizer="adamw", lr=5e-3, weight_decay=0.05, epochs=12, batch_size=8)
    runs = [
        train_segmentation(([t], masks), ([t[:8]], masks[:8]), 4, 32, cfg, fit, seeds=[0])[1][0]
        for t in (tokens, shifted)
    ]
    same = torch.allclose(torch.tensor(runs[0].losses), torch.tensor(runs[1].losses), rtol=1e-3, atol=1e-4)
    assert same is token_norm, (runs[0].losses, runs[1].losses)
    if token_norm:
        assert runs[0].best_score == pytest.approx(runs[1].best_score, abs=1e-3)
        assert runs[0].losses[-1] < 0.6 * runs[0].losses[0]


def test_token_norm_standardises_each_channel_and_is_off_by_default():
    assert isinstance(SegHead(16, 4, 32, SegConfig(channels=(16, 8, 8))).token_norm, torch.nn.Identity)
    head = SegHead(16, 4, 32, SegConfig(channels=(16, 8, 8), token_norm=True)).train()
    tokens = lesion_tokens()[0] * torch.linspace(5, 40, 16) + 3.0
    normed = head.token_norm(tokens).reshape(-1, 16)
    torch.testing.assert_close(normed.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.std(0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)
    assert not any(p.requires_grad for p in head.token_norm.parameters())  # no affine: nothing to learn


def test_layer_decay_gives_each_depth_of_the_vit_its_lr_and_the_head_the_full_lr():
    model = downstream_vit(
        {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}, num_classes=3
    )
    cfg = FitConfig(lr=1.0, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in param_groups(model, cfg) for p in g["params"]}
    names = dict(model.named_parameters())
    assert lr_of[id(names["patch_embed.proj.weight"])] == 0.125  # 0.5^(2 + 1)
    assert lr_of[id(names["blocks.0.attn.qkv.weight"])] == 0.25
    assert lr_of[id(names["blocks.1.mlp.fc2.bias"])] == 0.5
    assert lr_of[id(names["head.weight"])] == lr_of[id(names["fc_norm.weight"])] == 1.0
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)
    # the default is one lr for every parameter (the official recipe)
    assert {g["lr"] for g in param_groups(model, FitConfig(lr=1.0))} == {1.0}


def test_lp_ft_starts_fine_tuning_from_the_linear_probe_on_the_models_own_features(export):
    torch.manual_seed(0)
    model = downstream_vit(export_arch(export), num_classes=1, drop_path=0.1)
    load_init(model, export)
    init_head(model)
    blocks_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    (train_x, train_y), (val_x, val_y) = separable_images(64, 0), separable_images(32, 1)
    probe_cfg = FitConfig(epochs=30, batch_size=64, lr=0.5, clip_grad=None)
    fresh_score = score(val_y.numpy(), predict(model, val_x, Normalization()), True)
    fitted = probe_the_head(
        model, (train_x, train_y), (val_x, val_y), True, probe_cfg, Normalization(), seed=0
    )
    # only the head changed, and the model now scores what the probe scored on validation
    assert all(torch.equal(blocks_before[k], v) for k, v in model.state_dict().items() if k in blocks_before)
    probed_score = score(val_y.numpy(), predict(model, val_x, Normalization()), True)
    assert probed_score == pytest.approx(fitted.best_score, abs=1e-6)
    assert probed_score > 0.8 > fresh_score
    # the same probe as the linear-probe protocol fits on the same features
    pooled = frozen_features(model, train_x, Normalization(), tokens=False)[0]
    val_pooled = frozen_features(model, val_x, Normalization(), tokens=False)[0]
    (head,), _ = linear_probe(([pooled], train_y), ([val_pooled], val_y), 1, True, probe_cfg, seeds=[0])
    assert torch.allclose(head.weight, model.head.weight) and torch.allclose(head.bias, model.head.bias)
