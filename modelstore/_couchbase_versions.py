"""Reading and pinning versions in the Couchbase store: metadata, version pointers, model index."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Mapping

from couchbase.exceptions import CasMismatchException, DocumentExistsException
from couchbase.options import ReplaceOptions

from modelstore import _artifacts, _keys, _publish
from modelstore._couchbase_connection import map_errors
from modelstore._couchbase_documents import Documents
from modelstore.base import Head, VersionInfo
from modelstore.errors import ArtifactCorrupt, StoreUnavailable

NO_EXPIRY = timedelta(0)
MODEL_INDEX_ATTEMPTS = 20


def find_publish_id(documents: Documents, model: str, number: int, head: Head) -> tuple[str, bool]:
    """Return the publish id of version ``number`` and whether its pointer exists.

    The caller checked that the version is live in ``head``.
    """
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

    # No pointer: the publisher stopped after its head write. The parent
    # links from the head lead to the version; they skip the numbers that
    # an import left out.
    publish_id, current = head.latest_id, head.latest
    while current != number:
        metadata = read_metadata(documents, model, publish_id, current)
        parent, publish_id = metadata.get("parent"), metadata.get("parent_id")
        if not isinstance(publish_id, str) or not isinstance(parent, int) or parent < number:
            raise ArtifactCorrupt(
                f"version {number} of model {model!r} has no version pointer and the parent "
                f"links from the head (at version {current}) do not lead to it"
            )
        current = parent
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
    """Remove the expiry of a visible version's documents: chunks first, metadata last.

    Chunks that the version reuses from another one lost their expiry when
    that version was published, and touching them again changes nothing.
    """
    info = VersionInfo(model, metadata["version"], publish_id, metadata)
    for stored_id, kind, count in sorted(_artifacts.storage_refs(info)):
        for index in range(count):
            documents.touch(_keys.ARTIFACTS, _keys.chunk(model, stored_id, kind, index), NO_EXPIRY)
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


def remove_from_index(documents: Documents, model: str) -> None:
    """Remove ``model`` from the model index with a CAS loop."""
    collection = documents.connection.collection(_keys.METADATA)
    key = _keys.MODEL_INDEX
    for _ in range(MODEL_INDEX_ATTEMPTS):
        with map_errors(f"updating {documents.where(_keys.METADATA, key)}"):
            result = documents.get_json(_keys.METADATA, key)
            if result is None:
                return
            models = list(result.value.get("models", []))
            if model not in models:
                return
            models.remove(model)
            try:
                collection.replace(key, {"models": models}, ReplaceOptions(cas=result.cas))
                return
            except CasMismatchException:
                continue
    raise StoreUnavailable(
        f"removing model {model!r} from the model index lost {MODEL_INDEX_ATTEMPTS} races in a "
        "row; delete the model again to finish"
    )
