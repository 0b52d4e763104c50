"""Versioned model storage: one contract, SQLite and Couchbase backends."""

from modelstore.base import ARTIFACT_KINDS, ONNX, STATE, Head, ModelStore, VersionInfo
from modelstore.errors import ConfigError


def open_store(url: str) -> ModelStore:
    """Open the store named by ``url``.

    ``sqlite:///path/to/models.db`` opens (and creates) an embedded SQLite
    store; ``couchbase://host/bucket?scope=...`` and ``couchbases://...``
    open a Couchbase store (see ``modelstore.couchbase`` for the options).
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
    "STATE",
    "Head",
    "ModelStore",
    "VersionInfo",
    "open_store",
]
