"""ECAMP pre-training model: masked image modelling, context-guided super-resolution and MSCF masked language
modelling.

Three heads share one ViT encoder (paper §3.2–3.4, REFERENCE §1.4 and §2.2):
- MIM: MAE-style 75% random patch masking on the low-resolution image, a light decoder predicting pixels;
- SR: the decoder's whole low-resolution reconstruction is up-sampled ×2 and compared with the high-resolution
  image inside the attention window of stage 6 (`train_gloria`), so the encoder must model disease-relevant
  texture;
- MLM: the (masked) report is fused with the visible patch features by the multi-scale context fusion layer
  (local cross-attention + global average pooling, Fig. 4) and decoded by a BERT encoder with an MLM head.

The encoder's parameter names match timm's `VisionTransformer`, so `models.ecamp.export` can hand the trained
encoder to any timm user with `strict=True`. Parameters of switched-off branches are not created at all, so
DDP never sees unused parameters.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from timm.layers import LayerNorm, PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertCrossAttention,
    BertEmbeddings,
    BertEncoder,
    BertIntermediate,
    BertOnlyMLMHead,
    BertOutput,
    BertSelfOutput,
)

from models.text.masking import IGNORE_INDEX, weighted_mlm_loss


class ECAMPConfig(BaseModel):
    """Model size and method switches. Defaults are the paper/official values (ViT-B/16 at 224, SR at 448)."""

    model_config = ConfigDict(extra="forbid")

    # image encoder (ViT) and MAE decoder
    img_size: int = Field(224, ge=8, description="low-resolution input side (MIM)")
    hr_size: int = Field(448, ge=16, description="high-resolution side (SR target); must be 2 × img_size")
    patch_size: int = Field(16, ge=1)
    in_chans: int = Field(3, ge=1)
    embed_dim: int = Field(768, ge=8)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    decoder_embed_dim: int = Field(512, ge=8)
    decoder_depth: int = Field(4, ge=1)
    decoder_num_heads: int = Field(16, ge=1)
    mask_ratio: float = Field(0.75, ge=0.0, lt=1.0)
    norm_pix_loss: bool = Field(
        False, description="per-patch normalised MIM targets (official: flag ignored)"
    )
    loss_mean: Literal["masked", "all"] = Field(
        "masked",
        description="masked: MIM mean over masked patches, SR mean over window pixels (paper/MAE); "
        "all: mean over every pixel with the rest zeroed (official code)",
    )
    # context-guided super-resolution
    sr: bool = Field(True, description="SR branch on/off (Table 7 'SR')")
    sr_window: int = Field(12, ge=1, description="k: SR window side in grid cells for the centre fallback")
    sr_final_relu: bool = Field(
        False, description="official quirk: ReLU after the residual (cannot output <0)"
    )
    # text side: MSCF fusion layer + BERT encoder + MLM head
    vocab_size: int = Field(30000, ge=8)
    text_hidden: int = Field(768, ge=8)
    text_layers: int = Field(6, ge=0)
    text_heads: int = Field(6, ge=1)
    text_ffn: int = Field(1536, ge=8)
    max_len: int = Field(256, ge=8)
    text_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    mscf_local: bool = Field(True, description="cross-attention to local patch features (Table 7 'Local')")
    mscf_global: bool = Field(True, description="linear(GAP(patch features)) branch (Table 7 'Global')")
    tie_mlm_decoder: bool = Field(True, description="tie MLM decoder to word embeddings (official: untied)")
    text_side: bool = Field(
        True,
        description="MLM + MSCF text side on/off; off with sr=False is the MIM-only baseline (evaluation)",
    )

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @model_validator(mode="after")
    def _check_geometry(self) -> ECAMPConfig:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.hr_size != 2 * self.img_size:
            raise ValueError(
                f"hr_size {self.hr_size} must be 2 × img_size {self.img_size} (SR up-samples ×2)"
            )
        if self.sr_window > self.grid_size:
            raise ValueError(f"sr_window {self.sr_window} exceeds the {self.grid_size}-cell patch grid")
        for dim, heads, what in (
            (self.embed_dim, self.num_heads, "embed_dim/num_heads"),
            (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim/decoder_num_heads"),
            (self.text_hidden, self.text_heads, "text_hidden/text_heads"),
        ):
            if dim % heads:
                raise ValueError(f"{what}: {dim} is not divisible by {heads}")
        if self.norm_pix_loss and self.sr:
            raise ValueError(
                "norm_pix_loss with sr: the SR input would be de-normalised with the ground-truth statistics "
                "of the masked patches (a leak of what MIM must predict); switch one of them off"
            )
        return self

    def bert_config(self) -> BertConfig:
        """The BERT config of the text side (REFERENCE §2.2: official 6 layers, 768 wide, 6 heads, FFN
        1536)."""
        cfg = BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.text_hidden,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            intermediate_size=self.text_ffn,
            hidden_act="gelu",
            hidden_dropout_prob=self.text_dropout,
            attention_probs_dropout_prob=self.text_dropout,
            max_position_embeddings=self.max_len,
            type_vocab_size=2,
            pad_token_id=0,
            layer_norm_eps=1e-12,
        )
        cfg._attn_implementation = "sdpa"
        return cfg


# ------------------------------------------------------------------------------------------------------------
# fixed 2-D sin-cos position embeddings (MAE layout: first half encodes the column, second half the row)
# ------------------------------------------------------------------------------------------------------------
def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), dim] = [sin(p·ω), cos(p·ω)] with ω_k = 10000^(-k/(dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim {dim} must be even")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool) -> torch.Tensor:
    """[1, (1+) grid², dim] fixed embeddings, row-major patches; the CLS position (if any) is all zeros."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dim {dim} must be a multiple of 4")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


def random_masking(n: int, length: int, mask_ratio: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-sample random subset of patches to keep (MAE: argsort of uniform noise).

    Returns ids_keep [n, keep], mask [n, length] (1 = removed) and ids_restore [n, length] that undoes the
    shuffle.
    """
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length, device=device)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore), ids_restore


# ------------------------------------------------------------------------------------------------------------
# image branch
# ------------------------------------------------------------------------------------------------------------
class MaskedViTEncoder(nn.Module):
    """ViT encoder over the visible patches; parameter names equal timm `VisionTransformer`'s (for export)."""

    def __init__(self, cfg: ECAMPConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(cfg.embed_dim, cfg.grid_size, True), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.depth)
        )
        self.norm = LayerNorm(cfg.embed_dim)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [N, C, H, W] → latent [N, 1 + keep, D] (CLS first), mask [N, L], ids_restore [N, L]."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        ids_keep, mask, ids_restore = random_masking(x.shape[0], x.shape[1], mask_ratio, x.device)
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore


class MAEDecoder(nn.Module):
    """Light transformer that fills the masked positions with a learned token and predicts each patch's
    pixels."""

    def __init__(self, cfg: ECAMPConfig):
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(dim, cfg.grid_size, True), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dim, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, cfg.patch_size**2 * cfg.in_chans)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1 + keep, D] → per-patch pixel predictions [N, L, p²·C] in original patch order."""
        x = self.decoder_embed(latent)
        n_fill = ids_restore.shape[1] + 1 - x.shape[1]
        patches = torch.cat([x[:, 1:, :], self.mask_token.expand(x.shape[0], n_fill, -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]


class SRUpsampler(nn.Module):
    """Bilinear ×2, conv3×3, ReLU, conv3×3, plus the up-sampled input (paper §3.3; official adds a final
    ReLU)."""

    def __init__(self, channels: int, final_relu: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.final_relu = final_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        out = self.conv2(F.relu(self.conv1(up))) + up
        return F.relu(out) if self.final_relu else out


# ------------------------------------------------------------------------------------------------------------
# text branch: multi-scale context fusion (MSCF) + BERT encoder + MLM head
# ------------------------------------------------------------------------------------------------------------
def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 1/0 → boolean [B, 1, 1, L] (True = may attend), the form SDPA broadcasts over heads and
    queries."""
    return attention_mask.bool()[:, None, None, :]


class MSCFusion(nn.Module):
    """One fusion layer (Fig. 4, REFERENCE §2.2): f_t = SA(E); fused = FFN(LN(f_t + W(CA(f_t, f_v^l) +
    W_g·GAP)))."""

    def __init__(self, bert: BertConfig, img_dim: int, local: bool, global_: bool):
        super().__init__()
        self.self_attn = BertAttention(bert)
        self.img_proj = nn.Linear(img_dim, bert.hidden_size) if (local or global_) else None
        self.cross_attn = BertCrossAttention(bert) if local else None
        self.gap_proj = nn.Linear(bert.hidden_size, bert.hidden_size) if global_ else None
        self.fuse_out = BertSelfOutput(bert)
        self.intermediate = BertIntermediate(bert)
        self.output = BertOutput(bert)

    def forward(
        self, embeddings: torch.Tensor, text_mask: torch.Tensor, patches: torch.Tensor
    ) -> torch.Tensor:
        """embeddings [B, L, H], text_mask [B, 1, 1, L] bool, patches [B, P, D] (visible, CLS removed)."""
        f_t = self.self_attn(embeddings, attention_mask=text_mask)[0]
        context = torch.zeros_like(f_t)
        if self.img_proj is not None:
            local = self.img_proj(patches)
            if self.cross_attn is not None:  # f_a^l: text queries, local patch keys/values
                context = context + self.cross_attn(f_t, encoder_hidden_states=local)[0]
            if self.gap_proj is not None:  # f_a^g: duplicated over every text position
                context = context + self.gap_proj(local.mean(dim=1, keepdim=True))
        fused = self.fuse_out(context, f_t)
        return self.output(self.intermediate(fused), fused)


class MSCFTextModel(nn.Module):
    """Token embeddings → one MSCF layer → BERT encoder (hidden states); `head` turns them into MLM logits."""

    def __init__(self, cfg: ECAMPConfig):
        super().__init__()
        bert = cfg.bert_config()
        self.embeddings = BertEmbeddings(bert)
        self.fusion = MSCFusion(bert, cfg.embed_dim, cfg.mscf_local, cfg.mscf_global)
        self.encoder = BertEncoder(bert)
        self.head = BertOnlyMLMHead(bert)
        self.initializer_range = bert.initializer_range
        self.tie = cfg.tie_mlm_decoder

    def tie_weights(self) -> None:
        """One output bias (HF ties `predictions.bias` to `decoder.bias` only inside PreTrainedModel; an
        untied, unused copy would break DDP); optionally the decoder weight to the word embeddings (BERT;
        official: not)."""
        self.head.predictions.bias = self.head.predictions.decoder.bias
        if self.tie:
            self.head.predictions.decoder.weight = self.embeddings.word_embeddings.weight

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, patches: torch.Tensor
    ) -> torch.Tensor:
        text_mask = padding_mask(attention_mask)
        x = self.fusion(self.embeddings(input_ids=input_ids), text_mask, patches)
        return self.encoder(x, attention_mask=text_mask).last_hidden_state


# ------------------------------------------------------------------------------------------------------------
# the whole model
# ------------------------------------------------------------------------------------------------------------
class ECAMP(nn.Module):
    """forward(imgs_lr, imgs_hr, input_ids, attention_mask, labels, weights, window) → {mim, sr, mlm,
    total}."""

    def __init__(self, cfg: ECAMPConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = MaskedViTEncoder(cfg)
        self.decoder = MAEDecoder(cfg)
        self.upsampler = SRUpsampler(cfg.in_chans, cfg.sr_final_relu) if cfg.sr else None
        self.text = MSCFTextModel(cfg) if cfg.text_side else None
        self.initialize_weights()

    # ---- init
    # ------------------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """MAE init for the image side (xavier linears, N(0, .02) tokens); BERT init (N(0, .02)) for the text
        side."""
        for module in [self.encoder, self.decoder] + ([self.upsampler] if self.upsampler is not None else []):
            module.apply(init_mae_module)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        if self.text is not None:
            std = self.text.initializer_range
            self.text.apply(lambda m: init_bert_module(m, std))
            self.text.tie_weights()

    # ---- patches
    # ---------------------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] → [N, L, p²·C] (row-major patches, pixels in (p, q, c) order as MAE)."""
        p, c = self.cfg.patch_size, imgs.shape[1]
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p²·C] → [N, C, H, W]."""
        p, c = self.cfg.patch_size, self.cfg.in_chans
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    # ---- losses
    # ----------------------------------------------------------------------------------------------
    def mim_target(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-patch targets (normalised if norm_pix_loss) with the patch mean and std used to normalise
        them."""
        target = self.patchify(imgs)
        if not self.cfg.norm_pix_loss:
            return target, torch.zeros_like(target[..., :1]), torch.ones_like(target[..., :1])
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        return (target - mean) / std, mean, std

    def mim_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        denom = mask.sum() if self.cfg.loss_mean == "masked" else torch.tensor(float(mask.numel()))
        return (per_patch * mask).sum() / denom.clamp(min=1)

    def reconstruction(self, pred: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The decoder's low-res image in pixel space (undoing norm_pix with the detached target
        statistics)."""
        return self.unpatchify(pred * std.detach() + mean.detach())

    def sr_loss(self, recon_lr: torch.Tensor, imgs_hr: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """MSE between SR(reconstruction) and the high-res image inside each sample's window (Eq. 5)."""
        sr = self.upsampler(recon_lr)
        inside = window_mask(window, imgs_hr.shape[-2], imgs_hr.shape[-1]).to(sr.dtype)
        sq = ((sr - imgs_hr) ** 2) * inside
        if self.cfg.loss_mean == "masked":
            return sq.sum() / (inside.sum() * sr.shape[1]).clamp(min=1)
        return sq.mean()

    def mlm_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, positions: int | None = None
    ) -> torch.Tensor:
        """Weighted MLM loss (normalised by B·L), with the vocabulary projection run only where a label
        exists.

        Same value as projecting every position (unlabelled ones contribute nothing), but with ~25% of 256
        positions labelled it skips most of the largest matmul of the model (hidden × 30,000 vocabulary).
        `positions` is B·L of the untrimmed batch (see `trim_padding`); default: labels.numel().
        """
        predicted = labels != IGNORE_INDEX
        n = int(predicted.sum())
        if n == 0:  # keep the head in the graph so DDP sees its (zero) gradients
            return (self.text.head(hidden[:, :1]) * 0).sum()
        logits = self.text.head(hidden[predicted])
        loss = weighted_mlm_loss(logits[None], labels[predicted][None], weights[predicted][None])
        return loss * n / (positions or labels.numel())

    def mlm_logits(
        self,
        imgs_lr: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        where: torch.Tensor,
    ) -> torch.Tensor:
        """MLM logits [n, V] at the `where` [B, L] positions, the text fused with `imgs_lr` as in training
        (the encoder masks cfg.mask_ratio of the patches with the global RNG: seed it to compare two
        images)."""
        latent, _, _ = self.encoder(imgs_lr, self.cfg.mask_ratio)
        hidden = self.text(input_ids, attention_mask, latent[:, 1:, :])
        return self.text.head(hidden[where])

    # ---- forward
    # ---------------------------------------------------------------------------------------------
    def forward(
        self,
        imgs_lr: torch.Tensor,
        imgs_hr: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor,
        window: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Losses of one batch. window: [N, 4] (top, left, bottom, right) in high-res pixels, end
        exclusive."""
        latent, mask, ids_restore = self.encoder(imgs_lr, self.cfg.mask_ratio)
        pred = self.decoder(latent, ids_restore)
        target, mean, std = self.mim_target(imgs_lr)
        mim = self.mim_loss(pred, target, mask)
        if self.upsampler is not None:
            sr = self.sr_loss(self.reconstruction(pred, mean, std), imgs_hr, window)
        else:
            sr = torch.zeros((), device=imgs_lr.device)
        if self.text is None:  # MIM-only baseline: no text side at all
            return {"mim": mim, "sr": sr, "mlm": torch.zeros_like(mim), "total": mim + sr}
        positions = labels.numel()
        input_ids, attention_mask, labels, weights = trim_padding(input_ids, attention_mask, labels, weights)
        hidden = self.text(input_ids, attention_mask, latent[:, 1:, :])
        mlm = self.mlm_loss(hidden, labels, weights, positions)
        return {"mim": mim, "sr": sr, "mlm": mlm, "total": mim + sr + mlm}


def trim_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Drop the trailing columns that are padding in every row and carry no label.

    The collator pads every batch to max_len (256) because the loss divides by B·max_len; reports are ~100
    pieces, so most of the text encoder's work would be on padding that attention masks out anyway. The loss
    keeps the original B·L (see `mlm_loss`); with the official all-positions labels nothing is trimmed.
    """
    used = (attention_mask.bool() | (labels != IGNORE_INDEX)).any(dim=0)
    length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    if length == input_ids.shape[1]:
        return input_ids, attention_mask, labels, weights
    return input_ids[:, :length], attention_mask[:, :length], labels[:, :length], weights[:, :length]


def window_mask(window: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, 4] boxes (top, left, bottom, right; end exclusive) → [N, 1, H, W] boolean masks."""
    rows = torch.arange(height, device=window.device)
    cols = torch.arange(width, device=window.device)
    top, left, bottom, right = (window[:, i].reshape(-1, 1) for i in range(4))
    in_rows = (rows >= top) & (rows < bottom)  # [N, H]
    in_cols = (cols >= left) & (cols < right)  # [N, W]
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def init_mae_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_bert_module(m: nn.Module, std: float) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=std)
        if m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
