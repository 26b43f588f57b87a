"""ECAMP model parts: position embeddings, masking, patches, decoder, SR head + window, MSCF, losses,
export."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from models.ecamp.export import (
    export_encoder,
    load_timm_encoder,
    read_metadata,
    timm_kwargs,
    write_model_card,
)
from models.ecamp.model import (
    ECAMP,
    ECAMPConfig,
    SRUpsampler,
    random_masking,
    sincos_2d,
    trim_padding,
    window_mask,
)
from models.text.masking import IGNORE_INDEX, weighted_mlm_loss

TINY = dict(
    img_size=32,
    hr_size=64,
    patch_size=8,
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
    sr_window=2,
    vocab_size=50,
    text_hidden=32,
    text_layers=1,
    text_heads=2,
    text_ffn=64,
    max_len=16,
)


def tiny(**changes) -> ECAMPConfig:
    return ECAMPConfig(**{**TINY, **changes})


def batch(cfg: ECAMPConfig, n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (n, cfg.max_len), generator=g)
    mask = torch.ones(n, cfg.max_len, dtype=torch.long)
    mask[:, -4:] = 0
    labels = torch.where(torch.rand(n, cfg.max_len, generator=g) < 0.5, ids, IGNORE_INDEX)
    labels[mask == 0] = IGNORE_INDEX
    return {
        "imgs_lr": torch.randn(n, 3, cfg.img_size, cfg.img_size, generator=g),
        "imgs_hr": torch.randn(n, 3, cfg.hr_size, cfg.hr_size, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "weights": torch.rand(n, cfg.max_len, generator=g) * (labels != IGNORE_INDEX),
        "window": torch.tensor([[8, 8, 40, 40]] * n),
    }


def test_sincos_2d_layout_matches_mae():
    dim, grid = 16, 3
    emb = sincos_2d(dim, grid, cls_token=True)
    assert emb.shape == (1, 1 + grid * grid, dim)
    assert torch.all(emb[0, 0] == 0)  # CLS position
    omega = [1 / 10000 ** (k / 4) for k in range(4)]
    row, col = 1, 2  # token 1 + row * grid + col
    token = emb[0, 1 + row * grid + col]
    expected = (
        [math.sin(col * w) for w in omega]
        + [math.cos(col * w) for w in omega]
        + [math.sin(row * w) for w in omega]
        + [math.cos(row * w) for w in omega]
    )
    assert torch.allclose(token, torch.tensor(expected), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(6, 2, True)


def test_random_masking_keeps_a_quarter_and_restores_order():
    torch.manual_seed(0)
    ids_keep, mask, ids_restore = random_masking(4, 16, 0.75, torch.device("cpu"))
    assert ids_keep.shape == (4, 4)
    assert torch.all(mask.sum(1) == 12)
    for i in range(4):  # kept patches are exactly the unmasked ones
        assert set(ids_keep[i].tolist()) == set(torch.nonzero(mask[i] == 0).flatten().tolist())
    shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, ids_restore), torch.arange(16).expand(4, -1))
    assert not torch.equal(mask[0], mask[1])  # per-sample noise


def test_patchify_roundtrip_and_layout():
    model = ECAMP(tiny())
    imgs = torch.randn(2, 3, 32, 32)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    # patch (row 1, col 2) is pixels [8:16, 16:24] in (p, q, c) order
    assert torch.equal(patches[0, 1 * 4 + 2], imgs[0, :, 8:16, 16:24].permute(1, 2, 0).reshape(-1))
    assert torch.equal(model.unpatchify(patches), imgs)


def test_part_shapes():
    cfg = tiny()
    model = ECAMP(cfg)
    b = batch(cfg)
    latent, mask, ids_restore = model.encoder(b["imgs_lr"], cfg.mask_ratio)
    assert latent.shape == (3, 1 + 4, 32) and mask.shape == (3, 16) and ids_restore.shape == (3, 16)
    pred = model.decoder(latent, ids_restore)
    assert pred.shape == (3, 16, 8 * 8 * 3)
    sr = model.upsampler(model.unpatchify(pred))
    assert sr.shape == (3, 3, 64, 64)
    hidden = model.text(b["input_ids"], b["attention_mask"], latent[:, 1:])
    assert hidden.shape == (3, 16, 32)
    assert model.text.head(hidden).shape == (3, 16, 50)
    out = model(**b)
    assert set(out) == {"mim", "sr", "mlm", "total"}
    assert all(v.shape == () and torch.isfinite(v) for v in out.values())
    assert torch.allclose(out["total"], out["mim"] + out["sr"] + out["mlm"])


def test_sr_upsampler_is_residual_bilinear_and_final_relu_switch():
    up = SRUpsampler(3, final_relu=False)
    for conv in (up.conv1, up.conv2):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    x = torch.randn(2, 3, 8, 8)
    bilinear = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(up(x), bilinear)
    up.final_relu = True  # official quirk: cannot produce the negative normalised pixels
    assert torch.allclose(up(x), bilinear.clamp(min=0))


def test_window_mask_and_cells():
    box = (8, 16, 32, 40)  # 3x3 cells of 8 px at cell (1, 2)
    m = window_mask(torch.tensor([box, (0, 0, 0, 0)]), 48, 48)
    assert m.shape == (2, 1, 48, 48)
    assert int(m[0].sum()) == 24 * 24 and int(m[1].sum()) == 0
    assert m[0, 0, 8, 16] and not m[0, 0, 32, 16] and not m[0, 0, 8, 40]


def test_mim_loss_means_over_masked_patches_or_all():
    pred, target = torch.zeros(1, 4, 2), torch.ones(1, 4, 2)
    mask = torch.tensor([[1.0, 0, 0, 0]])
    assert float(ECAMP(tiny()).mim_loss(pred, target, mask)) == pytest.approx(1.0)
    assert float(ECAMP(tiny(loss_mean="all")).mim_loss(pred, target, mask)) == pytest.approx(0.25)


def test_norm_pix_targets_are_per_patch_standardised():
    model = ECAMP(tiny(norm_pix_loss=True, sr=False))
    imgs = torch.rand(2, 3, 32, 32) * 5 + 3
    target, mean, std = model.mim_target(imgs)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(model.reconstruction(target, mean, std), imgs, atol=1e-4)


def test_sr_loss_only_sees_the_window():
    model = ECAMP(tiny())
    for conv in (model.upsampler.conv1, model.upsampler.conv2):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    model.requires_grad_(False)
    recon = torch.randn(2, 3, 32, 32)
    hr = torch.nn.functional.interpolate(recon, scale_factor=2, mode="bilinear", align_corners=False)
    window = torch.tensor([[8, 8, 40, 40], [0, 16, 64, 48]])
    inside = window_mask(window, 64, 64).expand(-1, 3, -1, -1)
    assert float(model.sr_loss(recon, hr + 5.0 * ~inside, window)) == pytest.approx(0.0, abs=1e-10)
    # an error of 2 on every window pixel: masked mean 4; official mean over all pixels: 4 × window share
    assert float(model.sr_loss(recon, hr + 2.0 * inside, window)) == pytest.approx(4.0, rel=1e-5)
    share = (32 * 32 + 64 * 32) / (2 * 64 * 64)
    model.cfg = tiny(loss_mean="all")
    assert float(model.sr_loss(recon, hr + 2.0 * inside, window)) == pytest.approx(4.0 * share, rel=1e-5)


def test_mlm_loss_on_labelled_positions_equals_full_logits():
    cfg = tiny()
    model = ECAMP(cfg)
    b = batch(cfg)
    latent, _, _ = model.encoder(b["imgs_lr"], cfg.mask_ratio)
    hidden = model.text(b["input_ids"], b["attention_mask"], latent[:, 1:])
    full = weighted_mlm_loss(model.text.head(hidden), b["labels"], b["weights"])
    assert torch.allclose(model.mlm_loss(hidden, b["labels"], b["weights"]), full, atol=1e-6)
    none = torch.full_like(b["labels"], IGNORE_INDEX)
    assert float(model.mlm_loss(hidden, none, b["weights"])) == 0.0


def test_trimming_padding_keeps_the_mlm_loss():
    cfg = tiny(max_len=16)
    model = ECAMP(cfg).eval()
    b = batch(cfg)  # the last 4 columns are padding without labels
    trimmed = trim_padding(b["input_ids"], b["attention_mask"], b["labels"], b["weights"])
    assert trimmed[0].shape == (3, 12)
    latent = torch.randn(3, 5, 32)
    full = weighted_mlm_loss(
        model.text.head(model.text(b["input_ids"], b["attention_mask"], latent[:, 1:])),
        b["labels"],
        b["weights"],
    )
    short = model.mlm_loss(model.text(*trimmed[:2], latent[:, 1:]), trimmed[2], trimmed[3], positions=3 * 16)
    assert torch.allclose(full, short, atol=1e-6)
    labelled_pad = b["labels"].clone()
    labelled_pad[:, -1] = 7  # official quirk: labels on padding too -> nothing may be trimmed
    assert trim_padding(b["input_ids"], b["attention_mask"], labelled_pad, b["weights"])[0].shape == (3, 16)


@pytest.mark.parametrize(("local", "global_"), [(True, False), (False, True)])
def test_mscf_branches_carry_mlm_gradient_to_the_image_features(local, global_):
    cfg = tiny(mscf_local=local, mscf_global=global_, sr=False)
    model = ECAMP(cfg)
    fusion = model.text.fusion
    assert (fusion.cross_attn is not None) == local and (fusion.gap_proj is not None) == global_
    out = model(**batch(cfg))
    out["mlm"].backward()
    grad = model.encoder.blocks[-1].mlp.fc2.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("switches", [{}, {"sr": False}, {"mscf_local": False}, {"mscf_global": False}])
def test_every_parameter_gets_a_gradient(switches):
    """DDP (find_unused_parameters=False) needs every trainable parameter in the graph of every step."""
    cfg = tiny(**switches)
    model = ECAMP(cfg)
    model(**batch(cfg))["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_without_mscf_the_text_side_ignores_the_image():
    cfg = tiny(mscf_local=False, mscf_global=False)
    model = ECAMP(cfg).eval()
    b = batch(cfg)
    patches = torch.randn(3, 4, 32)
    a = model.text(b["input_ids"], b["attention_mask"], patches)
    assert torch.equal(a, model.text(b["input_ids"], b["attention_mask"], patches * 7))
    assert model.text.fusion.img_proj is None
    model_with = ECAMP(tiny()).eval()
    a = model_with.text(b["input_ids"], b["attention_mask"], patches)
    assert not torch.allclose(a, model_with.text(b["input_ids"], b["attention_mask"], patches * 7))


def test_switches_sr_off_and_mlm_decoder_tying():
    cfg = tiny(sr=False)
    model = ECAMP(cfg)
    assert model.upsampler is None
    assert float(model(**batch(cfg))["sr"]) == 0.0
    assert model.text.head.predictions.decoder.weight is model.text.embeddings.word_embeddings.weight
    untied = ECAMP(tiny(tie_mlm_decoder=False))
    assert untied.text.head.predictions.decoder.weight is not untied.text.embeddings.word_embeddings.weight


def test_config_errors_name_the_problem():
    with pytest.raises(ValidationError, match="hr_size 96 must be 2"):
        tiny(hr_size=96)
    with pytest.raises(ValidationError, match="sr_window 5 exceeds the 4-cell"):
        tiny(sr_window=5)
    with pytest.raises(ValidationError, match="not a multiple of patch_size"):
        tiny(img_size=36, hr_size=72)
    with pytest.raises(ValidationError, match="text_hidden/text_heads: 32 is not divisible by 3"):
        tiny(text_heads=3)


def test_the_default_config_builds_the_official_vit_b16_encoder_and_6_layer_bert():
    """The built model, not the config's literals: its encoder has exactly the tensors of timm's ViT-B/16
    (what the official code loads MAE ImageNet weights into), and its text side the official 6-layer, 768-wide
    BERT."""
    import timm

    cfg = ECAMPConfig()
    model = ECAMP(cfg)
    official = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    ours = {k: tuple(v.shape) for k, v in model.encoder.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in official.state_dict().items()}
    layers = model.text.encoder.layer
    assert len(layers) == 6 and layers[0].intermediate.dense.weight.shape == (1536, 768)
    assert layers[0].attention.self.num_attention_heads == 6
    assert model.text.embeddings.word_embeddings.weight.shape == (30000, 768)
    assert model.text.embeddings.position_embeddings.weight.shape == (256, 768)
    assert cfg.hr_size == 2 * cfg.img_size == 448  # SR up-samples the 224 reconstruction x2


def test_export_loads_into_timm_strictly_and_matches_the_encoder(tmp_path):
    cfg = tiny()
    torch.manual_seed(0)
    model = ECAMP(cfg).eval()
    path = export_encoder(model, tmp_path / "encoder.safetensors", extra={"steps": 3})
    vit = load_timm_encoder(path).eval()
    assert sum(p.numel() for p in vit.parameters()) == sum(p.numel() for p in model.encoder.parameters())
    assert read_metadata(path)["steps"] == "3" and timm_kwargs(cfg)["num_classes"] == 0
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, _, ids_restore = model.encoder(imgs, mask_ratio=0.0)  # all patches, in shuffled order
        theirs = vit.forward_features(imgs)
    unshuffled = torch.gather(ours[:, 1:], 1, ids_restore.unsqueeze(-1).expand(-1, -1, ours.shape[2]))
    assert torch.allclose(ours[:, 0], theirs[:, 0], atol=1e-5)
    assert torch.allclose(unshuffled, theirs[:, 1:], atol=1e-5)
    card = write_model_card(
        tmp_path / "MODEL_CARD.md", cfg, {"steps": 3}, [dict(mim=1, sr=2, mlm=3, total=6)] * 2
    )
    assert "load_timm_encoder" in card.read_text() and "| mlm | 3.0000 | 3.0000 |" in card.read_text()


def test_export_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an ECAMP encoder export"):
        load_timm_encoder(tmp_path / "other.safetensors")


def test_norm_pix_loss_with_sr_is_refused_because_it_leaks_the_targets_statistics():
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="norm_pix_loss with sr: .*ground-truth statistics"):
        ECAMPConfig(norm_pix_loss=True, sr=True)
    assert ECAMPConfig(norm_pix_loss=True, sr=False).norm_pix_loss  # MIM alone may normalise its targets
