"""Cumulative test-then-train metrics and their majority-class baseline."""

import math

import numpy as np

from modelstore.schema import LabelSet
from trainer.metrics import ClassificationMetrics, RegressionMetrics, metrics_for


def test_metrics_first_batch_only_counted():
    metrics = ClassificationMetrics(LabelSet(["cat", "dog"]))
    metrics.update(np.array(["dog", "dog", "cat"], dtype=object), None)
    out = metrics.to_dict()
    assert out["n_scored"] == 0
    assert out["accuracy"] is None
    assert out["baseline_accuracy"] is None
    assert out["label_counts"] == {"cat": 1, "dog": 2}


def test_metrics_baseline_predicts_majority_before_batch():
    metrics = ClassificationMetrics(LabelSet([0, 1]))
    metrics.update(np.array([1, 1, 0]), None)
    # The batch is mostly 0, but the baseline still predicts 1, the majority so far.
    metrics.update(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]))
    out = metrics.to_dict()
    assert out["n_scored"] == 4
    assert out["correct"] == 3
    assert out["accuracy"] == 0.75
    assert out["baseline_correct"] == 1
    assert out["baseline_accuracy"] == 0.25
    assert out["label_counts"] == {"0": 4, "1": 3}


def test_metrics_tie_goes_to_first_declared_label():
    metrics = ClassificationMetrics(LabelSet(["spam", "ham"]))
    metrics.update(np.array(["ham", "spam"], dtype=object), None)
    assert metrics.majority_label() == "spam"


def test_metrics_resume_from_stored():
    labels = LabelSet([0, 1])
    first = ClassificationMetrics(labels)
    first.update(np.array([0, 1, 1]), None)
    first.update(np.array([1, 1]), np.array([1, 0]))
    resumed = ClassificationMetrics(labels, first.to_dict())
    resumed.update(np.array([0]), np.array([0]))
    out = resumed.to_dict()
    assert out["n_scored"] == 3
    assert out["correct"] == 2
    assert out["baseline_correct"] == 2
    assert out["label_counts"] == {"0": 2, "1": 4}


def test_regression_metrics():
    metrics = metrics_for(None, None)
    assert isinstance(metrics, RegressionMetrics)
    metrics.update(np.array([1.0, 2.0]), None)
    metrics.update(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 1.0]))
    out = RegressionMetrics(metrics.to_dict()).to_dict()
    assert out["n_scored"] == 3
    assert out["sum_abs_error"] == 3.0
    assert out["sum_sq_error"] == 5.0
    assert out["mae"] == 1.0
    assert math.isclose(out["rmse"], math.sqrt(5.0 / 3.0))


def test_regression_metrics_empty():
    out = RegressionMetrics().to_dict()
    assert out["mae"] is None
    assert out["rmse"] is None
