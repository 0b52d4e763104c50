"""SQLite store cases beyond the shared contract: URLs, WAL, locks, crashes and two processes."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import time

import pytest

from modelstore import ONNX, STATE, open_store
from modelstore.errors import ArtifactCorrupt, ConfigError, StoreError, StoreUnavailable
from modelstore.sqlite import SQLiteStore
from store_backends import CHILD_DEADLINE_S, SMALL_CHUNK_BYTES, run_in_child

SPEC = {"estimator": "SGDRegressor", "params": {}, "features": [{"name": "x"}]}


@pytest.fixture
def path(tmp_path):
    return tmp_path / "models.db"


@pytest.fixture
def store(path):
    store = SQLiteStore(path, chunk_size_bytes=SMALL_CHUNK_BYTES)
    yield store
    store.close()


def publish_next(store, model, size=3 * SMALL_CHUNK_BYTES):
    head = store.head(model)
    return store.publish(head, {ONNX: os.urandom(size), STATE: b"state"}, {"spec": SPEC})


def count_rows(path, table, model):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table} WHERE model = ?", (model,)).fetchone()[0]
    finally:
        conn.close()


# ---------------------------------------------------------------- URLs


def test_url_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with open_store("sqlite:///relative.db?busy_timeout_ms=250") as store:
        assert isinstance(store, SQLiteStore)
        assert store.busy_timeout_ms == 250
        store.create_model("m", SPEC)
    assert (tmp_path / "relative.db").is_file()


def test_url_absolute_path(tmp_path):
    target = tmp_path / "absolute.db"

    with open_store(f"sqlite:///{target}?chunk_size_bytes=10") as store:
        assert store.chunk_size_bytes == 10
        assert store.path == target
    assert target.is_file()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///:memory:", "a worker and a predictor can share"),
        ("sqlite://host/models.db", "sqlite:///relative/path.db"),
        ("sqlite:models.db", "sqlite:///relative/path.db"),
        ("sqlite:///models.db?timeout=5", "unknown option 'timeout'"),
        ("sqlite:///models.db?busy_timeout_ms=soon", "not an integer"),
        ("sqlite:///models.db?chunk_size_bytes=0", "chunk_size_bytes"),
        ("sqlite:////nonexistent-folder/models.db", "does not exist"),
    ],
)
def test_url_rejects_invalid(url, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises((ConfigError, ValueError), match=message):
        open_store(url)


# ---------------------------------------------------------------- file format


def test_file_in_wal_mode(store, path):
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_newer_schema_rejected(path):
    SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()

    with pytest.raises(StoreError, match="schema version 99.*upgrade streamfit"):
        SQLiteStore(path)


def test_version_one_file_gains_predictions(path):
    # A file written before stored predictions existed: schema version 1.
    with SQLiteStore(path) as store:
        store.create_model("m", {"estimator": "SGDRegressor", "params": {}, "features": [{"name": "x"}]})
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE predictions")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    with SQLiteStore(path) as store:
        assert store.list_models() == ["m"]
        store.put_predictions("m", {"k": b'{"version":0}'}, expiry_s=60)
        assert store.prediction("m", "k") == {"version": 0}
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()


def test_not_a_database(path):
    path.write_bytes(b"this is not a SQLite file" * 100)

    with pytest.raises(StoreError, match="not a database") as caught:
        SQLiteStore(path)
    assert not caught.value.retriable


def edit(path, sql, parameters):
    conn = sqlite3.connect(path)
    try:
        with conn:
            assert conn.execute(sql, parameters).rowcount == 1
    finally:
        conn.close()


def test_text_chunk_detected(store, path):
    store.create_model("m", SPEC)
    info = publish_next(store, "m")
    edit(path, "UPDATE artifacts SET bytes = 'text' WHERE publish_id = ? AND kind = 'onnx' AND chunk = 1",
         (info.publish_id,))

    with pytest.raises(ArtifactCorrupt, match=rf"{info.publish_id}::onnx::1 .* is not a BLOB"):
        store.artifact(info, ONNX)


def test_invalid_metadata_json_detected(store, path):
    store.create_model("m", SPEC)
    info = publish_next(store, "m")
    edit(path, "UPDATE versions SET metadata = '{not json' WHERE publish_id = ?", (info.publish_id,))

    with pytest.raises(ArtifactCorrupt, match="version 1 .* is not valid JSON"):
        store.version("m")


def test_metadata_of_other_version_detected(store, path):
    store.create_model("m", SPEC)
    first = publish_next(store, "m")
    second = publish_next(store, "m")
    edit(path, "UPDATE versions SET metadata = (SELECT metadata FROM versions WHERE publish_id = ?) "
               "WHERE publish_id = ?", (first.publish_id, second.publish_id))

    with pytest.raises(ArtifactCorrupt, match="version 1 instead of 2"):
        store.version("m", 2)


# ---------------------------------------------------------------- locks and crashes


def test_locked_database_is_retriable(path):
    store = SQLiteStore(path, busy_timeout_ms=200)
    try:
        head = store.create_model("m", SPEC)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreUnavailable, match="SQLITE_BUSY") as caught:
                store.publish(head, {ONNX: b"x"}, {"spec": SPEC})
            assert caught.value.retriable
        finally:
            other.execute("ROLLBACK")
            other.close()

        assert store.head("m") == head
        assert store.publish(head, {ONNX: b"x"}, {"spec": SPEC}).version == 1
    finally:
        store.close()


@pytest.mark.parametrize("step", ["_write_artifacts", "_write_metadata", "_write_head"])
def test_crash_leaves_no_rows(store, path, step):
    store.create_model("m", SPEC)
    publish_next(store, "m")
    artifact_rows = count_rows(path, "artifacts", "m")

    def crash_after_step():
        original = getattr(store, step)

        def step_then_die(*args):
            original(*args)
            os._exit(17)

        setattr(store, step, step_then_die)
        publish_next(store, "m", size=10 * SMALL_CHUNK_BYTES)

    assert run_in_child(crash_after_step) == 17

    assert count_rows(path, "artifacts", "m") == artifact_rows
    assert count_rows(path, "versions", "m") == 2
    assert store.head("m").latest == 1


def test_writer_and_reader_processes(store):
    head = store.create_model("m", SPEC)
    versions = 20

    def write_versions():
        for _ in range(versions):
            publish_next(store, "m")

    writer = os.fork()
    if writer == 0:
        code = 1
        try:
            write_versions()
            code = 0
        finally:
            os._exit(code)

    seen = [head.latest]
    status = None
    deadline = time.monotonic() + CHILD_DEADLINE_S
    try:
        while status is None and time.monotonic() < deadline:
            done, wait_status = os.waitpid(writer, os.WNOHANG)
            if done:
                status = wait_status
            info = store.version("m")
            seen.append(info.version)
            for kind, entry in info.metadata["artifacts"].items():
                assert hashlib.sha256(store.artifact(info, kind)).hexdigest() == entry["sha256"]
    finally:
        if status is None:
            # Still running (a failed read or the deadline): stop it, then reap it.
            os.kill(writer, signal.SIGKILL)
            os.waitpid(writer, 0)

    assert status is not None, f"the writer did not finish within {CHILD_DEADLINE_S} s"
    assert os.waitstatus_to_exitcode(status) == 0
    assert seen == sorted(seen)
    assert seen[-1] == versions


def test_delete_model_removes_its_predictions(path):
    spec = {"estimator": "SGDRegressor", "params": {}, "features": [{"name": "x"}]}
    with SQLiteStore(path) as store:
        for name in ("gone", "kept"):
            store.create_model(name, spec)
            store.put_predictions(name, {"k": b'{"version":0}'}, expiry_s=60)
        store.delete_model("gone")
        store.create_model("gone", spec)
        assert store.prediction("gone", "k") is None
        assert store.prediction("kept", "k") == {"version": 0}
