"""Response bodies of the prediction and metadata routes.

Every body names the model, the version that served the request and its
age in seconds since its publish.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from modelstore.schema import CATEGORICAL

from predictor.loader import LoadedModel


def v1_response(
    model: LoadedModel, arrays: Mapping[str, np.ndarray], ignored: list[str], alias: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model.name,
        "version": model.version,
        "version_age_seconds": _round(model.age_seconds()),
    }
    if alias is not None:
        body["alias"] = alias
    if model.is_classifier:
        body["predictions"] = arrays["label"].tolist()
        body["labels"] = list(model.classes)
        for kind in ("probabilities", "scores"):
            if kind in arrays:
                body[kind] = arrays[kind].tolist()
    else:
        body["predictions"] = arrays["value"].reshape(-1).tolist()
    if ignored:
        body["ignored_features"] = ignored
    return body


def v2_response(
    model: LoadedModel,
    arrays: Mapping[str, np.ndarray],
    requested: list[str] | None,
    request_id: Any,
    alias: str | None = None,
) -> dict[str, Any]:
    outputs = []
    for kind in requested or list(arrays):
        array = arrays[kind]
        if kind == "value":
            array = array.reshape(-1)
        outputs.append({
            "name": kind,
            "datatype": _datatype(array),
            "shape": list(array.shape),
            "data": array.reshape(-1).tolist(),
        })
    body: dict[str, Any] = {
        "model_name": model.name,
        "model_version": str(model.version),
        "outputs": outputs,
        "parameters": _version_parameters(model, alias),
    }
    if isinstance(request_id, str):
        body["id"] = request_id
    return body


def v2_metadata(model: LoadedModel, aliases: Mapping[str, int], alias: str | None = None) -> dict[str, Any]:
    """Build the OIP model metadata of the version that serves ``model``.

    ``versions`` lists the served version and the versions the model's
    aliases name; any other version still in the store can be requested by
    number too.
    """
    inputs = [
        {
            "name": f.name,
            "datatype": "BYTES" if f.kind == CATEGORICAL else "FP32",
            "shape": [-1],
        }
        for f in model.schema.features
    ]
    outputs = []
    for kind in model.outputs:
        if kind == "label":
            is_int = model.classes and isinstance(model.classes[0], int)
            outputs.append({"name": kind, "datatype": "INT64" if is_int else "BYTES", "shape": [-1]})
        elif kind in ("probabilities", "scores"):
            outputs.append({"name": kind, "datatype": "FP32", "shape": [-1, len(model.classes or ())]})
        else:
            outputs.append({"name": kind, "datatype": "FP32", "shape": [-1]})
    versions = sorted({model.version, *aliases.values()})
    parameters = _version_parameters(model, alias)
    parameters.update({
        "task": model.task,
        "created_at": model.created_at,
        "aliases": dict(sorted(aliases.items())),
    })
    if model.classes is not None:
        parameters["labels"] = list(model.classes)
    return {
        "name": model.name,
        "versions": [str(v) for v in versions],
        "platform": "onnxruntime",
        "inputs": inputs,
        "outputs": outputs,
        "parameters": parameters,
    }


def server_metadata(version: str) -> dict[str, Any]:
    """Build the OIP server metadata; the extension is the simple JSON route under /v1."""
    return {"name": "streamfit-predictor", "version": version, "extensions": ["streamfit_json_v1"]}


def version_age(model: LoadedModel) -> float | None:
    """Return the seconds since the version was published, rounded to ms; None when unknown."""
    return _round(model.age_seconds())


def _version_parameters(model: LoadedModel, alias: str | None) -> dict[str, Any]:
    parameters: dict[str, Any] = {
        "version": model.version,
        "version_age_seconds": version_age(model),
    }
    if alias is not None:
        parameters["alias"] = alias
    return parameters


def _datatype(array: np.ndarray) -> str:
    if array.dtype.kind in ("U", "O", "S"):
        return "BYTES"
    if array.dtype.kind in ("i", "u"):
        return "INT64"
    if array.dtype == np.float64:
        return "FP64"
    return "FP32"


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 3)
