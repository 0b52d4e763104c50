"""Model store on Couchbase Server, with key-value operations only.

Every operation is a get, insert, replace, touch or remove, so the store runs
on gocaves (which has no N1QL) as well as on Couchbase Server. Documents live
in four collections of one scope (see ``modelstore._keys`` for the keys):
binary artifact chunks, JSON version metadata and version pointers, JSON
heads, and ``predictions`` for the predictor. Chunks use the raw binary
transcoder, except the JSON part of an ONNX-as-JSON artifact, which uses
the raw JSON transcoder.

A publish first inserts the artifact chunks and the version metadata, each
with an expiry (``orphan_expiry_s``). It then replaces the head, with the CAS
of the head the caller read. Last, it removes the expiry of its documents
(touch with 0) and inserts the version pointer. The expiry bounds
what a publish that crashes or loses leaves behind: its documents vanish on
their own, without a collector and without N1QL, which gocaves lacks. The
expiry is removed only after the head write because before it nobody knows
whether the version will ever be visible. A publisher that stops between the
head write and the touch leaves a visible version whose documents still
expire. The version pointer is written last, so a missing pointer marks that
case, and the next ``version()`` read of that version removes the expiry.

NOTE: if nothing reads such a version with ``version()`` within
``orphan_expiry_s`` (24 h by default), its documents expire while the head
still names it, and reads raise ArtifactCorrupt. Any ``version()`` call that
resolves the version before then repairs it.

Every head write (publish, alias, retention, delete) replaces the head with
the CAS of the document it was built from and records a write id, so a
timed-out write is resolved by reading the head back
(``modelstore._couchbase_heads`` describes the head's fields). A rollback is
a publish whose artifacts refer to existing chunks, so it writes only its
metadata, the head and its version pointer. Retention and delete first
record their work in the head, then remove documents, so an interrupted run
is finished by the next one (``modelstore._couchbase_lifecycle``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import timedelta
from typing import Any, Iterable, Mapping

from couchbase.exceptions import DocumentExistsException, DocumentNotFoundException
from couchbase.options import GetOptions, UpsertMultiOptions
from couchbase.transcoder import RawJSONTranscoder

from modelstore import _artifacts, _chunks, _keys, _publish, _retention
from modelstore import _couchbase_heads as _heads
from modelstore import _couchbase_lifecycle as _lifecycle
from modelstore import _couchbase_versions as _versions
from modelstore._couchbase_connection import AMBIGUOUS, Connection, map_errors
from modelstore._couchbase_documents import Documents, chunk_transcoder
from modelstore._couchbase_settings import CouchbaseSettings, credentials
from modelstore.base import Head, ModelStore, Reuse, VersionInfo
from modelstore.errors import (
    ArtifactCorrupt,
    ModelExists,
    StoreError,
    StoreUnavailable,
    VersionConflict,
    VersionNotFound,
)
from modelstore.names import validate_alias_name, validate_model_name
from modelstore.predictions import check_document, check_expiry, check_key

log = logging.getLogger(__name__)

# Tries of an operator's head change (alias, rollback, retention, delete)
# when other writers change the head at the same time.
LIFECYCLE_ATTEMPTS = 5


# Prediction documents are JSON text already, so they are stored as they are.
_RAW_JSON = RawJSONTranscoder()


class CouchbaseStore(ModelStore):
    """Model store in one Couchbase scope. The module docstring describes the publish protocol."""

    def __init__(
        self,
        settings: CouchbaseSettings,
        username: str,
        password: str,
        *,
        max_artifact_bytes: int = _publish.DEFAULT_MAX_ARTIFACT_BYTES,
    ) -> None:
        settings.check()
        self.settings = settings
        self.url = settings.url
        self.max_artifact_bytes = _publish.check_positive(
            "max_artifact_bytes", settings.max_artifact_bytes or max_artifact_bytes
        )
        self.onnx_format = settings.onnx_format
        self.keep_versions = settings.keep_versions
        self._documents = Documents(Connection(settings, username, password))
        # Connect now, so a wrong address, bucket or password fails at start-up.
        self._documents.connection.collection(_keys.HEADS)

    @classmethod
    def from_url(cls, url: str, environ: Mapping[str, str] = os.environ) -> "CouchbaseStore":
        """Open the store named by ``url``, with credentials from ``environ``.

        See ``CouchbaseSettings.from_url`` for the URL's options and
        ``modelstore._couchbase_settings.credentials`` for the variables.
        """
        settings = CouchbaseSettings.from_url(url)
        username, password = credentials(environ)
        return cls(settings, username, password)

    def close(self) -> None:
        self._documents.connection.close()

    @property
    def _orphan_expiry(self) -> timedelta:
        return timedelta(seconds=self.settings.orphan_expiry_s)

    # ------------------------------------------------------------ reads

    def head(self, model: str) -> Head:
        validate_model_name(model)
        return self._read_head(model)

    def heads(self, models: Iterable[str]) -> dict[str, Head]:
        names = [validate_model_name(model) for model in models]
        found = {}
        # Bounded batches keep one request's response small.
        for start in range(0, len(names), 1000):
            for model, head in _heads.read_many(self._documents, names[start:start + 1000]).items():
                found[model] = head.head
        return found

    def _read_head(self, model: str) -> Head:
        return _heads.read_existing(self._documents, model).head

    def version(self, model: str, version: int | None = None) -> VersionInfo:
        validate_model_name(model)
        if version is not None:
            _publish.validate_version_number(version)
        head = _heads.read_existing(self._documents, model)
        return self._version_in(head, head.latest if version is None else version)

    def _version_in(self, head: _heads.HeadDoc, number: int) -> VersionInfo:
        """Read version ``number``, which must be live in ``head``."""
        model = head.model
        if not head.is_live(number):
            raise _retention.version_not_found(model, number, head.latest)
        publish_id, pointer_found = _versions.find_publish_id(self._documents, model, number, head.head)
        metadata = _versions.read_metadata(self._documents, model, publish_id, number)
        if not pointer_found and not self._publisher_may_be_running(head.head, number):
            self._repair_version(metadata)
        return VersionInfo(model, number, publish_id, metadata)

    def versions(self, model: str) -> list[VersionInfo]:
        validate_model_name(model)
        head = _heads.read_existing(self._documents, model)
        return [self._version_in(head, number) for number in head.live_numbers()]

    def _publisher_may_be_running(self, head: Head, number: int) -> bool:
        grace_s = min(REPAIR_GRACE_S, self.settings.orphan_expiry_s / 4)
        return number == head.latest and time.time() - head.updated_at < grace_s

    def _repair_version(self, metadata: Mapping[str, Any]) -> None:
        """Remove the expiry of a visible version whose publisher stopped before doing so."""
        model, number, publish_id = metadata["model"], metadata["version"], metadata["publish_id"]
        log.warning(
            "model %r version %d is visible but has no version pointer; removing the expiry "
            "of its documents, which a publisher that stopped after its head write left",
            model, number,
        )
        try:
            self._pin_version(model, publish_id, metadata)
            self._write_pointer(model, number, publish_id)
        except StoreError as exc:
            # A read-only user cannot touch documents, but the read still succeeds.
            log.warning("could not remove the expiry of model %r version %d: %s", model, number, exc)

    def artifact(self, info: VersionInfo, kind: str) -> bytes:
        validate_model_name(info.model)
        _publish.validate_kind(kind)
        data = {}
        for part in _artifacts.parts(info, kind):
            data[part.kind] = self._read_part(info, part)
        return _artifacts.assemble(info, kind, data)

    def _read_part(self, info: VersionInfo, part: _artifacts.Part) -> bytes:
        name = f"{info.model}::{part.publish_id}::{part.kind}"
        owner = f"model {info.model!r} version {info.version}"
        chunks = []
        for index, expected in enumerate(_chunks.expected_chunks(part.entry, name)):
            key = _keys.chunk(info.model, part.publish_id, part.kind, index)
            where = f"{self._documents.where(_keys.ARTIFACTS, key)} of {owner}"
            try:
                data = self._documents.get_binary(key, chunk_transcoder(part.kind))
            except ArtifactCorrupt as exc:
                raise ArtifactCorrupt(f"{owner}: {exc}") from exc
            if data is None:
                raise ArtifactCorrupt(f"chunk {where} is missing; it expired or was removed")
            _chunks.verify_chunk(data, expected, where)
            chunks.append(data)
        return _chunks.join_verified(chunks, part.entry, f"{name} of {owner}")

    def list_models(self) -> list[str]:
        return _versions.read_index(self._documents)

    # ------------------------------------------------------------ writes

    def create_model(self, model: str, spec: Mapping[str, Any]) -> Head:
        validate_model_name(model)
        publish_id = _publish.new_publish_id()
        metadata = _publish.initial_metadata(model, spec, publish_id)
        metadata_key = _keys.metadata(model, publish_id)

        # Version 0 follows the publish protocol: its metadata expires unless
        # the head insert below makes it visible.
        self._documents.insert_json(_keys.METADATA, metadata_key, metadata, self._orphan_expiry)
        doc = _heads.with_write(
            {"model": model, "latest": 0, "latest_id": publish_id, "aliases": {}, "floor": 0},
            _heads.new_write_id(),
        )
        head = self._insert_head(model, doc)
        if head is None:
            self._documents.remove_quietly(_keys.METADATA, metadata_key)
            # A creator that stopped before its index update left the model
            # unlisted, so the losing creator repairs that.
            _versions.add_to_index(self._documents, model)
            raise ModelExists(f"model {model!r} already exists in {self.url}")

        self._pin_version(model, publish_id, metadata)
        self._write_pointer(model, 0, publish_id)
        _versions.add_to_index(self._documents, model)
        log.info("created model %r in %s", model, self.url)
        return head

    def _insert_head(self, model: str, doc: dict[str, Any]) -> Head | None:
        """Insert a new head, or return None if the model exists.

        A head left by an interrupted delete_model is deleted first.
        """
        collection = self._documents.connection.collection(_keys.HEADS)
        for _ in range(2):
            with map_errors(f"creating the head of model {model!r}"):
                try:
                    result = collection.insert(_keys.head(model), doc)
                    return Head(model, 0, doc["latest_id"], {}, doc["updated_at"], result.cas)
                except DocumentExistsException:
                    existing = _heads.read(self._documents, model, include_deleted=True)
                    if existing is None or not existing.deleted:
                        return None
                    _lifecycle.finish_delete(self, existing)
                except AMBIGUOUS as exc:
                    current = _heads.read(self._documents, model)
                    if current is None:
                        raise StoreUnavailable(
                            f"creating model {model!r} timed out and it does not exist; retry later"
                        ) from exc
                    return current.head if current.doc["latest_id"] == doc["latest_id"] else None
        return None

    def publish(
        self,
        expected: Head,
        artifacts: Mapping[str, bytes | Reuse],
        metadata: Mapping[str, Any],
    ) -> VersionInfo:
        _publish.check_expected_head(expected)
        plan = self._plan(expected, artifacts, metadata)
        info = self._commit(expected, plan)
        _retention.apply_after_publish(self, info)
        return info

    def _plan(self, expected: Head, artifacts: Mapping[str, bytes | Reuse], metadata: Mapping[str, Any],
              lineage: Mapping[str, Any] | None = None) -> _publish.PublishPlan:
        return _publish.plan_publish(
            expected, artifacts, metadata, chunk_size_bytes=self.settings.chunk_size_bytes,
            max_artifact_bytes=self.max_artifact_bytes, onnx_format=self.onnx_format, lineage=lineage,
        )

    def _commit(self, expected: Head, plan: _publish.PublishPlan) -> VersionInfo:
        """Write a planned version: chunks and metadata with an expiry, the head, then pins."""
        # Checked first so a stale writer stops before writing its chunks.
        # The CAS of the head replace is what decides.
        self._check_head(expected)

        started = time.monotonic()
        self._write_artifacts(plan)
        self._write_metadata(plan)
        self._check_lease(plan, started)
        try:
            self._write_head(expected, plan)
        except (VersionConflict, VersionNotFound):
            self._discard(plan)
            raise

        # The version is visible from here on: a failure below must not turn
        # a published version into an error for the caller.
        try:
            self._pin_version(plan.model, plan.publish_id, plan.metadata)
            self._write_pointer(plan.model, plan.version, plan.publish_id)
        except StoreError as exc:
            log.warning(
                "model %r version %d is published, but removing the expiry of its documents "
                "failed (%s); the next version() read of it retries", plan.model, plan.version, exc,
            )
        return VersionInfo(plan.model, plan.version, plan.publish_id, dict(plan.metadata))

    def _check_head(self, expected: Head) -> None:
        current = self._read_head(expected.model)
        if (current.cas, current.latest, current.latest_id) != (expected.cas, expected.latest, expected.latest_id):
            raise VersionConflict(
                f"model {expected.model!r} moved to version {current.latest} since the caller read "
                f"version {expected.latest}; reload the head and re-apply the batch"
            )

    def _write_artifacts(self, plan: _publish.PublishPlan) -> None:
        for kind, parts in plan.chunks.items():
            for index, data in enumerate(parts):
                key = _keys.chunk(plan.model, plan.publish_id, kind, index)
                self._documents.insert_binary(key, data, self._orphan_expiry, chunk_transcoder(kind))

    def _write_metadata(self, plan: _publish.PublishPlan) -> None:
        key = _keys.metadata(plan.model, plan.publish_id)
        try:
            self._documents.insert_json(_keys.METADATA, key, dict(plan.metadata), self._orphan_expiry)
        except DocumentExistsException as exc:
            raise StoreError(f"metadata {key!r} already exists; a publish id was reused") from exc

    def _check_lease(self, plan: _publish.PublishPlan, started: float) -> None:
        # Documents written with an expiry must not expire before the head
        # write makes them permanent. A publish slower than half the expiry
        # therefore gives up, and its documents expire as orphans.
        elapsed = time.monotonic() - started
        if elapsed > self.settings.orphan_expiry_s / 2:
            raise StoreUnavailable(
                f"publish of model {plan.model!r} version {plan.version} took {elapsed:.1f} s, more "
                f"than half of orphan_expiry_s={self.settings.orphan_expiry_s}; nothing was "
                "published. Raise orphan_expiry_s or check the cluster's throughput"
            )

    def _write_head(self, expected: Head, plan: _publish.PublishPlan) -> None:
        # The new head is built from the document as read now, so fields
        # that other operations keep there (retention's work, the floor)
        # are carried over. The replace carries the caller's CAS, so it
        # fails if that document is not the one the caller read.
        base = _heads.read_existing(self._documents, plan.model)
        for number in plan.reused_versions:
            if base.cas == expected.cas and not base.is_live(number):
                raise VersionNotFound(
                    f"model {plan.model!r} version {plan.version} reuses the artifacts of version "
                    f"{number}, which retention removed; nothing was published"
                )
        doc = dict(base.doc, latest=plan.version, latest_id=plan.publish_id)
        if plan.version > base.latest + 1:
            # An imported version after a gap: the versions up to now stay
            # live below the new floor.
            doc["kept_below"] = sorted({*base.doc.get("kept_below", []), *base.live_numbers()})
            doc["floor"] = plan.version
        doc = _heads.with_write(doc, _heads.new_write_id())
        _heads.replace(
            self._documents, plan.model, expected.cas, doc, f"publishing version {plan.version}",
            landed=lambda current: self._landed_below(current, plan),
        )

    def _landed_below(self, current: _heads.HeadDoc, plan: _publish.PublishPlan) -> bool:
        """Return True if ``plan``'s version is in the chain below a newer head."""
        if current.latest <= plan.version or not current.is_live(plan.version):
            return False
        publish_id, _ = _versions.find_publish_id(self._documents, plan.model, plan.version, current.head)
        return publish_id == plan.publish_id

    def _discard(self, plan: _publish.PublishPlan) -> None:
        # A loser's documents would expire anyway, but removing them frees
        # the space now. Failures are logged by remove_quietly and left to expire.
        for kind, parts in plan.chunks.items():
            for index in range(len(parts)):
                self._documents.remove_quietly(
                    _keys.ARTIFACTS, _keys.chunk(plan.model, plan.publish_id, kind, index)
                )
        self._documents.remove_quietly(_keys.METADATA, _keys.metadata(plan.model, plan.publish_id))

    def _pin_version(self, model: str, publish_id: str, metadata: Mapping[str, Any]) -> None:
        _versions.pin_version(self._documents, model, publish_id, metadata)

    def _write_pointer(self, model: str, number: int, publish_id: str) -> None:
        _versions.write_pointer(self._documents, model, number, publish_id)

    # ------------------------------------------------------------ lifecycle

    def set_alias(self, model: str, alias: str, version: int | None) -> Head:
        validate_model_name(model)
        validate_alias_name(alias)
        if version is not None:
            _publish.validate_version_number(version)
        return _lifecycle.retry(model, "setting an alias",
                                lambda: _lifecycle.set_alias(self, model, alias, version))

    def rollback(self, model: str, to_version: int | None = None) -> VersionInfo:
        validate_model_name(model)
        if to_version is not None:
            _publish.validate_version_number(to_version)
        info = _lifecycle.retry(model, "rolling back",
                                lambda: _lifecycle.rollback(self, model, to_version))
        log.info("model %r rolled back from version %d to version %d as version %d",
                 model, info.metadata["rolled_back_from"], info.source_version, info.version)
        return info

    def apply_retention(self, model: str, keep_last: int) -> list[int]:
        validate_model_name(model)
        _retention.check_keep("keep_last", keep_last, minimum=1)
        return _lifecycle.retry(model, "applying retention",
                                lambda: _lifecycle.apply_retention(self, model, keep_last))

    def delete_model(self, model: str) -> None:
        validate_model_name(model)
        _lifecycle.retry(model, "deleting the model", lambda: _lifecycle.delete_model(self, model))
        log.info("deleted model %r from %s", model, self.url)

    # ------------------------------------------------------------ predictions

    def put_predictions(self, model: str, predictions: Mapping[str, bytes], expiry_s: int) -> None:
        # A model's predictions are not deleted with it, because finding
        # them would need a query; they expire instead.
        validate_model_name(model)
        check_expiry(expiry_s)
        documents = {
            _keys.prediction(model, check_key(key)): check_document(model, key, body).encode("utf-8")
            for key, body in predictions.items()
        }
        if not documents:
            return
        collection = self._documents.connection.collection(_keys.PREDICTIONS)
        options = UpsertMultiOptions(
            transcoder=_RAW_JSON, expiry=timedelta(seconds=expiry_s), return_exceptions=False
        )
        with map_errors(f"storing {len(documents)} predictions of model {model!r}"):
            collection.upsert_multi(documents, options)

    def prediction(self, model: str, key: str) -> dict[str, Any] | None:
        validate_model_name(model)
        check_key(key)
        collection = self._documents.connection.collection(_keys.PREDICTIONS)
        with map_errors(f"reading prediction {key!r} of model {model!r}"):
            try:
                result = collection.get(_keys.prediction(model, key), GetOptions(transcoder=_RAW_JSON))
            except DocumentNotFoundException:
                return None
        return json.loads(result.content_as[bytes])

    def import_version(self, expected: Head, metadata: Mapping[str, Any],
                       artifacts: Mapping[str, bytes | Reuse]) -> VersionInfo:
        _publish.check_expected_head(expected)
        parent = metadata.get("parent") if isinstance(metadata, Mapping) else None
        parent_id = None
        head = _heads.read_existing(self._documents, expected.model)
        if isinstance(parent, int) and not isinstance(parent, bool) and head.is_live(parent):
            parent_id, _ = _versions.find_publish_id(self._documents, expected.model, parent, head.head)
        lineage = _publish.import_lineage(metadata, expected.latest, parent_id)
        plan = self._plan(expected, artifacts, metadata, lineage)
        return self._commit(expected, plan)


# A publisher writes the version pointer right after its head write. Within
# this many seconds of the head write (and well within the orphan expiry) a
# missing pointer is the normal race with that publisher, not a publisher
# that stopped, so readers leave the repair to it.
REPAIR_GRACE_S = 60.0
