"""Cumulative test-then-train metrics, stored in every version's metadata.

Each batch is scored by the version it is about to update, before that
version learns it, so every score is on data the model had not seen. The
counts are cumulative over the model's chain of versions. A batch that
arrives before the model has learned anything is not scored.

Classifiers are compared with a running majority-class baseline: before each
batch, the baseline predicts the label seen most often so far (ties go to the
label declared first). A model whose accuracy does not beat
``baseline_accuracy`` has learned nothing useful. Regressors keep absolute
and squared errors; clustering models the squared distance of each row to
its nearest center.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from modelstore.schema import LabelSet
from trainer.drift import error_values


class ClassificationMetrics:
    def __init__(self, labels: LabelSet, stored: Mapping[str, Any] | None = None):
        stored = stored or {}
        self.labels = labels
        self.n_scored = int(stored.get("n_scored", 0))
        self.correct = int(stored.get("correct", 0))
        self.baseline_correct = int(stored.get("baseline_correct", 0))
        # JSON object keys are strings, so integer labels are stored as "0", "1".
        counts = stored.get("label_counts", {})
        self.label_counts = {str(label): int(counts.get(str(label), 0)) for label in labels.labels}

    def majority_label(self) -> Any:
        # max keeps the first of equal counts, which is the label declared first.
        return max(self.labels.labels, key=lambda label: self.label_counts[str(label)])

    def update(self, y_true: np.ndarray, y_pred: np.ndarray | None) -> None:
        """Score one batch, then count its labels.

        ``y_pred`` is None when there is no model yet; the batch is then only counted.
        """
        y_true = np.asarray(y_true, dtype=object)
        if y_pred is not None:
            baseline = self.majority_label()
            self.n_scored += len(y_true)
            self.correct += int((np.asarray(y_pred, dtype=object) == y_true).sum())
            self.baseline_correct += int((y_true == baseline).sum())
        for label in y_true.tolist():
            self.label_counts[str(label)] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_scored": self.n_scored,
            "correct": self.correct,
            "accuracy": _ratio(self.correct, self.n_scored),
            "baseline_correct": self.baseline_correct,
            "baseline_accuracy": _ratio(self.baseline_correct, self.n_scored),
            "label_counts": dict(self.label_counts),
        }


class RegressionMetrics:
    def __init__(self, stored: Mapping[str, Any] | None = None):
        stored = stored or {}
        self.n_scored = int(stored.get("n_scored", 0))
        self.sum_abs_error = float(stored.get("sum_abs_error", 0.0))
        self.sum_sq_error = float(stored.get("sum_sq_error", 0.0))

    def update(self, y_true: np.ndarray, y_pred: np.ndarray | None) -> None:
        if y_pred is None:
            return
        error = np.asarray(y_pred, dtype=np.float64) - np.asarray(y_true, dtype=np.float64)
        self.n_scored += len(error)
        self.sum_abs_error += float(np.abs(error).sum())
        self.sum_sq_error += float(np.square(error).sum())

    def to_dict(self) -> dict[str, Any]:
        mean_sq = _ratio(self.sum_sq_error, self.n_scored)
        return {
            "n_scored": self.n_scored,
            "sum_abs_error": self.sum_abs_error,
            "sum_sq_error": self.sum_sq_error,
            "mae": _ratio(self.sum_abs_error, self.n_scored),
            "rmse": None if mean_sq is None else math.sqrt(mean_sq),
        }


def metrics_for(labels: LabelSet | None, stored: Mapping[str, Any] | None):
    """Resume the stored metrics of a classifier (``labels`` given) or a regressor."""
    if labels is not None:
        return ClassificationMetrics(labels, stored)
    return RegressionMetrics(stored)


def _ratio(numerator: float, denominator: int) -> float | None:
    # None, not NaN: metadata is JSON, and JSON has no NaN.
    return numerator / denominator if denominator else None


class ClusteringMetrics:
    """Test-then-train squared distance of each row to its nearest center."""

    def __init__(self, stored: Mapping[str, Any] | None = None):
        stored = stored or {}
        self.n_scored = int(stored.get("n_scored", 0))
        self.sum_sq_distance = float(stored.get("sum_sq_distance", 0.0))

    def update(self, sq_distances: np.ndarray | None) -> None:
        if sq_distances is None:
            return
        self.n_scored += len(sq_distances)
        self.sum_sq_distance += float(np.sum(sq_distances))

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_scored": self.n_scored,
            "sum_sq_distance": self.sum_sq_distance,
            "mean_sq_distance": _ratio(self.sum_sq_distance, self.n_scored),
        }


def score_batch(metrics, learner, X: np.ndarray, y: np.ndarray | None) -> np.ndarray | None:
    """Score one batch with ``learner`` before it learns the batch, and return the per-row errors.

    The errors are 0/1 for a classifier, absolute errors for a regressor and
    squared distances to the nearest center for a clustering model; None
    when the learner is not fitted yet, which scores nothing.
    """
    if not learner.is_fitted:
        metrics.update(None) if isinstance(metrics, ClusteringMetrics) else metrics.update(y, None)
        return None
    if isinstance(metrics, ClusteringMetrics):
        distances = nearest_sq_distance(learner, X)
        metrics.update(distances)
        return distances
    predictions = learner.predict(X)
    metrics.update(y, predictions)
    task = "classification" if isinstance(metrics, ClassificationMetrics) else "regression"
    return error_values(y, predictions, task)


SCORED_COUNTS = ("n_scored", "correct", "baseline_correct", "sum_abs_error")


def scored_delta(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> dict[str, float]:
    """Return what one batch added to the cumulative counts that the worker exports as counters."""
    before = before or {}
    return {key: after[key] - before.get(key, 0) for key in SCORED_COUNTS if key in after}


def nearest_sq_distance(learner, X: np.ndarray) -> np.ndarray:
    return np.square(learner.distances(X)).min(axis=1)


def metrics_for_spec(spec, stored: Mapping[str, Any] | None):
    """Resume the stored test-then-train metrics of any task."""
    if spec.is_clusterer:
        return ClusteringMetrics(stored)
    return metrics_for(spec.labels, stored)
