"""The estimators a model spec may name, and what the trainer needs to know about each.

Every estimator here learns incrementally with ``partial_fit`` in
scikit-learn 1.9 and converts to ONNX with skl2onnx 1.20. Each entry records
the task, the spec parameters it accepts, whether it defines
``predict_proba``, and the family whose export and parity rules apply.

PassiveAggressiveClassifier and PassiveAggressiveRegressor are deprecated in
scikit-learn 1.8 and removed in 1.10. A spec may still name them with their
own parameters (``C``, ``loss``). The trainer then builds the SGD estimator
that scikit-learn documents as their replacement, which learns the same
weights (a test checks this against the deprecated classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from sklearn.base import BaseEstimator
from sklearn.cluster import MiniBatchKMeans
from sklearn.linear_model import Perceptron, SGDClassifier, SGDRegressor
from sklearn.naive_bayes import BernoulliNB, ComplementNB, GaussianNB, MultinomialNB
from sklearn.neural_network import MLPClassifier, MLPRegressor

CLASSIFICATION = "classification"
REGRESSION = "regression"
CLUSTERING = "clustering"

# Families share an ONNX layout, a parity tolerance and the attributes that hold weights.
LINEAR = "linear"
NAIVE_BAYES = "naive_bayes"
GAUSSIAN_NB = "gaussian_nb"
BERNOULLI_NB = "bernoulli_nb"
MLP = "mlp"
KMEANS = "kmeans"

# Attributes of each family that its ONNX graph is made from (stored as float32).
EXPORTED_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    LINEAR: ("coef_", "intercept_"),
    NAIVE_BAYES: ("feature_log_prob_", "class_log_prior_"),
    BERNOULLI_NB: ("feature_log_prob_", "class_log_prior_"),
    GAUSSIAN_NB: ("theta_", "var_", "class_prior_"),
    MLP: ("coefs_", "intercepts_"),
    KMEANS: ("cluster_centers_",),
}

# Losses for which scikit-learn defines predict_proba on a linear classifier.
PROBABILITY_LOSSES = frozenset({"log_loss", "modified_huber"})

# Parameters that only matter to ``fit``; partial_fit ignores them. They are
# accepted so that a spec copied from a ``fit`` configuration still loads.
_PA_CLASSIFIER_PARAMS = ("C", "average", "fit_intercept", "loss", "random_state", "shuffle")
_PA_REGRESSOR_PARAMS = _PA_CLASSIFIER_PARAMS + ("epsilon",)


@dataclass(frozen=True)
class EstimatorInfo:
    """The trainer's facts about one estimator that a spec may name.

    ``build`` makes the scikit-learn estimator from the spec's parameters.
    ``non_negative_input``: partial_fit raises on negative values (the
    multinomial and complement naive Bayes models, which take counts).
    """

    name: str
    cls: type[BaseEstimator]
    task: str
    family: str
    params: tuple[str, ...]
    build: Callable[[Mapping[str, Any]], BaseEstimator]
    probabilities: Callable[[Mapping[str, Any]], bool]
    non_negative_input: bool = False
    takes_random_state: bool = True
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_classifier(self) -> bool:
        return self.task == CLASSIFICATION


def _plain(cls: type[BaseEstimator]) -> Callable[[Mapping[str, Any]], BaseEstimator]:
    return lambda params: cls(**params)


def _constructor_params(cls: type[BaseEstimator]) -> tuple[str, ...]:
    return tuple(sorted(cls._get_param_names()))


def _passive_aggressive_classifier(params: Mapping[str, Any]) -> SGDClassifier:
    params = dict(params)
    loss = params.pop("loss", "hinge")
    return SGDClassifier(
        loss="hinge",
        penalty=None,
        learning_rate="pa1" if loss == "hinge" else "pa2",
        eta0=params.pop("C", 1.0),
        **params,
    )


def _passive_aggressive_regressor(params: Mapping[str, Any]) -> SGDRegressor:
    params = dict(params)
    loss = params.pop("loss", "epsilon_insensitive")
    return SGDRegressor(
        loss="epsilon_insensitive",
        penalty=None,
        l1_ratio=0,
        learning_rate="pa1" if loss == "epsilon_insensitive" else "pa2",
        eta0=params.pop("C", 1.0),
        **params,
    )


def _linear_probabilities(params: Mapping[str, Any]) -> bool:
    return params.get("loss", "hinge") in PROBABILITY_LOSSES


def _always(params: Mapping[str, Any]) -> bool:
    return True


def _never(params: Mapping[str, Any]) -> bool:
    return False


def _info(name, cls, task, family, probabilities, **extra) -> EstimatorInfo:
    params = extra.pop("params", None) or _constructor_params(cls)
    build = extra.pop("build", None) or _plain(cls)
    return EstimatorInfo(
        name=name, cls=cls, task=task, family=family, params=params, build=build,
        probabilities=probabilities, **extra,
    )


ESTIMATORS: dict[str, EstimatorInfo] = {
    info.name: info
    for info in (
        _info("SGDClassifier", SGDClassifier, CLASSIFICATION, LINEAR, _linear_probabilities),
        _info("SGDRegressor", SGDRegressor, REGRESSION, LINEAR, _never),
        _info("Perceptron", Perceptron, CLASSIFICATION, LINEAR, _never),
        _info(
            "PassiveAggressiveClassifier", SGDClassifier, CLASSIFICATION, LINEAR, _never,
            params=_PA_CLASSIFIER_PARAMS, build=_passive_aggressive_classifier,
        ),
        _info(
            "PassiveAggressiveRegressor", SGDRegressor, REGRESSION, LINEAR, _never,
            params=_PA_REGRESSOR_PARAMS, build=_passive_aggressive_regressor,
        ),
        _info(
            "MultinomialNB", MultinomialNB, CLASSIFICATION, NAIVE_BAYES, _always,
            non_negative_input=True, takes_random_state=False,
        ),
        _info(
            "ComplementNB", ComplementNB, CLASSIFICATION, NAIVE_BAYES, _always,
            non_negative_input=True, takes_random_state=False,
        ),
        _info(
            "BernoulliNB", BernoulliNB, CLASSIFICATION, BERNOULLI_NB, _always,
            takes_random_state=False,
        ),
        _info(
            "GaussianNB", GaussianNB, CLASSIFICATION, GAUSSIAN_NB, _always,
            takes_random_state=False,
        ),
        _info("MLPClassifier", MLPClassifier, CLASSIFICATION, MLP, _always),
        _info("MLPRegressor", MLPRegressor, REGRESSION, MLP, _never),
        _info("MiniBatchKMeans", MiniBatchKMeans, CLUSTERING, KMEANS, _never),
    )
}
