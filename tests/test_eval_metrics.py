"""Downstream metrics against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluate.metrics import (
    OFFICIAL_IOU_THRESHOLDS,
    accuracy,
    detection_map,
    dice_per_image,
    mean_auc,
    mean_dice,
)


def test_mean_auc_hand_example_leaves_out_unscorable_class():
    y = np.array([[0, 0, 0], [0, 0, 0], [1, 1, 0], [1, 1, 0]])
    # class 0: negatives 0.1, 0.4; positives 0.35, 0.8 -> only (0.4, 0.35) of the 4 pairs is misordered: 3/4
    # class 1: every positive above every negative: 1.0; class 2 has no positive: left out
    scores = np.array([[0.1, 0.2, 0.5], [0.4, 0.1, 0.5], [0.35, 0.7, 0.5], [0.8, 0.9, 0.5]])
    mean, per_class = mean_auc(y, scores)
    assert per_class == pytest.approx({0: 0.75, 1: 1.0})
    assert mean == pytest.approx(0.875)


def test_mean_auc_one_dimensional_and_unscorable():
    mean, per_class = mean_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert mean == pytest.approx(0.75) and list(per_class) == [0]
    with pytest.raises(ValueError, match="no class can be scored"):
        mean_auc(np.ones((3, 2)), np.zeros((3, 2)))


def test_accuracy_takes_the_argmax():
    scores = np.array([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.2, 0.6, 0.2]])
    assert accuracy(np.array([0, 2, 1, 1]), scores) == pytest.approx(0.75)  # the third is wrong


def test_dice_per_image_and_the_empty_rules():
    pred = np.zeros((4, 4, 4), dtype=bool)
    truth = np.zeros((4, 4, 4), dtype=bool)
    pred[0, 0:2, 0:2] = True  # 4 pixels
    truth[0, 0:2, 1:3] = True  # 4 pixels, 2 shared: 2*2 / (4+4) = 0.5
    # image 1: both empty -> 1.0 (official rule)
    pred[2, 3, 3] = True  # image 2: empty truth but a prediction -> 0.0
    truth[3, 1, 1] = True  # image 3: a missed lesion -> 0.0
    assert dice_per_image(pred, truth).tolist() == pytest.approx([0.5, 1.0, 0.0, 0.0])
    prob = np.where(pred, 0.9, 0.1)
    assert mean_dice(prob, truth) == pytest.approx(1.5 / 4)
    assert mean_dice(prob, truth, threshold=0.95) == pytest.approx(2 / 4)  # nothing predicted


def test_iou_thresholds_are_exact():
    assert OFFICIAL_IOU_THRESHOLDS == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)


def _pred(boxes, scores):
    return np.array(boxes, dtype=float).reshape(-1, 4), np.array(scores, dtype=float)


def test_map_perfect_boxes():
    truths = [np.array([[10.0, 10, 50, 60]]), np.array([[0.0, 0, 20, 20], [30, 30, 60, 50]])]
    preds = [_pred(t, [0.9] * len(t)) for t in truths]
    assert detection_map(preds, truths) == pytest.approx(1.0)


def test_map_of_a_shifted_box_with_known_iou():
    # truth [0,0,10,10], prediction shifted right by 2.5: overlap 7.5*10 = 75, union 100+100-75 = 125,
    # IoU = 0.6 exactly -> matched at 0.40, 0.45, 0.50, 0.55, 0.60 (AP 1), missed at 0.65, 0.70, 0.75 (AP 0)
    # -> mAP = 5/8 = 0.625
    truths = [np.array([[0.0, 0, 10, 10]])]
    assert detection_map([_pred([[2.5, 0, 12.5, 10]], [0.8])], truths) == pytest.approx(0.625)


def test_map_official_skips_images_without_predictions():
    truths = [np.array([[0.0, 0, 10, 10]]), np.array([[20.0, 20, 40, 40]])]
    preds = [_pred([[0, 0, 10, 10]], [0.9]), _pred([], [])]  # the second lesion is missed
    # all: 1 of 2 truths found, precision 1 up to recall 0.5 -> 51 of COCO's 101 recall points: 51/101
    assert detection_map(preds, truths, scored="all") == pytest.approx(51 / 101)
    # official: the image without a prediction is never given to the metric -> 1.0
    assert detection_map(preds, truths, scored="official") == pytest.approx(1.0)


def test_map_false_alarm_on_a_negative_image():
    truths = [np.array([[0.0, 0, 10, 10]]), np.zeros((0, 4))]
    preds = [_pred([[0, 0, 10, 10]], [0.9]), _pred([[5, 5, 9, 9]], [0.95])]
    # all: ranked FP (0.95) then TP (0.9): precision 1/2 at recall 1 for every recall point -> 0.5
    assert detection_map(preds, truths, scored="all") == pytest.approx(0.5)
    assert detection_map(preds, truths, scored="official") == pytest.approx(1.0)


def test_map_with_nothing_to_score_is_zero():
    assert detection_map([], []) == 0.0
    assert detection_map([_pred([], [])], [np.array([[0.0, 0, 5, 5]])], scored="official") == 0.0
    assert detection_map([_pred([[0, 0, 5, 5]], [0.5])], [np.zeros((0, 4))]) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1"):
        detection_map([_pred([], []), _pred([], [])], [np.zeros((0, 4))])
