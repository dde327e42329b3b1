"""Metrics pml computes itself from predictions and ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from pml.evaluation.metrics import SegmentationScore, classification_metrics


def test_segmentation_iou_on_a_known_case() -> None:
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    predicted = np.array([[0, 1, 1, 1], [0, 0, 1, 0]])
    score = SegmentationScore(2)
    score.add(truth, predicted)
    metrics = score.metrics()
    # background: tp 3, union 5 → 0.6; class 1: tp 3, union 5 → 0.6
    assert metrics["meanIoU"] == pytest.approx(0.6)
    assert metrics["pixelAccuracy"] == pytest.approx(6 / 8)
    assert metrics["foregroundIoU"] == pytest.approx(0.6)


def test_segmentation_rejects_a_mask_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="differs"):
        SegmentationScore(2).add(np.zeros((2, 2)), np.zeros((3, 3)))


def test_classification_metrics_from_scores() -> None:
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    metrics = classification_metrics([0, 1, 1, 1], scores, 2)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["auc"] == pytest.approx(1.0)
    assert metrics["balancedAccuracy"] == pytest.approx((1 + 2 / 3) / 2)
