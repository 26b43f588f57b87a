"""YOLOv3-style single-class detection head on the patch tokens of a frozen ViT (paper §4.3, REFERENCE §3.3).

Follows the official ECAMP detector in spirit, at any ViT width and grid g:
- `det_head = Linear(D, D)` on the patch tokens (the only trained encoder-side layer), reshaped to D × g × g;
- a 3-level pyramid at 2g / g / ceil(g/2) (28/14/7 for ViT-B/16 at 224 px), each level a projection plus a
  residual bottleneck, then one 1×1 conv per level predicting (tx, ty, tw, th, objectness) for 3 anchors;
- YOLOv3 targets and loss (2.5 xy BCE, 2.5 wh MSE, 1 obj BCE, 0.5 no-object BCE), NMS 0.5 / 0.5 at decoding.

Compacted on purpose: the YOLOv3 CBL "embedding" stacks and top-down concatenation are replaced by the
residual block of each level, and there is no class logit (one class, the box score is the objectness).
Assignment and ignore rules are the YOLOv3 paper's (best of all 9 anchors; ignore by predicted-box IoU), where
the official eriklindernoren-style loss assigns per scale and ignores by anchor-shape IoU.
Everything is listed fine (2g) to coarse (g/2): anchors, channels, head outputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torchvision.ops import clip_boxes_to_image, nms

from models.evaluate.tokens import DenseHeadConfig, token_norm

# tw, th are exponentiated when decoding; an untrained head can output anything, so cap them (e^10 ≈ 22026)
MAX_LOG_SCALE = 10.0


class DetectionConfig(DenseHeadConfig):
    """Head and loss settings; defaults are the official values, `channels` aside for the small demo."""

    anchors: tuple[tuple[tuple[float, float], ...], ...] = Field(
        (
            ((10, 13), (16, 30), (33, 23)),
            ((30, 61), (62, 45), (59, 119)),
            ((116, 90), (156, 198), (373, 326)),
        ),
        description="(w, h) in pixels at `anchor_img_size`, per scale fine → coarse: the YOLOv3 COCO anchors",
    )
    anchor_img_size: float = Field(
        416,
        gt=0,
        description="input side the anchors are given for; scaled by img_size / this (official 224/416)",
    )
    channels: tuple[int, int, int] = Field(
        (512, 1024, 2048), description="pyramid widths at 2g / g / g/2 (official)"
    )
    expansion: int = Field(
        4, ge=1, description="bottleneck width = channels // expansion (official 8 at 1%/10%)"
    )
    obj_prior: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="initial objectness probability: thousands of empty anchors per positive would otherwise "
        "swamp the first steps (RetinaNet/YOLOv5 bias init; not in the official code)",
    )
    conf_threshold: float = Field(0.5, ge=0, le=1)
    nms_iou: float = Field(0.5, ge=0, le=1)
    ignore_iou: float = Field(
        0.5, ge=0, le=1, description="no no-object loss where a predicted box fits a truth"
    )
    lambda_xy: float = Field(2.5, ge=0)
    lambda_wh: float = Field(2.5, ge=0)
    lambda_obj: float = Field(1.0, ge=0)
    lambda_noobj: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _check_anchors(self) -> DetectionConfig:
        if len(self.anchors) != 3:
            raise ValueError(f"anchors: one list per pyramid level (3), got {len(self.anchors)}")
        if len({len(level) for level in self.anchors}) != 1 or not self.anchors[0]:
            raise ValueError("anchors: every level needs the same, non-zero number of anchors")
        if any(w <= 0 or h <= 0 for level in self.anchors for w, h in level):
            raise ValueError("anchors: widths and heights must be positive")
        if any(c < 1 for c in self.channels):
            raise ValueError("channels must be positive")
        return self

    @property
    def num_anchors(self) -> int:
        return len(self.anchors[0])


class Targets(NamedTuple):
    """Per scale: `obj` [B, A, S, S] bool (anchor responsible for a truth) and `box` [B, A, S, S, 4] float
    (x, y offsets in the cell in [0, 1], log(w / anchor_w), log(h / anchor_h)); index [b, a, row, column]."""

    obj: list[torch.Tensor]
    box: list[torch.Tensor]


def anchors_px(img_size: int, cfg: DetectionConfig) -> torch.Tensor:
    """[3, A, 2] anchor (w, h) in pixels of an img_size input: the anchors scale with the image."""
    return torch.tensor(cfg.anchors, dtype=torch.float32) * (img_size / cfg.anchor_img_size)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 → 1×1 expand with a residual, as the official pyramid's Bottleneck(c)."""

    def __init__(self, channels: int, expansion: int):
        super().__init__()
        hidden = max(channels // expansion, 1)
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class Upsample2x(nn.Module):
    """Bilinear ×2: the fine level is the token map read at twice its resolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class DetectionHead(nn.Module):
    """det_head + 3-level pyramid + YOLO predictions; everything that trains while the ViT stays frozen."""

    def __init__(self, embed_dim: int, grid: int, img_size: int, cfg: DetectionConfig):
        super().__init__()
        if embed_dim < 1 or grid < 2 or img_size < 1:
            raise ValueError(
                f"need embed_dim ≥ 1, grid ≥ 2, img_size ≥ 1; got {embed_dim}, {grid}, {img_size}"
            )
        self.embed_dim, self.grid, self.img_size, self.cfg = embed_dim, grid, img_size, cfg
        fine, mid, coarse = cfg.channels
        self.token_norm = token_norm(embed_dim, cfg)
        self.det_head = nn.Linear(embed_dim, embed_dim)
        # odd grids: the stride-2 conv (padding 1) gives ceil(g / 2); decoding uses img_size / S per level
        self.levels = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(embed_dim, fine, 1), Upsample2x(), Bottleneck(fine, cfg.expansion)),
                nn.Sequential(nn.Conv2d(embed_dim, mid, 1), Bottleneck(mid, cfg.expansion)),
                nn.Sequential(nn.Conv2d(embed_dim, coarse, 3, 2, 1), Bottleneck(coarse, cfg.expansion)),
            ]
        )
        self.preds = nn.ModuleList([nn.Conv2d(c, cfg.num_anchors * 5, 1) for c in cfg.channels])
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Objectness starts at `obj_prior`, coordinates at 0 (cell centre, anchor size)."""
        prior = math.log(self.cfg.obj_prior / (1 - self.cfg.obj_prior))
        for pred in self.preds:
            nn.init.normal_(pred.weight, std=0.01)
            bias = torch.zeros(self.cfg.num_anchors, 5)
            bias[:, 4] = prior
            with torch.no_grad():
                pred.bias.copy_(bias.flatten())

    @property
    def sizes(self) -> list[int]:
        """Output side per level, fine → coarse."""
        return [2 * self.grid, self.grid, (self.grid + 1) // 2]

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """tokens: [B, grid², embed_dim] patch tokens (CLS dropped), row-major as timm emits them.
        Returns per level, fine → coarse, [B, A, S, S, 5] raw (tx, ty, tw, th, objectness logit)."""
        if tokens.ndim != 3 or tokens.shape[1] != self.grid**2 or tokens.shape[2] != self.embed_dim:
            raise ValueError(
                f"tokens must be [B, {self.grid**2}, {self.embed_dim}] (grid² patch tokens, no CLS); "
                f"got {list(tokens.shape)}"
            )
        b = tokens.shape[0]
        x = (
            self.det_head(self.token_norm(tokens))
            .transpose(1, 2)
            .reshape(b, self.embed_dim, self.grid, self.grid)
        )
        outputs = []
        for level, pred in zip(self.levels, self.preds, strict=True):
            y = pred(level(x))
            s = y.shape[-1]
            outputs.append(y.view(b, self.cfg.num_anchors, 5, s, s).permute(0, 1, 3, 4, 2))
        return outputs


def _valid(boxes: torch.Tensor) -> torch.Tensor:
    """Drop degenerate rows: the official CSV writes a negative image as [[0, 0, 0, 0]]."""
    boxes = boxes.reshape(-1, 4)
    return boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]


def assign_targets(
    boxes: list[torch.Tensor], sizes: list[int], img_size: int, cfg: DetectionConfig
) -> Targets:
    """YOLOv3 assignment: each truth → its best shape-IoU anchor of all levels, at the cell of its centre.

    boxes: per image [M, 4] xyxy pixels (may be empty); sizes: output side per level, fine → coarse.
    Two truths landing on the same anchor and cell: the later one wins, as in YOLOv3.
    """
    device = boxes[0].device if boxes else torch.device("cpu")
    anchors = anchors_px(img_size, cfg).to(device)
    num_a = anchors.shape[1]
    n = len(boxes)
    obj = [torch.zeros(n, num_a, s, s, dtype=torch.bool, device=device) for s in sizes]
    box = [torch.zeros(n, num_a, s, s, 4, device=device) for s in sizes]
    valid = [_valid(b).float() for b in boxes]
    truth = torch.cat(valid) if valid else torch.zeros(0, 4, device=device)
    image = torch.cat([torch.full((len(v),), i, device=device) for i, v in enumerate(valid)]).long()
    if len(truth) == 0:
        return Targets(obj, box)

    wh = truth[:, 2:] - truth[:, :2]
    centre = (truth[:, :2] + truth[:, 2:]) / 2
    flat = anchors.reshape(-1, 2)
    inter = torch.minimum(wh[:, None], flat[None]).prod(-1)
    shape_iou = inter / (wh.prod(-1)[:, None] + flat.prod(-1)[None] - inter)
    best = shape_iou.argmax(1)
    level, anchor = best // num_a, best % num_a
    for lvl, s in enumerate(sizes):
        sel = level == lvl
        if not sel.any():
            continue
        g = centre[sel] / (img_size / s)
        cell = g.floor().long().clamp(0, s - 1)
        b, a, col, row = image[sel], anchor[sel], cell[:, 0], cell[:, 1]
        obj[lvl][b, a, row, col] = True
        offset = (g - cell).clamp(0, 1)
        box[lvl][b, a, row, col] = torch.cat([offset, torch.log(wh[sel] / anchors[lvl, a])], 1)
    return Targets(obj, box)


def _decode_level(out: torch.Tensor, anchors: torch.Tensor, img_size: int) -> torch.Tensor:
    """[B, A, S, S, 5] raw outputs + [A, 2] pixel anchors → [B, A, S, S, 4] xyxy pixel boxes (unclipped)."""
    s = out.shape[2]
    stride = img_size / s
    rows, cols = torch.meshgrid(
        torch.arange(s, device=out.device), torch.arange(s, device=out.device), indexing="ij"
    )
    cx = (cols + out[..., 0].sigmoid()) * stride
    cy = (rows + out[..., 1].sigmoid()) * stride
    w = anchors[:, 0].view(1, -1, 1, 1) * out[..., 2].clamp(max=MAX_LOG_SCALE).exp()
    h = anchors[:, 1].view(1, -1, 1, 1) * out[..., 3].clamp(max=MAX_LOG_SCALE).exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _ignored(pred: torch.Tensor, boxes: list[torch.Tensor], ignore_iou: float) -> torch.Tensor:
    """[B, A, S, S] bool: predicted boxes already overlapping a truth, not punished as background (YOLOv3).

    One batched IoU over the truths padded to the longest list (torchvision's `box_iou`, per image), so the
    cost of a step does not grow with a Python loop over its images."""
    most = max((len(t) for t in boxes), default=0)
    if most == 0:
        return torch.zeros(pred.shape[:-1], dtype=torch.bool, device=pred.device)
    truth = pred.new_zeros(len(boxes), most, 4)
    real = torch.zeros(len(boxes), most, dtype=torch.bool, device=pred.device)
    for b, t in enumerate(boxes):
        truth[b, : len(t)], real[b, : len(t)] = t, True
    flat = pred.reshape(len(boxes), -1, 4)  # [B, P, 4]
    area_p = (flat[..., 2] - flat[..., 0]) * (flat[..., 3] - flat[..., 1])
    area_t = (truth[..., 2] - truth[..., 0]) * (truth[..., 3] - truth[..., 1])
    lt = torch.max(flat[:, :, None, :2], truth[:, None, :, :2])
    rb = torch.min(flat[:, :, None, 2:], truth[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (area_p[:, :, None] + area_t[:, None, :] - inter)  # [B, P, M], as box_iou per image
    iou = iou.masked_fill(~real[:, None, :], -1.0)
    return (iou.amax(2) > ignore_iou).view(pred.shape[:-1])


def detection_loss(
    outputs: list[torch.Tensor], boxes: list[torch.Tensor], img_size: int, cfg: DetectionConfig
) -> torch.Tensor:
    """YOLOv3 loss, summed over anchors and levels, mean over the batch.

    boxes: per image [M, 4] xyxy pixels of the img_size input (may be empty; degenerate rows are dropped).
    2.5 × BCE(tx, ty) + 2.5 × MSE(tw, th) + BCE objectness on assigned anchors, 0.5 × BCE no-object on the
    others unless their predicted box has IoU > ignore_iou with a truth.
    """
    if len(outputs) != 3:
        raise ValueError(f"expected 3 pyramid outputs, got {len(outputs)}")
    n = outputs[0].shape[0]
    if len(boxes) != n:
        raise ValueError(f"boxes: one tensor per image ({n}), got {len(boxes)}")
    boxes = [_valid(b.to(outputs[0])) for b in boxes]
    targets = assign_targets(boxes, [o.shape[2] for o in outputs], img_size, cfg)
    anchors = anchors_px(img_size, cfg).to(outputs[0])
    total = outputs[0].new_zeros(())
    for lvl, out in enumerate(outputs):
        obj, tgt = targets.obj[lvl], targets.box[lvl]
        pos, t = out[obj], tgt[obj]
        xy = F.binary_cross_entropy_with_logits(pos[:, :2], t[:, :2], reduction="sum")
        wh = F.mse_loss(pos[:, 2:4], t[:, 2:4], reduction="sum")
        obj_loss = F.binary_cross_entropy_with_logits(pos[:, 4], torch.ones_like(pos[:, 4]), reduction="sum")
        noobj = ~obj & ~_ignored(_decode_level(out.detach(), anchors[lvl], img_size), boxes, cfg.ignore_iou)
        neg = out[..., 4][noobj]
        noobj_loss = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="sum")
        total = (
            total
            + cfg.lambda_xy * xy
            + cfg.lambda_wh * wh
            + cfg.lambda_obj * obj_loss
            + cfg.lambda_noobj * noobj_loss
        )
    return total / n


@torch.no_grad()
def decode(
    outputs: list[torch.Tensor], img_size: int, cfg: DetectionConfig
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image (boxes [K, 4] xyxy pixels clipped to the image, scores [K]), best first.

    Keeps sigmoid objectness > conf_threshold, then NMS at nms_iou over all levels together (single class).
    """
    anchors = anchors_px(img_size, cfg).to(outputs[0])
    boxes = torch.cat(
        [_decode_level(o, anchors[i], img_size).flatten(1, 3) for i, o in enumerate(outputs)], 1
    )
    scores = torch.cat([o[..., 4].sigmoid().flatten(1) for o in outputs], 1)
    results = []
    for b in range(boxes.shape[0]):
        keep = scores[b] > cfg.conf_threshold
        kept = clip_boxes_to_image(boxes[b][keep], (img_size, img_size))
        order = nms(kept, scores[b][keep], cfg.nms_iou)
        results.append((kept[order], scores[b][keep][order]))
    return results
