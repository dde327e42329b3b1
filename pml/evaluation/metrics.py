"""Metrics from predictions and ground truth (scikit-learn), for each problem type.

Every metric is "higher is better" unless ``LOWER_IS_BETTER`` names it.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

LOWER_IS_BETTER = {"hammingLoss", "logLoss"}


def direction(metric: str) -> str:
    return "minimize" if metric in LOWER_IS_BETTER else "maximize"


def classification_metrics(y_true: list[int], scores: np.ndarray, n_classes: int) -> dict[str, float]:
    """Single-label: ``y_true`` holds class positions, ``scores`` is (n, n_classes) probabilities."""
    y_pred = scores.argmax(axis=1)
    out = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balancedAccuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "f1Macro": float(skm.f1_score(y_true, y_pred, average="macro", labels=range(n_classes), zero_division=0)),
        "precisionMacro": float(
            skm.precision_score(y_true, y_pred, average="macro", labels=range(n_classes), zero_division=0)
        ),
        "recallMacro": float(
            skm.recall_score(y_true, y_pred, average="macro", labels=range(n_classes), zero_division=0)
        ),
    }
    present = sorted(set(y_true))
    if len(present) == n_classes and n_classes == 2:
        out["auc"] = float(skm.roc_auc_score(y_true, scores[:, 1]))
    elif len(present) == n_classes and n_classes > 2:
        normalised = scores / np.clip(scores.sum(axis=1, keepdims=True), 1e-12, None)
        out["auc"] = float(skm.roc_auc_score(y_true, normalised, multi_class="ovr", labels=range(n_classes)))
    return out


def multilabel_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Multi-label: indicator matrices of shape (n, n_labels)."""
    y_pred = (scores >= threshold).astype(int)
    return {
        "subsetAccuracy": float(skm.accuracy_score(y_true, y_pred)),
        "f1Micro": float(skm.f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "f1Macro": float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "hammingLoss": float(skm.hamming_loss(y_true, y_pred)),
    }


class SegmentationScore:
    """Accumulates a pixel confusion matrix over images, then gives IoU-based metrics."""

    def __init__(self, n_values: int):
        self.n = n_values  # background 0 plus each label index + 1
        self.confusion = np.zeros((n_values, n_values), dtype=np.int64)

    def add(self, truth: np.ndarray, predicted: np.ndarray) -> None:
        if truth.shape != predicted.shape:
            raise ValueError(f"predicted mask {predicted.shape} differs from truth {truth.shape}")
        t = truth.astype(np.int64).ravel()
        p = np.clip(predicted.astype(np.int64).ravel(), 0, self.n - 1)
        self.confusion += np.bincount(t * self.n + p, minlength=self.n * self.n).reshape(self.n, self.n)

    def metrics(self) -> dict[str, float]:
        c = self.confusion
        tp = np.diag(c).astype(float)
        union = c.sum(axis=0) + c.sum(axis=1) - tp
        seen = union > 0
        iou = np.divide(tp, union, out=np.zeros_like(tp), where=seen)
        dice = np.divide(2 * tp, c.sum(axis=0) + c.sum(axis=1), out=np.zeros_like(tp), where=seen)
        fg_tp = c[1:, 1:].sum()
        fg_union = c[1:, :].sum() + c[:, 1:].sum() - fg_tp
        return {
            "meanIoU": float(iou[seen].mean()) if seen.any() else 0.0,
            "meanDice": float(dice[seen].mean()) if seen.any() else 0.0,
            "pixelAccuracy": float(tp.sum() / max(c.sum(), 1)),
            "foregroundIoU": float(fg_tp / fg_union) if fg_union else 0.0,
        }
