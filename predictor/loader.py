"""Load one model version from the store into a warmed onnxruntime session.

A version is served only after every step here succeeded. Its metadata
describes an ONNX artifact, and the artifact matches its sha256 (the store
checks it). onnxruntime builds a session from the bytes, and the session's
input and outputs match the metadata. One inference on a zero row returns
arrays of the expected shapes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from modelstore.base import ONNX, ModelStore
from modelstore.errors import (
    ArtifactCorrupt,
    ModelNotFound,
    SpecError,
    StoreError,
    StreamfitError,
    VersionNotFound,
)
from modelstore.schema import Feature, FeatureSchema, LabelSet

from predictor.settings import PredictorSettings

OUTPUT_KINDS = ("label", "probabilities", "scores", "value")
# Estimated resident memory of one session: a fixed part plus twice the
# ONNX bytes (the graph's initializers are copied into the session's own
# tensors). Measured with onnxruntime 1.32 on x86-64 Linux: about 140 KiB
# for an 833-byte linear model and 33 MB for a 16.8 MB network.
SESSION_OVERHEAD_BYTES = 160 * 1024
CLASSIFIER_OUTPUTS = ("label", "probabilities", "scores")
REGRESSOR_OUTPUTS = ("value",)


class LoadFailed(StreamfitError):
    """A model version could not be loaded or warmed, so it is not served.

    ``result`` is the metric label (corrupt, invalid, warm_failed,
    unavailable, no_artifact). Only ``unavailable`` (a store error) is
    retriable, because the other results come from stored bytes, which never
    change. ``public`` is the message for clients: it leaves out the store's
    own message, which names internal hosts and paths.
    """

    def __init__(self, result: str, message: str, public: str | None = None):
        super().__init__(message)
        self.result = result
        self.retriable = result == "unavailable"
        self.public = message if public is None else public


@dataclass(eq=False)
class LoadedModel:
    """A warmed onnxruntime session of one model version and what serving it needs.

    ``classes`` is the label of each probability or score column, in column
    order; None for a regressor. ``outputs`` maps the output kinds in
    OUTPUT_KINDS to the ONNX output names.
    """

    name: str
    version: int
    publish_id: str
    created_at: float | None
    task: str
    schema: FeatureSchema
    classes: tuple[Any, ...] | None
    input_name: str
    outputs: Mapping[str, str]
    session: ort.InferenceSession
    load_seconds: float
    estimated_bytes: int = SESSION_OVERHEAD_BYTES
    features_by_name: Mapping[str, Feature] = field(init=False, repr=False)
    category_index: tuple[Mapping[str, int], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Built once per version, so decoding a request of many inputs
        # never rebuilds them per input.
        self.features_by_name = {f.name: f for f in self.schema.features}
        self.category_index = tuple(
            {category: j for j, category in enumerate(f.vocabulary)} for f in self.schema.features
        )

    @property
    def is_classifier(self) -> bool:
        return self.task == "classification"

    def predict(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Run the session on a (n, width) float32 array; return arrays by output kind."""
        kinds = list(self.outputs)
        arrays = self.session.run([self.outputs[k] for k in kinds], {self.input_name: rows})
        return dict(zip(kinds, arrays))

    def age_seconds(self, now: float | None = None) -> float | None:
        if self.created_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.created_at)


def session_options(settings: PredictorSettings) -> ort.SessionOptions:
    """Build SessionOptions with the configured thread counts.

    onnxruntime's defaults size its thread pools by the host's cores, which
    oversubscribes a container whose CPU quota is smaller, so the counts are
    always set explicitly.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads keep polling for work after an inference, so several
    # predictor processes on a small CPU quota would take each other's time.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def load_version(
    store: ModelStore, name: str, version: int, settings: PredictorSettings
) -> LoadedModel:
    """Load, check and warm one version of a model.

    Raises ModelNotFound or VersionNotFound from the store unchanged, and
    LoadFailed for everything that keeps the version from being served.
    """
    started = time.perf_counter()
    where = f"model {name!r} version {version}"
    try:
        info = store.version(name, version)
    except (ModelNotFound, VersionNotFound):
        raise
    except StoreError as exc:
        raise _store_failure(exc, where) from None
    metadata = info.metadata

    if ONNX not in metadata.get("artifacts", {}) or "onnx" not in metadata:
        raise LoadFailed(
            "no_artifact",
            f"{where} has no ONNX artifact (version 0 carries only the spec); "
            "publish a trained version first",
        )
    schema, classes, task = _read_spec(metadata, where)
    onnx_meta = metadata["onnx"]
    input_name, outputs = _read_onnx_meta(onnx_meta, schema, task, where)

    try:
        data = store.artifact(info, ONNX)
    except StoreError as exc:
        raise _store_failure(exc, where) from None

    # onnxruntime's errors share no base class below Exception.
    try:
        session = ort.InferenceSession(
            data, session_options(settings), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise LoadFailed("invalid", f"{where}: onnxruntime cannot load the artifact: {exc}") from None
    _check_signature(session, input_name, schema.width, outputs, where)

    model = LoadedModel(
        name=name,
        version=info.version,
        publish_id=info.publish_id,
        created_at=_float_or_none(metadata.get("created_at")),
        task=task,
        schema=schema,
        classes=classes,
        input_name=input_name,
        outputs=outputs,
        session=session,
        load_seconds=0.0,
        estimated_bytes=SESSION_OVERHEAD_BYTES + 2 * len(data),
    )
    _warm(model, where)
    model.load_seconds = time.perf_counter() - started
    return model


def _store_failure(exc: StoreError, where: str) -> LoadFailed:
    if isinstance(exc, ArtifactCorrupt):
        return LoadFailed(
            "corrupt", f"{where}: {exc}",
            public=f"{where}: its stored metadata or artifact is corrupt; the predictor log "
            "has the details",
        )
    return LoadFailed(
        "unavailable", f"{where}: {exc}",
        public=f"{where}: the model store is unavailable; retry later",
    )


def _read_spec(
    metadata: Mapping[str, Any], where: str
) -> tuple[FeatureSchema, tuple[Any, ...] | None, str]:
    spec = metadata.get("spec")
    if not isinstance(spec, Mapping):
        raise LoadFailed("invalid", f"{where}: metadata has no 'spec' object")
    try:
        schema = FeatureSchema.from_list(spec.get("features"))
    except SpecError as exc:
        raise LoadFailed("invalid", f"{where}: invalid feature schema: {exc}") from None

    task = metadata.get("task")
    if task not in ("classification", "regression"):
        task = "classification" if spec.get("labels") else "regression"
    if task == "regression":
        return schema, None, task

    onnx_classes = metadata["onnx"].get("classes") if isinstance(metadata.get("onnx"), Mapping) else None
    try:
        labels = LabelSet(onnx_classes if onnx_classes is not None else spec.get("labels"))
    except SpecError as exc:
        raise LoadFailed("invalid", f"{where}: invalid label set: {exc}") from None
    if onnx_classes is not None:
        return schema, labels.labels, task
    # scikit-learn stores classes_ as the sorted unique labels, and skl2onnx
    # orders the probability columns by classes_, not by the spec's order.
    return schema, tuple(sorted(labels.labels)), task


def _read_onnx_meta(
    onnx_meta: Any, schema: FeatureSchema, task: str, where: str
) -> tuple[str, dict[str, str]]:
    if not isinstance(onnx_meta, Mapping):
        raise LoadFailed("invalid", f"{where}: metadata 'onnx' is not an object")
    input_name = onnx_meta.get("input")
    width = onnx_meta.get("width")
    raw_outputs = onnx_meta.get("outputs")
    if not isinstance(input_name, str) or not isinstance(raw_outputs, Mapping):
        raise LoadFailed("invalid", f"{where}: metadata 'onnx' lacks 'input' or 'outputs'")
    if width != schema.width:
        raise LoadFailed(
            "invalid",
            f"{where}: ONNX input width {width!r} differs from the feature schema's "
            f"width {schema.width}",
        )

    # Kinds of the other task are left out: a regressor has no label to serve.
    kinds = CLASSIFIER_OUTPUTS if task == "classification" else REGRESSOR_OUTPUTS
    outputs = {k: v for k, v in raw_outputs.items() if k in kinds and isinstance(v, str)}
    needed = "label" if task == "classification" else "value"
    if needed not in outputs:
        raise LoadFailed(
            "invalid", f"{where}: metadata 'onnx.outputs' names no {needed!r} output for a {task} model"
        )
    return input_name, outputs


def _check_signature(
    session: ort.InferenceSession, input_name: str, width: int, outputs: Mapping[str, str], where: str
) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != input_name or inputs[0].type != "tensor(float)":
        found = [(i.name, i.type) for i in inputs]
        raise LoadFailed(
            "invalid", f"{where}: expected one float input {input_name!r}, the graph has {found}"
        )
    shape = inputs[0].shape
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != width):
        raise LoadFailed(
            "invalid", f"{where}: input {input_name!r} has shape {shape}, expected [N, {width}]"
        )
    graph_outputs = {o.name for o in session.get_outputs()}
    missing = sorted(set(outputs.values()) - graph_outputs)
    if missing:
        raise LoadFailed(
            "invalid", f"{where}: outputs {missing} are named in the metadata but not in the graph "
            f"{sorted(graph_outputs)}",
        )


def _warm(model: LoadedModel, where: str) -> None:
    """Run one inference on a zero row and check the shapes and types of the results."""
    try:
        arrays = model.predict(np.zeros((1, model.schema.width), dtype=np.float32))
    except Exception as exc:
        raise LoadFailed("warm_failed", f"{where}: warm-up inference failed: {exc}") from None

    for kind, array in arrays.items():
        if array.ndim == 0 or array.shape[0] != 1:
            raise LoadFailed(
                "warm_failed", f"{where}: output {kind!r} has shape {array.shape} for one row"
            )
        if kind in ("probabilities", "scores"):
            columns = len(model.classes) if model.classes else None
            if array.ndim != 2 or array.shape[1] != columns:
                raise LoadFailed(
                    "warm_failed",
                    f"{where}: output {kind!r} has shape {array.shape}, expected (1, {columns}) "
                    f"for classes {list(model.classes or ())}",
                )
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise LoadFailed("warm_failed", f"{where}: output {kind!r} is not finite on a zero row")
    for kind, array in arrays.items():
        _check_output_type(model, kind, array, where)

    if model.is_classifier:
        _check_class_order(model, arrays, where)


def _check_output_type(model: LoadedModel, kind: str, array: np.ndarray, where: str) -> None:
    """Raise LoadFailed unless an output's rank and dtype fit its kind.

    The metadata maps kinds to graph outputs by name only, so a wrong
    mapping would otherwise serve probabilities as labels, for example.
    """
    if kind == "label":
        wants_int = bool(model.classes) and isinstance(model.classes[0], int)
        fits = array.ndim == 1 and (
            array.dtype.kind in "iu" if wants_int else array.dtype.kind in "OUS"
        )
        label_type = "integers" if wants_int else "strings"
        expected = f"(n,) {label_type} like the labels {list(model.classes or ())}"
    elif kind == "value":
        fits = array.dtype.kind == "f" and (array.ndim == 1 or array.shape[1:] == (1,))
        expected = "(n,) or (n, 1) floats"
    else:
        fits = array.dtype.kind == "f"
        expected = "floats"
    if not fits:
        raise LoadFailed(
            "warm_failed",
            f"{where}: output {kind!r} has shape {array.shape} and dtype {array.dtype}, "
            f"expected {expected}; the metadata 'onnx.outputs' names the wrong graph output "
            "or the wrong labels",
        )


def _check_class_order(model: LoadedModel, arrays: Mapping[str, np.ndarray], where: str) -> None:
    # The label output must be the class of the highest column; a mismatch
    # means the column order assumed for "classes" is wrong. A tie proves
    # nothing, so it is not checked.
    columns = arrays.get("probabilities", arrays.get("scores"))
    if columns is None:
        return
    row = columns[0]
    best = int(np.argmax(row))
    if np.count_nonzero(row == row[best]) > 1:
        return
    label = arrays["label"][0]
    label = label.item() if hasattr(label, "item") else label
    if label != model.classes[best]:
        raise LoadFailed(
            "warm_failed",
            f"{where}: the label output {label!r} is not the class of the highest column "
            f"({model.classes[best]!r} of {list(model.classes)}); the class order is unknown",
        )


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    # A NaN, infinite or overflowing time has no JSON number, so it counts
    # as unknown.
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
