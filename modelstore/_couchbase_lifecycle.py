"""Aliases, rollback, retention and deletion in the Couchbase store.

Each operation reads the head document and decides from it. An alias is one
CAS write of the head. Retention and delete make one CAS write of the head
before they remove any other document. A rollback is a publish. ``retry`` runs it again
from a fresh read when another writer changed the head in between.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, TypeVar

from couchbase.exceptions import CasMismatchException

from modelstore import _artifacts, _keys, _publish, _retention
from modelstore import _couchbase_heads as _heads
from modelstore import _couchbase_versions as _versions
from modelstore.base import Head, Reuse, VersionInfo
from modelstore.errors import ArtifactCorrupt, ModelNotFound, StoreError, VersionConflict

if TYPE_CHECKING:
    from modelstore.couchbase import CouchbaseStore

log = logging.getLogger(__name__)

ATTEMPTS = 5
T = TypeVar("T")


def retry(model: str, what: str, operation: Callable[[], T]) -> T:
    """Run ``operation`` again from a fresh head read when it raises VersionConflict, a few times."""
    for _ in range(ATTEMPTS - 1):
        try:
            return operation()
        except VersionConflict as exc:
            log.info("model %r: %s met a concurrent head write (%s); trying again", model, what, exc)
    try:
        return operation()
    except VersionConflict as exc:
        raise VersionConflict(
            f"model {model!r}: {what} lost {ATTEMPTS} races in a row against other writers of "
            "the head; try again later"
        ) from exc


def set_alias(store: "CouchbaseStore", model: str, alias: str, version: int | None) -> Head:
    documents = store._documents
    head = _heads.read_existing(documents, model)
    aliases = dict(head.doc["aliases"])
    if version is None:
        if alias not in aliases:
            return head.head
        del aliases[alias]
    else:
        # Raises VersionNotFound for a version never published or removed.
        store._version_in(head, version)
        aliases[alias] = version
    doc = _heads.with_write(dict(head.doc, aliases=aliases), _heads.new_write_id())
    _heads.replace(documents, model, head.cas, doc, f"setting alias {alias!r}")
    return _heads.read_existing(documents, model).head


def rollback(store: "CouchbaseStore", model: str, to_version: int | None) -> VersionInfo:
    head = _heads.read_existing(store._documents, model)
    latest = store._version_in(head, head.latest)
    target = _retention.rollback_target(latest, to_version)
    source = store._version_in(head, target)
    metadata, lineage = _publish.rollback_lineage(source, latest)
    reused = {kind: Reuse(source, kind) for kind in source.metadata["artifacts"]}
    # The version is a publish whose artifacts are all reused: only its
    # metadata, the head and its pointer are written.
    plan = store._plan(head.head, reused, metadata, lineage)
    return store._commit(head.head, plan)


def apply_retention(store: "CouchbaseStore", model: str, keep_last: int) -> list[int]:
    """Make the removed versions invisible with one head write, then remove their documents."""
    documents = store._documents
    head = _heads.read_existing(documents, model)
    live = [store._version_in(head, number) for number in head.live_numbers()]
    plan = _retention.plan(live, head.doc["aliases"], keep_last)
    work = head.retiring
    if plan.remove:
        removed = {info.version for info in plan.remove}
        kept = [info.version for info in live if info.version not in removed]
        floor = head.latest
        while floor - 1 in kept:
            floor -= 1
        work = {
            "versions": work["versions"] + [[info.version, info.publish_id] for info in plan.remove],
            "parts": work["parts"] + [list(part) for part in plan.parts],
        }
        doc = dict(head.doc, floor=floor, kept_below=[n for n in kept if n < floor], retiring=work)
        _heads.replace(documents, model, head.cas, _heads.with_write(doc, _heads.new_write_id()),
                       f"retiring {len(removed)} versions")
    if work["versions"] or work["parts"]:
        _collect(store, model, work)
    return [info.version for info in plan.remove]


def _collect(store: "CouchbaseStore", model: str, work: dict[str, list]) -> None:
    """Remove the documents listed in ``work``, then drop the finished items from the head."""
    documents = store._documents
    # Chunks first and version pointers last, so a run that stops half-way
    # leaves every item findable for the next run.
    for publish_id, kind, count in work["parts"]:
        for index in range(count):
            documents.remove(_keys.ARTIFACTS, _keys.chunk(model, publish_id, kind, index))
    for number, publish_id in work["versions"]:
        documents.remove(_keys.METADATA, _keys.metadata(model, publish_id))
        documents.remove(_keys.METADATA, _keys.version_pointer(model, number))

    for _ in range(ATTEMPTS):
        head = _heads.read(documents, model, include_deleted=True)
        if head is None:
            return
        current = head.retiring
        remaining = {
            "versions": [item for item in current["versions"] if item not in work["versions"]],
            "parts": [item for item in current["parts"] if item not in work["parts"]],
        }
        if remaining == current:
            return
        doc = _heads.with_write(dict(head.doc, retiring=remaining), _heads.new_write_id())
        try:
            _heads.replace(documents, model, head.cas, doc, "finishing retention")
            return
        except VersionConflict:
            continue
    log.warning("model %r: retention removed its documents but could not clear its work list "
                "from the head; the next run clears it", model)


def delete_model(store: "CouchbaseStore", model: str) -> None:
    documents = store._documents
    head = _heads.read(documents, model, include_deleted=True)
    if head is None:
        raise ModelNotFound(f"model {model!r} not found in {store.url}; nothing was deleted")
    if not head.deleted:
        # From this write on, readers and publishers see no model; the
        # documents are removed after it, so none of them is ever read half-deleted.
        doc = _heads.with_write(dict(head.doc, deleted=True), _heads.new_write_id())
        _heads.replace(documents, model, head.cas, doc, "deleting the model")
        head = _heads.read(documents, model, include_deleted=True)
        if head is None:
            return
    finish_delete(store, head)


def finish_delete(store: "CouchbaseStore", head: _heads.HeadDoc) -> None:
    """Remove every document of a model whose head is marked deleted, the head last."""
    documents, model = store._documents, head.model
    _versions.remove_from_index(documents, model)

    # Publish ids are found while every document is still there, because a
    # version without a pointer is found through the metadata above it.
    found: list[tuple[int, str]] = list(map(tuple, head.retiring["versions"]))
    for number in head.live_numbers():
        try:
            publish_id, _ = _versions.find_publish_id(documents, model, number, head.head)
        except ArtifactCorrupt as exc:
            # Documents of a version that cannot be found were never pinned,
            # so they expire on their own.
            log.warning("model %r: version %d not found while deleting (%s); its documents "
                        "expire", model, number, exc)
            continue
        found.append((number, publish_id))

    parts = {tuple(part) for part in head.retiring["parts"]}
    for number, publish_id in found:
        result = documents.get_json(_keys.METADATA, _keys.metadata(model, publish_id))
        if result is None:
            continue
        info = VersionInfo(model, number, publish_id, result.value)
        try:
            parts |= _artifacts.storage_refs(info)
        except ArtifactCorrupt as exc:
            log.warning("model %r version %d: invalid artifact metadata while deleting (%s)",
                        model, number, exc)
    for publish_id, kind, count in sorted(parts):
        for index in range(count):
            documents.remove(_keys.ARTIFACTS, _keys.chunk(model, publish_id, kind, index))
    for number, publish_id in found:
        documents.remove(_keys.METADATA, _keys.metadata(model, publish_id))
        documents.remove(_keys.METADATA, _keys.version_pointer(model, number))
    try:
        documents.remove(_keys.HEADS, _keys.head(model), cas=head.cas)
    except StoreError as exc:
        if not isinstance(exc.__cause__, CasMismatchException):
            raise
        # Another process finished this delete and created the model again.
        log.info("model %r: the deleted head changed while its documents were removed", model)

