"""Export a learner to ONNX with skl2onnx, with fixed input and output names.

The predictor reads the names from the ``onnx`` metadata returned here, so it
never guesses them from the graph. The input is one float32 tensor named
``features`` of shape (n, schema width); columns are encoded by the model's
FeatureSchema. Outputs:

- ``label``: (n,) int64 or string, the predicted class (classifiers).
- ``probabilities``: (n, n_classes) float32, only for the losses
  ``log_loss`` and ``modified_huber``, for which scikit-learn defines
  ``predict_proba``.
- ``scores``: (n, n_classes) float32 for every other classifier loss.
  skl2onnx 1.20 names this output ``probabilities`` although it contains the
  raw ``decision_function`` margins, so it is renamed: a hinge or perceptron
  margin is not a probability. For two classes column 1 is the
  decision_function value and column 0 its negation.
- ``value``: (n, 1) float32, the prediction of a regressor.

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

INPUT_NAME = "features"

# Opsets the exported graphs may use. onnxruntime 1.14 and later run ONNX
# opset 18 and ai.onnx.ml 3; skl2onnx emits lower versions when an operator
# needs nothing newer. The opsets a graph really imports go into metadata.
TARGET_OPSET = {"": 18, "ai.onnx.ml": 3}


def export_onnx(learner: Learner) -> tuple[bytes, dict[str, Any]]:
    """Convert a fitted learner to ONNX; return the model bytes and its metadata."""
    spec = learner.spec
    width = spec.schema.width
    estimator = learner.estimator_
    if learner.scaler_ is not None:
        model = Pipeline([("scaler", learner.scaler_), ("estimator", estimator)])
    else:
        model = estimator

    outputs: dict[str, str] = {}
    options = None
    if spec.is_classifier:
        n_classes = len(estimator.classes_)
        label_type = Int64TensorType([None]) if spec.labels.kind == "int" else StringTensorType([None])
        second = "probabilities" if learner.has_probabilities else "scores"
        final_types = [("label", label_type), (second, FloatTensorType([None, n_classes]))]
        outputs = {"label": "label", second: second}
        # Without this option skl2onnx returns probabilities as a list of
        # dictionaries (ZipMap), which is slow and awkward to serve.
        options = {id(estimator): {"zipmap": False}}
    else:
        final_types = [("value", FloatTensorType([None, 1]))]
        outputs = {"value": "value"}

    proto = convert_sklearn(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, width]))],
        final_types=final_types,
        options=options,
        target_opset=TARGET_OPSET,
    )
    _check_output_names(proto, list(outputs.values()))

    metadata: dict[str, Any] = {
        "input": INPUT_NAME,
        "width": width,
        "outputs": outputs,
        "opset": _opsets(proto),
    }
    if spec.is_classifier:
        metadata["classes"] = estimator.classes_.tolist()
    return proto.SerializeToString(), metadata


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
