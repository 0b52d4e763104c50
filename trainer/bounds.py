"""Bounds on the size of the terms that make up each exported output.

float32 rounding in a sum is bounded by a multiple of the sum of the
absolute values of its terms, not of the result, which can be small after
cancellation. The publish gate scales its relative tolerance by these
bounds. Each function returns one bound per row and output column.
"""

from __future__ import annotations

import numpy as np

from trainer.estimators import BERNOULLI_NB, GAUSSIAN_NB, LINEAR, MLP, NAIVE_BAYES
from trainer.learner import Learner


def output_magnitude(learner: Learner, X: np.ndarray) -> np.ndarray:
    """Return a bound of the absolute terms summed for each score or value, shape (n, k)."""
    Z = np.abs(learner.transform(X))
    estimator = learner.estimator_
    family = learner.spec.info.family
    with np.errstate(all="ignore"):
        if family == LINEAR:
            return _affine(Z, estimator.coef_.T, estimator.intercept_)
        if family == MLP:
            return _mlp(Z, estimator)
        if family == NAIVE_BAYES:
            return _affine(Z, estimator.feature_log_prob_.T, estimator.class_log_prior_)
        if family == BERNOULLI_NB:
            return _bernoulli(len(Z), estimator)
        if family == GAUSSIAN_NB:
            return _gaussian(Z, estimator)
    raise ValueError(f"no output bound for family {family!r}")


def squared_distance_magnitude(learner: Learner, X: np.ndarray) -> np.ndarray:
    """Return (|x| + |c|)^2 for each row x and cluster center c, shape (n, k)."""
    Z = learner.transform(X)
    row_norms = np.linalg.norm(Z, axis=1)[:, None]
    center_norms = np.linalg.norm(learner.estimator_.cluster_centers_, axis=1)[None, :]
    return np.square(row_norms + center_norms)


def _finite_abs(values) -> np.ndarray:
    # -inf log priors of unseen classes contribute nothing to the rounding error.
    return np.abs(np.nan_to_num(np.asarray(values, dtype=np.float64), neginf=0.0, posinf=0.0))


def _affine(Z: np.ndarray, weights, bias) -> np.ndarray:
    return Z @ _finite_abs(weights) + _finite_abs(bias).reshape(1, -1)


def _mlp(Z: np.ndarray, estimator) -> np.ndarray:
    # Every activation scikit-learn offers is bounded by max(|x|, 1), so the
    # bound of one layer's input is the previous bound through |W| and |b|.
    bound = Z
    for weights, bias in zip(estimator.coefs_, estimator.intercepts_):
        bound = np.maximum(_affine(bound, weights, bias), 1.0)
    return bound


def _bernoulli(n_rows: int, estimator) -> np.ndarray:
    log_p = estimator.feature_log_prob_
    log_not_p = np.log1p(-np.exp(log_p))
    per_class = _finite_abs(log_p).sum(axis=1) + _finite_abs(log_not_p).sum(axis=1)
    per_class += _finite_abs(estimator.class_log_prior_)
    return np.broadcast_to(per_class, (n_rows, len(per_class)))


def _gaussian(Z: np.ndarray, estimator) -> np.ndarray:
    theta, var = estimator.theta_, estimator.var_
    spread = np.square(Z[:, None, :] + np.abs(theta)[None, :, :]) / var[None, :, :]
    constant = np.abs(np.log(2.0 * np.pi * var)).sum(axis=1)
    prior = _finite_abs(np.log(estimator.class_prior_))
    return spread.sum(axis=2) + constant[None, :] + prior[None, :]
