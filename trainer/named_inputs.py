"""A portable ONNX graph that takes a record's named features instead of one encoded tensor.

The served graph takes one float tensor ``features`` that the predictor
encodes with the model's FeatureSchema. This module puts that encoding into
the graph itself, for runtimes that have no streamfit code: one input per
feature, in schema order,

- numeric feature: float32 of shape (n, 1). NaN is replaced by the
  feature's ``missing`` number when the schema sets one; otherwise NaN flows
  into the model and its outputs.
- categorical feature: string of shape (n, 1), one-hot encoded in the graph
  with the declared vocabulary by ``ai.onnx.ml.OneHotEncoder``. A category
  outside the vocabulary gives all-zero columns when the feature's
  ``unknown`` policy is ``ignore``. With ``reject`` onnxruntime fails the
  whole run, and its error message ("Unknown Category") omits the value. A missing category has no string of
  its own: send one outside the vocabulary, which follows the unknown policy.

The encoded columns are concatenated into exactly the float32 row that
``FeatureSchema.encode`` gives, so both graphs return identical outputs.
The model graph's internal names get the prefix ``model/`` and the encoder's
``encode/``, so a feature name cannot clash with them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import ModelProto, TensorProto, compose, helper, numpy_helper

from modelstore.schema import CATEGORICAL, FeatureSchema
from trainer.export import INPUT_NAME
from trainer.spec import check_named_inputs

MODEL_PREFIX = "model/"
ENCODER_PREFIX = "encode/"
# Opsets the encoder needs: IsNaN and Where from 9, OneHotEncoder from ai.onnx.ml 1.
_MIN_OPSET = 9


def named_input_graph(base: ModelProto, schema: FeatureSchema) -> ModelProto:
    """Return ``base`` (the served graph) with a feature encoder in front of it.

    Raises SpecError when a feature is named like an output of the graph.
    """
    check_named_inputs(schema)
    graph = compose.add_prefix_graph(
        base.graph, MODEL_PREFIX, rename_outputs=False, rename_inputs=True
    )
    nodes, initializers, inputs, columns = [], [], [], []
    for feature in schema.features:
        column = f"{ENCODER_PREFIX}{feature.name}"
        if feature.kind == CATEGORICAL:
            inputs.append(helper.make_tensor_value_info(feature.name, TensorProto.STRING, [None, 1]))
            nodes += _one_hot(feature, column, initializers)
        else:
            inputs.append(helper.make_tensor_value_info(feature.name, TensorProto.FLOAT, [None, 1]))
            nodes += _numeric(feature, column, initializers)
        columns.append(column)
    nodes.append(
        helper.make_node(
            "Concat", columns, [MODEL_PREFIX + INPUT_NAME], axis=1, name=f"{ENCODER_PREFIX}concat"
        )
    )

    combined = helper.make_graph(
        nodes + list(graph.node),
        base.graph.name + "_named_inputs",
        inputs,
        list(graph.output),
        initializer=initializers + list(graph.initializer),
    )
    model = helper.make_model(combined, opset_imports=_opsets(base), ir_version=base.ir_version)
    model.producer_name = base.producer_name
    model.producer_version = base.producer_version
    return model


def named_inputs_metadata(schema: FeatureSchema, outputs: dict[str, str]) -> dict[str, Any]:
    """Describe the named inputs and the outputs of the graph, for ``metadata["onnx"]``."""
    return {
        "inputs": [
            {
                "name": feature.name,
                "type": "string" if feature.kind == CATEGORICAL else "float",
                "shape": [None, 1],
            }
            for feature in schema.features
        ],
        "outputs": dict(outputs),
    }


def feeds(schema: FeatureSchema, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Return the named-input feeds for records given as feature objects."""
    out: dict[str, np.ndarray] = {}
    for feature in schema.features:
        values = [row.get(feature.name) for row in rows]
        if feature.kind == CATEGORICAL:
            out[feature.name] = np.array(values, dtype=object).reshape(-1, 1)
        else:
            numbers = [np.nan if value is None else float(value) for value in values]
            out[feature.name] = np.array(numbers, dtype=np.float32).reshape(-1, 1)
    return out


def _one_hot(feature, column: str, initializers: list) -> list:
    encoded = f"{column}/one_hot"
    shape = f"{column}/shape"
    initializers.append(
        numpy_helper.from_array(np.array([-1, len(feature.vocabulary)], dtype=np.int64), shape)
    )
    return [
        helper.make_node(
            "OneHotEncoder",
            [feature.name],
            [encoded],
            domain="ai.onnx.ml",
            cats_strings=list(feature.vocabulary),
            zeros=1 if feature.unknown == "ignore" else 0,
            name=encoded,
        ),
        # OneHotEncoder returns (n, 1, categories) for an (n, 1) input.
        helper.make_node("Reshape", [encoded, shape], [column], name=f"{column}/reshape"),
    ]


def _numeric(feature, column: str, initializers: list) -> list:
    if feature.missing == "reject":
        return [helper.make_node("Identity", [feature.name], [column], name=column)]
    fill = f"{column}/missing"
    is_nan = f"{column}/is_nan"
    initializers.append(numpy_helper.from_array(np.array(feature.missing, dtype=np.float32), fill))
    return [
        helper.make_node("IsNaN", [feature.name], [is_nan], name=is_nan),
        helper.make_node("Where", [is_nan, fill, feature.name], [column], name=column),
    ]


def _opsets(base: ModelProto) -> list:
    versions: dict[str, int] = {}
    for entry in base.opset_import:
        versions[entry.domain] = max(versions.get(entry.domain, 0), entry.version)
    versions[""] = max(versions.get("", 0), _MIN_OPSET)
    versions["ai.onnx.ml"] = max(versions.get("ai.onnx.ml", 0), 1)
    return [helper.make_opsetid(domain, version) for domain, version in sorted(versions.items())]


def feeds_from_encoded(schema: FeatureSchema, X: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Decode encoded rows back into named-input feeds, for a parity check.

    Returns the feeds and a mask of the rows they cover: a row whose one-hot
    block is not a valid encoding (a probe row), or is all zero for a
    feature that rejects unknown categories, has no named-input form.
    """
    X = np.asarray(X, dtype=np.float32)
    keep = np.ones(len(X), dtype=bool)
    columns: dict[str, np.ndarray] = {}
    start = 0
    for feature in schema.features:
        block = X[:, start : start + feature.width]
        start += feature.width
        if feature.kind != CATEGORICAL:
            columns[feature.name] = block.reshape(-1, 1)
            continue
        ones = (block == 1.0).sum(axis=1)
        valid = ((block == 0.0) | (block == 1.0)).all(axis=1) & (ones <= 1)
        if feature.unknown != "ignore":
            valid &= ones == 1
        keep &= valid
        outside = _outside(feature.vocabulary)
        names = np.array(list(feature.vocabulary) + [outside], dtype=object)
        index = np.where(ones == 1, block.argmax(axis=1), len(feature.vocabulary))
        columns[feature.name] = names[index].reshape(-1, 1)
    return {name: values[keep] for name, values in columns.items()}, keep


def _outside(vocabulary: tuple[str, ...]) -> str:
    candidate = "<unknown>"
    while candidate in vocabulary:
        candidate += "_"
    return candidate
