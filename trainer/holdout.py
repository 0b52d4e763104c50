"""Learn a batch into a candidate, with the publish gate's optional metric check.

Without a metric margin in the spec's ``gate``, the candidate is a copy of
the current learner that learns the whole batch in one ``partial_fit``
call. With one, the candidate first learns the batch without its last
``holdout_fraction`` of rows. The candidate and the current learner are
then scored on those rows, which neither has learned. The candidate learns
them only if its score is not worse by more than the margin. Both
steps depend on the batch alone, so learning stays deterministic and a
restored learner continues exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from modelstore.errors import PublishRejected
from trainer.learner import Learner
from trainer.metrics import nearest_sq_distance
from trainer.spec import GateSettings


def learn_candidate(
    current: Learner, X: np.ndarray, y: np.ndarray | None
) -> tuple[Learner, dict[str, Any] | None]:
    """Return a copy of ``current`` that learned the batch, and the metric check's report.

    The report is None when no metric check is configured or the batch is
    too small for one. Raises PublishRejected (reason ``metric_regression``)
    when the candidate scores worse than the margin allows.
    """
    gate = current.spec.gate
    candidate = copy.deepcopy(current)
    margin = None if gate is None else _margin(gate)
    n_holdout = 0 if margin is None else int(len(X) * gate.holdout_fraction)
    if margin is None or not current.is_fitted or n_holdout < gate.min_holdout_rows:
        return candidate.learn(X, y), None

    split = len(X) - n_holdout
    y_first = None if y is None else y[:split]
    y_held = None if y is None else y[split:]
    candidate.learn(X[:split], y_first)
    report = _compare(current, candidate, X[split:], y_held, margin)
    candidate.learn(X[split:], y_held)
    return candidate, report


def _margin(gate: GateSettings) -> float | None:
    return gate.max_accuracy_drop if gate.max_accuracy_drop is not None else gate.max_error_increase


def _compare(current: Learner, candidate: Learner, X, y, margin: float) -> dict[str, Any]:
    spec = current.spec
    if spec.is_classifier:
        metric = "accuracy"
        before = float(np.mean(current.predict(X) == y))
        after = float(np.mean(candidate.predict(X) == y))
        worse = after < before - margin
        allowed = f"max_accuracy_drop is {margin}"
    else:
        metric = "mean_sq_distance" if spec.is_clusterer else "mae"
        before, after = _error(current, X, y), _error(candidate, X, y)
        worse = after > before * (1.0 + margin)
        allowed = f"max_error_increase is {margin} (relative)"

    report = {"metric": metric, "holdout_rows": len(X), "current": before, "candidate": after}
    if worse:
        raise PublishRejected(
            "metric_regression",
            f"{spec.estimator} candidate has {metric} {after:.6g} on {len(X)} held-out rows "
            f"of the batch, the current version {before:.6g}; {allowed}, so the version is "
            "not published",
        )
    return report


def _error(learner: Learner, X, y) -> float:
    if learner.spec.is_clusterer:
        return float(nearest_sq_distance(learner, X).mean())
    return float(np.mean(np.abs(learner.predict(X) - y)))
