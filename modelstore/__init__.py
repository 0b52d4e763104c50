"""Versioned model storage: one contract, SQLite and Couchbase backends."""

from modelstore.base import (
    ARTIFACT_KINDS,
    ONNX,
    ONNX_BINARY,
    ONNX_JSON,
    STATE,
    Head,
    ModelStore,
    Reuse,
    VersionInfo,
)
from modelstore.errors import ConfigError


def open_store(url: str) -> ModelStore:
    """Open the store named by ``url``.

    ``sqlite:///path/to/models.db`` opens (and creates) an embedded SQLite
    store; ``couchbase://host/bucket?scope=...`` and ``couchbases://...``
    open a Couchbase store (see ``modelstore.couchbase`` for the options).

    Both take these query options: ``chunk_size_bytes``,
    ``max_artifact_bytes`` (larger artifacts raise ArtifactTooLarge, 1 GiB
    by default), ``keep_versions`` (retention after publishes; 0, the
    default, keeps every version) and ``onnx_format`` (``binary``, the
    default, or ``json``).
    """
    if url.startswith("sqlite:"):
        from modelstore.sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if url.startswith(("couchbase://", "couchbases://")):
        from modelstore.couchbase import CouchbaseStore

        return CouchbaseStore.from_url(url)
    raise ConfigError(
        f"invalid store URL {url!r}: use sqlite:///path/to/models.db or "
        "couchbase://host/bucket?scope=streamfit"
    )


__all__ = [
    "ARTIFACT_KINDS",
    "ONNX",
    "ONNX_BINARY",
    "ONNX_JSON",
    "STATE",
    "Head",
    "ModelStore",
    "Reuse",
    "VersionInfo",
    "open_store",
]
