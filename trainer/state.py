"""Save and restore a learner's trainable state with skops, never with pickle.

ONNX cannot be turned back into a trainable estimator, so every version also
stores the scaler and the estimator. The bytes come from the model store,
which another process can write, so loading them must not run arbitrary
code: skops rebuilds only the types listed in ``TRUSTED_TYPES`` below. The
list is fixed here and never taken from the bytes being loaded.
"""

from __future__ import annotations

import copy
import io
import json
import zipfile
from typing import Any

import numpy as np
import skops.io as sio

from modelstore.errors import ArtifactCorrupt
from trainer.learner import Learner
from trainer.spec import ModelSpec

STATE_FORMAT = 1

# Every type that a saved state may contain, as named by scikit-learn 1.9
# (other releases may use other names). Besides containers and numpy arrays
# these are the scalers and estimators, the RandomState that MiniBatchKMeans
# keeps between calls, the Cython loss objects that SGD keeps in
# ``_loss_function_``, and the MLP optimizers and label binarizer.
TRUSTED_TYPES = [
    "builtins.dict",
    "builtins.list",
    "builtins.str",
    "builtins.int",
    "builtins.float",
    "builtins.tuple",
    "numpy.ndarray",
    "numpy.float64",
    "numpy.int64",
    "numpy.dtype",
    "numpy.random.mtrand.RandomState",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._data.MinMaxScaler",
    "sklearn.preprocessing._data.MaxAbsScaler",
    "sklearn.preprocessing._label.LabelBinarizer",
    "sklearn.linear_model._stochastic_gradient.SGDClassifier",
    "sklearn.linear_model._stochastic_gradient.SGDRegressor",
    "sklearn.linear_model._perceptron.Perceptron",
    "sklearn.naive_bayes.MultinomialNB",
    "sklearn.naive_bayes.ComplementNB",
    "sklearn.naive_bayes.BernoulliNB",
    "sklearn.naive_bayes.GaussianNB",
    "sklearn.neural_network._multilayer_perceptron.MLPClassifier",
    "sklearn.neural_network._multilayer_perceptron.MLPRegressor",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.cluster._kmeans.MiniBatchKMeans",
    "sklearn._loss._loss.CyHalfBinomialLoss",
    "sklearn._loss._loss.CyHalfSquaredError",
    "sklearn._loss._loss.CyHuberLoss",
    "sklearn.linear_model._sgd_fast.Hinge",
    "sklearn.linear_model._sgd_fast.ModifiedHuber",
    "sklearn.linear_model._sgd_fast.SquaredHinge",
    "sklearn.linear_model._sgd_fast.EpsilonInsensitive",
    "sklearn.linear_model._sgd_fast.SquaredEpsilonInsensitive",
]


def dump_state(learner: Learner) -> bytes:
    """Serialize the learner's scaler, estimator and sample count with skops."""
    return sio.dumps(
        {
            "format": STATE_FORMAT,
            "scaler": learner.scaler_,
            "estimator": _bounded(learner.estimator_),
            "samples_learned": int(learner.samples_learned_),
        }
    )


def _bounded(estimator: Any) -> Any:
    """Return the estimator without history that would grow the state with every batch.

    An MLP appends one loss to ``loss_curve_`` per partial_fit call and reads
    only the last one (to count epochs without improvement), so keeping the
    last entry continues training exactly.
    """
    curve = getattr(estimator, "loss_curve_", None)
    if not curve or len(curve) <= 1:
        return estimator
    trimmed = copy.copy(estimator)
    trimmed.loss_curve_ = curve[-1:]
    return trimmed


def load_state(data: bytes, spec: ModelSpec) -> Learner:
    """Rebuild a learner for ``spec`` from bytes written by ``dump_state``.

    Raises ArtifactCorrupt when the bytes are not a skops file, contain a type
    outside TRUSTED_TYPES, or do not match the spec.
    """
    untrusted = sorted(_declared_types(data) - set(TRUSTED_TYPES))
    if untrusted:
        raise ArtifactCorrupt(f"state artifact contains untrusted types {untrusted}")
    try:
        state = sio.loads(data, trusted=TRUSTED_TYPES)
    except Exception as exc:  # skops raises many types for malformed input
        raise ArtifactCorrupt(f"state artifact cannot be loaded: {exc}") from exc

    learner = Learner(spec)
    _check_state(state, learner)
    learner.scaler_ = state["scaler"]
    learner.estimator_ = state["estimator"]
    learner.samples_learned_ = state["samples_learned"]
    return learner


def _declared_types(data: bytes) -> set[str]:
    """Read the type names that a skops file declares, without building any object."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            schema = json.loads(archive.read("schema.json"))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise ArtifactCorrupt(f"state artifact is not a skops file: {exc}") from exc

    found: set[str] = set()
    pending: list[Any] = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if "__module__" in node and "__class__" in node:
                found.add(f"{node['__module__']}.{node['__class__']}")
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return found


def _check_state(state: Any, fresh: Learner) -> None:
    """Raise ArtifactCorrupt unless ``state`` has the shape that ``fresh`` expects."""
    spec = fresh.spec
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ArtifactCorrupt(
            f"state artifact has format {_format_of(state)!r}; this trainer reads "
            f"format {STATE_FORMAT}"
        )
    if type(state.get("estimator")) is not type(fresh.estimator_):
        raise ArtifactCorrupt(
            f"state artifact contains {type(state.get('estimator')).__name__}, "
            f"the spec declares {spec.estimator}"
        )
    if type(state.get("scaler")) is not type(fresh.scaler_):
        raise ArtifactCorrupt(
            f"state artifact contains scaler {type(state.get('scaler')).__name__}, "
            f"the spec declares {spec.scaler}"
        )
    samples = state.get("samples_learned")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ArtifactCorrupt(f"state artifact has samples_learned {samples!r}")

    scaler = state["scaler"]
    scaled = len(spec.scaled_columns)
    if scaler is not None and getattr(scaler, "n_features_in_", scaled) != scaled:
        raise ArtifactCorrupt(
            f"state artifact has a scaler of {scaler.n_features_in_} columns, the spec "
            f"scales {scaled} (scaler_columns {spec.scaler_columns!r})"
        )

    estimator = state["estimator"]
    width = getattr(estimator, "n_features_in_", spec.schema.width)
    if width != spec.schema.width:
        raise ArtifactCorrupt(
            f"state artifact was learned on {width} columns, the spec's schema has "
            f"{spec.schema.width}"
        )
    if spec.labels is not None and hasattr(estimator, "classes_"):
        if estimator.classes_.tolist() != np.sort(spec.labels.array()).tolist():
            raise ArtifactCorrupt(
                f"state artifact has classes {estimator.classes_.tolist()!r}, the spec "
                f"declares labels {list(spec.labels.labels)!r}"
            )


def _format_of(state: Any) -> Any:
    return state.get("format") if isinstance(state, dict) else type(state).__name__
