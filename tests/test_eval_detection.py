"""Detection head (REFERENCE §3.3): shapes, YOLOv3 assignment, loss, decoding and NMS; CPU, a few seconds."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from models.evaluate.detection import (
    DetectionConfig,
    DetectionHead,
    anchors_px,
    assign_targets,
    decode,
    detection_loss,
)

SMALL = DetectionConfig(channels=(16, 32, 64))


def _empty_outputs(sizes: list[int], batch: int = 1, obj_logit: float = -10.0) -> list[torch.Tensor]:
    """Raw outputs at the cell centre and anchor size everywhere, objectness `obj_logit`."""
    outputs = [torch.zeros(batch, 3, s, s, 5) for s in sizes]
    for out in outputs:
        out[..., 4] = obj_logit
    return outputs


def test_output_shapes_demo_and_odd_grid():
    torch.manual_seed(0)
    head = DetectionHead(32, 8, 64, SMALL)
    outs = head(torch.randn(2, 64, 32))
    assert [tuple(o.shape) for o in outs] == [(2, 3, 16, 16, 5), (2, 3, 8, 8, 5), (2, 3, 4, 4, 5)]
    assert head.sizes == [16, 8, 4]
    odd = DetectionHead(32, 7, 56, SMALL)  # odd grid: coarse level is ceil(7 / 2)
    assert [o.shape[2] for o in odd(torch.randn(2, 49, 32))] == [14, 7, 4] == odd.sizes


def test_output_shapes_paper_geometry():
    torch.manual_seed(0)
    head = DetectionHead(768, 14, 224, DetectionConfig(channels=(16, 16, 16)))
    outs = head(torch.randn(1, 196, 768))
    assert [tuple(o.shape) for o in outs] == [(1, 3, 28, 28, 5), (1, 3, 14, 14, 5), (1, 3, 7, 7, 5)]
    assert head.det_head.in_features == head.det_head.out_features == 768


def test_bad_inputs_raise():
    head = DetectionHead(32, 8, 64, SMALL)
    with pytest.raises(ValueError, match="grid²"):
        head(torch.randn(1, 65, 32))  # CLS token left in
    with pytest.raises(ValueError, match="grid"):
        DetectionHead(32, 1, 64, SMALL)
    with pytest.raises(ValidationError):
        DetectionConfig(anchors=[[(10, 13)], [(30, 61)]])
    with pytest.raises(ValidationError):
        DetectionConfig(conf_thresh=0.3)
    with pytest.raises(ValueError, match="one tensor per image"):
        detection_loss(_empty_outputs([16, 8, 4], batch=2), [torch.zeros(0, 4)], 64, SMALL)


def test_anchors_scale_with_image():
    cfg = DetectionConfig()
    assert torch.equal(anchors_px(416, cfg)[2, 2], torch.tensor([373.0, 326.0]))
    torch.testing.assert_close(anchors_px(224, cfg)[0, 0], torch.tensor([10 * 224 / 416, 13 * 224 / 416]))


def test_assignment_puts_small_and_big_boxes_on_the_right_scale():
    cfg = DetectionConfig()
    small = torch.tensor([[100.0, 100.0, 112.0, 114.0]])  # ≈ 22×26 at 416 px → (16, 30), fine level
    medium = torch.tensor([[20.0, 30.0, 60.0, 90.0]])  # ≈ 74×111 → (59, 119), middle level
    big = torch.tensor([[22.0, 22.0, 202.0, 202.0]])  # ≈ 334×334 → (373, 326), coarse level
    t = assign_targets([small, medium, big], [28, 14, 7], 224, cfg)
    where = [[tuple(i.tolist()) for i in obj.nonzero()] for obj in t.obj]
    # (image, anchor, row, column); centres (106, 107) / 8, (40, 60) / 16, (112, 112) / 32
    assert where == [[(0, 1, 13, 13)], [(1, 2, 3, 2)], [(2, 2, 3, 3)]]
    torch.testing.assert_close(t.box[2][2, 2, 3, 3, :2], torch.tensor([0.5, 0.5]))
    wh = torch.tensor([180.0, 180.0]) / (torch.tensor([373.0, 326.0]) * 224 / 416)
    torch.testing.assert_close(t.box[2][2, 2, 3, 3, 2:], wh.log())


def test_assignment_skips_empty_and_degenerate_boxes():
    t = assign_targets([torch.zeros(0, 4), torch.zeros(1, 4)], [16, 8, 4], 64, SMALL)
    assert not any(o.any() for o in t.obj)
    loss = detection_loss(
        _empty_outputs([16, 8, 4], batch=2), [torch.zeros(0, 4), torch.zeros(1, 4)], 64, SMALL
    )
    # only no-object terms: 0.5 × softplus(-10) per anchor, 3 × (16² + 8² + 4²) anchors per image
    expected = 0.5 * 3 * (256 + 64 + 16) * torch.nn.functional.softplus(torch.tensor(-10.0))
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)  # BCE-with-logits is float32-coarse here


def test_decode_anchor_box_at_cell_centre_exact():
    cfg = DetectionConfig()  # at 416 px the anchors are the COCO values exactly
    outputs = _empty_outputs([52, 26, 13])
    outputs[1][0, 1, 3, 5, 4] = 10.0  # anchor (62, 45), row 3, column 5 of the 26×26 level (stride 16)
    ((boxes, scores),) = decode(outputs, 416, cfg)
    assert torch.equal(
        boxes, torch.tensor([[5.5 * 16 - 31, 3.5 * 16 - 22.5, 5.5 * 16 + 31, 3.5 * 16 + 22.5]])
    )
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([10.0])))


def test_decode_paper_geometry_and_clipping():
    cfg = DetectionConfig()
    outputs = _empty_outputs([28, 14, 7])
    outputs[2][0, 2, 3, 3, 4] = 4.0  # anchor (373, 326) × 224 / 416 at the central 7×7 cell: 200.8 × 175.5
    ((boxes, _),) = decode(outputs, 224, cfg)
    w, h = 373 * 224 / 416, 326 * 224 / 416
    torch.testing.assert_close(boxes, torch.tensor([[112 - w / 2, 112 - h / 2, 112 + w / 2, 112 + h / 2]]))
    outputs[2][0, 2, 3, 3, 4] = -10.0
    outputs[2][0, 2, 0, 0, 4] = 4.0  # same anchor centred at (16, 16): sticks out of the image
    ((boxes, _),) = decode(outputs, 224, cfg)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 16 + w / 2, 16 + h / 2]]))  # clipped at 0


def test_nms_keeps_the_higher_score():
    outputs = _empty_outputs([52, 26, 13])
    # anchor (33, 23) in neighbouring cells of the 52×52 level (stride 8), pulled together by tx
    outputs[0][0, 2, 10, 10, 0], outputs[0][0, 2, 10, 10, 4] = 2.0, 3.0
    outputs[0][0, 2, 10, 11, 0], outputs[0][0, 2, 10, 11, 4] = -2.0, 5.0
    ((boxes, scores),) = decode(outputs, 416, DetectionConfig())
    assert boxes.shape == (1, 4)
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([5.0])))
    cx = (11 + torch.sigmoid(torch.tensor(-2.0))) * 8
    torch.testing.assert_close(boxes[0, [0, 2]], torch.stack([cx - 16.5, cx + 16.5]))


def test_decode_nothing_above_threshold_is_empty():
    results = decode(
        _empty_outputs([16, 8, 4], batch=2, obj_logit=0.0), 64, SMALL
    )  # sigmoid 0.5 is not > 0.5
    assert len(results) == 2
    for boxes, scores in results:
        assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_perfect_prediction_has_lower_loss():
    sizes, img = [28, 14, 7], 224
    cfg = DetectionConfig()
    boxes = [torch.tensor([[40.0, 50.0, 90.0, 130.0]])]
    t = assign_targets(boxes, sizes, img, cfg)
    perfect = _empty_outputs(sizes)
    for out, obj, box in zip(perfect, t.obj, t.box, strict=True):
        out[..., :2][obj] = torch.logit(box[..., :2][obj], eps=1e-6)
        out[..., 2:4][obj] = box[..., 2:4][obj]
        out[..., 4][obj] = 10.0
    wrong = [o.clone() for o in perfect]
    for out, obj in zip(wrong, t.obj, strict=True):
        out[..., :4][obj] += 1.0
    good, bad = detection_loss(perfect, boxes, img, cfg), detection_loss(wrong, boxes, img, cfg)
    assert good < bad
    ((found, _),) = decode(perfect, img, cfg)  # the encoding round-trips through decode
    torch.testing.assert_close(found, boxes[0], atol=1e-3, rtol=0)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    head = DetectionHead(32, 8, 64, SMALL)
    tokens = torch.randn(4, 64, 32)
    boxes = [
        torch.tensor([[8.0, 8.0, 30.0, 40.0]]),
        torch.tensor([[20.0, 10.0, 60.0, 50.0], [2.0, 2.0, 12.0, 12.0]]),
        torch.zeros(0, 4),
        torch.tensor([[30.0, 30.0, 50.0, 58.0]]),
    ]
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = detection_loss(head(tokens), boxes, 64, SMALL)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0], losses  # measured: 13.35 → 3.45 (0.26×)
    head.eval()  # BatchNorm running statistics have followed
    with torch.no_grad():
        assert detection_loss(head(tokens), boxes, 64, SMALL) < 0.35 * losses[0]


def test_token_norm_makes_the_detection_head_blind_to_the_token_scale():
    """Same contract as the segmentation head's (tests/test_eval_heads.py): per-channel scale and offset of
    the frozen tokens do not reach the head when token_norm is on (batch statistics, training mode)."""
    torch.manual_seed(0)
    tokens = torch.randn(4, 16, 32)
    shifted = tokens * torch.linspace(5, 40, 32) + 5.0
    for token_norm, same in ((True, True), (False, False)):
        torch.manual_seed(0)
        head = DetectionHead(32, 4, 32, SMALL.model_copy(update={"token_norm": token_norm})).train()
        out, out_shifted = head(tokens), head(shifted)
        close = all(torch.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(out, out_shifted, strict=True))
        assert close is same
