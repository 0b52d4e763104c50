"""Per-backend helpers for the model store tests: open a store, corrupt a chunk, forbid access.

The contract tests run the same cases over every backend. This module
contains what differs per backend: how to reach a stored chunk behind the
store's back, and what "store access" means.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import pytest

from modelstore import _keys
from modelstore.base import ModelStore, VersionInfo
from modelstore.couchbase import CouchbaseStore
from modelstore.sqlite import SQLiteStore

# Small enough that a few kilobytes make several chunks, so every contract
# test exercises chunking.
SMALL_CHUNK_BYTES = 4096

# One scope per test session keeps runs against a shared cluster apart.
COUCHBASE_SCOPE = f"contract-{uuid.uuid4().hex[:8]}"

CHILD_DEADLINE_S = 60.0


@dataclass
class Backend:
    """A store under test plus the backend-specific operations the tests need."""

    name: str
    open: Callable[..., ModelStore]
    corrupt_chunk: Callable[[VersionInfo, str, int, bytes], None]
    delete_chunk: Callable[[VersionInfo, str, int], None]
    forbid_access: Callable[[ModelStore, pytest.MonkeyPatch], None]
    # URL and environment for open_store() in another Python process.
    url: str
    environ: dict[str, str]


def sqlite_backend(path) -> Backend:
    def open_store(chunk_size_bytes: int | None = SMALL_CHUNK_BYTES, **options) -> SQLiteStore:
        if chunk_size_bytes is not None:
            options["chunk_size_bytes"] = chunk_size_bytes
        return SQLiteStore(path, **options)

    def execute(sql: str, parameters: tuple) -> None:
        # A separate connection, as another program editing the file would use.
        conn = sqlite3.connect(path)
        try:
            with conn:
                assert conn.execute(sql, parameters).rowcount == 1
        finally:
            conn.close()

    def corrupt_chunk(info: VersionInfo, kind: str, index: int, data: bytes) -> None:
        execute(
            "UPDATE artifacts SET bytes = ? WHERE model = ? AND publish_id = ? AND kind = ? AND chunk = ?",
            (data, info.model, info.publish_id, kind, index),
        )

    def delete_chunk(info: VersionInfo, kind: str, index: int) -> None:
        execute(
            "DELETE FROM artifacts WHERE model = ? AND publish_id = ? AND kind = ? AND chunk = ?",
            (info.model, info.publish_id, kind, index),
        )

    def forbid_access(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
        def fail(*args, **kwargs):
            raise AssertionError("the store was accessed before the model name was validated")

        monkeypatch.setattr(store, "_connection", fail)

    return Backend("sqlite", open_store, corrupt_chunk, delete_chunk, forbid_access, f"sqlite:///{path}", {})


def couchbase_backend(server) -> Backend:
    environ = {
        "STREAMFIT_COUCHBASE_USERNAME": server.username,
        "STREAMFIT_COUCHBASE_PASSWORD": server.password,
    }

    def open_store(chunk_size_bytes: int | None = SMALL_CHUNK_BYTES, **options) -> CouchbaseStore:
        query = {"scope": COUCHBASE_SCOPE, **options}
        if chunk_size_bytes is not None:
            query["chunk_size_bytes"] = chunk_size_bytes
        url = f"{server.connstr}/{server.bucket}?" + "&".join(f"{k}={v}" for k, v in query.items())
        return CouchbaseStore.from_url(url, environ=environ)

    def artifacts_collection():
        from datetime import timedelta

        from couchbase.auth import PasswordAuthenticator
        from couchbase.cluster import Cluster
        from couchbase.options import ClusterOptions

        cluster = Cluster(server.connstr, ClusterOptions(PasswordAuthenticator(server.username, server.password)))
        cluster.wait_until_ready(timedelta(seconds=10))
        return cluster, cluster.bucket(server.bucket).scope(COUCHBASE_SCOPE).collection(_keys.ARTIFACTS)

    def corrupt_chunk(info: VersionInfo, kind: str, index: int, data: bytes) -> None:
        from couchbase.options import ReplaceOptions
        from couchbase.transcoder import RawBinaryTranscoder

        cluster, collection = artifacts_collection()
        try:
            collection.replace(
                _keys.chunk(info.model, info.publish_id, kind, index), data,
                ReplaceOptions(transcoder=RawBinaryTranscoder()),
            )
        finally:
            cluster.close()

    def delete_chunk(info: VersionInfo, kind: str, index: int) -> None:
        cluster, collection = artifacts_collection()
        try:
            collection.remove(_keys.chunk(info.model, info.publish_id, kind, index))
        finally:
            cluster.close()

    def forbid_access(store: CouchbaseStore, monkeypatch: pytest.MonkeyPatch) -> None:
        def fail(*args, **kwargs):
            raise AssertionError("the store was accessed before the model name was validated")

        monkeypatch.setattr(store._documents.connection, "collection", fail)

    url = f"{server.connstr}/{server.bucket}?scope={COUCHBASE_SCOPE}"
    return Backend("couchbase", open_store, corrupt_chunk, delete_chunk, forbid_access, url, environ)


def run_in_child(function, deadline_s=CHILD_DEADLINE_S):
    """Run ``function`` in a forked child and return the child's exit code.

    The child exits with 0 when ``function`` returns, 98 when it raises, or
    the code ``function`` passes to os._exit.
    """
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            function()
            code = 0
        except BaseException:
            code = 98
        finally:
            os._exit(code)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"child {pid} did not finish within {deadline_s} s")
