"""Couchbase store cases beyond the shared contract: URL and credentials, wrong documents,
orphan expiry, ambiguous head writes and outages, against gocaves."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from datetime import timedelta

import pytest
from couchbase.auth import PasswordAuthenticator
from couchbase.cluster import Cluster
from couchbase.exceptions import AmbiguousTimeoutException, DocumentNotFoundException
from couchbase.options import ClusterOptions, GetOptions, ReplaceOptions
from couchbase.transcoder import RawBinaryTranscoder

from modelstore import ONNX, STATE, _keys, open_store
from modelstore._couchbase_settings import CouchbaseSettings, credentials
from modelstore.couchbase import CouchbaseStore
from modelstore.errors import (
    ArtifactCorrupt,
    ConfigError,
    StoreError,
    StoreUnavailable,
    VersionConflict,
)
from store_backends import COUCHBASE_SCOPE, SMALL_CHUNK_BYTES, couchbase_backend

SPEC = {"estimator": "SGDRegressor", "params": {}, "features": [{"name": "x"}]}
BINARY = RawBinaryTranscoder()


class SimulatedCrash(BaseException):
    """Stops a publish the way a killed process would: no store code catches it."""


# ---------------------------------------------------------------- URL and credentials (no server)


def test_url_options():
    settings = CouchbaseSettings.from_url(
        "couchbase://127.0.0.1:1,127.0.0.1:2/models?scope=prod&chunk_size_bytes=1024"
        "&kv_timeout_ms=900&orphan_expiry_s=60&create_collections=false"
    )

    assert settings.connstr == "couchbase://127.0.0.1:1,127.0.0.1:2"
    assert settings.bucket == "models"
    assert settings.scope == "prod"
    assert settings.chunk_size_bytes == 1024
    assert settings.kv_timeout_ms == 900
    assert settings.orphan_expiry_s == 60
    assert settings.create_collections is False


def test_url_defaults():
    settings = CouchbaseSettings.from_url("couchbase://db.example")

    assert settings.bucket == "default"
    assert settings.scope == "streamfit"
    assert settings.chunk_size_bytes == 20 * 1024 * 1024
    assert settings.orphan_expiry_s == 24 * 3600


@pytest.mark.parametrize(
    "url", ["couchbase://admin:s3cret@db/default", "couchbases://admin:s3/cr@t@db/default", "couchbase://admin@db"]
)
def test_url_rejects_credentials(url):
    with pytest.raises(ConfigError, match="STREAMFIT_COUCHBASE_PASSWORD") as caught:
        CouchbaseSettings.from_url(url)
    assert "s3" not in str(caught.value)
    assert "admin" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("couchbase://db/default?password=x", "option 'password': unknown"),
        ("couchbase://db/default?chunk_size_bytes=20971521", "chunk_size_bytes=20971521"),
        ("couchbase://db/default?chunk_size_bytes=big", "expected an integer"),
        ("couchbase://db/default?ca_cert=/etc/hosts", "couchbases://"),
        ("couchbases://db/default?ca_cert=/nonexistent.pem", "not found"),
        ("couchbase://db/default?scope=_system", "invalid Couchbase scope"),
        ("couchbase://db/default?create_collections=maybe", "true or false"),
        ("couchbase://db/b!d", "invalid Couchbase bucket name"),
        ("couchbase:///default", "hosts"),
        ("redis://db/default", "expected couchbase://"),
    ],
)
def test_url_rejects_invalid(url, message):
    with pytest.raises(ConfigError, match=message):
        CouchbaseSettings.from_url(url)


def test_credentials_from_environment():
    environ = {"STREAMFIT_COUCHBASE_USERNAME": "streamfit", "STREAMFIT_COUCHBASE_PASSWORD": "pw"}

    assert credentials(environ) == ("streamfit", "pw")


def test_credentials_from_password_file(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("from file\n")
    environ = {"STREAMFIT_COUCHBASE_USERNAME": "streamfit", "STREAMFIT_COUCHBASE_PASSWORD_FILE": str(secret)}

    assert credentials(environ) == ("streamfit", "from file")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "STREAMFIT_COUCHBASE_USERNAME"),
        ({"STREAMFIT_COUCHBASE_USERNAME": "u"}, "missing Couchbase password"),
        ({"STREAMFIT_COUCHBASE_USERNAME": "u", "STREAMFIT_COUCHBASE_PASSWORD": "a",
          "STREAMFIT_COUCHBASE_PASSWORD_FILE": "/x"}, "only one"),
        ({"STREAMFIT_COUCHBASE_USERNAME": "u", "STREAMFIT_COUCHBASE_PASSWORD_FILE": "/nonexistent"}, "cannot read"),
    ],
)
def test_credentials_missing(environ, message):
    with pytest.raises(ConfigError, match=message):
        credentials(environ)


# ---------------------------------------------------------------- fixtures for server tests


@pytest.fixture
def backend(gocaves_server):
    return couchbase_backend(gocaves_server)


@pytest.fixture
def store(backend):
    store = backend.open()
    yield store
    store.close()


@pytest.fixture
def model():
    return f"cb-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def raw(gocaves_server):
    """Collections of the test scope, reached with the SDK directly, behind the store's back."""
    cluster = Cluster(
        gocaves_server.connstr,
        ClusterOptions(PasswordAuthenticator(gocaves_server.username, gocaves_server.password)),
    )
    cluster.wait_until_ready(timedelta(seconds=10))
    scope = cluster.bucket(gocaves_server.bucket).scope(COUCHBASE_SCOPE)
    yield lambda name: scope.collection(name)
    cluster.close()


def publish_next(store, model, artifacts=None):
    head = store.head(model)
    if artifacts is None:
        artifacts = {ONNX: os.urandom(2 * SMALL_CHUNK_BYTES + 5), STATE: b"state"}
    return store.publish(head, artifacts, {"spec": SPEC})


def document_keys(info):
    keys = [(_keys.METADATA, _keys.metadata(info.model, info.publish_id))]
    for kind, entry in info.metadata["artifacts"].items():
        for index in range(len(entry["chunks"])):
            keys.append((_keys.ARTIFACTS, _keys.chunk(info.model, info.publish_id, kind, index)))
    return keys


def expiry_of(raw, collection, key):
    """Return the document's expiry time (None for no expiry), or "missing"."""
    transcoder = BINARY if collection == _keys.ARTIFACTS else None
    options = GetOptions(with_expiry=True, transcoder=transcoder) if transcoder else GetOptions(with_expiry=True)
    try:
        return raw(collection).get(key, options).expiry_time
    except DocumentNotFoundException:
        return "missing"


def capture_plan_then(store, monkeypatch, step, action):
    """Replace ``store.<step>`` with: run it, record its plan, then call ``action()``."""
    plans = []
    original = getattr(store, step)

    def hooked(*args):
        original(*args)
        plans.extend(a for a in args if hasattr(a, "publish_id"))
        action()

    monkeypatch.setattr(store, step, hooked)
    return plans


# ---------------------------------------------------------------- connection and collections


def test_open_store_reads_environment(gocaves_server, monkeypatch):
    monkeypatch.setenv("STREAMFIT_COUCHBASE_USERNAME", gocaves_server.username)
    monkeypatch.setenv("STREAMFIT_COUCHBASE_PASSWORD", gocaves_server.password)

    with open_store(f"{gocaves_server.connstr}/{gocaves_server.bucket}?scope={COUCHBASE_SCOPE}") as store:
        assert isinstance(store, CouchbaseStore)
        assert gocaves_server.password not in store.url
        assert isinstance(store.list_models(), list)


def test_collections_created_when_missing(gocaves_server):
    scope = f"fresh-{uuid.uuid4().hex[:8]}"
    environ = {"STREAMFIT_COUCHBASE_USERNAME": gocaves_server.username,
               "STREAMFIT_COUCHBASE_PASSWORD": gocaves_server.password}
    url = f"{gocaves_server.connstr}/{gocaves_server.bucket}?scope={scope}"

    stores = [CouchbaseStore.from_url(url, environ=environ) for _ in range(2)]
    try:
        cluster = Cluster(gocaves_server.connstr, ClusterOptions(
            PasswordAuthenticator(gocaves_server.username, gocaves_server.password)))
        try:
            cluster.wait_until_ready(timedelta(seconds=10))
            scopes = cluster.bucket(gocaves_server.bucket).collections().get_all_scopes()
        finally:
            cluster.close()
        collections = {c.name for s in scopes if s.name == scope for c in s.collections}
        assert collections == set(_keys.COLLECTIONS)
        stores[1].create_model("fresh", SPEC)
        assert stores[0].list_models() == ["fresh"]
    finally:
        for store in stores:
            store.close()


def test_new_collections_probed_until_usable(gocaves_server):
    from modelstore._couchbase_connection import _ensure_collections, _wait_until_usable

    cluster = Cluster(gocaves_server.connstr, ClusterOptions(
        PasswordAuthenticator(gocaves_server.username, gocaves_server.password)))
    try:
        cluster.wait_until_ready(timedelta(seconds=10))
        bucket = cluster.bucket(gocaves_server.bucket)
        scope = f"probe-{uuid.uuid4().hex[:8]}"
        assert _ensure_collections(bucket, scope) is True
        assert _ensure_collections(bucket, scope) is False
        # Right after creation a write may not reach the collection yet;
        # after the probe every collection takes one.
        _wait_until_usable(bucket, scope, 10)
        for name in _keys.COLLECTIONS:
            bucket.scope(scope).collection(name).upsert("k", {"n": 1})
        # A scope that does not exist never becomes usable: the wait ends
        # with an error that names the collection.
        with pytest.raises(StoreUnavailable, match=r"collection never-[0-9a-f]+\.\w+ was created but is not usable after 1 s"):
            _wait_until_usable(bucket, f"never-{uuid.uuid4().hex[:8]}", 1)
    finally:
        cluster.close()


def test_missing_collections_named_when_not_created(gocaves_server):
    environ = {"STREAMFIT_COUCHBASE_USERNAME": gocaves_server.username,
               "STREAMFIT_COUCHBASE_PASSWORD": gocaves_server.password}
    scope = f"absent-{uuid.uuid4().hex[:8]}"
    url = f"{gocaves_server.connstr}/{gocaves_server.bucket}?scope={scope}&create_collections=false"
    with pytest.raises(StoreError, match=f"collection {scope}\\.artifacts does not exist .*create_collections=true"):
        CouchbaseStore.from_url(url, environ=environ)


def test_wrong_password_not_retriable(gocaves_server):
    environ = {"STREAMFIT_COUCHBASE_USERNAME": gocaves_server.username,
               "STREAMFIT_COUCHBASE_PASSWORD": "wrong-secret-value"}

    with pytest.raises(StoreError, match="rejected the credentials") as caught:
        CouchbaseStore.from_url(f"{gocaves_server.connstr}/{gocaves_server.bucket}?scope={COUCHBASE_SCOPE}",
                                environ=environ)
    assert not caught.value.retriable
    assert "wrong-secret-value" not in str(caught.value)


def test_closed_port_unavailable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environ = {"STREAMFIT_COUCHBASE_USERNAME": "u", "STREAMFIT_COUCHBASE_PASSWORD": "p"}

    with pytest.raises(StoreUnavailable) as caught:
        CouchbaseStore.from_url(f"couchbase://127.0.0.1:{port}/default?connect_timeout_ms=1000", environ=environ)
    assert caught.value.retriable


def test_paused_server_unavailable(gocaves_pausable, model):
    store = couchbase_backend(gocaves_pausable).open(kv_timeout_ms=500)
    try:
        store.create_model(model, SPEC)
        gocaves_pausable.pause()
        try:
            with pytest.raises(StoreUnavailable, match="timed out or is unavailable"):
                store.head(model)
        finally:
            gocaves_pausable.resume()
        assert store.head(model).latest == 0
    finally:
        store.close()


def test_concurrent_creates_all_listed(backend):
    names = [f"cb-{uuid.uuid4().hex[:8]}" for _ in range(6)]
    stores = [backend.open() for _ in names]
    try:
        threads = [threading.Thread(target=s.create_model, args=(n, SPEC)) for s, n in zip(stores, names)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

        assert set(names) <= set(stores[0].list_models())
    finally:
        for store in stores:
            store.close()


# ---------------------------------------------------------------- documents that are not what the key promises


def test_json_document_at_chunk_key(store, model, raw):
    store.create_model(model, SPEC)
    info = publish_next(store, model)
    key = _keys.chunk(model, info.publish_id, ONNX, 1)
    raw(_keys.ARTIFACTS).replace(key, {"not": "binary"})

    with pytest.raises(ArtifactCorrupt, match=rf"{key}.*is not binary"):
        store.artifact(info, ONNX)


def test_binary_document_at_metadata_key(store, model, raw):
    store.create_model(model, SPEC)
    info = publish_next(store, model)
    key = _keys.metadata(model, info.publish_id)
    raw(_keys.METADATA).replace(key, b"\x00binary", ReplaceOptions(transcoder=BINARY))

    with pytest.raises(ArtifactCorrupt, match=rf"{key}.*is not JSON"):
        store.version(model)


def test_binary_document_at_head_key(store, model, raw):
    store.create_model(model, SPEC)
    raw(_keys.HEADS).replace(model, b"\x00binary", ReplaceOptions(transcoder=BINARY))

    with pytest.raises(ArtifactCorrupt, match=rf"'{model}'.*is not JSON"):
        store.head(model)


def test_metadata_of_other_version_under_key(store, model, raw):
    store.create_model(model, SPEC)
    first = publish_next(store, model)
    second = publish_next(store, model)
    key = _keys.metadata(model, second.publish_id)
    raw(_keys.METADATA).replace(key, dict(first.metadata))

    with pytest.raises(ArtifactCorrupt, match=rf"{key}.*version 1 instead of 2"):
        store.version(model, 2)


def test_chunk_of_other_artifact_under_key(store, model, raw):
    store.create_model(model, SPEC)
    info = publish_next(store, model)
    other = publish_next(store, model)
    stolen = raw(_keys.ARTIFACTS).get(_keys.chunk(model, other.publish_id, ONNX, 0), GetOptions(transcoder=BINARY))
    key = _keys.chunk(model, info.publish_id, ONNX, 0)
    raw(_keys.ARTIFACTS).replace(key, stolen.value, ReplaceOptions(transcoder=BINARY))

    with pytest.raises(ArtifactCorrupt, match=rf"{key}.*sha256"):
        store.artifact(info, ONNX)


# ---------------------------------------------------------------- orphans and expiry


def test_published_documents_never_expire(store, model, raw):
    head = store.create_model(model, SPEC)
    info = publish_next(store, model)

    for collection, key in document_keys(info) + document_keys(store.version(model, 0)):
        assert expiry_of(raw, collection, key) is None, key
    assert expiry_of(raw, _keys.METADATA, _keys.version_pointer(model, 1)) is None
    assert store.head(model).latest_id != head.latest_id


def test_crashed_publish_documents_expire(backend, model, raw, monkeypatch):
    store = backend.open(orphan_expiry_s=2)
    try:
        store.create_model(model, SPEC)
        published = publish_next(store, model)

        def crash():
            raise SimulatedCrash()

        plans = capture_plan_then(store, monkeypatch, "_write_metadata", crash)
        with pytest.raises(SimulatedCrash):
            publish_next(store, model)
        crashed = plans[0]
        orphan_keys = [(_keys.METADATA, _keys.metadata(model, crashed.publish_id))] + [
            (_keys.ARTIFACTS, _keys.chunk(model, crashed.publish_id, kind, i))
            for kind, parts in crashed.chunks.items() for i in range(len(parts))
        ]
        for collection, key in orphan_keys:
            assert expiry_of(raw, collection, key) not in (None, "missing"), key

        time.sleep(3.5)

        for collection, key in orphan_keys:
            assert expiry_of(raw, collection, key) == "missing", key
        # The published version is untouched by the same wait.
        assert store.head(model).latest_id == published.publish_id
        assert store.artifact(store.version(model), ONNX) == store.artifact(published, ONNX)
    finally:
        store.close()


def test_losing_publish_removes_its_documents(backend, model, raw, monkeypatch):
    loser, winner = backend.open(), backend.open()
    try:
        head = loser.create_model(model, SPEC)
        # The winner publishes after the loser passed its early head check,
        # so only the CAS of the loser's head write can stop it.
        plans = capture_plan_then(
            loser, monkeypatch, "_write_metadata",
            lambda: winner.publish(winner.head(model), {ONNX: b"winner"}, {"spec": SPEC}),
        )

        with pytest.raises(VersionConflict, match=model):
            loser.publish(head, {ONNX: os.urandom(3 * SMALL_CHUNK_BYTES)}, {"spec": SPEC})

        assert loser.artifact(loser.version(model), ONNX) == b"winner"
        lost = plans[0]
        assert expiry_of(raw, _keys.METADATA, _keys.metadata(model, lost.publish_id)) == "missing"
        for index in range(3):
            assert expiry_of(raw, _keys.ARTIFACTS, _keys.chunk(model, lost.publish_id, ONNX, index)) == "missing"
    finally:
        loser.close()
        winner.close()


def test_stop_after_head_write_repaired_on_read(backend, model, raw, monkeypatch):
    store = backend.open(orphan_expiry_s=2)
    try:
        store.create_model(model, SPEC)

        def crash(*args):
            raise SimulatedCrash()

        monkeypatch.setattr(store, "_pin_version", crash)
        with pytest.raises(SimulatedCrash):
            publish_next(store, model)
        monkeypatch.undo()

        head = store.head(model)
        assert head.latest == 1
        assert expiry_of(raw, _keys.METADATA, _keys.version_pointer(model, 1)) == "missing"
        assert expiry_of(raw, _keys.METADATA, _keys.metadata(model, head.latest_id)) not in (None, "missing")

        # Right after the head write, a reader leaves the repair to a
        # publisher that may still be running; after the grace it repairs.
        store.version(model)
        assert expiry_of(raw, _keys.METADATA, _keys.version_pointer(model, 1)) == "missing"
        time.sleep(0.6)
        info = store.version(model)

        for collection, key in document_keys(info):
            assert expiry_of(raw, collection, key) is None, key
        assert expiry_of(raw, _keys.METADATA, _keys.version_pointer(model, 1)) is None
        time.sleep(2.5)
        assert store.artifact(store.version(model), ONNX) is not None
    finally:
        store.close()


def test_version_found_without_pointers(store, model, raw):
    store.create_model(model, SPEC)
    versions = [publish_next(store, model) for _ in range(3)]
    for number in (1, 2):
        raw(_keys.METADATA).remove(_keys.version_pointer(model, number))

    assert store.version(model, 1) == versions[0]
    assert store.version(model, 2) == versions[1]
    assert expiry_of(raw, _keys.METADATA, _keys.version_pointer(model, 1)) is None


def test_slow_publish_gives_up_before_expiry(backend, model, monkeypatch):
    store = backend.open(orphan_expiry_s=2)
    try:
        head = store.create_model(model, SPEC)
        capture_plan_then(store, monkeypatch, "_write_metadata", lambda: time.sleep(1.2))

        with pytest.raises(StoreUnavailable, match="orphan_expiry_s=2"):
            publish_next(store, model)
        assert store.head(model) == head
    finally:
        store.close()


# ---------------------------------------------------------------- ambiguous head writes


class FlakyHeads:
    """The real heads collection, whose next replace runs ``before``, maybe applies, then times out."""

    def __init__(self, collection, *, apply: bool, before=lambda: None, after=lambda: None):
        self._collection = collection
        self._apply = apply
        self._before = before
        self._after = after
        self.failures = 0

    def __getattr__(self, name):
        return getattr(self._collection, name)

    def replace(self, *args, **kwargs):
        if self.failures:
            return self._collection.replace(*args, **kwargs)
        self.failures += 1
        self._before()
        if self._apply:
            self._collection.replace(*args, **kwargs)
        self._after()
        raise AmbiguousTimeoutException(message="injected timeout after the request was sent")


def flaky_heads(store, monkeypatch, **options):
    connection = store._documents.connection
    original = connection.collection
    flaky = FlakyHeads(original(_keys.HEADS), **options)
    monkeypatch.setattr(connection, "collection", lambda name: flaky if name == _keys.HEADS else original(name))
    return flaky


def test_ambiguous_head_write_that_landed(store, model, monkeypatch):
    store.create_model(model, SPEC)
    flaky = flaky_heads(store, monkeypatch, apply=True)

    info = publish_next(store, model)

    assert flaky.failures == 1
    assert store.head(model).latest_id == info.publish_id
    assert store.version(model, 1) == info


def test_ambiguous_head_write_that_did_not_land(store, model, monkeypatch):
    store.create_model(model, SPEC)
    flaky = flaky_heads(store, monkeypatch, apply=False)

    info = publish_next(store, model)

    assert flaky.failures == 1
    assert store.head(model).latest == 1
    assert store.head(model).latest_id == info.publish_id


def test_ambiguous_head_write_lost_to_other_writer(backend, store, model, monkeypatch):
    store.create_model(model, SPEC)
    other = backend.open()
    try:
        flaky_heads(
            store, monkeypatch, apply=False,
            before=lambda: other.publish(other.head(model), {ONNX: b"other"}, {"spec": SPEC}),
        )

        with pytest.raises(VersionConflict):
            publish_next(store, model)
        assert other.artifact(other.version(model), ONNX) == b"other"
        assert other.head(model).latest == 1
    finally:
        other.close()


def test_ambiguous_head_write_landed_then_overtaken(backend, store, model, monkeypatch):
    store.create_model(model, SPEC)
    other = backend.open()
    try:
        flaky_heads(
            store, monkeypatch, apply=True,
            after=lambda: other.publish(other.head(model), {ONNX: b"on top"}, {"spec": SPEC}),
        )

        info = publish_next(store, model)

        assert info.version == 1
        assert other.version(model, 1).publish_id == info.publish_id
        assert other.head(model).latest == 2
    finally:
        other.close()


def test_ambiguous_alias_write_that_landed(store, model, monkeypatch):
    store.create_model(model, SPEC)
    publish_next(store, model)
    flaky = flaky_heads(store, monkeypatch, apply=True)

    head = store.set_alias(model, "production", 1)

    assert flaky.failures == 1
    assert head.aliases == {"production": 1}
    assert store.head(model).aliases == {"production": 1}


def test_ambiguous_alias_write_that_did_not_land(store, model, monkeypatch):
    store.create_model(model, SPEC)
    publish_next(store, model)
    flaky = flaky_heads(store, monkeypatch, apply=False)

    store.set_alias(model, "production", 1)

    assert flaky.failures == 1
    assert store.head(model).aliases == {"production": 1}


def test_ambiguous_alias_write_landed_then_overtaken(backend, store, model, monkeypatch):
    store.create_model(model, SPEC)
    publish_next(store, model)
    other = backend.open()
    try:
        # Another writer publishes on top of the alias write before the
        # timed-out writer reads the head back: the write id in the head's
        # write list still shows that the alias write landed.
        flaky_heads(store, monkeypatch, apply=True,
                    after=lambda: other.publish(other.head(model), {ONNX: b"on top"}, {"spec": SPEC}))

        store.set_alias(model, "candidate", 1)

        head = other.head(model)
        assert head.latest == 2
        assert head.aliases == {"candidate": 1}
    finally:
        other.close()


def test_ambiguous_rollback_write_that_landed(store, model, monkeypatch):
    store.create_model(model, SPEC)
    first = publish_next(store, model)
    publish_next(store, model)
    flaky = flaky_heads(store, monkeypatch, apply=True)

    info = store.rollback(model, 1)

    assert flaky.failures == 1
    assert info.version == 3
    assert store.head(model).latest == 3
    assert store.artifact(store.version(model), ONNX) == store.artifact(first, ONNX)


def test_ambiguous_retention_write_that_landed(store, model, monkeypatch):
    store.create_model(model, SPEC)
    for _ in range(3):
        publish_next(store, model)
    flaky = flaky_heads(store, monkeypatch, apply=True)

    assert store.apply_retention(model, 1) == [1, 2]

    assert flaky.failures == 1
    assert [info.version for info in store.versions(model)] == [0, 3]
    assert store.head(model).latest == 3


def test_head_write_outcome_unknown(gocaves_pausable, model, monkeypatch):
    store = couchbase_backend(gocaves_pausable).open(kv_timeout_ms=500)
    try:
        store.create_model(model, SPEC)
        publish_next(store, model)

        def pause_then_fail():
            # The head cannot be read back while the cluster is paused, so
            # the store cannot tell whether the write landed.
            gocaves_pausable.pause()

        flaky_heads(store, monkeypatch, apply=False, after=pause_then_fail)
        try:
            with pytest.raises(StoreUnavailable, match="may or may not have landed"):
                store.set_alias(model, "production", 1)
        finally:
            gocaves_pausable.resume()
        monkeypatch.undo()
        assert store.head(model).aliases == {}
    finally:
        store.close()
