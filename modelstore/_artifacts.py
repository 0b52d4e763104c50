"""How one artifact of a version is laid out in stored parts, and put back together.

A binary artifact is one part, stored under its own kind. The ONNX artifact
in the JSON format is two parts, ``onnx_json`` (the graph as protobuf's
JSON mapping) and ``onnx_data`` (the tensor data). Its metadata entry keeps
the sha256 and size of the ONNX bytes that were published, and each part
has its own sha256, size and chunk list.

An entry may name the publish id that stores its chunks (``publish_id``).
Rollback and import write entries that refer to the chunks of another
version this way, so no bytes are copied. Without it, the chunks belong
to the version itself.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, NamedTuple

from modelstore import _chunks, _onnx_json
from modelstore.base import ONNX, ONNX_BINARY, ONNX_FORMATS, ONNX_JSON, Reuse, VersionInfo
from modelstore.errors import ArtifactCorrupt, ConfigError, InvalidInputError, VersionNotFound

log = logging.getLogger(__name__)

JSON_PART = "onnx_json"
DATA_PART = "onnx_data"
RESERVED_KINDS = frozenset({JSON_PART, DATA_PART})


class Part(NamedTuple):
    """One stored part of an artifact: the publish id and kind its chunk keys use, and its entry."""

    publish_id: str
    kind: str
    entry: Mapping[str, Any]


def check_format(onnx_format: object) -> str:
    if onnx_format not in ONNX_FORMATS:
        raise ConfigError(
            f"invalid onnx_format {onnx_format!r}: expected one of {', '.join(ONNX_FORMATS)}"
        )
    return onnx_format


def encode(model: str, kind: str, data: bytes, onnx_format: str) -> dict[str, bytes]:
    """Return the parts to store for one artifact, by storage kind."""
    if kind != ONNX or onnx_format != ONNX_JSON:
        return {kind: data}
    try:
        document, tensors = _onnx_json.split(data)
    except ValueError as exc:
        # The format is a preference for readers; the binary form serves
        # the same model, so the publish goes on with it.
        log.warning(
            "model %r: storing the ONNX artifact in binary instead of JSON (%s)", model, exc
        )
        return {kind: data}
    return {JSON_PART: document, DATA_PART: tensors}


def describe(kind: str, data: bytes, chunks: Mapping[str, list[bytes]]) -> dict[str, Any]:
    """Build the metadata entry of an artifact from its bytes and the chunks of its parts."""
    if list(chunks) == [kind]:
        return _chunks.describe(chunks[kind])
    whole = _chunks.describe([data])
    return {
        "format": ONNX_JSON,
        "sha256": whole["sha256"],
        "size": whole["size"],
        "parts": {part: _chunks.describe(parts) for part, parts in chunks.items()},
    }


def reused_entry(model: str, kind: str, reuse: Reuse) -> dict[str, Any]:
    """Return the entry of a version that refers to the stored chunks of ``reuse``."""
    info = reuse.info
    if not isinstance(info, VersionInfo) or info.model != model:
        raise InvalidInputError(
            f"invalid Reuse for artifact {kind!r} of model {model!r}: it must name a version "
            f"of the same model, not {getattr(info, 'model', info)!r}"
        )
    entry = info.metadata.get("artifacts", {}).get(reuse.kind)
    if entry is None:
        raise VersionNotFound(
            f"version {info.version} of model {model!r} has no {reuse.kind!r} artifact to reuse"
        )
    return {**entry, "publish_id": entry.get("publish_id", info.publish_id)}


def parts(info: VersionInfo, kind: str) -> list[Part]:
    """Return the stored parts of one artifact of ``info``; raise VersionNotFound if it has none."""
    artifacts = info.metadata.get("artifacts", {})
    entry = artifacts.get(kind)
    if entry is None:
        raise VersionNotFound(
            f"version {info.version} of model {info.model!r} has no {kind!r} artifact "
            f"(it has: {sorted(artifacts) or 'none'})"
        )
    return entry_parts(info, kind, entry)


def entry_parts(info: VersionInfo, kind: str, entry: Any) -> list[Part]:
    where = f"model {info.model!r} version {info.version} artifact {kind!r}"
    if not isinstance(entry, Mapping):
        raise ArtifactCorrupt(f"metadata of {where} is not an object: {entry!r}")
    publish_id = entry.get("publish_id", info.publish_id)
    if not isinstance(publish_id, str):
        raise ArtifactCorrupt(f"metadata of {where} names an invalid publish id {publish_id!r}")
    if entry.get("format", ONNX_BINARY) == ONNX_BINARY:
        return [Part(publish_id, kind, entry)]
    stored = entry.get("parts")
    if entry.get("format") != ONNX_JSON or not isinstance(stored, Mapping) or set(stored) != RESERVED_KINDS:
        raise ArtifactCorrupt(f"metadata of {where} has an unknown format or parts: {str(entry)[:200]}")
    return [Part(publish_id, JSON_PART, stored[JSON_PART]), Part(publish_id, DATA_PART, stored[DATA_PART])]


def assemble(info: VersionInfo, kind: str, data: Mapping[str, bytes]) -> bytes:
    """Return the artifact from its verified parts (by storage kind), checked against its entry."""
    entry = info.metadata["artifacts"][kind]
    if entry.get("format", ONNX_BINARY) == ONNX_BINARY:
        return data[kind]
    where = f"model {info.model!r} version {info.version} artifact {kind!r}"
    try:
        rebuilt = _onnx_json.join(data[JSON_PART], data[DATA_PART])
    except ValueError as exc:
        raise ArtifactCorrupt(f"{where} in the JSON format cannot be read back: {exc}") from None
    return _chunks.join_verified([rebuilt], entry, where)


def storage_refs(info: VersionInfo) -> set[tuple[str, str, int]]:
    """Return (publish id, storage kind, number of chunks) of every stored part ``info`` refers to."""
    refs = set()
    for kind, entry in info.metadata.get("artifacts", {}).items():
        for part in entry_parts(info, kind, entry):
            chunks = _chunks.expected_chunks(part.entry, f"{info.model}::{part.publish_id}::{part.kind}")
            refs.add((part.publish_id, part.kind, len(chunks)))
    return refs
