"""An incremental learner: a scaler and a partial_fit estimator driven by a spec."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from modelstore.errors import PublishRejected
from trainer import scaling
from trainer.spec import ModelSpec

# scikit-learn reports weights that overflow with these phrases in a ValueError:
# SGD "Floating-point under-/overflow occurred", MLP "non-finite parameter weights".
_OVERFLOW_PHRASES = ("overflow", "non-finite")


class Learner:
    """A scaler followed by an estimator, both learned batch by batch.

    The scaler's statistics are updated with ``partial_fit`` before the batch
    is transformed, so each batch is scaled with statistics that include it.
    Learned state ends in ``_``: ``scaler_`` (None when the spec has no
    scaler; it covers ``spec.scaled_columns`` only), ``estimator_`` and
    ``samples_learned_``. Inputs are never modified in place.

    Floating-point warnings of numpy are silenced while learning and
    predicting. A non-finite result is not lost: the publish gate checks
    every parameter and every ONNX output and names what it found.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.scaler_ = spec.make_scaler()
        self.estimator_ = spec.make_estimator()
        self.samples_learned_ = 0

    @property
    def is_fitted(self) -> bool:
        return hasattr(self.estimator_, "n_features_in_")

    @property
    def has_probabilities(self) -> bool:
        return self.spec.has_probabilities

    def learn(self, X, y=None) -> "Learner":
        """Learn one batch; raise PublishRejected when it cannot be learned safely.

        Classifiers receive the full declared label set on every call, so a
        batch that contains a single class learns normally. Clustering
        models ignore ``y``.
        """
        X, y = self.validate(X, y)
        if len(X) == 0:
            return self
        self._check_can_learn(X)

        columns = self.spec.scaled_columns
        with np.errstate(all="ignore"):
            if self.scaler_ is not None:
                scaling.partial_fit(self.scaler_, columns, X)
            Z = scaling.transform(self.scaler_, columns, X)
            self._check_non_negative(Z)
            try:
                self._partial_fit(Z, y)
            except ValueError as exc:
                if not any(phrase in str(exc) for phrase in _OVERFLOW_PHRASES):
                    raise
                raise PublishRejected(
                    "non_finite_parameters",
                    f"{self.spec.estimator} weights overflowed while learning {len(X)} rows: "
                    f"{exc}",
                ) from exc

        self.samples_learned_ += len(X)
        return self

    def _partial_fit(self, Z: np.ndarray, y: np.ndarray | None) -> None:
        if self.spec.is_classifier:
            self.estimator_.partial_fit(Z, y, classes=self.spec.labels.array())
        elif self.spec.is_clusterer:
            self.estimator_.partial_fit(Z)
        else:
            self.estimator_.partial_fit(Z, y)

    def _check_can_learn(self, X: np.ndarray) -> None:
        n_clusters = getattr(self.estimator_, "n_clusters", None)
        if self.spec.is_clusterer and not self.is_fitted and len(X) < n_clusters:
            raise PublishRejected(
                "too_few_rows",
                f"{self.spec.estimator} places its first {n_clusters} centers on the first "
                f"batch, which has only {len(X)} rows; send batches of at least {n_clusters} "
                "records (batch max_records)",
            )

    def _check_non_negative(self, Z: np.ndarray) -> None:
        if not self.spec.info.non_negative_input or (Z >= 0).all():
            return
        rows = np.flatnonzero((Z < 0).any(axis=1))
        raise PublishRejected(
            "negative_input",
            f"{self.spec.estimator} takes non-negative counts, but {len(rows)} rows of this "
            f"batch (first: row {int(rows[0])}) have negative values after scaling; use "
            "scaler MinMaxScaler or send non-negative features",
        )

    def validate(self, X, y=None) -> tuple[np.ndarray, np.ndarray | None]:
        """Return copies of X (float64) and y checked against the spec, or raise ValueError."""
        X = self._check_X(X)
        if self.spec.is_clusterer:
            return X, None
        return X, self._check_y(y, len(X))

    def predict(self, X) -> np.ndarray:
        with np.errstate(all="ignore"):
            return self.estimator_.predict(self._transform(X))

    def predict_proba(self, X) -> np.ndarray:
        if not self.has_probabilities:
            raise AttributeError(
                f"predict_proba is not available for {self._describe()}; only the losses "
                "'log_loss' and 'modified_huber', the naive Bayes models and MLPClassifier "
                "give probabilities, use decision_function for scores"
            )
        with np.errstate(all="ignore"):
            return self.estimator_.predict_proba(self._transform(X))

    def decision_function(self, X) -> np.ndarray:
        """Return the margins of a linear classifier, the ``scores`` of its export."""
        if not hasattr(self.estimator_, "decision_function"):
            raise AttributeError(f"decision_function is not available for {self.spec.estimator}")
        return self.estimator_.decision_function(self._transform(X))

    def distances(self, X) -> np.ndarray:
        """Return the distance of each row to each cluster center (clustering only)."""
        if not self.spec.is_clusterer:
            raise AttributeError("distances are only available for clustering models")
        return self.estimator_.transform(self._transform(X))

    def transform(self, X) -> np.ndarray:
        """Return X scaled as the estimator receives it, as float64."""
        return self._transform(X)

    def export_scaler(self) -> BaseEstimator | None:
        """Return the scaler over all columns, as the ONNX graph applies it."""
        if self.scaler_ is None:
            return None
        return scaling.full_width(self.scaler_, self.spec.scaled_columns, self.spec.schema.width)

    def _describe(self) -> str:
        loss = self.spec.params.get("loss")
        return f"{self.spec.estimator}(loss={loss!r})" if loss else self.spec.estimator

    def _transform(self, X) -> np.ndarray:
        if not self.is_fitted:
            raise NotFittedError(
                f"this {self.spec.estimator} learner has not learned any batch yet; "
                "call learn first"
            )
        X = self._check_X(X)
        with np.errstate(all="ignore"):
            return scaling.transform(self.scaler_, self.spec.scaled_columns, X)

    def _check_X(self, X) -> np.ndarray:
        # np.array copies, so scaling and learning never touch the caller's array.
        X = np.array(X, dtype=np.float64)
        width = self.spec.schema.width
        if X.ndim != 2 or X.shape[1] != width:
            got = X.shape[1] if X.ndim == 2 else f"shape {X.shape}"
            raise ValueError(
                f"X has shape {X.shape}; this model's schema expects (n, {width}) columns, "
                f"got {got}. Encode rows with the model's feature schema"
            )
        if not np.isfinite(X).all():
            rows = np.flatnonzero(~np.isfinite(X).all(axis=1))[:5].tolist()
            raise ValueError(f"X contains NaN or infinity in rows {rows}; reject those records")
        return X

    def _check_y(self, y, n_rows: int) -> np.ndarray:
        labels = self.spec.labels
        if y is None:
            raise ValueError(f"y is missing; {self.spec.estimator} learns from labelled rows")
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
