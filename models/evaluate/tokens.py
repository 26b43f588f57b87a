"""What a dense head does to the frozen patch tokens before its first Linear.

Encoders hand their tokens over at very different scales: on the demo, a random ViT's channels have a median
std of 0.29 and means within ±0.17, the pre-trained ones 1.1-1.4 and up to ±2.4. A head trained with one
learning rate then takes steps of different effective size per encoder, so a fixed step budget favours
whichever encoder happens to sit at the right scale. Standardising each channel (BatchNorm without affine, as
MAE's linear probe does) leaves the head's function class unchanged — the Linear that follows absorbs any
per-channel scale and shift — and makes the comparison between initialisations about the features.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class DenseHeadConfig(BaseModel):
    """Settings every frozen-token head shares (segmentation, detection)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_norm: bool = Field(
        False,
        description="standardise each token channel (BatchNorm without affine, as MAE's linear probe) before "
        "the head's Linear; off = the official heads",
    )


class TokenNorm(nn.Module):
    """Per-channel BatchNorm without affine over [B, N, D] tokens: batch statistics in training, their running
    mean after. The tokens are frozen, so their distribution never moves: a plain average of the batch
    statistics (momentum None) is the right estimate, and unlike an exponential one it keeps nothing of the
    initial (0, 1), so evaluation is as blind to the encoder's scale as training."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6, momentum=None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens.transpose(1, 2)).transpose(1, 2)  # BatchNorm1d normalises dim 1 of [B, D, N]


def token_norm(embed_dim: int, cfg: DenseHeadConfig) -> nn.Module:
    return TokenNorm(embed_dim) if cfg.token_norm else nn.Identity()
