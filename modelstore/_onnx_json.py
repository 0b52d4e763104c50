"""ONNX as a JSON document: the graph in protobuf's JSON mapping, the tensor data beside it.

A model stored this way has two parts. The first is the ``ModelProto`` in
the JSON mapping of protobuf (``google.protobuf.json_format``, camelCase
field names), which anyone can read with their own tools. The second is
one binary blob with the data of every tensor of 1 KiB or more. Each such
tensor keeps its name, type and dims in the JSON. Its data is marked
external the way ONNX does it (``dataLocation: EXTERNAL``, with
``location``, ``offset`` and ``length`` entries). An extra ``field`` entry
names the ``TensorProto`` field that the data came from. Without that split a 50 MB model
would be a JSON document of more than 100 MB of number literals, above
Couchbase's 20 MiB value limit.

``join`` rebuilds exactly the bytes that ``split`` was given: packed float
and double fields are restored byte for byte, and the JSON mapping of
protobuf round-trips every other field. ``split`` checks that and raises
ValueError for a model that would not come back identical.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np

DATA_LOCATION = "onnx_data"
# Tensors with less data than this stay inline, so small constants (class
# labels, shapes, intercepts) are readable in the JSON document.
EXTERNAL_MIN_BYTES = 1024

# TensorProto fields that can carry a tensor's data, with their field number
# and the little-endian dtype of one element. raw_data has no dtype.
_FIELDS = {
    "float_data": (4, "<f4"),
    "int32_data": (5, "<i4"),
    "int64_data": (7, "<i8"),
    "raw_data": (9, None),
    "double_data": (10, "<f8"),
    "uint64_data": (11, "<u8"),
}
# Packed fixed-width fields come back through MergeFromString of their wire
# encoding, which takes 0.1 s for 50 MB where extend() of a list takes 1 s.
_FIXED_WIDTH = {"float_data", "double_data"}


def split(onnx_bytes: bytes) -> tuple[bytes, bytes]:
    """Return the JSON document (UTF-8) and the tensor data blob of a serialized ONNX model.

    Raises ValueError when the bytes are not an ONNX model, when a tensor
    already uses external data, or when the parts would not rebuild the
    same bytes.
    """
    import onnx
    from google.protobuf import json_format
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(onnx_bytes)
    except DecodeError as exc:
        raise ValueError(f"the artifact is not a serialized ONNX model ({exc})") from None

    blob = bytearray()
    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"tensor {tensor.name!r} already refers to external data")
        for name, (_, dtype) in _FIELDS.items():
            data = _field_bytes(tensor, name, dtype)
            if data is None or len(data) < EXTERNAL_MIN_BYTES:
                continue
            tensor.ClearField(name)
            entries = {"location": DATA_LOCATION, "offset": str(len(blob)),
                       "length": str(len(data)), "field": name}
            for key, value in entries.items():
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            blob += data
            break

    document = json.dumps(
        json_format.MessageToDict(model), sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode()
    data = bytes(blob)
    if join(document, data) != onnx_bytes:
        raise ValueError("the JSON form does not rebuild the same ONNX bytes")
    return document, data


def join(document: bytes, data: bytes) -> bytes:
    """Rebuild the serialized ONNX model from its JSON document and tensor data blob.

    Raises ValueError when the document is not an ONNX model in JSON or
    refers to data outside the blob.
    """
    import onnx
    from google.protobuf import json_format

    model = onnx.ModelProto()
    try:
        json_format.Parse(document.decode(), model)
    except (UnicodeDecodeError, json_format.ParseError) as exc:
        raise ValueError(f"the JSON document is not an ONNX model ({exc})") from None

    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        if entries.get("location") != DATA_LOCATION or entries.get("field") not in _FIELDS:
            raise ValueError(f"tensor {tensor.name!r} has unknown external data {entries}")
        try:
            offset, length = int(entries["offset"]), int(entries["length"])
        except (KeyError, ValueError):
            raise ValueError(f"tensor {tensor.name!r} has an invalid offset or length: {entries}") from None
        if offset < 0 or length < 0 or offset + length > len(data):
            raise ValueError(
                f"tensor {tensor.name!r} refers to bytes {offset}..{offset + length} "
                f"of a {len(data)}-byte data blob"
            )
        tensor.ClearField("external_data")
        tensor.ClearField("data_location")
        _restore_field(tensor, entries["field"], data[offset:offset + length])
    return model.SerializeToString()


def _field_bytes(tensor, name: str, dtype: str | None) -> bytes | None:
    if name == "raw_data":
        return tensor.raw_data if tensor.HasField("raw_data") else None
    values = getattr(tensor, name)
    if not len(values):
        return None
    return np.asarray(values, dtype=dtype).tobytes()


def _restore_field(tensor, name: str, data: bytes) -> None:
    number, dtype = _FIELDS[name]
    if name == "raw_data":
        tensor.raw_data = data
    elif name in _FIXED_WIDTH:
        tensor.MergeFromString(_varint((number << 3) | 2) + _varint(len(data)) + data)
    else:
        getattr(tensor, name).extend(np.frombuffer(data, dtype=dtype).tolist())


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _tensors(model) -> Iterator:
    """Yield every TensorProto of a model: initializers, attributes, subgraphs and functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph) -> Iterator:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node) -> Iterator:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values
            yield attribute.sparse_tensor.indices
        for sparse in attribute.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)
