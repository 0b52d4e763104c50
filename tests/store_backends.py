"""Per-backend helpers for the model store tests: open a store, corrupt a chunk, forbid access.

The contract tests run the same cases over every backend. This module
contains what differs per backend: how to reach a stored chunk behind the
store's back, and what "store access" means.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from modelstore import _artifacts, _keys
from modelstore import _couchbase_heads as _heads
from modelstore.base import ModelStore, VersionInfo
from modelstore.couchbase import CouchbaseStore
from modelstore.sqlite import SQLiteStore

# Small enough that a few kilobytes make several chunks, so every contract
# test exercises chunking.
SMALL_CHUNK_BYTES = 4096

# One scope per test session keeps runs against a shared cluster apart.
COUCHBASE_SCOPE = f"contract-{uuid.uuid4().hex[:8]}"

CHILD_DEADLINE_S = 60.0

# Raw SDK clusters of the Couchbase test helpers, by connection string.
_RAW_CLUSTERS: dict[str, tuple[int, object]] = {}


# Exit code of a child that a crash hook stopped after a write.
CRASH_CODE = 17


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
    # crash_after_writes(store, n, log_path): in a forked child, make the
    # store's n-th write the last thing the process does (os._exit after it
    # returns), and append what each write touched to log_path.
    crash_after_writes: Callable[[ModelStore, int, Path], None] = None
    # stored_items(store, model, candidates): the items (rows or documents)
    # of the model that exist for good (no expiry), among everything
    # stored (SQLite) or among ``candidates`` plus the reachable ones
    # (Couchbase, which has no scan without N1QL).
    stored_items: Callable[[ModelStore, str, set], set] = None
    # reachable_items(store, model, pending=True): the items that the head
    # reaches through live versions, plus (with pending) the unfinished work
    # of a retention recorded in the head.
    reachable_items: Callable[..., set] = None


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

    def crash_after_writes(store: SQLiteStore, count: int, log_path: Path) -> None:
        writes = [0]
        original = store._db.write_transaction

        class Counted:
            """The transaction's connection; each INSERT, UPDATE or DELETE counts as a write."""

            def __init__(self, conn):
                self._conn = conn

            def __getattr__(self, name):
                return getattr(self._conn, name)

            def execute(self, sql, *args):
                result = self._conn.execute(sql, *args)
                self._count(sql)
                return result

            def executemany(self, sql, *args):
                result = self._conn.executemany(sql, *args)
                self._count(sql)
                return result

            def _count(self, sql):
                if sql.split()[0].upper() in ("INSERT", "UPDATE", "DELETE"):
                    writes[0] += 1
                    with open(log_path, "a") as log:
                        log.write(f"sqlite\t{sql.split()[0]} {writes[0]}\n")
                    if writes[0] == count:
                        os._exit(CRASH_CODE)

        @contextmanager
        def write_transaction():
            with original() as conn:
                yield Counted(conn)

        store._db.write_transaction = write_transaction

    def rows(store: SQLiteStore, model: str) -> set:
        conn = sqlite3.connect(path)
        try:
            found = {("heads", row[0]) for row in conn.execute("SELECT model FROM heads WHERE model = ?", (model,))}
            found |= {("versions", row[0]) for row in conn.execute(
                "SELECT publish_id FROM versions WHERE model = ?", (model,))}
            found |= {("artifacts", *row) for row in conn.execute(
                "SELECT publish_id, kind, chunk FROM artifacts WHERE model = ?", (model,))}
            return found
        finally:
            conn.close()

    def stored_items(store: SQLiteStore, model: str, candidates: set) -> set:
        return rows(store, model)

    def reachable_items(store: SQLiteStore, model: str, pending: bool = True) -> set:
        from modelstore.errors import ModelNotFound

        try:
            versions = store.versions(model)
        except ModelNotFound:
            return set()
        found = {("heads", model)}
        for info in versions:
            found.add(("versions", info.publish_id))
            for publish_id, kind, count in _artifacts.storage_refs(info):
                found |= {("artifacts", publish_id, kind, index) for index in range(count)}
        return found

    return Backend("sqlite", open_store, corrupt_chunk, delete_chunk, forbid_access, f"sqlite:///{path}", {},
                   crash_after_writes, stored_items, reachable_items)


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

    def crash_after_writes(store: CouchbaseStore, count: int, log_path: Path) -> None:
        writes = [0]
        connection = store._documents.connection
        original = connection.collection

        class Counted:
            """A collection whose inserts, upserts, replaces, removes and touches count as writes."""

            def __init__(self, name, collection):
                self._name = name
                self._collection = collection

            def __getattr__(self, attribute):
                value = getattr(self._collection, attribute)
                if attribute not in ("insert", "upsert", "replace", "remove", "touch", "mutate_in"):
                    return value

                def write(key, *args, **kwargs):
                    result = value(key, *args, **kwargs)
                    writes[0] += 1
                    with open(log_path, "a") as log:
                        log.write(f"{self._name}\t{key}\n")
                    if writes[0] == count:
                        os._exit(CRASH_CODE)
                    return result

                return write

        connection.collection = lambda name: Counted(name, original(name))

    def reachable_items(store: CouchbaseStore, model: str, pending: bool = True) -> set:
        documents = store._documents
        head = _heads.read(documents, model, include_deleted=True)
        if head is None:
            return set()
        found = {(_keys.HEADS, _keys.head(model))}
        if head.deleted:
            return found
        versions, parts = [], set()
        if pending:
            versions = [(n, pid) for n, pid in head.retiring["versions"]]
            parts = {tuple(part) for part in head.retiring["parts"]}
        for info in store.versions(model):
            versions.append((info.version, info.publish_id))
            parts |= _artifacts.storage_refs(info)
        for number, publish_id in versions:
            found.add((_keys.METADATA, _keys.metadata(model, publish_id)))
            found.add((_keys.METADATA, _keys.version_pointer(model, number)))
        for publish_id, kind, count in parts:
            found |= {(_keys.ARTIFACTS, _keys.chunk(model, publish_id, kind, i)) for i in range(count)}
        return found

    def stored_items(store: CouchbaseStore, model: str, candidates: set) -> set:
        from couchbase.exceptions import DocumentNotFoundException
        from couchbase.options import GetOptions
        from couchbase.transcoder import RawBinaryTranscoder

        scope = raw_scope()
        found = set()
        for collection, key in candidates | reachable_items(store, model):
            if key == _keys.MODEL_INDEX:
                continue
            try:
                # The SDK decodes the value only when .value is read, so
                # JSON documents pass through the binary transcoder here.
                result = scope.collection(collection).get(
                    key, GetOptions(with_expiry=True, transcoder=RawBinaryTranscoder()))
            except DocumentNotFoundException:
                continue
            if result.expiry_time is None:
                found.add((collection, key))
        return found

    def raw_scope():
        # One cluster for the whole test process, with a generous timeout:
        # the machine is shared, and a timeout here would fail a test for a
        # reason that is not the store's.
        if server.connstr not in _RAW_CLUSTERS:
            from datetime import timedelta

            from couchbase.auth import PasswordAuthenticator
            from couchbase.cluster import Cluster
            from couchbase.options import ClusterOptions, ClusterTimeoutOptions

            cluster = Cluster(server.connstr, ClusterOptions(
                PasswordAuthenticator(server.username, server.password),
                timeout_options=ClusterTimeoutOptions(kv_timeout=timedelta(seconds=20))))
            cluster.wait_until_ready(timedelta(seconds=20))
            _RAW_CLUSTERS[server.connstr] = (os.getpid(), cluster)
        return _RAW_CLUSTERS[server.connstr][1].bucket(server.bucket).scope(COUCHBASE_SCOPE)

    url = f"{server.connstr}/{server.bucket}?scope={COUCHBASE_SCOPE}"
    return Backend("couchbase", open_store, corrupt_chunk, delete_chunk, forbid_access, url, environ,
                   crash_after_writes, stored_items, reachable_items)


def retry_unavailable(function, attempts=3):
    """Call ``function``, again after StoreUnavailable, as a client does with a retriable error.

    With SDK 4.6.3 on gocaves, about one process in a hundred forked from a
    process with an open Cluster waits out its timeout on its first request,
    and the next try succeeds. Once in several thousand forks, the first
    read instead missed the head of a model that the parent had just
    written (ModelNotFound after 0.04 s). Tests that fork use this, so that
    these first-request faults of a forked client do not fail them. A real
    loss would persist: the retries fail too, and the parent's checks of
    the stored items still run.
    """
    from modelstore.errors import ModelNotFound, StoreUnavailable

    for attempt in range(1, attempts + 1):
        try:
            return function()
        except (StoreUnavailable, ModelNotFound) as exc:
            if attempt == attempts:
                raise
            print(f"process {os.getpid()}: {type(exc).__name__} on attempt {attempt}, trying again",
                  file=sys.stderr)
            time.sleep(0.2)


def run_in_child(function, deadline_s=CHILD_DEADLINE_S):
    """Run ``function`` in a forked child and return the child's exit code.

    The child exits with 0 when ``function`` returns, 98 when it raises, or
    the code ``function`` passes to os._exit. StoreUnavailable is retried
    (see ``retry_unavailable``).
    """
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            retry_unavailable(function)
            code = 0
        except BaseException:
            # The parent sees only the exit code, so the traceback goes to
            # stderr, where pytest shows it with the failure.
            print(f"child {os.getpid()} failed after {time.monotonic() - started:.2f} s:", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
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
