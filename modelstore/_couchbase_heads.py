"""The head document of the Couchbase store: reading it, which versions it makes live, CAS writes.

A head document contains, besides ``latest``, ``latest_id`` and ``aliases``:

``writes``
    The ids of the last ``WRITE_IDS_KEPT`` head writes. A writer whose
    replace timed out reads the head back and finds out from this list
    whether its write landed, even after other writers wrote on top of it.
``floor`` and ``kept_below``
    The live versions are ``floor`` to ``latest`` plus ``kept_below``
    (version 0, aliased versions and imported versions with gaps between
    them). Retention raises the floor, so listing versions needs no scan
    of the bucket.
``retiring``
    The work of a retention run that has not finished: versions already
    invisible whose documents are being removed, and the chunk parts no
    kept version refers to. The next run finishes it, so an interrupted
    run leaves no orphans that nothing tracks.
``deleted``
    Set by ``delete_model`` before it removes any document, so the model
    is gone for readers from that write on, and an interrupted delete is
    found and finished later.

Every write replaces the whole document with the CAS of the document it
was built from, so no field written by another writer is ever lost.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from couchbase.exceptions import CasMismatchException, DocumentNotFoundException
from couchbase.options import ReplaceOptions

from modelstore import _keys
from modelstore._couchbase_connection import AMBIGUOUS, map_errors
from modelstore._couchbase_documents import JSON, Documents
from modelstore.base import Head
from modelstore.errors import ArtifactCorrupt, ModelNotFound, StoreUnavailable, VersionConflict

log = logging.getLogger(__name__)

WRITE_IDS_KEPT = 32
# Tries of one head write whose response times out. Every try carries the
# same CAS, so a retry succeeds only if no write, ours included, has landed.
HEAD_WRITE_ATTEMPTS = 3


@dataclass(frozen=True)
class HeadDoc:
    """A head document as read, with its CAS."""

    model: str
    doc: dict[str, Any]
    cas: int

    @property
    def latest(self) -> int:
        return self.doc["latest"]

    @property
    def head(self) -> Head:
        doc = self.doc
        return Head(
            self.model, doc["latest"], doc["latest_id"], dict(doc["aliases"]),
            float(doc.get("updated_at", 0.0)), self.cas,
        )

    @property
    def deleted(self) -> bool:
        return bool(self.doc.get("deleted"))

    @property
    def retiring(self) -> dict[str, list]:
        retiring = self.doc.get("retiring") or {}
        return {"versions": list(retiring.get("versions", [])), "parts": list(retiring.get("parts", []))}

    def live_numbers(self) -> list[int]:
        """Return the numbers of the versions that exist, ascending."""
        retiring = {number for number, _ in self.retiring["versions"]}
        floor = self.doc.get("floor", 0)
        numbers = set(self.doc.get("kept_below", [])) | set(range(floor, self.latest + 1))
        return sorted(numbers - retiring)

    def is_live(self, number: int) -> bool:
        if number > self.latest or number in {n for n, _ in self.retiring["versions"]}:
            return False
        return number >= self.doc.get("floor", 0) or number in self.doc.get("kept_below", [])


def read(documents: Documents, model: str, *, include_deleted: bool = False) -> HeadDoc | None:
    """Read and check the head document; None when it is missing (or deleted, unless included)."""
    result = documents.get_json(_keys.HEADS, _keys.head(model))
    if result is None:
        return None
    head = parse(documents, model, result.value, result.cas)
    if head.deleted and not include_deleted:
        return None
    return head


def read_many(documents: Documents, models: list[str]) -> dict[str, HeadDoc]:
    """Read the heads of ``models`` in one bulk request; missing and deleted ones are left out."""
    found = {}
    for model, (value, cas) in documents.get_many_json(_keys.HEADS, [_keys.head(m) for m in models]).items():
        head = parse(documents, model, value, cas)
        if not head.deleted:
            found[model] = head
    return found


def parse(documents: Documents, model: str, doc: Any, cas: int) -> HeadDoc:
    """Check a head document as read; raise ArtifactCorrupt if it is not a head of ``model``."""
    key = _keys.head(model)
    valid = (
        isinstance(doc, dict)
        and doc.get("model") == model
        and _is_count(doc.get("latest"))
        and isinstance(doc.get("latest_id"), str)
        and isinstance(doc.get("aliases"), dict)
        and _is_count(doc.get("floor", 0))
        and isinstance(doc.get("kept_below", []), list)
        and isinstance(doc.get("retiring", {}), dict)
    )
    if not valid:
        raise ArtifactCorrupt(
            f"head document {documents.where(_keys.HEADS, key)} is not a head of "
            f"model {model!r}: {str(doc)[:200]}"
        )
    return HeadDoc(model, doc, cas)


def read_existing(documents: Documents, model: str) -> HeadDoc:
    """Read the head document of a model that exists, or raise ModelNotFound."""
    head = read(documents, model)
    if head is None:
        raise ModelNotFound(
            f"model {model!r} not found in {documents.connection.settings.url}; create it first"
        )
    return head


def new_write_id() -> str:
    return uuid.uuid4().hex


def with_write(doc: dict[str, Any], write_id: str) -> dict[str, Any]:
    """Return a copy of ``doc`` that records ``write_id`` and the time of the write."""
    new = dict(doc)
    new["writes"] = [*doc.get("writes", [])[-(WRITE_IDS_KEPT - 1):], write_id]
    new["updated_at"] = time.time()
    return new


def replace(
    documents: Documents,
    model: str,
    cas: int,
    doc: dict[str, Any],
    what: str,
    landed: Callable[[HeadDoc], bool] | None = None,
) -> None:
    """Replace the head with ``doc`` if its CAS is still ``cas``; raise VersionConflict if not.

    A timeout is resolved by reading the head back: the write landed if its
    id is in ``writes`` (or ``landed(current)`` returns True), and it may be
    tried again with the same CAS only if the head is unchanged. It is never
    retried blindly.
    """
    key = _keys.head(model)
    write_id = doc["writes"][-1]
    collection = documents.connection.collection(_keys.HEADS)
    for attempt in range(1, HEAD_WRITE_ATTEMPTS + 1):
        with map_errors(f"writing the head of model {model!r} ({what})"):
            try:
                collection.replace(key, doc, ReplaceOptions(cas=cas, transcoder=JSON))
                return
            except (CasMismatchException, DocumentNotFoundException):
                if attempt == 1:
                    raise _conflict(model, what) from None
                # After an ambiguous try, our own earlier write may be the
                # one that changed the CAS.
            except AMBIGUOUS as exc:
                log.warning(
                    "head write of model %r (%s) timed out (%s); reading the head back",
                    model, what, type(exc).__name__,
                )
        if _write_landed(documents, model, cas, write_id, what, landed):
            return
    raise StoreUnavailable(
        f"head write of model {model!r} ({what}) timed out {HEAD_WRITE_ATTEMPTS} times. The "
        "head was unchanged when last read, but a delayed write may still land, so the outcome "
        "is unknown: reload the head before writing again"
    )


def _write_landed(documents: Documents, model: str, cas: int, write_id: str, what: str,
                  landed: Callable[[HeadDoc], bool] | None) -> bool:
    """Return True if the write landed, False if the head is unchanged, else raise VersionConflict."""
    try:
        current = read(documents, model, include_deleted=True)
    except StoreUnavailable as exc:
        raise StoreUnavailable(
            f"head write of model {model!r} ({what}) timed out and the head could not be read "
            "back, so the write may or may not have landed; reload the head before writing again"
        ) from exc
    if current is not None:
        if write_id in current.doc.get("writes", []):
            return True
        if current.cas == cas:
            return False
        if landed is not None and landed(current):
            return True
    raise _conflict(model, what)


def _conflict(model: str, what: str) -> VersionConflict:
    return VersionConflict(
        f"model {model!r}: another writer changed the head first ({what}); reload the head "
        "and try again"
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
