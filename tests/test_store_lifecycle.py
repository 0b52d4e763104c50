"""The version lifecycle, run over every backend: history, aliases, rollback, retention, delete, import.

Each test uses its own model names, so tests never see each other's data even
when they share a Couchbase scope.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from modelstore import ONNX, STATE, Reuse
from modelstore.errors import (
    ArtifactCorrupt,
    ArtifactTooLarge,
    InvalidInputError,
    ModelNotFound,
    VersionConflict,
    VersionNotFound,
)
from store_backends import SMALL_CHUNK_BYTES, couchbase_backend, sqlite_backend

SPEC = {"estimator": "SGDClassifier", "params": {}, "features": [{"name": "x"}], "labels": [0, 1]}


@pytest.fixture(params=["sqlite", pytest.param("couchbase", marks=pytest.mark.couchbase)])
def backend(request, tmp_path):
    if request.param == "sqlite":
        return sqlite_backend(tmp_path / "models.db")
    return couchbase_backend(request.getfixturevalue("gocaves_server"))


@pytest.fixture
def store(backend):
    store = backend.open()
    yield store
    store.close()


@pytest.fixture
def model():
    return f"m-{uuid.uuid4().hex[:12]}"


def publish_next(store, model, **fields):
    head = store.head(model)
    metadata = {"spec": SPEC, "samples_learned": 10 * (head.latest + 1),
                "offsets": {"t/0": 100 * (head.latest + 1)},
                "metrics": {"accuracy": head.latest / 10}, **fields}
    artifacts = {ONNX: os.urandom(2 * SMALL_CHUNK_BYTES + head.latest), STATE: os.urandom(64)}
    return store.publish(head, artifacts, metadata)


def chain(store, model, versions):
    store.create_model(model, SPEC)
    return [store.version(model, 0)] + [publish_next(store, model) for _ in range(versions)]


def numbers(store, model):
    return [info.version for info in store.versions(model)]


def chunk_items(backend, store, model):
    return {item for item in backend.reachable_items(store, model) if item[0] == "artifacts"}


# ---------------------------------------------------------------- history


def test_versions_lists_every_version(store, model):
    published = chain(store, model, 3)

    assert store.versions(model) == published
    assert numbers(store, model) == [0, 1, 2, 3]
    with pytest.raises(ModelNotFound, match=model):
        store.versions(f"{model}-missing")


# ---------------------------------------------------------------- aliases


def test_alias_set_move_remove(store, model):
    chain(store, model, 2)

    head = store.set_alias(model, "production", 1)
    assert head.aliases == {"production": 1}
    assert store.head(model).aliases == {"production": 1}

    store.set_alias(model, "candidate", 2)
    store.promote(model, 2)
    assert store.head(model).aliases == {"production": 2, "candidate": 2}

    store.set_alias(model, "candidate", None)
    store.set_alias(model, "never-set", None)
    assert store.head(model).aliases == {"production": 2}


def test_aliases_survive_publish(store, model):
    chain(store, model, 1)
    store.promote(model, 1)

    publish_next(store, model)
    publish_next(store, model)

    head = store.head(model)
    assert head.latest == 3
    assert head.aliases == {"production": 1}


def test_alias_write_moves_cas(store, model):
    chain(store, model, 1)
    stale = store.head(model)

    store.set_alias(model, "candidate", 1)

    # A publisher that read the head before the alias write must read it again.
    with pytest.raises(VersionConflict):
        store.publish(stale, {ONNX: b"stale"}, {"spec": SPEC})
    assert store.head(model).latest == 1
    assert store.head(model).aliases == {"candidate": 1}


@pytest.mark.parametrize("alias", ["", "1", "9lives", "a/b", "a:b", "a b", "x" * 65, None, 3])
def test_alias_invalid_name(backend, store, monkeypatch, model, alias):
    backend.forbid_access(store, monkeypatch)

    with pytest.raises(InvalidInputError, match="invalid alias name"):
        store.set_alias(model, alias, 1)


def test_alias_missing_version(store, model):
    chain(store, model, 1)

    with pytest.raises(VersionNotFound, match=rf"version 5 of model '{model}'"):
        store.set_alias(model, "production", 5)
    with pytest.raises(ModelNotFound):
        store.set_alias(f"{model}-missing", "production", 0)
    assert store.head(model).aliases == {}


# ---------------------------------------------------------------- rollback


def test_rollback_serves_source_artifacts(backend, store, model):
    published = chain(store, model, 3)
    chunks_before = chunk_items(backend, store, model)

    info = store.rollback(model, 1)

    assert info.version == 4
    assert store.head(model).latest == 4
    assert info.metadata["parent"] == 3
    assert info.metadata["rolled_back_from"] == 3
    assert info.metadata["source_version"] == 1
    assert info.source_version == 1
    for kind in (ONNX, STATE):
        assert store.artifact(info, kind) == store.artifact(published[1], kind)
        # A reference to the source's chunks, not a copy of them.
        assert info.metadata["artifacts"][kind]["publish_id"] == published[1].publish_id
    assert chunk_items(backend, store, model) == chunks_before
    # The model's learned state is the source's, but the records that
    # versions 2 and 3 consumed stay consumed.
    assert info.samples_learned == published[1].samples_learned
    assert info.metadata["metrics"] == published[1].metadata["metrics"]
    assert info.offsets == published[3].offsets
    assert info.spec == SPEC
    assert store.version(model, 4) == info


def test_rollback_default_steps_back(store, model):
    published = chain(store, model, 3)

    first = store.rollback(model)
    second = store.rollback(model)

    assert (first.version, first.source_version) == (4, 2)
    assert (second.version, second.source_version) == (5, 1)
    assert store.artifact(second, ONNX) == store.artifact(published[1], ONNX)
    with pytest.raises(InvalidInputError, match="no trained version before version 1"):
        store.rollback(model)


def test_rollback_to_rollback_serves_first_source(store, model):
    published = chain(store, model, 3)
    back = store.rollback(model, 1)
    publish_next(store, model)

    again = store.rollback(model, back.version)

    assert again.source_version == 1
    assert again.metadata["rolled_back_from"] == 5
    assert store.artifact(again, ONNX) == store.artifact(published[1], ONNX)
    assert again.metadata["artifacts"][ONNX]["publish_id"] == published[1].publish_id


def test_publish_after_rollback(store, model):
    chain(store, model, 2)
    back = store.rollback(model, 1)

    info = publish_next(store, model)

    assert info.version == 4
    assert info.metadata["parent"] == back.version
    assert info.metadata["parent_id"] == back.publish_id
    assert "rolled_back_from" not in info.metadata
    assert "source_version" not in info.metadata
    assert info.source_version == 4


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (0, InvalidInputError, "version 0"),
        (2, InvalidInputError, "already the latest"),
        (7, VersionNotFound, "version 7 of model"),
        (-1, InvalidInputError, "-1"),
    ],
)
def test_rollback_invalid_target(store, model, target, error, message):
    chain(store, model, 2)
    head = store.head(model)

    with pytest.raises(error, match=message):
        store.rollback(model, target)
    assert store.head(model) == head


def test_rollback_missing_model(store, model):
    with pytest.raises(ModelNotFound, match=model):
        store.rollback(model, 1)


# ---------------------------------------------------------------- retention


def test_retention_keeps_last_aliased_and_zero(store, model):
    published = chain(store, model, 6)
    store.promote(model, 2)

    removed = store.apply_retention(model, 2)

    assert removed == [1, 3, 4]
    assert numbers(store, model) == [0, 2, 5, 6]
    for number in (2, 5, 6):
        info = store.version(model, number)
        assert info == published[number]
        assert store.artifact(info, ONNX) == store.artifact(published[number], ONNX)
    for number in removed:
        with pytest.raises(VersionNotFound, match=rf"version {number} of model '{model}'.*retention"):
            store.version(model, number)
    assert store.apply_retention(model, 2) == []


def test_retention_removes_chunks(backend, store, model):
    published = chain(store, model, 3)
    kept_chunks = chunk_items(backend, store, model)

    store.apply_retention(model, 1)

    remaining = backend.stored_items(store, model, kept_chunks)
    assert [info.version for info in store.versions(model)] == [0, 3]
    assert {item for item in remaining if item[0] == "artifacts"} == chunk_items(backend, store, model)
    with pytest.raises(ArtifactCorrupt, match="version 1"):
        store.artifact(published[1], ONNX)


def test_retention_keeps_rollback_source_chunks(backend, store, model):
    published = chain(store, model, 3)
    back = store.rollback(model, 1)

    assert store.apply_retention(model, 1) == [1, 2, 3]

    # Version 1 is gone, but the rollback version still serves its bytes.
    with pytest.raises(VersionNotFound):
        store.version(model, 1)
    for kind in (ONNX, STATE):
        assert store.artifact(store.version(model, back.version), kind) == store.artifact(back, kind)
    source_chunks = chunk_items(backend, store, model)

    publish_next(store, model)
    assert store.apply_retention(model, 1) == [4]

    # Once no kept version refers to them, the source's chunks go as well.
    assert backend.stored_items(store, model, source_chunks) & source_chunks == set()
    with pytest.raises(ArtifactCorrupt):
        store.artifact(back, ONNX)
    assert published[0] == store.version(model, 0)


def test_retention_then_rollback_and_alias(store, model):
    chain(store, model, 4)
    store.apply_retention(model, 2)

    with pytest.raises(VersionNotFound, match="retention"):
        store.rollback(model, 1)
    with pytest.raises(VersionNotFound, match="retention"):
        store.set_alias(model, "production", 2)
    assert store.rollback(model, 3).version == 5


@pytest.mark.parametrize("keep", [0, -1, "2", None, True])
def test_retention_invalid_keep(store, model, keep):
    chain(store, model, 1)

    with pytest.raises(InvalidInputError, match="keep_last"):
        store.apply_retention(model, keep)


def test_automatic_retention(backend, model):
    store = backend.open(keep_versions=2)
    try:
        chain(store, model, 1)
        store.promote(model, 1)
        for _ in range(9):
            publish_next(store, model)

        # Retention runs every keep_versions // 4 (at least 1) publishes.
        assert numbers(store, model) == [0, 1, 9, 10]
    finally:
        store.close()


# ---------------------------------------------------------------- delete


def test_delete_model(backend, store, model):
    published = chain(store, model, 2)
    store.rollback(model, 1)
    items = backend.reachable_items(store, model)

    store.delete_model(model)

    assert model not in store.list_models()
    assert backend.stored_items(store, model, items) == set()
    with pytest.raises(ModelNotFound, match=model):
        store.head(model)
    with pytest.raises(ModelNotFound):
        store.version(model, 1)
    with pytest.raises(ArtifactCorrupt):
        store.artifact(published[1], ONNX)
    with pytest.raises(ModelNotFound, match=model):
        store.delete_model(model)

    # The name is free again, for a model that starts from scratch.
    store.create_model(model, {**SPEC, "labels": ["a", "b"]})
    assert numbers(store, model) == [0]
    assert store.version(model).spec["labels"] == ["a", "b"]


def test_publish_after_delete_fails(store, model):
    chain(store, model, 1)
    stale = store.head(model)
    store.delete_model(model)

    with pytest.raises((ModelNotFound, VersionConflict)):
        store.publish(stale, {ONNX: b"late"}, {"spec": SPEC})
    with pytest.raises(ModelNotFound):
        store.head(model)


# ---------------------------------------------------------------- import


def test_import_keeps_numbers_and_reuse(store, model):
    source = f"{model}-source"
    published = chain(store, source, 4)
    store.rollback(source, 2)
    store.apply_retention(source, 2)
    originals = store.versions(source)
    assert [info.version for info in originals] == [0, 4, 5]

    head = store.create_model(model, SPEC)
    imported = {}
    for info in originals[1:]:
        artifacts = {}
        for kind, entry in info.metadata["artifacts"].items():
            owner = next((i for i in imported.values()
                          if i.metadata["imported"]["publish_id"] == entry.get("publish_id")), None)
            artifacts[kind] = Reuse(owner, kind) if owner else store.artifact(info, kind)
        imported[info.version] = store.import_version(head, info.metadata, artifacts)
        head = store.head(model)

    assert numbers(store, model) == [0, 4, 5]
    for original in originals[1:]:
        copy = store.version(model, original.version)
        assert copy.publish_id != original.publish_id
        assert copy.metadata["imported"]["publish_id"] == original.publish_id
        for field in ("parent", "created_at", "offsets", "samples_learned", "metrics"):
            assert copy.metadata[field] == original.metadata[field], field
        for kind in (ONNX, STATE):
            assert store.artifact(copy, kind) == store.artifact(original, kind)
    # Version 4's parent (3) was not imported, version 5's parent (4) was.
    assert store.version(model, 4).metadata["parent_id"] is None
    assert store.version(model, 5).metadata["parent_id"] == imported[4].publish_id
    assert store.version(model, 5).metadata["source_version"] == 2
    with pytest.raises(VersionNotFound):
        store.version(model, 2)
    assert published[2].publish_id != imported[5].publish_id

    # Publishing goes on after the imported versions.
    assert publish_next(store, model).version == 6


def test_import_rejects_old_number(store, model):
    chain(store, model, 2)
    info = store.version(model, 1)

    with pytest.raises(InvalidInputError, match="above the latest version 2"):
        store.import_version(store.head(model), info.metadata, {ONNX: b"x"})


# ---------------------------------------------------------------- errors


def test_checksum_mismatch_names_model_and_version(backend, store, model):
    published = chain(store, model, 2)
    good = store.artifact(published[2], ONNX)

    backend.corrupt_chunk(published[2], ONNX, 0, bytes(reversed(good[:SMALL_CHUNK_BYTES])))

    with pytest.raises(ArtifactCorrupt, match=rf"model '{model}' version 2.*sha256"):
        store.artifact(store.version(model, 2), ONNX)


def test_oversize_artifact_names_everything(backend, model):
    store = backend.open(max_artifact_bytes=5000)
    try:
        chain(store, model, 0)
        head = store.head(model)

        with pytest.raises(ArtifactTooLarge) as caught:
            store.publish(head, {ONNX: os.urandom(6000)}, {"spec": SPEC})

        message = str(caught.value)
        for fact in (repr(model), "version 1", "6000 bytes", "5000", "max_artifact_bytes"):
            assert fact in message
        assert store.head(model) == head
    finally:
        store.close()


def test_artifact_sha256_in_metadata(store, model):
    published = chain(store, model, 1)

    entry = published[1].metadata["artifacts"][ONNX]
    data = store.artifact(published[1], ONNX)
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["size"] == len(data) == sum(chunk["size"] for chunk in entry["chunks"])


def test_heads_bulk_read(store, model):
    names = [f"{model}-{i}" for i in range(3)]
    for name in names:
        store.create_model(name, SPEC)
    publish_next(store, names[1])
    store.promote(names[1], 1)
    store.delete_model(names[2])

    heads = store.heads([*names, f"{model}-missing"])

    assert heads == {name: store.head(name) for name in names[:2]}
    assert heads[names[1]].aliases == {"production": 1}
    assert store.heads([]) == {}
    with pytest.raises(InvalidInputError, match="invalid model name"):
        store.heads(["ok", "../bad"])
