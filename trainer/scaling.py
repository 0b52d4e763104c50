"""Incremental scalers that may cover only some of a model's columns.

With ``scaler_columns: "numeric"`` the scaler learns statistics of the
numeric columns only and the one-hot columns pass through unchanged. A
rare category scaled by its standard deviation becomes a large value
(about 1/sqrt(p) for a category of frequency p), which makes its weight
take large, noisy steps under a constant learning rate.

skl2onnx converts a scaler of the full width, so ``full_width`` builds one
from the partial scaler: the columns it does not cover get the identity
transform (offset 0, scale 1), which is exact in floating point.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.preprocessing import MaxAbsScaler, MinMaxScaler, StandardScaler

# Per-column learned attributes of each scaler and their identity value.
_IDENTITY: dict[type, dict[str, float]] = {
    StandardScaler: {"mean_": 0.0, "var_": 1.0, "scale_": 1.0},
    MinMaxScaler: {"min_": 0.0, "scale_": 1.0, "data_min_": 0.0, "data_max_": 1.0,
                   "data_range_": 1.0},
    MaxAbsScaler: {"max_abs_": 1.0, "scale_": 1.0},
}


def transform(scaler: BaseEstimator | None, columns: Sequence[int], X: np.ndarray) -> np.ndarray:
    """Return a scaled copy of X; only ``columns`` are scaled."""
    if scaler is None:
        return np.array(X, dtype=np.float64)
    if len(columns) == X.shape[1]:
        return scaler.transform(X)
    out = np.array(X, dtype=np.float64)
    out[:, columns] = scaler.transform(X[:, columns])
    return out


def partial_fit(scaler: BaseEstimator, columns: Sequence[int], X: np.ndarray) -> None:
    scaler.partial_fit(X if len(columns) == X.shape[1] else X[:, columns])


def full_width(scaler: BaseEstimator, columns: Sequence[int], width: int) -> BaseEstimator:
    """Return a fitted scaler of ``width`` columns equal to ``scaler`` on ``columns``."""
    if len(columns) == width:
        return scaler
    identity = _IDENTITY[type(scaler)]
    out = clone(scaler)
    for name, value in identity.items():
        learned = getattr(scaler, name, None)
        if learned is None:
            continue
        full = np.full(width, value, dtype=np.float64)
        full[list(columns)] = learned
        setattr(out, name, full)
    out.n_samples_seen_ = scaler.n_samples_seen_
    out.n_features_in_ = width
    return out


def exported_attributes(scaler: BaseEstimator) -> tuple[str, ...]:
    """Names of the per-column attributes that the ONNX graph uses."""
    if isinstance(scaler, StandardScaler):
        return ("mean_", "scale_")
    if isinstance(scaler, MinMaxScaler):
        return ("min_", "scale_")
    return ("scale_",)
