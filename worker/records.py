"""Decoding of raw record bytes into a model name, features and a label.

Every check raises RecordRejected with a short stable ``reason`` code, used as
a metric label, a log field and a dead-letter header:

``empty``, ``too_large``, ``not_utf8``, ``invalid_json``, ``non_finite``,
``not_object``, ``missing_features``, ``missing_label``, ``missing_model`` and
``invalid_model``. Once the model's schema is known, these follow: ``wrong_type``,
``missing_feature``, ``wrong_width``, ``unknown_category``, ``label_type`` and
``unknown_label`` (raised by ``modelstore.schema``). The worker adds
``unknown_model`` (no such model in the store), ``model_error`` (the stored
spec or state of the model cannot be used) and, for the records of a batch
whose version failed a publish check, that check's reason.

The functions here are pure: no store, no Kafka, no clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from modelstore.errors import InvalidModelName, RecordRejected
from modelstore.names import validate_model_name
from modelstore.schema import FeatureSchema, LabelSet, check_target

MAX_DETAIL_CHARS = 200


class SpecLike(Protocol):
    """The part of a model spec that decoding needs (``trainer.spec.ModelSpec`` has it)."""

    schema: FeatureSchema
    labels: LabelSet | None
    is_classifier: bool


# Tuples rather than frozen dataclasses: two are built per record, and a
# frozen dataclass takes several times longer to build.
class DecodedRecord(NamedTuple):
    """A record whose envelope is valid; its features are not yet checked against a schema."""

    model: str
    features: Mapping[str, Any] | Sequence[Any]
    label: Any


class EncodedRecord(NamedTuple):
    """A record ready for ``partial_fit``: one float32 row and a checked label."""

    row: np.ndarray
    label: Any
    extra_keys: tuple[str, ...]


class _NonFiniteNumber(ValueError):
    def __init__(self, literal: str):
        super().__init__(literal)
        self.literal = literal


def _reject_constant(literal: str) -> Any:
    # Python's json module accepts NaN, Infinity and -Infinity, which are not
    # JSON and would reach partial_fit as non-finite numbers.
    raise _NonFiniteNumber(literal)


def _parse_float(literal: str) -> float:
    # A literal like 1e400 overflows to inf without passing parse_constant.
    number = float(literal)
    if not math.isfinite(number):
        raise _NonFiniteNumber(literal)
    return number


# One decoder for every record: json.loads with hooks builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float)


def parse_value(value: bytes | None, max_record_bytes: int) -> dict[str, Any]:
    """Parse a record value into a JSON object, or raise RecordRejected."""
    if value is None or len(value) == 0:
        raise RecordRejected("empty", "the record has no value")
    if len(value) > max_record_bytes:
        raise RecordRejected(
            "too_large",
            f"the value has {len(value)} bytes, the maximum is {max_record_bytes} "
            "(setting max_record_bytes)",
        )

    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordRejected(
            "not_utf8", f"the value is not UTF-8: byte {err.start} is {value[err.start:err.start + 1]!r}"
        ) from None

    try:
        obj = _DECODER.decode(text)
    except _NonFiniteNumber as err:
        raise RecordRejected(
            "non_finite", f"the value contains the non-finite number {err.literal[:40]}"
        ) from None
    except json.JSONDecodeError as err:
        raise RecordRejected(
            "invalid_json", f"the value is not valid JSON: {err.msg} at character {err.pos}"
        ) from None
    except RecursionError:
        raise RecordRejected("invalid_json", "the value nests arrays or objects too deeply") from None
    except ValueError as err:
        # int() refuses integers of more than 4300 digits (CPython's limit
        # against quadratic parsing); such a number is far outside float32.
        raise RecordRejected("non_finite", f"the value contains a number that is too long: {str(err)[:80]}") from None

    if not isinstance(obj, dict):
        raise RecordRejected(
            "not_object",
            f"the value is a JSON {_json_type(obj)}, expected an object with 'features' and 'label'",
        )
    return obj


def choose_model(obj: Mapping[str, Any], key: bytes | None, forced_model: str | None) -> str:
    """Name the model a record trains: the forced model, else the ``model`` field, else the key."""
    if forced_model is not None:
        return forced_model

    if "model" in obj:
        name = obj["model"]
        where = "the 'model' field"
    elif key:
        try:
            name = bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            raise RecordRejected(
                "invalid_model", "the message key is not UTF-8, so it cannot name a model"
            ) from None
        where = "the message key"
    else:
        raise RecordRejected(
            "missing_model",
            "the record has no 'model' field and no message key; set one of them "
            "or start the worker with --model NAME",
        )

    try:
        return validate_model_name(name)
    except InvalidModelName as err:
        raise RecordRejected("invalid_model", f"{where} is not a model name: {err}") from None


def decode_record(
    value: bytes | None,
    key: bytes | None,
    *,
    forced_model: str | None = None,
    max_record_bytes: int = 1024 * 1024,
) -> DecodedRecord:
    """Decode a record's bytes into (model, features, label), or raise RecordRejected."""
    obj = parse_value(value, max_record_bytes)
    if not obj:
        raise RecordRejected("empty", "the value is an empty JSON object")
    if "features" not in obj or obj["features"] is None:
        raise RecordRejected("missing_features", "the record has no 'features' field")
    model = choose_model(obj, key, forced_model)
    # The label may be missing here: a clustering model learns without one,
    # and encode_record rejects its absence for the other tasks.
    return DecodedRecord(model=model, features=obj["features"], label=obj.get("label"))


def encode_record(record: DecodedRecord, spec: SpecLike) -> EncodedRecord:
    """Encode features with the model's schema and check the label, or raise RecordRejected."""
    row = spec.schema.encode_one(record.features)
    if _takes_counts(spec) and (row < 0).any():
        column = int(np.flatnonzero(row < 0)[0])
        name = spec.schema.column_names()[column]
        raise RecordRejected(
            "negative_input",
            f"feature {name!r} is {float(row[column]):g}, but {spec.estimator} takes non-negative "
            "counts; send non-negative values, or use scaler MinMaxScaler in the model's spec",
        )
    if getattr(spec, "is_clusterer", False):
        label = None
    elif spec.is_classifier:
        if spec.labels is None:
            raise RecordRejected("label_type", f"model {record.model!r} declares no labels")
        label = spec.labels.check(record.label)
    else:
        label = check_target(record.label)

    extra: tuple[str, ...] = ()
    features = record.features
    if type(features) is dict or isinstance(features, Mapping):
        extra = tuple(spec.schema.extra_keys(features))
    return EncodedRecord(row=row, label=label, extra_keys=extra)


def _takes_counts(spec: SpecLike) -> bool:
    """Return True when the spec's estimator rejects negative input that its scaler does not remove.

    MinMaxScaler learns each batch before scaling it, so it maps every row
    of the batch into [0, 1]. MaxAbsScaler keeps the signs, and so does no
    scaler at all.
    """
    info = getattr(spec, "info", None)
    return bool(getattr(info, "non_negative_input", False)) and getattr(spec, "scaler", None) != "MinMaxScaler"


def short_detail(detail: str) -> str:
    """Cut a rejection detail to a length fit for a log line and a Kafka header."""
    if len(detail) <= MAX_DETAIL_CHARS:
        return detail
    return detail[: MAX_DETAIL_CHARS - 3] + "..."


def _json_type(obj: Any) -> str:
    if isinstance(obj, list):
        return "array"
    if isinstance(obj, str):
        return "string"
    if isinstance(obj, bool):
        return "boolean"
    if isinstance(obj, (int, float)):
        return "number"
    return "null"
