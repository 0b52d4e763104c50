"""Model specs: which estimator a model uses, with which settings, on which features.

A spec is the JSON object stored as ``metadata["spec"]`` in every version of
a model. ``ModelSpec.from_dict`` validates it completely before any learning
starts, so a bad spec fails when the model is created, with a message that
names the field, the value and the fix, and never in the middle of a stream.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from sklearn.base import BaseEstimator, is_classifier
from sklearn.linear_model import SGDClassifier, SGDRegressor
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import InvalidParameterError

from modelstore.errors import SpecError
from modelstore.schema import FeatureSchema, LabelSet

# Estimators that learn incrementally with partial_fit and that skl2onnx converts.
ESTIMATORS: dict[str, type[BaseEstimator]] = {
    "SGDClassifier": SGDClassifier,
    "SGDRegressor": SGDRegressor,
}
SCALERS: dict[str, type[BaseEstimator]] = {"StandardScaler": StandardScaler}
DEFAULT_SCALER = "StandardScaler"

# Losses for which scikit-learn defines predict_proba. Every other classifier
# loss is a margin loss whose decision_function is a score, not a probability.
PROBABILITY_LOSSES = frozenset({"log_loss", "modified_huber"})

# A fixed seed makes partial_fit's per-batch shuffling reproducible, which is
# what lets a learner restored from its saved state continue bit-identically.
DEFAULT_RANDOM_STATE = 0

_TOP_LEVEL_KEYS = ("estimator", "params", "scaler", "features", "labels")

# Specs shipped with the package, for example the default flights model.
BUILTIN_SPECS_DIR = Path(__file__).parent / "specs"


@dataclass(frozen=True)
class ModelSpec:
    """A validated model spec; build it with ``ModelSpec.from_dict``."""

    estimator: str
    params: Mapping[str, Any]
    scaler: str | None
    schema: FeatureSchema
    labels: LabelSet | None = None

    @property
    def is_classifier(self) -> bool:
        return self.labels is not None

    @property
    def task(self) -> str:
        return "classification" if self.is_classifier else "regression"

    @property
    def has_probabilities(self) -> bool:
        return self.is_classifier and self.params.get("loss", "hinge") in PROBABILITY_LOSSES

    def make_estimator(self) -> BaseEstimator:
        return ESTIMATORS[self.estimator](**self.params)

    def make_scaler(self) -> BaseEstimator | None:
        return SCALERS[self.scaler]() if self.scaler else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "estimator": self.estimator,
            "params": dict(self.params),
            "scaler": self.scaler,
            "features": self.schema.to_list(),
        }
        if self.labels is not None:
            out["labels"] = list(self.labels.labels)
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> "ModelSpec":
        if not isinstance(raw, Mapping):
            raise SpecError(
                f"spec: expected a JSON object with keys {', '.join(_TOP_LEVEL_KEYS)}, "
                f"got {type(raw).__name__}"
            )
        unknown = sorted(set(raw) - set(_TOP_LEVEL_KEYS))
        if unknown:
            raise SpecError(
                f"spec: unknown keys {unknown}; allowed keys are {', '.join(_TOP_LEVEL_KEYS)}"
            )

        estimator = _parse_estimator(raw.get("estimator"))
        params = _parse_params(estimator, raw.get("params", {}))
        scaler = _parse_scaler(raw.get("scaler", DEFAULT_SCALER))
        schema = FeatureSchema.from_list(raw.get("features"))
        labels = _parse_labels(estimator, raw)
        return cls(estimator=estimator, params=params, scaler=scaler, schema=schema, labels=labels)


def builtin_spec(name: str) -> dict[str, Any]:
    """Return the raw spec shipped as ``trainer/specs/<name>.json``."""
    available = sorted(path.stem for path in BUILTIN_SPECS_DIR.glob("*.json"))
    if name not in available:
        raise SpecError(f"no built-in spec {name!r}; available specs are {', '.join(available)}")
    return json.loads((BUILTIN_SPECS_DIR / f"{name}.json").read_text(encoding="utf-8"))


def _parse_estimator(name: Any) -> str:
    if name not in ESTIMATORS:
        raise SpecError(
            f"estimator: {name!r} is not supported; use one of {', '.join(ESTIMATORS)}"
        )
    return name


def _parse_scaler(name: Any) -> str | None:
    if name is not None and name not in SCALERS:
        raise SpecError(
            f"scaler: {name!r} is not supported; use {', '.join(map(repr, SCALERS))} "
            "or null for no scaling"
        )
    return name


def _parse_labels(estimator: str, raw: Mapping[str, Any]) -> LabelSet | None:
    if is_classifier(ESTIMATORS[estimator]()):
        if "labels" not in raw:
            raise SpecError(
                f"labels: missing; {estimator} is a classifier and needs the list of its "
                'labels, for example "labels": [0, 1]'
            )
        return LabelSet(raw["labels"])
    if "labels" in raw:
        raise SpecError(
            f"labels: {raw['labels']!r} given for {estimator}, which is a regressor; "
            "remove labels or use a classifier"
        )
    return None


def _parse_params(estimator: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise SpecError(f"params: expected an object of {estimator} parameters, got {raw!r}")
    cls = ESTIMATORS[estimator]
    allowed = sorted(cls().get_params())
    for name, value in raw.items():
        if name not in allowed:
            raise SpecError(
                f"params.{name}: {estimator} has no parameter {name!r}; "
                f"allowed parameters are {', '.join(allowed)}"
            )
        _check_param_policy(estimator, name, value)

    params = dict(raw)
    params.setdefault("random_state", DEFAULT_RANDOM_STATE)

    # scikit-learn's own validation gives the allowed values in its message.
    # _more_validate_params adds the cross-parameter rules that partial_fit
    # would otherwise only raise on the first batch.
    instance = cls(**params)
    try:
        instance._validate_params()
        instance._more_validate_params(for_partial_fit=True)
    except (InvalidParameterError, ValueError) as exc:
        raise SpecError(f"params: invalid {estimator} parameters: {exc}") from None
    return params


def _check_param_policy(estimator: str, name: str, value: Any) -> None:
    """Reject values that scikit-learn accepts but that break streamfit's guarantees."""
    if name == "class_weight" and value is not None:
        raise SpecError(
            f"params.class_weight: {value!r} is not supported; remove class_weight. "
            "partial_fit cannot compute 'balanced' weights from one batch, and JSON "
            "object keys cannot carry integer labels"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"params.{name}: {value!r} is not a finite number")
    if value is not None and not isinstance(value, (str, int, float, bool)):
        raise SpecError(
            f"params.{name}: {value!r} is not a JSON string, number, boolean or null; "
            f"use the scalar form of {estimator}'s {name!r}"
        )
    if name == "random_state" and (isinstance(value, bool) or not isinstance(value, int)):
        raise SpecError(
            f"params.random_state: {value!r} makes learning irreproducible and a restored "
            f"model would not continue exactly; use an integer seed (default "
            f"{DEFAULT_RANDOM_STATE})"
        )
    if name == "warm_start" and value:
        raise SpecError(
            "params.warm_start: true has no effect with partial_fit, which always "
            "continues from the current weights; remove warm_start"
        )
