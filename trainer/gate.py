"""Checks that a learned version may be published.

Two checks run before every publish. First, every learned parameter must be
finite, and the exported ones must also fit in float32, because the ONNX
graph stores them as float32 and a larger value becomes infinity there.
Second, onnxruntime must agree with scikit-learn on the batch just learned
and on fixed probe rows far from any data, so a conversion bug or a float32
precision loss never reaches the predictor. ``trainer.holdout`` adds the
optional metric check.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import onnxruntime as ort

from modelstore.errors import PublishRejected
from modelstore.schema import FLOAT32_MAX
from trainer import bounds
from trainer.estimators import EXPORTED_ATTRIBUTES
from trainer.export import INPUT_NAME
from trainer.learner import Learner
from trainer.scaling import exported_attributes

# ONNX computes in float32 and scikit-learn in float64. The allowed
# difference of a score grows with the size of the terms summed for it
# (relative part) and has a floor for results near zero (absolute part).
SCORE_RTOL = 1e-4
SCORE_ATOL = 1e-4
PROBABILITY_ATOL = 1e-4

# Constant probe rows, in raw feature units, that reach far outside the data
# a model has seen, where float32 overflow and cancellation show first.
PROBE_VALUES = (0.0, 1.0, -1.0, 1e3, -1e3)
PROBE_SEED = 0

# Private attributes that hold weights next to the public ones ending in "_":
# SGD's unscaled and averaged weights, MiniBatchKMeans' per-center counts.
_PRIVATE_WEIGHTS = (
    "_standard_coef",
    "_standard_intercept",
    "_average_coef",
    "_average_intercept",
    "_counts",
)
def check_publishable(learner: Learner, onnx_bytes: bytes, X_probe: np.ndarray) -> None:
    """Raise PublishRejected unless ``learner`` and its ONNX export may be published.

    ``X_probe`` is usually the batch just learned; fixed probe rows are added.
    The reason is ``non_finite_parameters`` or ``onnx_parity``.
    """
    check_finite_parameters(learner)
    check_onnx_parity(learner, onnx_bytes, X_probe)


def check_finite_parameters(learner: Learner) -> None:
    exported = set(EXPORTED_ATTRIBUTES[learner.spec.info.family])
    arrays = list(_learned_arrays(learner.estimator_))
    if learner.scaler_ is not None:
        arrays += list(_learned_arrays(learner.scaler_))
        exported |= set(exported_attributes(learner.scaler_))

    for name, values in arrays:
        values = np.asarray(values, dtype=np.float64)
        bad = ~np.isfinite(values) & ~_allowed_infinity(learner, name, values)
        if name.split("[")[0] in exported:
            bad |= np.abs(np.nan_to_num(values, neginf=0.0)) > FLOAT32_MAX
        if bad.any():
            raise PublishRejected(
                "non_finite_parameters",
                f"{learner.spec.estimator} parameter {name} has {int(bad.sum())} values that "
                f"are NaN, infinite or beyond float32 range (first: "
                f"{float(values[bad].ravel()[0])!r}); the version is not published. Scale the "
                "features or lower the learning rate",
            )


def _learned_arrays(obj: Any) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for each float array of learned state on ``obj``."""
    for name, value in vars(obj).items():
        if not (name.endswith("_") and not name.startswith("_")) and name not in _PRIVATE_WEIGHTS:
            continue
        yield from _float_arrays(name, value)
    optimizer = getattr(obj, "_optimizer", None)
    for name in ("ms", "vs", "velocities"):
        yield from _float_arrays(f"_optimizer.{name}", getattr(optimizer, name, None))


def _float_arrays(name: str, value: Any) -> Iterator[tuple[str, np.ndarray]]:
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        yield name, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, np.ndarray) and item.dtype.kind == "f":
                yield f"{name}[{i}]", item


def _allowed_infinity(learner: Learner, name: str, values: np.ndarray) -> np.ndarray:
    # A naive Bayes model gives a class it has not seen yet a prior of 0, so
    # its log prior is -inf. That class gets probability 0 in both runtimes.
    if name == "class_log_prior_":
        return np.isneginf(values) & (learner.estimator_.class_count_ == 0)
    return np.zeros(values.shape, dtype=bool)


def probe_rows(width: int) -> np.ndarray:
    """Return the fixed probe rows for a schema of ``width`` columns."""
    rows = [np.full(width, value) for value in PROBE_VALUES]
    rows.append(np.random.RandomState(PROBE_SEED).uniform(-100.0, 100.0, size=width))
    return np.asarray(rows, dtype=np.float32)


def run_session(onnx_bytes: bytes, X: np.ndarray) -> dict[str, np.ndarray]:
    """Run an ONNX model on X; return its outputs by name."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # unused-initializer notices are not failures
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {INPUT_NAME: X})))


def parity_rows(learner: Learner, X_probe: np.ndarray) -> np.ndarray:
    """Return the batch rows and the fixed probe rows, as float32, for a parity check."""
    width = learner.spec.schema.width
    return np.vstack([np.asarray(X_probe, dtype=np.float32).reshape(-1, width), probe_rows(width)])


def check_onnx_parity(learner: Learner, onnx_bytes: bytes, X_probe: np.ndarray) -> None:
    X = parity_rows(learner, X_probe)
    results = run_session(onnx_bytes, X)
    for name, values in results.items():
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            _reject_parity(learner, f"ONNX output {name!r} contains NaN or infinity")
    compare_outputs(learner, results, X)


def compare_outputs(learner: Learner, results: dict[str, np.ndarray], X: np.ndarray) -> None:
    """Raise PublishRejected unless ONNX ``results`` on X match scikit-learn's."""
    spec = learner.spec
    if spec.is_clusterer:
        _compare_clusters(learner, results, X)
        return

    tolerance = SCORE_ATOL + SCORE_RTOL * bounds.output_magnitude(learner, X)
    if not spec.is_classifier:
        expected = learner.predict(X)
        _compare(learner, "value", results["value"].reshape(-1), expected, tolerance[:, 0])
        return

    decision, decision_tolerance = _decision(learner, X, tolerance)
    if learner.has_probabilities:
        _compare(learner, "probabilities", results["probabilities"], decision,
                 decision_tolerance)
    else:
        _compare(learner, "scores", results["scores"], decision, decision_tolerance)
    _compare_labels(learner, results["label"], learner.predict(X), decision, decision_tolerance)


def _decision(learner: Learner, X: np.ndarray, tolerance: np.ndarray):
    """Return the matrix whose row-wise argmax is the served label, and its tolerance.

    skl2onnx picks the label of a model with probabilities by the highest
    probability. Where two probabilities are equal, for example two
    one-vs-rest classes saturated at 1, scikit-learn picks by the margins.
    Both labels agree with the served probabilities, so such rows count as
    ties rather than mismatches.
    """
    if learner.has_probabilities:
        proba = learner.predict_proba(X)
        row_tolerance = PROBABILITY_ATOL + tolerance.max(axis=1, keepdims=True)
        return proba, np.broadcast_to(row_tolerance, proba.shape)
    scores = learner.decision_function(X)
    if scores.ndim == 1:
        # Binary: scikit-learn gives one margin for class 1; ONNX gives both columns.
        return np.column_stack([-scores, scores]), np.column_stack([tolerance[:, 0]] * 2)
    return scores, tolerance


def _compare_clusters(learner: Learner, results: dict[str, np.ndarray], X: np.ndarray) -> None:
    # Both runtimes compute |x|^2 - 2 x.c + |c|^2, whose float32 rounding
    # error is bounded by a multiple of (|x| + |c|)^2, so squared distances
    # are compared against that bound.
    expected = learner.distances(X)
    tolerance = SCORE_ATOL + SCORE_RTOL * bounds.squared_distance_magnitude(learner, X)
    _compare(learner, "distances", np.square(results["distances"].astype(np.float64)),
             np.square(expected), tolerance)
    _compare_labels(learner, results["cluster"], learner.predict(X), -np.square(expected), tolerance)


def _compare(learner: Learner, output: str, actual, expected, tolerance) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        _reject_parity(
            learner, f"ONNX output {output!r} has shape {actual.shape}, expected {expected.shape}"
        )
    # Equal infinities (a class of probability 0 in both) are agreement.
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(actual - expected) <= tolerance) & ~(actual == expected)
    if bad.any():
        row, column = np.argwhere(bad.reshape(len(bad), -1))[0]
        _reject_parity(
            learner,
            f"ONNX output {output!r} differs from scikit-learn in {int(bad.sum())} values; "
            f"first at row {row}: {actual.reshape(len(actual), -1)[row, column]!r} != "
            f"{expected.reshape(len(expected), -1)[row, column]!r}",
        )


def _compare_labels(learner, actual, expected, decision, tolerance) -> None:
    # Where the two best scores are within rounding of each other, float32 and
    # float64 may pick different classes and both are right.
    tolerance = np.broadcast_to(tolerance, decision.shape)
    if decision.shape[1] < 2:
        clear = np.ones(len(decision), dtype=bool)
    else:
        with np.errstate(invalid="ignore"):
            ordered = np.sort(decision, axis=1)
            clear = (ordered[:, -1] - ordered[:, -2]) > 2 * tolerance.max(axis=1)
    mismatch = (np.asarray(actual).astype(object) != np.asarray(expected).astype(object)) & clear
    if mismatch.any():
        row = int(np.flatnonzero(mismatch)[0])
        _reject_parity(
            learner,
            f"ONNX label differs from scikit-learn in {int(mismatch.sum())} rows; "
            f"first at row {row}: {actual[row]!r} != {expected[row]!r}",
        )


def _reject_parity(learner: Learner, detail: str) -> None:
    raise PublishRejected(
        "onnx_parity", f"{learner.spec.estimator}: {detail}; the version is not published"
    )
