"""Backend-independent steps of create_model and publish: checks and metadata."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from modelstore import _artifacts, _chunks
from modelstore.base import ONNX_BINARY, Head, Reuse, VersionInfo
from modelstore.errors import ArtifactCorrupt, ArtifactTooLarge, InvalidInputError, VersionConflict
from modelstore.names import validate_model_name

# Artifact kinds become parts of store keys, so they follow the same rules as
# model names, only shorter and lower case.
_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")

# Fields that the store sets on every version, whatever the caller passes.
STORE_FIELDS = frozenset(
    {"model", "version", "parent", "parent_id", "publish_id", "created_at", "artifacts",
     "rolled_back_from", "source_version", "imported"}
)

DEFAULT_MAX_ARTIFACT_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True)
class PublishPlan:
    """Everything one publish writes: the chunks of each artifact and the version metadata."""

    model: str
    version: int
    publish_id: str
    chunks: Mapping[str, list[bytes]]
    metadata: Mapping[str, Any]
    # Versions whose stored artifacts the new version refers to (Reuse).
    reused_versions: tuple[int, ...] = ()


def new_publish_id() -> str:
    return uuid.uuid4().hex


def validate_kind(kind: object) -> str:
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise InvalidInputError(
            f"invalid artifact kind {kind!r}: use 1 to 32 lower-case ASCII letters, "
            "digits or '_', starting with a letter (for example 'onnx' or 'state')"
        )
    if kind in _artifacts.RESERVED_KINDS:
        raise InvalidInputError(
            f"invalid artifact kind {kind!r}: the store keeps the parts of ONNX-as-JSON "
            f"under {sorted(_artifacts.RESERVED_KINDS)}; choose another name"
        )
    return kind


def validate_version_number(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InvalidInputError(
            f"invalid version {version!r}: expected an integer >= 0, or None for the latest"
        )
    return version


def check_expected_head(expected: object) -> Head:
    """Reject a head the caller did not read from a store before any store access."""
    if not isinstance(expected, Head):
        raise InvalidInputError(
            f"invalid expected head {expected!r}: pass the Head returned by store.head(model)"
        )
    validate_model_name(expected.model)
    if expected.cas is None or expected.cas == 0:
        # A zero CAS means "no check" to Couchbase; a head without a token
        # cannot prove that it is still current, so it always loses.
        raise VersionConflict(
            f"model {expected.model!r}: the expected head carries no CAS token "
            f"({expected.cas!r}); read it again with store.head({expected.model!r})"
        )
    return expected


def encode_json(document: Mapping[str, Any], description: str) -> str:
    """Serialize ``document`` as strict JSON (no NaN or Infinity), naming ``description`` on failure."""
    try:
        return json.dumps(document, allow_nan=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"invalid {description}: it must be JSON with finite numbers only ({exc})"
        ) from exc


def initial_metadata(model: str, spec: Mapping[str, Any], publish_id: str) -> dict[str, Any]:
    """Build the metadata of version 0: the spec, nothing learned, no artifacts."""
    if not isinstance(spec, Mapping):
        raise InvalidInputError(
            f"invalid spec for model {model!r}: expected a JSON object, got {type(spec).__name__}"
        )
    metadata = {
        "spec": dict(spec),
        "samples_learned": 0,
        "metrics": {},
        "offsets": {},
        "model": model,
        "version": 0,
        "parent": None,
        "parent_id": None,
        "publish_id": publish_id,
        "created_at": time.time(),
        "artifacts": {},
    }
    encode_json(metadata, f"spec of model {model!r}")
    return metadata


def plan_publish(
    expected: Head,
    artifacts: Mapping[str, Any],
    metadata: Mapping[str, Any],
    *,
    chunk_size_bytes: int,
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
    onnx_format: str = ONNX_BINARY,
    lineage: Mapping[str, Any] | None = None,
) -> PublishPlan:
    """Check a publish request and build its chunks and metadata, without any store access.

    ``lineage`` contains the store-owned fields of a rollback or an import
    (``version``, ``parent``, ``parent_id``, ``created_at``,
    ``rolled_back_from``, ``source_version``, ``imported``). The caller's
    metadata can never set them.
    """
    model = expected.model
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("spec"), Mapping):
        raise InvalidInputError(
            f"invalid metadata for model {model!r}: expected a mapping with a 'spec' object, "
            "as every version carries its model spec"
        )
    if not isinstance(artifacts, Mapping):
        raise InvalidInputError(
            f"invalid artifacts for model {model!r}: expected a mapping of kind to bytes"
        )
    lineage = dict(lineage or {})
    version = lineage.get("version", expected.latest + 1)

    chunks: dict[str, list[bytes]] = {}
    entries: dict[str, dict[str, Any]] = {}
    reused: set[int] = set()
    for kind, data in artifacts.items():
        validate_kind(kind)
        if isinstance(data, Reuse):
            entries[kind] = _artifacts.reused_entry(model, kind, data)
            reused.add(data.info.version)
            continue
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInputError(
                f"invalid artifact {kind!r} for model {model!r}: expected bytes or a Reuse, "
                f"got {type(data).__name__}"
            )
        data = bytes(data)
        if len(data) > max_artifact_bytes:
            raise ArtifactTooLarge(
                f"artifact {kind!r} of model {model!r} version {version} has {len(data)} bytes, "
                f"the maximum is {max_artifact_bytes} (max_artifact_bytes); nothing was "
                "published. Raise max_artifact_bytes or shrink the model"
            )
        parts = _artifacts.encode(model, kind, data, onnx_format)
        for storage_kind, part in parts.items():
            chunks[storage_kind] = _chunks.split(part, chunk_size_bytes)
        entries[kind] = _artifacts.describe(kind, data, {k: chunks[k] for k in parts})

    publish_id = new_publish_id()
    full = {k: v for k, v in metadata.items() if k not in STORE_FIELDS}
    full.update(
        model=model,
        version=version,
        parent=expected.latest,
        parent_id=expected.latest_id,
        publish_id=publish_id,
        created_at=time.time(),
        artifacts=entries,
    )
    full.update(lineage)
    encode_json(full, f"metadata of model {model!r} version {version}")
    return PublishPlan(model, version, publish_id, chunks, full, tuple(sorted(reused)))


def rollback_lineage(source: VersionInfo, latest: VersionInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build the metadata and lineage of a rollback of ``latest`` to ``source``.

    The metadata is the source's (spec, metrics, samples learned, ONNX
    description), with the offsets of the latest version merged in by
    maximum: the records that the discarded versions consumed stay
    consumed, so the worker never learns them again.
    """
    metadata = {k: v for k, v in source.metadata.items() if k not in STORE_FIELDS}
    offsets = dict(source.offsets)
    for partition, offset in latest.offsets.items():
        offsets[partition] = max(offsets.get(partition, 0), offset)
    metadata["offsets"] = dict(sorted(offsets.items()))
    lineage = {
        "rolled_back_from": latest.version,
        # A rollback to a rollback serves the first one's source.
        "source_version": source.source_version,
    }
    return metadata, lineage


def import_lineage(metadata: Mapping[str, Any], latest: int, parent_id: str | None) -> dict[str, Any]:
    """Check the history fields of an imported version and return its lineage."""
    model = metadata.get("model")
    version = metadata.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version <= latest:
        raise InvalidInputError(
            f"invalid imported version {version!r} of model {model!r}: expected an integer "
            f"above the latest version {latest} of the target"
        )
    parent = metadata.get("parent")
    if parent is not None and (isinstance(parent, bool) or not isinstance(parent, int) or not 0 <= parent < version):
        raise InvalidInputError(
            f"invalid parent {parent!r} of imported version {version} of model {model!r}: "
            f"expected an integer from 0 to {version - 1}"
        )
    created_at = metadata.get("created_at")
    if isinstance(created_at, bool) or not isinstance(created_at, (int, float)):
        raise InvalidInputError(
            f"invalid created_at {created_at!r} of imported version {version} of model {model!r}"
        )
    lineage = {
        "version": version,
        "parent": parent,
        "parent_id": parent_id,
        "created_at": created_at,
        "imported": {"publish_id": metadata.get("publish_id"), "imported_at": time.time()},
    }
    for field in ("rolled_back_from", "source_version"):
        if field in metadata:
            lineage[field] = metadata[field]
    return lineage


def check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"invalid {name} {value!r}: expected an integer >= 1")
    return value


def check_chunk_size(chunk_size_bytes: object, maximum: int) -> int:
    if (
        isinstance(chunk_size_bytes, bool)
        or not isinstance(chunk_size_bytes, int)
        or not 1 <= chunk_size_bytes <= maximum
    ):
        raise InvalidInputError(
            f"invalid chunk_size_bytes {chunk_size_bytes!r}: expected an integer "
            f"from 1 to {maximum}"
        )
    return chunk_size_bytes


def check_stored_metadata(
    metadata: object, model: str, where: str, *, version: int | None = None,
    publish_id: str | None = None,
) -> dict[str, Any]:
    """Raise ArtifactCorrupt unless ``metadata`` is a version document of ``model``.

    This catches a document read under the wrong key or written by something else.
    """
    problems = []
    if not isinstance(metadata, dict):
        raise ArtifactCorrupt(f"stored metadata {where} is not a JSON object: {type(metadata).__name__}")
    if metadata.get("model") != model:
        problems.append(f"model {metadata.get('model')!r} instead of {model!r}")
    stored_version = metadata.get("version")
    if isinstance(stored_version, bool) or not isinstance(stored_version, int):
        problems.append(f"version {stored_version!r} is not an integer")
    elif version is not None and stored_version != version:
        problems.append(f"version {stored_version} instead of {version}")
    if publish_id is not None and metadata.get("publish_id") != publish_id:
        problems.append(f"publish id {metadata.get('publish_id')!r} instead of {publish_id!r}")
    if not isinstance(metadata.get("artifacts"), dict):
        problems.append("no 'artifacts' object")
    if problems:
        raise ArtifactCorrupt(f"stored metadata {where} is invalid: " + "; ".join(problems))
    return metadata
