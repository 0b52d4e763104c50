"""Request decoding of the two prediction APIs; ``predictor.responses`` builds the bodies.

``/v2/...`` follows the Open Inference Protocol V2 (KServe's REST
predict protocol): one named input tensor per schema feature. ``/v1/...``
takes named features as JSON objects. Both encode rows with the model's
FeatureSchema, the code the trainer uses, so a row means the same to both.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from modelstore.errors import RecordRejected, StreamfitError
from modelstore.schema import CATEGORICAL, FLOAT32_MAX

from predictor.loader import LoadedModel

NUMERIC_DATATYPES = {
    "FP16", "FP32", "FP64",
    "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
}
MAX_IGNORED_NAMES = 20
# Ignored feature names are echoed back cut to this many characters.
MAX_ECHOED_NAME_CHARS = 64
# An integer of more digits cannot be a float32 feature value. Python parses
# at most 4300 digits and float() overflows above about 309, so longer
# integers would otherwise fail the request with a 500 instead of a 400.
MAX_INTEGER_DIGITS = 300


class RequestError(StreamfitError):
    """A request that is invalid as sent; ``status`` is the HTTP status code to return."""

    def __init__(self, status: int, message: str, field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field
        self.reason = reason


def parse_json(body: bytes) -> Any:
    """Parse a JSON request body; raise RequestError(400) naming the problem."""
    if not body:
        raise RequestError(400, "the request body is empty; send a JSON object")
    # JSON over HTTP is UTF-8 (RFC 8259); json.loads would guess UTF-16 or
    # UTF-32 from the first bytes.
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "the request body is not UTF-8 text; send a JSON object") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise RequestError(
            400, f"invalid JSON body: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise RequestError(400, "invalid JSON body: nested too deeply") from None


def _reject_constant(name: str) -> Any:
    raise RequestError(
        400, f"invalid JSON body: {name} is not a JSON number; send finite numbers only"
    )


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise RequestError(
            400, f"invalid JSON body: an integer of {digits} digits is out of range; send "
            "numbers within the float32 range (about 3.4e38)"
        )
    return int(text)


def decode_v1(payload: Any, model: LoadedModel, max_rows: int) -> tuple[np.ndarray, list[str]]:
    """Encode ``{"features": row}`` or ``{"instances": [row, ...]}``.

    A row is an object of named features or a list in schema order. Returns
    the (n, width) float32 array and the sorted names of ignored extra keys.
    """
    if not isinstance(payload, Mapping):
        raise RequestError(400, f"the body must be a JSON object, got {_json_type(payload)}")
    unknown = sorted(set(payload) - {"features", "instances"})
    if unknown:
        raise RequestError(
            400, f"unknown keys {unknown} in the body; send 'features' (one row) or "
            "'instances' (a list of rows)", field=unknown[0],
        )
    if ("features" in payload) == ("instances" in payload):
        raise RequestError(
            400, "send exactly one of 'features' (one row) and 'instances' (a list of rows)"
        )

    if "features" in payload:
        rows, where = [payload["features"]], ["features"]
    else:
        rows = payload["instances"]
        if not isinstance(rows, list) or not rows:
            raise RequestError(
                400, f"'instances' must be a non-empty list of rows, got {_json_type(rows)}",
                field="instances",
            )
        _check_rows(len(rows), max_rows)
        where = [f"instances[{i}]" for i in range(len(rows))]

    out = _encode_columns(model, _rows_to_columns(model, rows), len(rows))
    if out is None:
        # Row by row, as the schema does, to name the first row and
        # feature that fail.
        out = np.zeros((len(rows), model.schema.width), dtype=np.float32)
        for i, row in enumerate(rows):
            out[i] = _encode(model, row, where[i])
    ignored: set[str] = set()
    for row in rows:
        if len(ignored) >= MAX_IGNORED_NAMES:
            break
        if isinstance(row, Mapping):
            ignored.update(k[:MAX_ECHOED_NAME_CHARS] for k in model.schema.extra_keys(row))
    return out, sorted(ignored)[:MAX_IGNORED_NAMES]


def decode_v2(
    payload: Any, model: LoadedModel, max_rows: int
) -> tuple[np.ndarray, list[str] | None]:
    """Encode an OIP V2 inference request.

    Returns the (n, width) float32 array and the output names requested
    (None for all).
    """
    if not isinstance(payload, Mapping):
        raise RequestError(400, f"the body must be a JSON object, got {_json_type(payload)}")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(
            400, "'inputs' must be a non-empty list of tensors, one per feature: "
            f"{list(model.schema.names)}", field="inputs",
        )

    columns: dict[str, list[Any]] = {}
    rows = None
    for i, tensor in enumerate(inputs):
        name, data = _decode_tensor(tensor, f"inputs[{i}]", model, max_rows)
        if name in columns:
            raise RequestError(400, f"inputs[{i}]: input {name!r} is sent twice", field=f"inputs[{i}]")
        if rows is not None and len(data) != rows:
            raise RequestError(
                400, f"inputs[{i}]: input {name!r} has {len(data)} rows, the inputs before "
                f"it have {rows}", field=f"inputs[{i}].shape",
            )
        rows = len(data)
        columns[name] = data

    out = _encode_columns(model, columns, rows)
    if out is None:
        # Encode row by row, as the schema does, to name the first row and
        # feature that fail.
        out = np.zeros((rows, model.schema.width), dtype=np.float32)
        for r in range(rows):
            out[r] = _encode(model, {n: c[r] for n, c in columns.items()}, f"row {r}")
    return out, _requested_outputs(payload.get("outputs"), model)


class _Absent:
    """Marks a feature missing from a row object; the column encoder leaves such columns to the row path."""


_ABSENT = _Absent()
_NUMBER_TYPES = {int, float}


def _rows_to_columns(model: LoadedModel, rows: list[Any]) -> dict[str, list[Any]] | None:
    """Turn rows (all objects, or all lists of the schema's width) into columns by feature name."""
    names = model.schema.names
    if all(type(row) is dict for row in rows):
        return {name: [row.get(name, _ABSENT) for row in rows] for name in names}
    if all(type(row) is list and len(row) == len(names) for row in rows):
        return dict(zip(names, map(list, zip(*rows))))
    return None


def _encode_columns(
    model: LoadedModel, columns: Mapping[str, list[Any]] | None, rows: int
) -> np.ndarray | None:
    """Encode whole columns with numpy, or return None when a value needs the row-wise checks.

    Every column must be present, numeric columns plain finite numbers
    within the float32 range, and categorical columns strings in the
    vocabulary. Anything else (a missing feature, null, an unknown
    category) takes the row-wise path of FeatureSchema, which applies the
    missing and unknown policies and names the failing row.
    """
    if columns is None:
        return None
    schema = model.schema
    out = np.zeros((rows, schema.width), dtype=np.float32)
    start = 0
    for index, feature in enumerate(schema.features):
        data = columns.get(feature.name)
        if data is None:
            return None
        if feature.kind == CATEGORICAL:
            lookup = model.category_index[index]
            try:
                positions = [lookup[value] for value in data]
            except (KeyError, TypeError):
                return None
            out[np.arange(rows), start + np.asarray(positions, dtype=np.intp)] = 1.0
        else:
            # Exact types: bool is a subclass of int but not a number here.
            if not set(map(type, data)) <= _NUMBER_TYPES:
                return None
            try:
                values = np.asarray(data, dtype=np.float64)
            except OverflowError:
                return None
            if not np.all(np.abs(values) <= FLOAT32_MAX):
                return None
            out[:, start] = values
        start += feature.width
    return out


def _decode_tensor(tensor: Any, where: str, model: LoadedModel, max_rows: int) -> tuple[str, list[Any]]:
    if not isinstance(tensor, Mapping):
        raise RequestError(400, f"{where}: expected a tensor object, got {_json_type(tensor)}", field=where)
    name = tensor.get("name")
    features = model.features_by_name
    # A JSON list or object as the name is unhashable, so it is checked first.
    if not isinstance(name, str) or name not in features:
        raise RequestError(
            400, f"{where}.name: {name!r} is not an input of model {model.name!r}; its inputs "
            f"are {list(model.schema.names)}", field=f"{where}.name",
        )

    datatype = tensor.get("datatype")
    expected = "BYTES" if features[name].kind == CATEGORICAL else "FP32"
    if expected == "BYTES" and datatype != "BYTES":
        raise RequestError(
            400, f"{where}.datatype: input {name!r} is categorical and takes BYTES, got "
            f"{datatype!r}", field=f"{where}.datatype",
        )
    if expected == "FP32" and (not isinstance(datatype, str) or datatype not in NUMERIC_DATATYPES):
        raise RequestError(
            400, f"{where}.datatype: input {name!r} is numeric and takes FP32, FP64, INT64 "
            f"or another numeric datatype, got {datatype!r}", field=f"{where}.datatype",
        )

    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) not in (1, 2)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or (len(shape) == 2 and shape[1] != 1)
    ):
        raise RequestError(
            400, f"{where}.shape: input {name!r} has shape {shape!r}; use [n] or [n, 1]",
            field=f"{where}.shape",
        )
    if shape[0] == 0:
        raise RequestError(400, f"{where}.shape: input {name!r} has no rows", field=f"{where}.shape")
    _check_rows(shape[0], max_rows)

    data = tensor.get("data")
    if not isinstance(data, list):
        raise RequestError(400, f"{where}.data: expected a list, got {_json_type(data)}", field=f"{where}.data")
    # OIP allows the data of [n, 1] nested row by row or flat.
    if data and all(isinstance(v, list) and len(v) == 1 for v in data):
        data = [v[0] for v in data]
    if len(data) != shape[0]:
        raise RequestError(
            400, f"{where}.data: input {name!r} has {len(data)} values for shape {shape}",
            field=f"{where}.data",
        )
    if datatype.startswith(("INT", "UINT")):
        for j, value in enumerate(data):
            if isinstance(value, bool) or not isinstance(value, int):
                raise RequestError(
                    400, f"{where}.data[{j}]: input {name!r} is {datatype} and takes integers, "
                    f"got {value!r}", field=f"{where}.data",
                )
    return name, data


def _requested_outputs(raw: Any, model: LoadedModel) -> list[str] | None:
    if raw is None:
        return None
    available = list(model.outputs)
    if not isinstance(raw, list) or not all(isinstance(o, Mapping) for o in raw):
        raise RequestError(400, "'outputs' must be a list of objects with a 'name'", field="outputs")
    names = [o.get("name") for o in raw]
    for name in names:
        if name not in available:
            raise RequestError(
                400, f"outputs: {name!r} is not an output of model {model.name!r}; its "
                f"outputs are {available}", field="outputs",
            )
    return names


def _encode(model: LoadedModel, row: Any, where: str) -> np.ndarray:
    try:
        return model.schema.encode_one(row)
    except RecordRejected as exc:
        raise RequestError(400, f"{where}: {exc.detail}", field=where, reason=exc.reason) from None


def _check_rows(rows: int, max_rows: int) -> None:
    if rows > max_rows:
        raise RequestError(
            413, f"the request has {rows} rows; the maximum is {max_rows} (max_batch_rows), "
            "so split it into smaller requests",
        )


def check_finite(arrays: Mapping[str, np.ndarray]) -> None:
    """Raise RequestError(422) when an output is NaN or infinite.

    Finite float32 inputs of extreme magnitude can overflow a model's
    arithmetic; JSON has no number for the result.
    """
    for kind, array in arrays.items():
        if array.dtype.kind != "f":
            continue
        bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
        if bad.any():
            row = int(np.argmax(bad))
            raise RequestError(
                422, f"row {row}: output {kind!r} is not finite for this input; check the "
                "feature values for extreme magnitudes", field=f"row {row}",
            )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
