"""Reading and pinning versions in the Couchbase store: heads, metadata, version pointers, model index."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Mapping

from couchbase.exceptions import CasMismatchException, DocumentExistsException
from couchbase.options import ReplaceOptions

from modelstore import _chunks, _keys, _publish
from modelstore._couchbase_connection import map_errors
from modelstore._couchbase_documents import Documents
from modelstore.base import Head
from modelstore.errors import ArtifactCorrupt, ModelNotFound, StoreUnavailable

NO_EXPIRY = timedelta(0)
MODEL_INDEX_ATTEMPTS = 20


def read_head(documents: Documents, model: str) -> Head:
    key = _keys.head(model)
    result = documents.get_json(_keys.HEADS, key)
    if result is None:
        raise ModelNotFound(f"model {model!r} not found in {documents.connection.settings.url}; create it first")
    doc = result.value
    valid = (
        isinstance(doc, dict)
        and doc.get("model") == model
        and _is_count(doc.get("latest"))
        and isinstance(doc.get("latest_id"), str)
        and isinstance(doc.get("aliases"), dict)
    )
    if not valid:
        raise ArtifactCorrupt(
            f"head document {documents.where(_keys.HEADS, key)} is not a head of "
            f"model {model!r}: {str(doc)[:200]}"
        )
    return Head(
        model, doc["latest"], doc["latest_id"], dict(doc["aliases"]),
        float(doc.get("updated_at", 0.0)), result.cas,
    )


def find_publish_id(documents: Documents, model: str, number: int, head: Head) -> tuple[str, bool]:
    """Return the publish id of version ``number`` and whether its pointer exists."""
    key = _keys.version_pointer(model, number)
    result = documents.get_json(_keys.METADATA, key)
    if result is not None:
        doc = result.value
        if not (isinstance(doc, dict) and doc.get("model") == model
                and doc.get("version") == number and isinstance(doc.get("publish_id"), str)):
            raise ArtifactCorrupt(
                f"version pointer {documents.where(_keys.METADATA, key)} is invalid: "
                f"{str(doc)[:200]}"
            )
        if number == head.latest and doc["publish_id"] != head.latest_id:
            raise ArtifactCorrupt(
                f"version pointer {documents.where(_keys.METADATA, key)} names "
                f"{doc['publish_id']!r} but the head of model {model!r} names {head.latest_id!r}"
            )
        return doc["publish_id"], True

    # No pointer: the publisher stopped after its head write, or the
    # version predates pointers. The parent links from the head lead to it.
    publish_id = head.latest_id
    for expected_version in range(head.latest, number, -1):
        metadata = read_metadata(documents, model, publish_id, expected_version)
        publish_id = metadata.get("parent_id")
        if not isinstance(publish_id, str):
            raise ArtifactCorrupt(
                f"version {expected_version} of model {model!r} has no parent_id, so version "
                f"{number} cannot be found from the head"
            )
    return publish_id, False


def read_metadata(documents: Documents, model: str, publish_id: str, number: int) -> dict[str, Any]:
    key = _keys.metadata(model, publish_id)
    where = documents.where(_keys.METADATA, key)
    result = documents.get_json(_keys.METADATA, key)
    if result is None:
        raise ArtifactCorrupt(
            f"metadata {where} of model {model!r} version {number} is missing; "
            "it expired or was removed"
        )
    return _publish.check_stored_metadata(
        result.value, model, where, version=number, publish_id=publish_id
    )


def pin_version(documents: Documents, model: str, publish_id: str, metadata: Mapping[str, Any]) -> None:
    """Remove the expiry of a visible version's documents: chunks first, metadata last."""
    for kind, entry in metadata["artifacts"].items():
        for index in range(len(_chunks.expected_chunks(entry, f"{model}::{publish_id}::{kind}"))):
            documents.touch(_keys.ARTIFACTS, _keys.chunk(model, publish_id, kind, index), NO_EXPIRY)
    documents.touch(_keys.METADATA, _keys.metadata(model, publish_id), NO_EXPIRY)


def write_pointer(documents: Documents, model: str, number: int, publish_id: str) -> None:
    # Written last: an existing pointer means every document of the
    # version has lost its expiry.
    key = _keys.version_pointer(model, number)
    doc = {"model": model, "version": number, "publish_id": publish_id}
    try:
        documents.insert_json(_keys.METADATA, key, doc, NO_EXPIRY)
    except DocumentExistsException:
        existing = documents.get_json(_keys.METADATA, key)
        if existing is None or existing.value != doc:
            raise ArtifactCorrupt(
                f"version pointer {documents.where(_keys.METADATA, key)} names another "
                f"publish than {publish_id!r}: {existing.value if existing else None!r}"
            ) from None


def read_index(documents: Documents) -> list[str]:
    result = documents.get_json(_keys.METADATA, _keys.MODEL_INDEX)
    if result is None:
        return []
    models = result.value.get("models") if isinstance(result.value, dict) else None
    if not isinstance(models, list):
        raise ArtifactCorrupt(
            f"model index {documents.where(_keys.METADATA, _keys.MODEL_INDEX)} is invalid"
        )
    return sorted(models)


def add_to_index(documents: Documents, model: str) -> None:
    """Add ``model`` to the model index with a CAS loop, so concurrent creators never drop a name."""
    collection = documents.connection.collection(_keys.METADATA)
    key = _keys.MODEL_INDEX
    for _ in range(MODEL_INDEX_ATTEMPTS):
        with map_errors(f"updating {documents.where(_keys.METADATA, key)}"):
            result = documents.get_json(_keys.METADATA, key)
            try:
                if result is None:
                    collection.insert(key, {"models": [model]})
                    return
                models = list(result.value.get("models", []))
                if model in models:
                    return
                collection.replace(key, {"models": sorted([*models, model])}, ReplaceOptions(cas=result.cas))
                return
            except (DocumentExistsException, CasMismatchException):
                continue
    raise StoreUnavailable(
        f"model {model!r} was created but adding it to the model index lost "
        f"{MODEL_INDEX_ATTEMPTS} races in a row; list_models() omits it until the next create_model"
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
