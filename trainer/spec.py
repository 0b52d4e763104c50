"""Model specs: which estimator a model uses, with which settings, on which features.

A spec is the JSON object stored as ``metadata["spec"]`` in every version of
a model. ``ModelSpec.from_dict`` validates it completely before any learning
starts, so a bad spec fails when the model is created, with a message that
names the field, the value and the fix, and never in the middle of a stream.
``load_spec_file`` reads a spec from a JSON or a TOML file.

Keys (only ``estimator`` and ``features`` are required):

- ``estimator``: a name from ``trainer.estimators.ESTIMATORS``.
- ``params``: constructor parameters of that estimator.
- ``scaler``: ``StandardScaler`` (default), ``MinMaxScaler``, ``MaxAbsScaler``
  or null (``"none"`` in TOML, which has no null).
- ``scaler_columns``: ``"all"`` (default) or ``"numeric"``, which leaves the
  one-hot columns of categorical features unscaled.
- ``features``: the feature schema (``modelstore.schema.FeatureSchema``).
- ``labels``: the label set of a classifier; absent for other tasks.
- ``batch``: ``{"max_records": N}``, the number of records per refit the
  spec's parameters are tuned for. ``streamfit train`` learns in batches of
  that size.
- ``gate``: optional publish-gate settings, see ``GateSettings``.
- ``onnx``: export settings, see ``OnnxSettings``.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import skl2onnx
from sklearn.base import BaseEstimator
from sklearn.preprocessing import MaxAbsScaler, MinMaxScaler, StandardScaler

from modelstore.base import ARTIFACT_KINDS
from modelstore.errors import SpecError
from modelstore.schema import NUMERIC, FeatureSchema, LabelSet
from trainer.estimators import (
    CLASSIFICATION,
    CLUSTERING,
    ESTIMATORS,
    REGRESSION,
    EstimatorInfo,
)
from trainer.params import check_params

SCALERS: dict[str, type[BaseEstimator]] = {
    "StandardScaler": StandardScaler,
    "MinMaxScaler": MinMaxScaler,
    "MaxAbsScaler": MaxAbsScaler,
}
DEFAULT_SCALER = "StandardScaler"

# Artifact kind of the graph with named inputs, published next to "onnx".
NAMED_ONNX = "onnx_named"
SCALER_COLUMNS = ("all", "numeric")

# Opsets an export may target. skl2onnx 1.20 tests its converters up to
# opset 22; below 13 ReduceSum and friends take attributes instead of inputs.
MIN_OPSET = 13
MAX_OPSET = skl2onnx.__max_supported_opset__
MIN_ML_OPSET = 1
MAX_ML_OPSET = 3
DEFAULT_OPSET = 18
DEFAULT_ML_OPSET = 3

# Output names of every exported graph; a graph with named inputs cannot
# also take a feature of one of these names.
OUTPUT_NAMES = ("label", "probabilities", "scores", "value", "cluster", "distances")

_TOP_LEVEL_KEYS = (
    "estimator", "params", "scaler", "scaler_columns", "features", "labels", "batch", "gate",
    "onnx",
)

# Specs shipped with the package, for example the default flights model.
BUILTIN_SPECS_DIR = Path(__file__).parent / "specs"


@dataclass(frozen=True)
class GateSettings:
    """The optional metric check of the publish gate.

    Before a version is published, the candidate learns the first part of
    the batch and is scored, together with the current version, on the
    remaining ``holdout_fraction`` of it, which neither has learned. A
    classifier is rejected when its accuracy is lower by more than
    ``max_accuracy_drop`` (absolute). Other models are rejected when their
    error is higher by more than ``max_error_increase``, relative to the
    current version's: the mean absolute error of a regressor, the mean
    squared distance of a clustering model. Batches whose holdout has fewer
    than ``min_holdout_rows`` rows skip the check.
    """

    max_accuracy_drop: float | None = None
    max_error_increase: float | None = None
    holdout_fraction: float = 0.2
    min_holdout_rows: int = 20

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.max_accuracy_drop is not None:
            out["max_accuracy_drop"] = self.max_accuracy_drop
        if self.max_error_increase is not None:
            out["max_error_increase"] = self.max_error_increase
        out["holdout_fraction"] = self.holdout_fraction
        out["min_holdout_rows"] = self.min_holdout_rows
        return out


@dataclass(frozen=True)
class OnnxSettings:
    """Export settings: the pinned opsets and the optional named-input graph.

    ``target_opset`` and ``ml_opset`` are the highest versions of the ONNX
    and ``ai.onnx.ml`` operator sets a graph may import. Pin them to what
    the oldest onnxruntime serving the model runs. ``named_inputs`` also
    exports a graph that takes one input per feature, see
    ``trainer.named_inputs``.
    """

    target_opset: int = DEFAULT_OPSET
    ml_opset: int = DEFAULT_ML_OPSET
    named_inputs: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_opset": self.target_opset,
            "ml_opset": self.ml_opset,
            "named_inputs": self.named_inputs,
        }

    def opsets(self) -> dict[str, int]:
        """Return the opsets in the form skl2onnx's ``target_opset`` takes."""
        return {"": self.target_opset, "ai.onnx.ml": self.ml_opset}


@dataclass(frozen=True)
class ModelSpec:
    """A validated model spec; build it with ``ModelSpec.from_dict``."""

    estimator: str
    params: Mapping[str, Any]
    scaler: str | None
    schema: FeatureSchema
    labels: LabelSet | None = None
    scaler_columns: str = "all"
    batch_max_records: int | None = None
    gate: GateSettings | None = None
    onnx: OnnxSettings = OnnxSettings()

    @property
    def info(self) -> EstimatorInfo:
        return ESTIMATORS[self.estimator]

    @property
    def task(self) -> str:
        return self.info.task

    @property
    def is_classifier(self) -> bool:
        return self.task == CLASSIFICATION

    @property
    def is_clusterer(self) -> bool:
        return self.task == CLUSTERING

    @property
    def has_probabilities(self) -> bool:
        return self.is_classifier and self.info.probabilities(self.params)

    @property
    def scaled_columns(self) -> tuple[int, ...]:
        """Indices of the encoded columns that the scaler transforms."""
        if self.scaler is None:
            return ()
        if self.scaler_columns == "all":
            return tuple(range(self.schema.width))
        columns, start = [], 0
        for feature in self.schema.features:
            if feature.kind == NUMERIC:
                columns.append(start)
            start += feature.width
        return tuple(columns)

    def make_estimator(self) -> BaseEstimator:
        return self.info.build(self.params)

    def make_scaler(self) -> BaseEstimator | None:
        return SCALERS[self.scaler]() if self.scaler else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "estimator": self.estimator,
            "params": dict(self.params),
            "scaler": self.scaler,
            "scaler_columns": self.scaler_columns,
            "features": self.schema.to_list(),
        }
        if self.labels is not None:
            out["labels"] = list(self.labels.labels)
        if self.batch_max_records is not None:
            out["batch"] = {"max_records": self.batch_max_records}
        if self.gate is not None:
            out["gate"] = self.gate.to_dict()
        out["onnx"] = self.onnx.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> "ModelSpec":
        if not isinstance(raw, Mapping):
            raise SpecError(
                f"spec: expected a JSON object with keys {', '.join(_TOP_LEVEL_KEYS)}, "
                f"got {type(raw).__name__}"
            )
        unknown = sorted(set(raw) - set(_TOP_LEVEL_KEYS))
        if unknown:
            raise SpecError(
                f"spec: unknown keys {unknown}; allowed keys are {', '.join(_TOP_LEVEL_KEYS)}"
            )

        info = _parse_estimator(raw.get("estimator"))
        schema = FeatureSchema.from_list(raw.get("features"))
        labels = _parse_labels(info, raw)
        params = check_params(info, raw.get("params", {}), n_labels=len(labels.labels) if labels else 0)
        scaler = _parse_scaler(raw.get("scaler", DEFAULT_SCALER))
        scaler_columns = _parse_scaler_columns(raw.get("scaler_columns", "all"), scaler, schema)
        _check_scaler_fits_estimator(info, scaler, scaler_columns)
        return cls(
            estimator=info.name,
            params=params,
            scaler=scaler,
            schema=schema,
            labels=labels,
            scaler_columns=scaler_columns,
            batch_max_records=_parse_batch(raw.get("batch")),
            gate=_parse_gate(info, raw.get("gate")),
            onnx=_parse_onnx(raw.get("onnx"), schema),
        )


def load_spec_file(path: str | Path) -> "ModelSpec":
    """Read and validate a spec from a ``.json`` or ``.toml`` file.

    Raises SpecError naming the file when it cannot be read or parsed, and
    the usual SpecError when its content is invalid.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"spec file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".toml":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"spec file {str(path)!r} is not valid TOML: {exc}") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(
                f"spec file {str(path)!r} is not valid JSON: {exc}; name a TOML spec *.toml"
            ) from None
    try:
        return ModelSpec.from_dict(raw)
    except SpecError as exc:
        raise SpecError(f"spec file {str(path)!r}: {exc}") from None


def builtin_spec(name: str) -> dict[str, Any]:
    """Return the raw spec shipped as ``trainer/specs/<name>.json``."""
    available = sorted(path.stem for path in BUILTIN_SPECS_DIR.glob("*.json"))
    if name not in available:
        raise SpecError(f"no built-in spec {name!r}; available specs are {', '.join(available)}")
    return json.loads((BUILTIN_SPECS_DIR / f"{name}.json").read_text(encoding="utf-8"))


def _parse_estimator(name: Any) -> EstimatorInfo:
    if name not in ESTIMATORS:
        raise SpecError(
            f"estimator: {name!r} is not supported; use one of {', '.join(ESTIMATORS)}"
        )
    return ESTIMATORS[name]


def _parse_scaler(name: Any) -> str | None:
    # TOML has no null, so the string "none" also means no scaler.
    if name is None or name == "none":
        return None
    if name not in SCALERS:
        raise SpecError(
            f"scaler: {name!r} is not supported; use {', '.join(map(repr, SCALERS))} "
            "or null for no scaling"
        )
    return name


def _parse_scaler_columns(value: Any, scaler: str | None, schema: FeatureSchema) -> str:
    if value not in SCALER_COLUMNS:
        raise SpecError(
            f"scaler_columns: {value!r} is invalid; use 'all' to scale every encoded column "
            "or 'numeric' to leave one-hot columns unscaled"
        )
    if value == "numeric" and scaler is not None:
        if not any(feature.kind == NUMERIC for feature in schema.features):
            raise SpecError(
                "scaler_columns: 'numeric' but the schema has no numeric feature; "
                "set scaler to null or scaler_columns to 'all'"
            )
    return value


def _check_scaler_fits_estimator(info: EstimatorInfo, scaler: str | None, columns: str) -> None:
    if info.non_negative_input and scaler == "StandardScaler":
        raise SpecError(
            f"scaler: 'StandardScaler' centers each feature on its mean, so about half "
            f"of the scaled values are negative, and {info.name} takes counts and rejects "
            "negative input; use 'MinMaxScaler', which scales the learned values into "
            "[0, 1], or null when every feature is already a non-negative count"
        )


def _parse_labels(info: EstimatorInfo, raw: Mapping[str, Any]) -> LabelSet | None:
    if info.task == CLASSIFICATION:
        if "labels" not in raw:
            raise SpecError(
                f"labels: missing; {info.name} is a classifier and needs the list of its "
                'labels, for example "labels": [0, 1]'
            )
        return LabelSet(raw["labels"])
    if "labels" in raw:
        kind = "a regressor" if info.task == REGRESSION else "a clustering model"
        raise SpecError(
            f"labels: {raw['labels']!r} given for {info.name}, which is {kind}; "
            "remove labels or use a classifier"
        )
    return None


def _parse_batch(raw: Any) -> int | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) - {"max_records"}:
        raise SpecError(f'batch: expected {{"max_records": N}}, got {raw!r}')
    value = raw.get("max_records")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"batch.max_records: {value!r} is invalid; use a positive integer")
    return value


def _parse_gate(info: EstimatorInfo, raw: Any) -> GateSettings | None:
    if raw is None:
        return None
    allowed = ("max_accuracy_drop", "max_error_increase", "holdout_fraction", "min_holdout_rows")
    if not isinstance(raw, Mapping):
        raise SpecError(f"gate: expected an object with keys {', '.join(allowed)}, got {raw!r}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise SpecError(f"gate: unknown keys {unknown}; allowed keys are {', '.join(allowed)}")

    metric_key = "max_accuracy_drop" if info.task == CLASSIFICATION else "max_error_increase"
    other_key = "max_error_increase" if metric_key == "max_accuracy_drop" else "max_accuracy_drop"
    if other_key in raw:
        raise SpecError(
            f"gate.{other_key}: {info.name} is a {info.task} model and is gated on "
            f"{'accuracy' if metric_key == 'max_accuracy_drop' else 'its error'}; "
            f"use gate.{metric_key}"
        )
    margin = raw.get(metric_key)
    if margin is not None:
        margin = _number(f"gate.{metric_key}", margin, low=0.0)
    fraction = _number("gate.holdout_fraction", raw.get("holdout_fraction", 0.2), low=0.0)
    if not 0.0 < fraction < 1.0:
        raise SpecError(f"gate.holdout_fraction: {fraction!r} is invalid; use a number in (0, 1)")
    rows = raw.get("min_holdout_rows", 20)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise SpecError(f"gate.min_holdout_rows: {rows!r} is invalid; use a positive integer")
    return GateSettings(
        max_accuracy_drop=margin if metric_key == "max_accuracy_drop" else None,
        max_error_increase=margin if metric_key == "max_error_increase" else None,
        holdout_fraction=fraction,
        min_holdout_rows=rows,
    )


def check_named_inputs(schema: FeatureSchema) -> None:
    """Raise SpecError when a feature name cannot be an input of the named-input graph."""
    for i, feature in enumerate(schema.features):
        if feature.name in OUTPUT_NAMES or feature.name.startswith(("model/", "encode/")):
            raise SpecError(
                f"features[{i}].name: {feature.name!r} is an output name or a reserved prefix "
                f"of the named-input ONNX graph (outputs {', '.join(OUTPUT_NAMES)}; prefixes "
                "model/ and encode/); rename the feature or set onnx.named_inputs to false"
            )


def _parse_onnx(raw: Any, schema: FeatureSchema) -> OnnxSettings:
    if raw is None:
        return OnnxSettings()
    allowed = ("target_opset", "ml_opset", "named_inputs")
    if not isinstance(raw, Mapping):
        raise SpecError(f"onnx: expected an object with keys {', '.join(allowed)}, got {raw!r}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise SpecError(f"onnx: unknown keys {unknown}; allowed keys are {', '.join(allowed)}")
    opset = _opset("onnx.target_opset", raw.get("target_opset", DEFAULT_OPSET), MIN_OPSET, MAX_OPSET)
    ml_opset = _opset("onnx.ml_opset", raw.get("ml_opset", DEFAULT_ML_OPSET), MIN_ML_OPSET, MAX_ML_OPSET)
    named = raw.get("named_inputs", False)
    if not isinstance(named, bool):
        raise SpecError(f"onnx.named_inputs: {named!r} is invalid; use true or false")
    if named:
        check_named_inputs(schema)
        if NAMED_ONNX not in ARTIFACT_KINDS:
            raise SpecError(
                f"onnx.named_inputs: true, but this store accepts only the artifact kinds "
                f"{', '.join(ARTIFACT_KINDS)} and not {NAMED_ONNX!r}; set it to false and "
                "export the named-input graph with `streamfit train --named-onnx FILE`"
            )
    return OnnxSettings(target_opset=opset, ml_opset=ml_opset, named_inputs=named)


def _opset(field: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(
            f"{field}: {value!r} is not supported; use an integer from {low} to {high} "
            f"(skl2onnx {skl2onnx.__version__} converts up to {high})"
        )
    return value


def _number(field: str, value: Any, *, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{field}: {value!r} is not a finite number")
    if value < low:
        raise SpecError(f"{field}: {value!r} is invalid; use a number >= {low}")
    return float(value)

