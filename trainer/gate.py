"""Checks that a learned version may be published.

Two checks run before every publish. First, every parameter must be finite,
and the exported ones must also fit in float32, because the ONNX graph stores
them as float32 and a larger value becomes infinity there. Second,
onnxruntime must agree with scikit-learn on the batch just learned and on
fixed probe rows far from any data, so a conversion bug or a float32
precision loss never reaches the predictor.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from modelstore.errors import PublishRejected
from modelstore.schema import FLOAT32_MAX
from trainer.export import INPUT_NAME
from trainer.learner import Learner

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

# Estimator attributes holding weights; the averaged ones exist only when
# ``average`` is set, and the next batch continues from them.
_WEIGHT_ATTRIBUTES = (
    "coef_",
    "intercept_",
    "_standard_coef",
    "_standard_intercept",
    "_average_coef",
    "_average_intercept",
)
_EXPORTED = frozenset({"coef_", "intercept_", "mean_", "scale_"})


def check_publishable(learner: Learner, onnx_bytes: bytes, X_probe: np.ndarray) -> None:
    """Raise PublishRejected unless ``learner`` and its ONNX export may be published.

    ``X_probe`` is usually the batch just learned; fixed probe rows are added.
    The reason is ``non_finite_parameters`` or ``onnx_parity``.
    """
    check_finite_parameters(learner)
    check_onnx_parity(learner, onnx_bytes, X_probe)


def check_finite_parameters(learner: Learner) -> None:
    arrays = [(name, getattr(learner.estimator_, name, None)) for name in _WEIGHT_ATTRIBUTES]
    if learner.scaler_ is not None:
        arrays += [
            (name, getattr(learner.scaler_, name, None)) for name in ("mean_", "var_", "scale_")
        ]

    for name, values in arrays:
        if values is None:
            continue
        values = np.asarray(values, dtype=np.float64)
        bad = ~np.isfinite(values)
        if name in _EXPORTED:
            bad |= np.abs(np.nan_to_num(values)) > FLOAT32_MAX
        if bad.any():
            raise PublishRejected(
                "non_finite_parameters",
                f"{learner.spec.estimator} parameter {name} has {int(bad.sum())} values that "
                f"are NaN, infinite or beyond float32 range (first: "
                f"{float(values[bad].ravel()[0])!r}); the version is not published. Scale the "
                "features or lower eta0",
            )


def probe_rows(width: int) -> np.ndarray:
    """Return the fixed probe rows for a schema of ``width`` columns."""
    rows = [np.full(width, value) for value in PROBE_VALUES]
    rows.append(np.random.RandomState(PROBE_SEED).uniform(-100.0, 100.0, size=width))
    return np.asarray(rows, dtype=np.float32)


def check_onnx_parity(learner: Learner, onnx_bytes: bytes, X_probe: np.ndarray) -> None:
    width = learner.spec.schema.width
    X = np.vstack([np.asarray(X_probe, dtype=np.float32).reshape(-1, width), probe_rows(width)])

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    results = dict(zip(names, session.run(None, {INPUT_NAME: X})))
    for name, values in results.items():
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            _reject_parity(learner, f"ONNX output {name!r} contains NaN or infinity")

    tolerance = _score_tolerance(learner, X)
    if not learner.spec.is_classifier:
        expected = learner.predict(X)
        _compare(learner, "value", results["value"].reshape(-1), expected, tolerance[:, 0])
        return

    scores = learner.decision_function(X)
    if scores.ndim == 1:
        # Binary: scikit-learn gives one margin for class 1; ONNX gives both columns.
        scores = np.column_stack([-scores, scores])
        tolerance = np.column_stack([tolerance[:, 0], tolerance[:, 0]])
    if learner.has_probabilities:
        expected = learner.predict_proba(X)
        _compare(
            learner,
            "probabilities",
            results["probabilities"],
            expected,
            PROBABILITY_ATOL + tolerance,
        )
    else:
        _compare(learner, "scores", results["scores"], scores, tolerance)
    _compare_labels(learner, results["label"], learner.predict(X), scores, tolerance)


def _score_tolerance(learner: Learner, X: np.ndarray) -> np.ndarray:
    """Return the allowed score difference per row and output column.

    float32 rounding in a dot product is bounded by a multiple of the sum of
    the absolute terms, so the relative tolerance applies to that sum and not
    to the result, which can be small after cancellation.
    """
    scaled = np.abs(learner.transform(X))
    coef = np.abs(np.atleast_2d(learner.estimator_.coef_))
    intercept = np.abs(np.atleast_1d(learner.estimator_.intercept_))
    magnitude = scaled @ coef.T + intercept
    return SCORE_ATOL + SCORE_RTOL * magnitude


def _compare(learner: Learner, output: str, actual, expected, tolerance) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        _reject_parity(
            learner, f"ONNX output {output!r} has shape {actual.shape}, expected {expected.shape}"
        )
    bad = np.abs(actual - expected) > tolerance
    if bad.any():
        row, column = np.argwhere(bad.reshape(len(bad), -1))[0]
        _reject_parity(
            learner,
            f"ONNX output {output!r} differs from scikit-learn in {int(bad.sum())} values; "
            f"first at row {row}: {actual.reshape(len(actual), -1)[row, column]!r} != "
            f"{expected.reshape(len(expected), -1)[row, column]!r}",
        )


def _compare_labels(learner, actual, expected, scores, tolerance) -> None:
    # Where the two best scores are within rounding of each other, float32 and
    # float64 may pick different classes and both are right.
    ordered = np.sort(scores, axis=1)
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
