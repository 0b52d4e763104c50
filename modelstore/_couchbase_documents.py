"""Typed access to the Couchbase store's documents: JSON or binary, each read with its own transcoder."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, NamedTuple

from couchbase.exceptions import (
    CouchbaseException,
    DocumentExistsException,
    DocumentNotFoundException,
    ValueFormatException,
)
from couchbase.options import GetMultiOptions, GetOptions, InsertOptions, RemoveOptions, TouchOptions
from couchbase.transcoder import JSONTranscoder, RawBinaryTranscoder, RawJSONTranscoder

from modelstore import _artifacts, _keys
from modelstore._couchbase_connection import Connection, map_errors
from modelstore.errors import ArtifactCorrupt, StoreError

log = logging.getLogger(__name__)

BINARY = RawBinaryTranscoder()
JSON = JSONTranscoder()
# The JSON part of an ONNX-as-JSON artifact keeps its exact bytes, so its
# sha256 still matches, and carries the JSON flag, so Couchbase tools read it as JSON.
RAW_JSON = RawJSONTranscoder()


def chunk_transcoder(kind: str):
    return RAW_JSON if kind == _artifacts.JSON_PART else BINARY


class Document(NamedTuple):
    value: Any
    cas: int


class Documents:
    """Gets, inserts, touches and removes documents by key, and maps SDK errors to store errors."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    @property
    def _artifact_timeout(self) -> timedelta:
        return timedelta(milliseconds=self.connection.settings.artifact_timeout_ms)

    def where(self, collection: str, key: str) -> str:
        settings = self.connection.settings
        return f"{key!r} in {settings.bucket}.{settings.scope}.{collection}"

    def get_json(self, collection: str, key: str) -> Document | None:
        """Read a JSON document, or None when it does not exist."""
        return self._get(collection, key, JSON, "JSON")

    def get_many_json(self, collection: str, keys: list[str]) -> dict[str, tuple[Any, int]]:
        """Read JSON documents in one bulk request; return (value, CAS) by key, without missing ones."""
        if not keys:
            return {}
        with map_errors(f"reading {len(keys)} documents of {self.where(collection, keys[0])} and others"):
            result = self.connection.collection(collection).get_multi(keys, GetMultiOptions(transcoder=JSON))
            for key, exc in result.exceptions.items():
                if not isinstance(exc, DocumentNotFoundException):
                    raise exc
            found = {}
            for key, document in result.results.items():
                try:
                    found[key] = (document.value, document.cas)
                except ValueFormatException as exc:
                    raise ArtifactCorrupt(
                        f"document {self.where(collection, key)} is not JSON; it was written by "
                        "something other than this store"
                    ) from exc
            return found

    def get_binary(self, key: str, transcoder=BINARY) -> bytes | None:
        """Read an artifact chunk, or None when it does not exist."""
        expected = "JSON" if transcoder is RAW_JSON else "binary"
        document = self._get(_keys.ARTIFACTS, key, transcoder, expected, self._artifact_timeout)
        return None if document is None else bytes(document.value)

    def _get(self, collection: str, key: str, transcoder, expected: str,
             timeout: timedelta | None = None) -> Document | None:
        with map_errors(f"reading {self.where(collection, key)}"):
            try:
                result = self.connection.collection(collection).get(
                    key, GetOptions(transcoder=transcoder, timeout=timeout)
                )
                # The SDK decodes lazily, on the first access to .value, so
                # that access belongs inside this try.
                return Document(result.value, result.cas)
            except DocumentNotFoundException:
                return None
            except ValueFormatException as exc:
                # The document's flags name another format: it was written
                # under this key by something else, or with another transcoder.
                raise ArtifactCorrupt(
                    f"document {self.where(collection, key)} is not {expected} "
                    f"({getattr(exc, 'message', None) or type(exc).__name__}); it was written by "
                    "something other than this store"
                ) from exc

    def insert_json(self, collection: str, key: str, value: Any, expiry: timedelta) -> int:
        """Insert a JSON document and return its CAS. Raises DocumentExistsException if the key is taken."""
        with map_errors(f"writing {self.where(collection, key)}", passthrough=(DocumentExistsException,)):
            result = self.connection.collection(collection).insert(
                key, value, InsertOptions(transcoder=JSON, expiry=expiry)
            )
        return result.cas

    def insert_binary(self, key: str, value: bytes, expiry: timedelta, transcoder=BINARY) -> None:
        with map_errors(f"writing {self.where(_keys.ARTIFACTS, key)} ({len(value)} bytes)"):
            try:
                self.connection.collection(_keys.ARTIFACTS).insert(
                    key, value,
                    InsertOptions(transcoder=transcoder, expiry=expiry, timeout=self._artifact_timeout),
                )
            except DocumentExistsException as exc:
                # Keys carry a fresh random publish id, so an existing key
                # means two writers drew the same id or a bug reuses one.
                raise StoreError(
                    f"artifact chunk {self.where(_keys.ARTIFACTS, key)} already exists; "
                    "a publish never overwrites a chunk"
                ) from exc

    def touch(self, collection: str, key: str, expiry: timedelta) -> None:
        """Set a document's expiry, where timedelta(0) removes it. Raises ArtifactCorrupt if the document is gone."""
        with map_errors(f"changing the expiry of {self.where(collection, key)}"):
            try:
                self.connection.collection(collection).touch(key, expiry, TouchOptions())
            except DocumentNotFoundException as exc:
                raise ArtifactCorrupt(
                    f"document {self.where(collection, key)} is missing; it expired or was removed"
                ) from exc

    def remove(self, collection: str, key: str, cas: int | None = None) -> bool:
        """Remove a document; return False if it was already gone. Other failures raise StoreError."""
        options = RemoveOptions(cas=cas) if cas else RemoveOptions()
        with map_errors(f"removing {self.where(collection, key)}"):
            try:
                self.connection.collection(collection).remove(key, options)
            except DocumentNotFoundException:
                return False
        return True

    def remove_quietly(self, collection: str, key: str) -> None:
        """Remove a document the store no longer needs. A failure only leaves it to its expiry."""
        try:
            self.connection.collection(collection).remove(key)
        except DocumentNotFoundException:
            pass
        except (CouchbaseException, StoreError) as exc:
            log.warning(
                "could not remove %s (%s); it stays until its expiry",
                self.where(collection, key), type(exc).__name__,
            )
