"""Export a learner to ONNX with skl2onnx, with fixed input and output names.

The predictor reads the names from the ``onnx`` metadata returned here, so it
never guesses them from the graph. The input is one float32 tensor named
``features`` of shape (n, schema width); columns are encoded by the model's
FeatureSchema. Outputs:

- ``label``: (n,) int64 or string, the predicted class (classifiers).
- ``probabilities``: (n, n_classes) float32, only for estimators that
  define ``predict_proba``: the losses ``log_loss`` and ``modified_huber``,
  the naive Bayes models and MLPClassifier.
- ``scores``: (n, n_classes) float32 for every other classifier: the
  ``decision_function`` margins. skl2onnx 1.20 names this output
  ``probabilities``, so it is renamed: a hinge or perceptron margin is not a
  probability. For two classes column 1 is the decision_function value and
  column 0 its negation.
- ``value``: (n, 1) float32, the prediction of a regressor.
- ``cluster``: (n,) int64 and ``distances``: (n, n_clusters) float32, the
  nearest center and the Euclidean distance to each center (clustering).

Columns of ``probabilities`` and ``scores`` follow ``classes``, which is
scikit-learn's sorted class order and can differ from the order of the
spec's labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import skl2onnx
import sklearn
import skops
from onnx import ModelProto
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, Int64TensorType, StringTensorType
from sklearn.pipeline import Pipeline

from trainer.learner import Learner
from trainer.spec import OnnxSettings

INPUT_NAME = "features"

# Default opsets (the spec's ``onnx`` settings pin them per model).
# onnxruntime 1.14 and later run ONNX opset 18 and ai.onnx.ml 3; skl2onnx
# emits lower versions when an operator needs nothing newer. The opsets a
# graph really imports go into metadata next to the pinned targets.
TARGET_OPSET = OnnxSettings().opsets()


def export_onnx(learner: Learner) -> tuple[bytes, dict[str, Any]]:
    """Convert a fitted learner to ONNX; return the model bytes and its metadata."""
    proto = convert(learner)
    return proto.SerializeToString(), onnx_metadata(learner, proto)


def convert(learner: Learner) -> ModelProto:
    """Convert a fitted learner with skl2onnx, with the output names listed above."""
    spec = learner.spec
    estimator = learner.estimator_
    scaler = learner.export_scaler()
    if scaler is not None:
        model = Pipeline([("scaler", scaler), ("estimator", estimator)])
    else:
        model = estimator

    final_types = output_types(learner)
    # Without zipmap=False skl2onnx returns probabilities as a list of
    # dictionaries (ZipMap), which is slow and awkward to serve.
    options = {id(estimator): {"zipmap": False}} if spec.is_classifier else None
    # skl2onnx takes log(0) for the prior of a class not seen yet. The -inf
    # it writes is intended, and the gate checks what the graph returns.
    with np.errstate(divide="ignore"):
        proto = convert_sklearn(
            model,
            initial_types=[(INPUT_NAME, FloatTensorType([None, spec.schema.width]))],
            final_types=final_types,
            options=options,
            target_opset=spec.onnx.opsets(),
        )
    _check_output_names(proto, [name for name, _ in final_types])
    # skl2onnx names the graph with a random UUID; a fixed name makes equal
    # weights give equal bytes, and so equal sha256 sums in the store.
    proto.graph.name = spec.estimator
    return proto


def output_types(learner: Learner) -> list[tuple[str, Any]]:
    """Return the graph's outputs as (name, skl2onnx type), in skl2onnx's order."""
    spec = learner.spec
    if spec.is_classifier:
        n_classes = len(learner.estimator_.classes_)
        label_type = Int64TensorType([None]) if spec.labels.kind == "int" else StringTensorType([None])
        second = "probabilities" if learner.has_probabilities else "scores"
        return [("label", label_type), (second, FloatTensorType([None, n_classes]))]
    if spec.is_clusterer:
        n_clusters = learner.estimator_.n_clusters
        return [("cluster", Int64TensorType([None])), ("distances", FloatTensorType([None, n_clusters]))]
    return [("value", FloatTensorType([None, 1]))]


def onnx_metadata(learner: Learner, proto: ModelProto) -> dict[str, Any]:
    """Return the ``onnx`` metadata of a version exported from ``learner``."""
    spec = learner.spec
    metadata: dict[str, Any] = {
        "input": INPUT_NAME,
        "width": spec.schema.width,
        "outputs": {name: name for name, _ in output_types(learner)},
        "opset": _opsets(proto),
        "target_opset": {"ai.onnx": spec.onnx.target_opset, "ai.onnx.ml": spec.onnx.ml_opset},
    }
    if spec.is_classifier:
        metadata["classes"] = learner.estimator_.classes_.tolist()
    return metadata


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped a version's artifacts."""
    return {
        "scikit-learn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "skops": skops.__version__,
    }


def _opsets(proto: ModelProto) -> dict[str, int]:
    """Return the opset each domain of the graph imports, "" written as "ai.onnx"."""
    opsets: dict[str, int] = {}
    for entry in proto.opset_import:
        domain = entry.domain or "ai.onnx"
        # skl2onnx may list a domain twice; the highest version is the one required.
        opsets[domain] = max(opsets.get(domain, 0), int(entry.version))
    return dict(sorted(opsets.items()))


def _check_output_names(proto: ModelProto, expected: list[str]) -> None:
    names = [output.name for output in proto.graph.output]
    if names != expected:
        raise RuntimeError(
            f"skl2onnx {skl2onnx.__version__} produced outputs {names}, expected {expected}"
        )
