"""An incremental learner: a scaler and a partial_fit estimator driven by a spec."""

from __future__ import annotations

import numpy as np
from sklearn.exceptions import NotFittedError

from modelstore.errors import PublishRejected
from trainer.spec import ModelSpec


class Learner:
    """A scaler followed by an estimator, both learned batch by batch.

    The scaler's statistics are updated with ``partial_fit`` before the batch
    is transformed, so each batch is scaled with statistics that include it.
    Learned state ends in ``_``: ``scaler_`` (None when the spec has no
    scaler), ``estimator_`` and ``samples_learned_``. Inputs are never
    modified in place.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.scaler_ = spec.make_scaler()
        self.estimator_ = spec.make_estimator()
        self.samples_learned_ = 0

    @property
    def is_fitted(self) -> bool:
        return hasattr(self.estimator_, "coef_")

    @property
    def has_probabilities(self) -> bool:
        return self.spec.has_probabilities

    def learn(self, X, y) -> "Learner":
        """Learn one batch; raise PublishRejected when the weights overflow.

        Classifiers receive the full declared label set on every call, so a
        batch that contains a single class learns normally.
        """
        X, y = self.validate(X, y)
        if len(X) == 0:
            return self

        if self.scaler_ is not None:
            self.scaler_.partial_fit(X)
            X = self.scaler_.transform(X)
        try:
            if self.spec.is_classifier:
                self.estimator_.partial_fit(X, y, classes=self.spec.labels.array())
            else:
                self.estimator_.partial_fit(X, y)
        except ValueError as exc:
            # scikit-learn's SGD stops with a ValueError when a weight
            # overflows; inputs were validated above, so anything else is a bug.
            if "overflow" not in str(exc):
                raise
            raise PublishRejected(
                "non_finite_parameters",
                f"{self.spec.estimator} weights overflowed while learning {len(X)} rows: {exc}",
            ) from exc

        self.samples_learned_ += len(X)
        return self

    def validate(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        """Return copies of X (float64) and y checked against the spec, or raise ValueError."""
        X = self._check_X(X)
        return X, self._check_y(y, len(X))

    def predict(self, X) -> np.ndarray:
        return self.estimator_.predict(self._transform(X))

    def predict_proba(self, X) -> np.ndarray:
        if not self.has_probabilities:
            raise AttributeError(
                f"predict_proba is not available for loss={self.spec.params.get('loss')!r}; "
                "only 'log_loss' and 'modified_huber' give probabilities, "
                "use decision_function for scores"
            )
        return self.estimator_.predict_proba(self._transform(X))

    def decision_function(self, X) -> np.ndarray:
        if not self.spec.is_classifier:
            raise AttributeError("decision_function is only available for classifiers")
        return self.estimator_.decision_function(self._transform(X))

    def transform(self, X) -> np.ndarray:
        """Return X scaled as the estimator receives it, as float64."""
        return self._transform(X)

    def _transform(self, X) -> np.ndarray:
        if not self.is_fitted:
            raise NotFittedError(
                f"this {self.spec.estimator} learner has not learned any batch yet; "
                "call learn first"
            )
        X = self._check_X(X)
        if self.scaler_ is not None:
            X = self.scaler_.transform(X)
        return X

    def _check_X(self, X) -> np.ndarray:
        # np.array copies, so scaling and learning never touch the caller's array.
        X = np.array(X, dtype=np.float64)
        width = self.spec.schema.width
        if X.ndim != 2 or X.shape[1] != width:
            raise ValueError(
                f"X has shape {X.shape}; this model's schema expects (n, {width}) columns"
            )
        if not np.isfinite(X).all():
            rows = np.flatnonzero(~np.isfinite(X).all(axis=1))[:5].tolist()
            raise ValueError(f"X contains NaN or infinity in rows {rows}; reject those records")
        return X

    def _check_y(self, y, n_rows: int) -> np.ndarray:
        labels = self.spec.labels
        if labels is None:
            y = np.array(y, dtype=np.float64)
            if not np.isfinite(y).all():
                raise ValueError("y contains NaN or infinity; reject those records")
        else:
            y = _label_array(y, labels.kind)
        if y.shape != (n_rows,):
            raise ValueError(f"y has shape {y.shape}; expected ({n_rows},) to match X")

        if labels is not None:
            unknown = set(y.tolist()) - set(labels.labels)
            if unknown:
                raise ValueError(
                    f"y contains labels {sorted(unknown, key=repr)!r} outside the declared "
                    f"labels {list(labels.labels)!r}; reject those records"
                )
        return y


def _label_array(y, kind: str) -> np.ndarray:
    """Copy labels into an int64 or object array without converting between types.

    numpy would silently turn ``["1", 1]`` into two strings, or ``"1"`` into
    the integer 1, so every element is checked against the declared type first.
    """
    values = y.tolist() if isinstance(y, np.ndarray) else list(y)
    expected = int if kind == "int" else str
    for value in values:
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ValueError(
                f"label {value!r} is a {type(value).__name__}; this model's labels are "
                f"{kind}s, so reject the record"
            )
    if kind == "int":
        return np.array(values, dtype=np.int64)
    return np.array(values, dtype=object)
