"""Model store on Couchbase Server, with key-value operations only.

Every operation is a get, insert, replace, touch or remove, so the store runs
on gocaves (which has no N1QL) as well as on Couchbase Server. Documents live
in four collections of one scope (see ``modelstore._keys`` for the keys):
binary artifact chunks (raw binary transcoder), JSON version metadata and
version pointers, JSON heads, and ``predictions`` for the predictor.

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
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any, Mapping

from couchbase.exceptions import (
    CasMismatchException,
    DocumentExistsException,
    DocumentNotFoundException,
)
from couchbase.options import ReplaceOptions

from modelstore import _chunks, _keys, _publish
from modelstore import _couchbase_versions as _versions
from modelstore._couchbase_connection import AMBIGUOUS, Connection, map_errors
from modelstore._couchbase_documents import JSON, Documents
from modelstore._couchbase_settings import CouchbaseSettings, credentials
from modelstore.base import Head, ModelStore, VersionInfo
from modelstore.errors import (
    ArtifactCorrupt,
    ModelExists,
    ModelNotFound,
    StoreError,
    StoreUnavailable,
    VersionConflict,
    VersionNotFound,
)
from modelstore.names import validate_model_name

log = logging.getLogger(__name__)

# Tries of one head write whose response times out. Every try carries the
# same CAS, so a retry succeeds only if no write, ours included, has landed.
HEAD_WRITE_ATTEMPTS = 3


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
        self.max_artifact_bytes = max_artifact_bytes
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

    def _read_head(self, model: str) -> Head:
        return _versions.read_head(self._documents, model)

    def version(self, model: str, version: int | None = None) -> VersionInfo:
        validate_model_name(model)
        if version is not None:
            _publish.validate_version_number(version)
        head = self._read_head(model)
        number = head.latest if version is None else version
        if number > head.latest:
            raise VersionNotFound(
                f"version {number} of model {model!r} not found; the latest is {head.latest}"
            )
        publish_id, pointer_found = _versions.find_publish_id(self._documents, model, number, head)
        metadata = _versions.read_metadata(self._documents, model, publish_id, number)
        if not pointer_found and not self._publisher_may_be_running(head, number):
            self._repair_version(metadata)
        return VersionInfo(model, number, publish_id, metadata)

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
        entry = info.metadata.get("artifacts", {}).get(kind)
        if entry is None:
            raise VersionNotFound(
                f"version {info.version} of model {info.model!r} has no {kind!r} artifact "
                f"(it has: {sorted(info.metadata.get('artifacts', {})) or 'none'})"
            )
        name = _keys.chunk(info.model, info.publish_id, kind, 0).rpartition("::")[0]
        parts = []
        for index, expected in enumerate(_chunks.expected_chunks(entry, name)):
            key = _keys.chunk(info.model, info.publish_id, kind, index)
            where = self._documents.where(_keys.ARTIFACTS, key)
            data = self._documents.get_binary(key)
            if data is None:
                raise ArtifactCorrupt(f"chunk {where} is missing; it expired or was removed")
            _chunks.verify_chunk(data, expected, where)
            parts.append(data)
        return _chunks.join_verified(parts, entry, name)

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
        doc = {"model": model, "latest": 0, "latest_id": publish_id, "aliases": {}, "updated_at": time.time()}
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
        """Insert a new head, or return None if the model exists."""
        collection = self._documents.connection.collection(_keys.HEADS)
        with map_errors(f"creating the head of model {model!r}"):
            try:
                result = collection.insert(_keys.head(model), doc)
            except DocumentExistsException:
                return None
            except AMBIGUOUS as exc:
                try:
                    current = self._read_head(model)
                except ModelNotFound:
                    raise StoreUnavailable(
                        f"creating model {model!r} timed out and it does not exist; retry later"
                    ) from exc
                return current if current.latest_id == doc["latest_id"] else None
        return Head(model, 0, doc["latest_id"], {}, doc["updated_at"], result.cas)

    def publish(
        self,
        expected: Head,
        artifacts: Mapping[str, bytes],
        metadata: Mapping[str, Any],
    ) -> VersionInfo:
        _publish.check_expected_head(expected)
        plan = _publish.plan_publish(
            expected, artifacts, metadata, self.settings.chunk_size_bytes, self.max_artifact_bytes
        )
        # Checked first so a stale writer stops before writing its chunks.
        # The CAS of the head replace is what decides.
        self._check_head(expected)

        started = time.monotonic()
        self._write_artifacts(plan)
        self._write_metadata(plan)
        self._check_lease(plan, started)
        try:
            self._write_head(expected, plan)
        except VersionConflict:
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
                self._documents.insert_binary(key, data, self._orphan_expiry)

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
        key = _keys.head(plan.model)
        doc = {
            "model": plan.model,
            "latest": plan.version,
            "latest_id": plan.publish_id,
            "aliases": dict(expected.aliases),
            "updated_at": time.time(),
        }
        collection = self._documents.connection.collection(_keys.HEADS)
        for attempt in range(1, HEAD_WRITE_ATTEMPTS + 1):
            with map_errors(f"writing the head of model {plan.model!r}"):
                try:
                    collection.replace(key, doc, ReplaceOptions(cas=expected.cas, transcoder=JSON))
                    return
                except (CasMismatchException, DocumentNotFoundException):
                    if attempt == 1:
                        raise VersionConflict(
                            f"model {plan.model!r}: another writer published on version "
                            f"{expected.latest} first; reload the head and re-apply the batch"
                        ) from None
                    # After an ambiguous try, our own earlier write may be the
                    # one that changed the CAS.
                except AMBIGUOUS as exc:
                    log.warning(
                        "head write of model %r version %d timed out (%s); reading the head back",
                        plan.model, plan.version, type(exc).__name__,
                    )
            if self._head_write_landed(expected, plan):
                return
        raise StoreUnavailable(
            f"head write of model {plan.model!r} version {plan.version} timed out "
            f"{HEAD_WRITE_ATTEMPTS} times. The head was unchanged when last read, but a delayed "
            "write may still land, so the outcome is unknown: reload the head before publishing again"
        )

    def _head_write_landed(self, expected: Head, plan: _publish.PublishPlan) -> bool:
        """Decide by reading back whether an ambiguous head write landed.

        Returns True if it did, False if the head is unchanged (a retry with
        the same CAS is then safe), and raises VersionConflict if another
        writer's version is there instead.
        """
        try:
            current = self._read_head(plan.model)
            if current.latest_id == plan.publish_id:
                return True
            if current.cas == expected.cas:
                return False
            if current.latest > plan.version:
                # Ours may have landed and another writer may have published
                # on top of it already.
                publish_id, _ = _versions.find_publish_id(self._documents, plan.model, plan.version, current)
                if publish_id == plan.publish_id:
                    return True
        except StoreUnavailable as exc:
            raise StoreUnavailable(
                f"head write of model {plan.model!r} version {plan.version} timed out and the head "
                "could not be read back, so the version may or may not be published; reload the "
                "head before publishing again"
            ) from exc
        raise VersionConflict(
            f"model {plan.model!r}: another writer published on version {expected.latest} first; "
            "reload the head and re-apply the batch"
        )

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


# A publisher writes the version pointer right after its head write. Within
# this many seconds of the head write (and well within the orphan expiry) a
# missing pointer is the normal race with that publisher, not a publisher
# that stopped, so readers leave the repair to it.
REPAIR_GRACE_S = 60.0
