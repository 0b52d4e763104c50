"""Validation of a spec's estimator parameters.

scikit-learn validates most parameters only when ``partial_fit`` first
runs, which would be in the middle of a stream. ``check_params`` builds the
estimator and runs scikit-learn's own validation at once, and adds the rules
that keep streamfit's guarantees: reproducible learning, exact resume,
finite weights and ONNX export.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from sklearn.utils._param_validation import InvalidParameterError

from modelstore.errors import SpecError
from trainer.estimators import BERNOULLI_NB, NAIVE_BAYES, EstimatorInfo

# A fixed seed makes partial_fit's per-batch shuffling reproducible, which is
# what lets a learner restored from its saved state continue bit-identically.
DEFAULT_RANDOM_STATE = 0

# Parameters that take a list of numbers; every other one takes a JSON scalar.
_LIST_PARAMS = frozenset({"hidden_layer_sizes", "class_prior", "priors"})


def check_params(info: EstimatorInfo, raw: Any, *, n_labels: int) -> dict[str, Any]:
    """Return the validated parameters of ``info``'s estimator, or raise SpecError."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"params: expected an object of {info.name} parameters, got {raw!r}")
    for name, value in raw.items():
        if name not in info.params:
            raise SpecError(
                f"params.{name}: {info.name} has no parameter {name!r}; "
                f"allowed parameters are {', '.join(info.params)}"
            )
        _check_value(info, name, value)
        _check_policy(info, name, value, n_labels)

    params = {name: list(value) if isinstance(value, (list, tuple)) else value
              for name, value in raw.items()}
    if info.takes_random_state:
        params.setdefault("random_state", DEFAULT_RANDOM_STATE)

    # scikit-learn's own validation gives the allowed values in its message.
    # _more_validate_params (SGD models only) adds the cross-parameter rules
    # that partial_fit would otherwise raise on the first batch.
    instance = info.build(params)
    try:
        instance._validate_params()
        more = getattr(instance, "_more_validate_params", None)
        if more is not None:
            more(for_partial_fit=True)
    except (InvalidParameterError, ValueError) as exc:
        raise SpecError(f"params: invalid {info.name} parameters: {exc}") from None
    return params


def _check_value(info: EstimatorInfo, name: str, value: Any) -> None:
    if name in _LIST_PARAMS and isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                raise SpecError(
                    f"params.{name}: {value!r} contains {item!r}; use a list of finite numbers"
                )
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"params.{name}: {value!r} is not a finite number")
    if value is not None and not isinstance(value, (str, int, float, bool)):
        raise SpecError(
            f"params.{name}: {value!r} is not a JSON string, number, boolean or null; "
            f"use the scalar form of {info.name}'s {name!r}"
        )


def _check_policy(info: EstimatorInfo, name: str, value: Any, n_labels: int) -> None:
    """Reject values that scikit-learn accepts but that break streamfit's guarantees."""
    if name == "class_weight" and value is not None:
        raise SpecError(
            f"params.class_weight: {value!r} is not supported; remove class_weight. "
            "partial_fit cannot compute 'balanced' weights from one batch, and JSON "
            "object keys cannot carry integer labels"
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
    if name == "early_stopping" and value:
        raise SpecError(
            "params.early_stopping: true needs a validation split inside one fit call, "
            "which partial_fit does not make; remove early_stopping"
        )
    if name == "solver" and value == "lbfgs":
        raise SpecError(
            f"params.solver: 'lbfgs' has no partial_fit in {info.name}; use 'adam' or 'sgd'"
        )
    if name == "init" and value not in ("k-means++", "random"):
        raise SpecError(
            f"params.init: {value!r} is not supported; use 'k-means++' or 'random'"
        )
    if name == "alpha" and info.family in (NAIVE_BAYES, BERNOULLI_NB):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise SpecError(
                f"params.alpha: {value!r} gives a log probability of -infinity to a feature "
                f"never seen with a class, which ONNX cannot serve; use a positive alpha "
                "such as 1.0"
            )
    if name in ("class_prior", "priors") and value is not None:
        if not isinstance(value, (list, tuple)) or len(value) != n_labels:
            raise SpecError(
                f"params.{name}: {value!r} must list one prior per label ({n_labels}), "
                "in sorted label order"
            )
        if any(isinstance(p, (int, float)) and p < 0 for p in value):
            raise SpecError(f"params.{name}: {value!r} contains a negative prior")
        if name == "priors" and not math.isclose(sum(value), 1.0, abs_tol=1e-9):
            raise SpecError(f"params.priors: {value!r} sums to {sum(value)!r}; priors must sum to 1")
