"""Feature records of a source topic and the prediction records sent for them.

A feature record is a Kafka message whose value is a UTF-8 JSON object::

    {"features": {"month": 1, "carrier": "UA"} | [1, "UA"],   required
     "id": "abc" | 42,                                          optional, echoed back
     "model": "flights"}                                        optional

The model is the ``stream_model`` setting when set, else the ``model``
field, else the message key, the rules the worker applies to labelled
records. Every check raises RecordRejected with a short stable reason:
``empty``, ``too_large``, ``not_utf8``, ``invalid_json``, ``non_finite``,
``not_object``, ``missing_features``, ``invalid_id``, ``missing_model`` and
``invalid_model``. The stream adds ``unknown_model``, ``not_servable``,
``non_finite_output`` and the schema's own reasons (``wrong_type``,
``missing_feature``, ``wrong_width``, ``unknown_category``).

The functions here are pure: no store, no Kafka, no clock.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from modelstore.errors import InvalidModelName, RecordRejected
from modelstore.names import validate_model_name

from predictor.loader import LoadedModel
from predictor.responses import version_age

MAX_ID_CHARS = 256


@dataclass(frozen=True)
class FeatureRecord:
    """A record whose envelope is valid; its features are checked by the model's schema later."""

    model: str
    features: Mapping[str, Any] | Sequence[Any]
    id: str | int | None


class _NonFinite(ValueError):
    def __init__(self, literal: str):
        super().__init__(literal)
        self.literal = literal


def _reject_constant(literal: str) -> Any:
    # Python's json module accepts NaN and Infinity, which are not JSON.
    raise _NonFinite(literal)


def _parse_float(literal: str) -> float:
    # A literal like 1e400 overflows to inf without passing parse_constant.
    number = float(literal)
    if not math.isfinite(number):
        raise _NonFinite(literal)
    return number


def decode_record(
    key: bytes | None, value: bytes | None, forced_model: str | None, max_bytes: int
) -> FeatureRecord:
    """Decode one message into a FeatureRecord, or raise RecordRejected with the reason."""
    if not value:
        raise RecordRejected("empty", "the record has no value")
    if len(value) > max_bytes:
        raise RecordRejected(
            "too_large",
            f"the value has {len(value)} bytes, the maximum is {max_bytes} (stream_max_record_bytes)",
        )
    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordRejected("not_utf8", f"the value is not UTF-8: byte {exc.start} is invalid") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float)
    except _NonFinite as exc:
        raise RecordRejected("non_finite", f"the value contains the non-finite number {exc.literal[:40]}") from None
    except json.JSONDecodeError as exc:
        raise RecordRejected("invalid_json", f"the value is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise RecordRejected("invalid_json", "the value nests arrays or objects too deeply") from None
    except ValueError as exc:
        # int() rejects integers of more than 4300 digits, far outside float32.
        raise RecordRejected("non_finite", f"the value contains a number that is too long: {str(exc)[:80]}") from None

    if not isinstance(obj, dict):
        raise RecordRejected("not_object", "the value is not a JSON object with 'features'")
    if "features" not in obj:
        raise RecordRejected("missing_features", "the record has no 'features' object or list")
    record_id = obj.get("id")
    if record_id is not None and (
        isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or len(str(record_id)) > MAX_ID_CHARS
    ):
        raise RecordRejected(
            "invalid_id", f"'id' must be a string or an integer of at most {MAX_ID_CHARS} characters"
        )
    return FeatureRecord(choose_model(obj, key, forced_model), obj["features"], record_id)


def choose_model(obj: Mapping[str, Any], key: bytes | None, forced_model: str | None) -> str:
    """Name the model of a record: the forced model, else the ``model`` field, else the key."""
    if forced_model is not None:
        return forced_model
    if "model" in obj:
        name, where = obj["model"], "the 'model' field"
    elif key:
        try:
            name = bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            raise RecordRejected("invalid_model", "the message key is not UTF-8, so it cannot name a model") from None
        where = "the message key"
    else:
        raise RecordRejected(
            "missing_model",
            "the record has no 'model' field and no message key; set one of them or start "
            "the predictor with stream_model",
        )
    try:
        return validate_model_name(name)
    except InvalidModelName as exc:
        raise RecordRejected("invalid_model", f"{where} is not a model name: {exc}") from None


def non_finite_rows(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Return a boolean mask of the rows with a NaN or infinite float output."""
    bad = None
    for array in arrays.values():
        if array.dtype.kind != "f":
            continue
        rows = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
        bad = rows if bad is None else bad | rows
    if bad is None:
        first = next(iter(arrays.values()))
        return np.zeros(len(first), dtype=bool)
    return bad


def prediction_value(
    model: LoadedModel,
    arrays: Mapping[str, np.ndarray],
    row: int,
    record: FeatureRecord,
    source: tuple[str, int, int],
) -> bytes:
    """Build the JSON value of the prediction record for row ``row`` of ``arrays``."""
    outputs: dict[str, Any] = {}
    for kind, array in arrays.items():
        value = array[row]
        outputs[kind] = value.reshape(-1).tolist()[0] if kind == "value" else value.tolist()
    body: dict[str, Any] = {
        "model": model.name,
        "version": model.version,
        "version_age_seconds": version_age(model),
        "outputs": outputs,
    }
    if model.classes is not None:
        body["labels"] = list(model.classes)
    if record.id is not None:
        body["id"] = record.id
    topic, partition, offset = source
    body["source"] = {"topic": topic, "partition": partition, "offset": offset}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
