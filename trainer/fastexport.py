"""Fast export: write new weights into a cached ONNX graph instead of converting again.

Between two versions of a model usually only the weights change, while the
graph's nodes, shapes and names stay the same. ``ExportTemplate.build``
converts a learner once with skl2onnx and finds where each exported weight
sits in the graph. It converts a second time with every weight replaced by
a distinct marker value and looks the markers up in the graph's float
arrays (initializers and float attributes such as the Scaler's offsets),
directly, negated or as a reciprocal. ``rewrite`` then fills those places
from another learner of the same structure, without skl2onnx.

A graph array that changes with the weights in any other way (for example
GaussianNB's sum of log variances, or the squared norms of k-means centers)
cannot be rewritten, and ``build`` returns None. A template is also only
kept when rewriting the learner it was built from reproduces skl2onnx's
bytes exactly. Each rewritten graph still goes through the publish gate's
parity check, like a converted one.
"""

from __future__ import annotations

import copy
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from onnx import AttributeProto, ModelProto, TensorProto, numpy_helper

from trainer.estimators import EXPORTED_ATTRIBUTES
from trainer.export import convert
from trainer.learner import Learner
from trainer.scaling import exported_attributes

# Markers are integers from MARKER_BASE on: exact in float32 up to 2**24,
# and far from the small constants (0, 1, -1, class counts) of a graph.
MARKER_BASE = 4096.0
_IDENTITY, _NEGATE, _RECIPROCAL = 0, 1, 2


@dataclass
class _Slot:
    """One graph float array and, per element, the weight it holds."""

    location: tuple          # ("init", index) or ("attr", node index, attribute index)
    shape: tuple[int, ...]
    constant: np.ndarray     # float32 values used where ``mapped`` is False
    mapped: np.ndarray       # bool per element
    source: np.ndarray       # index into the flat weight vector
    transform: np.ndarray    # _IDENTITY, _NEGATE or _RECIPROCAL


class ExportTemplate:
    """A converted graph and the places of the weights in it; reusable while
    ``signature(learner)`` stays the same."""

    def __init__(self, proto: ModelProto, slots: list[_Slot], signature: tuple):
        self.proto = proto
        self.slots = slots
        self.signature = signature
        self._lock = threading.Lock()

    @classmethod
    def build(cls, learner: Learner, proto: ModelProto | None = None) -> "ExportTemplate | None":
        """Return a template for ``learner``'s structure, or None when it cannot be rewritten.

        ``proto`` is the learner's conversion when the caller already has it.
        """
        proto = proto if proto is not None else convert(learner)
        names, real = _weights(learner)
        if not real:
            return None
        markers = _marker_learner(learner, names, real)
        if markers is None:
            return None
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                marked = convert(markers)
        except Exception:  # a converter that rejects the marker values cannot be templated
            return None

        slots = _match(proto, marked, sum(array.size for array in real))
        if slots is None:
            return None
        template = cls(copy.deepcopy(proto), slots, signature(learner))
        if template.rewrite(learner) != proto.SerializeToString():
            return None
        return template

    def rewrite(self, learner: Learner) -> bytes:
        """Return the graph with ``learner``'s weights; the caller checks the signature."""
        _, arrays = _weights(learner)
        flat = np.concatenate([array.ravel() for array in arrays])
        with self._lock:
            for slot in self.slots:
                _write(self.proto, slot, _values(slot, flat))
            return self.proto.SerializeToString()


def signature(learner: Learner) -> tuple:
    """Return what must stay equal for a template to fit: the spec, the shapes and the classes."""
    names, arrays = _weights(learner)
    classes = getattr(learner.estimator_, "classes_", None)
    return (
        repr(sorted(learner.spec.to_dict().items())),
        tuple(names),
        tuple(array.shape for array in arrays),
        None if classes is None else tuple(classes.tolist()),
    )


def _weights(learner: Learner) -> tuple[list[str], list[np.ndarray]]:
    """Return the names and float64 values of the weights the graph is made from."""
    names: list[str] = []
    arrays: list[np.ndarray] = []
    scaler = learner.export_scaler()
    if scaler is not None:
        for name in exported_attributes(scaler):
            names.append(f"scaler.{name}")
            arrays.append(np.asarray(getattr(scaler, name), dtype=np.float64))
    for name in EXPORTED_ATTRIBUTES[learner.spec.info.family]:
        value = getattr(learner.estimator_, name)
        if isinstance(value, list):
            for i, item in enumerate(value):
                names.append(f"{name}[{i}]")
                arrays.append(np.asarray(item, dtype=np.float64))
        else:
            names.append(name)
            arrays.append(np.asarray(value, dtype=np.float64))
    return names, arrays


def _marker_learner(learner: Learner, names: list[str], arrays: list[np.ndarray]) -> Learner | None:
    """Return a copy of ``learner`` whose exported weights are distinct markers."""
    total = sum(array.size for array in arrays)
    if MARKER_BASE + total >= 2**24:
        return None
    marked = copy.deepcopy(learner)
    start = MARKER_BASE
    scaler = marked.export_scaler()
    for name, array in zip(names, arrays):
        values = np.arange(start, start + array.size, dtype=np.float64).reshape(array.shape)
        start += array.size
        owner_name, _, attribute = name.rpartition(".")
        if owner_name == "scaler":
            setattr(scaler, attribute, values)
        elif name.endswith("]"):
            attribute, index = name[:-1].split("[")
            getattr(marked.estimator_, attribute)[int(index)] = values
        else:
            setattr(marked.estimator_, name, values)
    if scaler is not None:
        # The export reads the full-width scaler; pin the marked one.
        marked.export_scaler = lambda: scaler
    return marked


def _float_arrays(proto: ModelProto) -> Iterator[tuple[tuple, np.ndarray]]:
    for i, tensor in enumerate(proto.graph.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            yield ("init", i), numpy_helper.to_array(tensor)
    for i, node in enumerate(proto.graph.node):
        for j, attribute in enumerate(node.attribute):
            if attribute.type == AttributeProto.FLOATS:
                yield ("attr", i, j), np.asarray(attribute.floats, dtype=np.float32)


def _match(proto: ModelProto, marked: ModelProto, total: int) -> list[_Slot] | None:
    real = dict(_float_arrays(proto))
    other = dict(_float_arrays(marked))
    if real.keys() != other.keys() or len(proto.graph.node) != len(marked.graph.node):
        return None

    slots = []
    for location, values in real.items():
        found = other[location].astype(np.float32).ravel()
        if found.shape != values.ravel().shape:
            return None
        source, transform, mapped = _decode(found, total)
        unchanged = found == values.ravel()
        if not (mapped | unchanged).all():
            return None  # an element changes with the weights in a way markers cannot name
        if mapped.any():
            slots.append(_Slot(location, values.shape, values.ravel().copy(), mapped, source, transform))
    return slots


def _decode(found: np.ndarray, total: int):
    """Return, per element, the marker index, its transform and whether one matched."""
    values = found.astype(np.float64)
    source = np.zeros(values.shape, dtype=np.int64)
    transform = np.full(values.shape, _IDENTITY)
    mapped = np.zeros(values.shape, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        candidates = (
            (_IDENTITY, values),
            (_NEGATE, -values),
            (_RECIPROCAL, np.round(1.0 / values)),
        )
    for code, candidate in candidates:
        index = candidate - MARKER_BASE
        ok = ~mapped & np.isfinite(index) & (index >= 0) & (index < total) & (index == np.round(index))
        ok[ok] &= _apply(code, candidate[ok]) == found[ok]
        source[ok] = index[ok].astype(np.int64)
        transform[ok] = code
        mapped |= ok
    return source, transform, mapped


def _apply(code: int, weights: np.ndarray) -> np.ndarray:
    # skl2onnx computes in float64 and casts to float32 last, for example the
    # Scaler's scale = float32(1 / scale_).
    if code == _NEGATE:
        return (-weights).astype(np.float32)
    if code == _RECIPROCAL:
        with np.errstate(divide="ignore"):
            return (1.0 / weights).astype(np.float32)
    return weights.astype(np.float32)


def _values(slot: _Slot, flat: np.ndarray) -> np.ndarray:
    out = slot.constant.copy()
    for code in (_IDENTITY, _NEGATE, _RECIPROCAL):
        where = slot.mapped & (slot.transform == code)
        if where.any():
            out[where] = _apply(code, flat[slot.source[where]])
    return out.reshape(slot.shape)


def _write(proto: ModelProto, slot: _Slot, values: np.ndarray) -> None:
    if slot.location[0] == "init":
        # Keep the tensor's encoding (raw bytes or a repeated field), so the
        # rewritten graph is byte-identical to a conversion of the same weights.
        tensor = proto.graph.initializer[slot.location[1]]
        values = np.ascontiguousarray(values, dtype="<f4")
        if tensor.raw_data:
            tensor.raw_data = values.tobytes()
        else:
            del tensor.float_data[:]
            tensor.float_data.extend(values.ravel().tolist())
        return
    _, node, attribute = slot.location
    target: Any = proto.graph.node[node].attribute[attribute]
    del target.floats[:]
    target.floats.extend(values.ravel().tolist())
