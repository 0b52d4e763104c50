"""Feature schema and label set of a model, and the encoding of raw features.

The schema is stored in every version's metadata, so the worker (which
learns) and the predictor (which serves) turn a record's features into the
same float32 row. Column order always comes from the schema, never from the
order of keys in a JSON object.

A numeric feature is one float32 column. A categorical feature with a
declared vocabulary is one-hot encoded, one column per category, in
vocabulary order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from modelstore.errors import RecordRejected, SpecError

NUMERIC = "numeric"
CATEGORICAL = "categorical"

# Largest magnitude that stays finite in float32, the ONNX input type.
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Feature:
    """One input feature of a model.

    ``missing`` is the policy when a record lacks the feature: ``"reject"``
    (the default) or, for a numeric feature, a number to put in its place.
    ``unknown`` is the policy for a category outside the vocabulary:
    ``"reject"`` or ``"ignore"`` (all the feature's columns stay 0).
    """

    name: str
    kind: str = NUMERIC
    vocabulary: tuple[str, ...] = ()
    missing: str | float = "reject"
    unknown: str = "reject"

    @property
    def width(self) -> int:
        return len(self.vocabulary) if self.kind == CATEGORICAL else 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.kind}
        if self.kind == CATEGORICAL:
            out["vocabulary"] = list(self.vocabulary)
            out["unknown"] = self.unknown
        out["missing"] = self.missing
        return out

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "Feature":
        if not isinstance(raw, Mapping):
            raise SpecError(f"{where}: expected an object with 'name' and 'type', got {raw!r}")
        unknown_keys = set(raw) - {"name", "type", "vocabulary", "missing", "unknown"}
        if unknown_keys:
            raise SpecError(
                f"{where}: unknown keys {sorted(unknown_keys)}; allowed are "
                "name, type, vocabulary, missing, unknown"
            )
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise SpecError(f"{where}.name: expected a non-empty string, got {name!r}")
        kind = raw.get("type", NUMERIC)
        if kind not in (NUMERIC, CATEGORICAL):
            raise SpecError(
                f"{where}.type: {kind!r} is not a feature type; use 'numeric' or 'categorical'"
            )

        missing = raw.get("missing", "reject")
        if kind == NUMERIC:
            if missing != "reject" and (
                isinstance(missing, bool)
                or not isinstance(missing, (int, float))
                or not math.isfinite(missing)
            ):
                raise SpecError(
                    f"{where}.missing: {missing!r} is invalid for numeric feature {name!r}; "
                    "use 'reject' or a finite number to impute"
                )
            if "vocabulary" in raw:
                raise SpecError(
                    f"{where}.vocabulary: numeric feature {name!r} takes no vocabulary; "
                    "set type to 'categorical' or remove the vocabulary"
                )
            return cls(name=name, kind=NUMERIC, missing=missing if missing == "reject" else float(missing))

        vocabulary = raw.get("vocabulary")
        if (
            not isinstance(vocabulary, list)
            or not vocabulary
            or not all(isinstance(v, str) for v in vocabulary)
        ):
            raise SpecError(
                f"{where}.vocabulary: categorical feature {name!r} needs a non-empty list "
                f"of strings, got {vocabulary!r}"
            )
        if len(set(vocabulary)) != len(vocabulary):
            raise SpecError(f"{where}.vocabulary: feature {name!r} lists a category twice")
        unknown = raw.get("unknown", "reject")
        if unknown not in ("reject", "ignore"):
            raise SpecError(
                f"{where}.unknown: {unknown!r} is invalid for feature {name!r}; "
                "use 'reject' or 'ignore'"
            )
        if missing not in ("reject", "ignore"):
            raise SpecError(
                f"{where}.missing: {missing!r} is invalid for categorical feature {name!r}; "
                "use 'reject' or 'ignore' (all columns 0)"
            )
        return cls(
            name=name,
            kind=CATEGORICAL,
            vocabulary=tuple(vocabulary),
            missing=missing,
            unknown=unknown,
        )


class FeatureSchema:
    """The ordered features of a model and their encoding to one float32 row."""

    def __init__(self, features: Sequence[Feature]):
        if not features:
            raise SpecError("features: a model needs at least one feature")
        names = [f.name for f in features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SpecError(f"features: names {duplicates} appear more than once")
        self.features = tuple(features)
        self.names = tuple(names)
        self.width = sum(f.width for f in features)
        self._index = {f.name: i for i, f in enumerate(features)}
        self._category_index = [
            {c: j for j, c in enumerate(f.vocabulary)} for f in features
        ]
        self._offsets = np.cumsum([0] + [f.width for f in features])[:-1].tolist()
        # (index, feature, first column, is numeric, category columns), built
        # once because _fill runs per record.
        self._plan = [
            (i, f, start, f.kind == NUMERIC, self._category_index[i])
            for i, (f, start) in enumerate(zip(self.features, self._offsets))
        ]

    @classmethod
    def from_list(cls, raw: Any) -> "FeatureSchema":
        if not isinstance(raw, list):
            raise SpecError(f"features: expected a list of feature objects, got {raw!r}")
        return cls([Feature.from_dict(item, f"features[{i}]") for i, item in enumerate(raw)])

    def to_list(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self.features]

    def column_names(self) -> list[str]:
        """Names of the encoded columns, ``feature=category`` for one-hot columns."""
        out = []
        for f in self.features:
            if f.kind == CATEGORICAL:
                out.extend(f"{f.name}={c}" for c in f.vocabulary)
            else:
                out.append(f.name)
        return out

    def encode(self, rows: Iterable[Mapping[str, Any] | Sequence[Any]]) -> np.ndarray:
        """Encode many rows into a (n, width) float32 array.

        Raises RecordRejected for the first row that cannot be encoded; use
        ``encode_one`` to reject rows one at a time.
        """
        rows = list(rows)
        out = np.zeros((len(rows), self.width), dtype=np.float32)
        for i, row in enumerate(rows):
            self._fill(row, out[i])
        return out

    def encode_one(self, row: Mapping[str, Any] | Sequence[Any]) -> np.ndarray:
        out = np.zeros(self.width, dtype=np.float32)
        self._fill(row, out)
        return out

    def extra_keys(self, row: Mapping[str, Any]) -> list[str]:
        """Keys of a feature object that the schema does not know (ignored, counted)."""
        return [k for k in row if k not in self._index]

    def _fill(self, row: Mapping[str, Any] | Sequence[Any], out: np.ndarray) -> None:
        # A decoded JSON object is a dict, checked first because an
        # isinstance check against the Mapping ABC is several times slower.
        if type(row) is dict or isinstance(row, Mapping):
            get = row.get
            values = [get(name, _MISSING) for name in self.names]
        elif isinstance(row, (list, tuple)):
            if len(row) != len(self.features):
                raise RecordRejected(
                    "wrong_width",
                    f"features list has {len(row)} values, the schema has "
                    f"{len(self.features)} ({', '.join(self.names)})",
                )
            values = list(row)
        else:
            raise RecordRejected(
                "wrong_type",
                f"features must be an object or a list, got {type(row).__name__}",
            )
        for (i, feature, start, numeric, categories), value in zip(self._plan, values):
            kind = type(value)
            if numeric:
                if (kind is float or kind is int) and -FLOAT32_MAX <= value <= FLOAT32_MAX:
                    # The common case: a finite number in float32 range (NaN fails the comparison).
                    out[start] = value
                    continue
            elif kind is str:
                j = categories.get(value)
                if j is not None:
                    out[start + j] = 1.0
                    continue
            if value is _MISSING or value is None:
                self._fill_missing(feature, out, start)
            elif numeric:
                out[start] = _numeric(feature.name, value)
            else:
                self._fill_category(i, feature, value, out, start)

    def _fill_missing(self, feature: Feature, out: np.ndarray, start: int) -> None:
        if feature.missing == "reject":
            raise RecordRejected(
                "missing_feature", f"feature {feature.name!r} is missing or null"
            )
        if feature.kind == NUMERIC:
            out[start] = feature.missing
        # A categorical feature with missing='ignore' keeps all its columns at 0.

    def _fill_category(
        self, i: int, feature: Feature, value: Any, out: np.ndarray, start: int
    ) -> None:
        if not isinstance(value, str):
            raise RecordRejected(
                "wrong_type",
                f"feature {feature.name!r} is categorical and takes a string, "
                f"got {value!r}",
            )
        j = self._category_index[i].get(value)
        if j is not None:
            out[start + j] = 1.0
        elif feature.unknown == "reject":
            raise RecordRejected(
                "unknown_category",
                f"feature {feature.name!r} has no category {value[:64]!r} in its vocabulary",
            )


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _numeric(name: str, value: Any) -> float:
    # bool is a subclass of int in Python; a JSON true is not a number here.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordRejected(
            "wrong_type", f"feature {name!r} is numeric, got {value!r}"
        )
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float64 range
        number = math.inf
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise RecordRejected(
            "non_finite",
            f"feature {name!r} is {_short(value)}, which is not a finite float32 number",
        )
    return number


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


class LabelSet:
    """The declared labels of a classifier, in class order, all of one type.

    A regressor has no label set; its labels are finite numbers.
    """

    def __init__(self, labels: Sequence[Any]):
        if not isinstance(labels, (list, tuple)) or len(labels) < 2:
            raise SpecError(
                f"labels: a classifier needs a list of at least 2 labels, got {labels!r}"
            )
        types = {_label_type(v) for v in labels}
        if None in types:
            raise SpecError(
                f"labels: {list(labels)!r} contains a value that is neither an integer "
                "nor a string; declare labels as integers or as strings"
            )
        if len(types) > 1:
            raise SpecError(
                f"labels: {list(labels)!r} mixes integers and strings; "
                "declare all labels with one type"
            )
        if len(set(labels)) != len(labels):
            raise SpecError(f"labels: {list(labels)!r} lists a label twice")
        self.labels = tuple(labels)
        self.kind = types.pop()
        self._index = {v: i for i, v in enumerate(self.labels)}

    def check(self, value: Any) -> Any:
        """Return ``value`` if it is a declared label, else raise RecordRejected."""
        if value is None:
            raise RecordRejected("missing_label", "the record has no label")
        if _label_type(value) != self.kind:
            raise RecordRejected(
                "label_type",
                f"label {value!r} is a {type(value).__name__}; this model's labels are "
                f"{self.kind}s {list(self.labels)!r}",
            )
        if value not in self._index:
            raise RecordRejected(
                "unknown_label",
                f"label {value!r} is not one of the declared labels {list(self.labels)!r}",
            )
        return value

    def array(self) -> np.ndarray:
        if self.kind == "int":
            return np.asarray(self.labels, dtype=np.int64)
        return np.asarray(self.labels, dtype=object)


def check_target(value: Any) -> float:
    """Return a regression target as a float, or raise RecordRejected."""
    if value is None:
        raise RecordRejected("missing_label", "the record has no label")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordRejected("label_type", f"label {value!r} is not a number")
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float64 range
        number = math.inf
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise RecordRejected("non_finite", f"label {_short(value)} is not a finite float32 number")
    return number


def _label_type(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "int"
    if isinstance(value, str):
        return "str"
    return None
