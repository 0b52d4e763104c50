"""One Couchbase cluster connection per process, its collections, and error mapping."""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

from couchbase.auth import PasswordAuthenticator
from couchbase.cluster import Cluster
from couchbase.collection import Collection
from couchbase.diagnostics import ServiceType
from couchbase.exceptions import (
    AmbiguousTimeoutException,
    AuthenticationException,
    CollectionAlreadyExistsException,
    CollectionNotFoundException,
    CouchbaseException,
    DocumentNotFoundException,
    DurabilitySyncWriteAmbiguousException,
    MissingConnectionException,
    RateLimitedException,
    RequestCanceledException,
    ScopeAlreadyExistsException,
    ScopeNotFoundException,
    ServiceUnavailableException,
    TemporaryFailException,
    TimeoutException,
    UnAmbiguousTimeoutException,
)
from couchbase.options import ClusterOptions, ClusterTimeoutOptions, GetOptions, WaitUntilReadyOptions

from modelstore import _fork, _keys
from modelstore._couchbase_settings import CouchbaseSettings
from modelstore.errors import StoreError, StoreUnavailable

log = logging.getLogger(__name__)

# Errors after which the operation may still have been applied by the server.
AMBIGUOUS = (
    AmbiguousTimeoutException,
    TimeoutException,
    RequestCanceledException,
    DurabilitySyncWriteAmbiguousException,
)

# Errors that mean "the cluster timed out or rejected the request for now".
UNAVAILABLE = AMBIGUOUS + (
    UnAmbiguousTimeoutException,
    MissingConnectionException,
    ServiceUnavailableException,
    TemporaryFailException,
    RateLimitedException,
)

class Connection:
    """A Cluster and the store's collections, reopened in a child after fork()."""

    def __init__(self, settings: CouchbaseSettings, username: str, password: str) -> None:
        self.settings = settings
        self._username = username
        self._password = password
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._cluster: Cluster | None = None
        self._collections: dict[str, Collection] = {}
        self._collections_checked = False
        _fork.register(self)

    def collection(self, name: str) -> Collection:
        if os.getpid() != self._pid:
            self._reset_after_fork()
        collection = self._collections.get(name)
        if collection is None:
            with self._lock:
                if not self._collections:
                    self._connect()
                collection = self._collections[name]
        return collection

    def close(self) -> None:
        if os.getpid() != self._pid:
            self._reset_after_fork()
            return
        with self._lock:
            if self._cluster is not None:
                self._cluster.close()
            self._cluster = None
            self._collections = {}

    def _reset_after_fork(self) -> None:
        # A lock held by another thread of the parent stays held forever in
        # the child, so the child gets a new one as well.
        self._lock = threading.Lock()
        if self._cluster is not None:
            _fork.abandon(self._cluster)
        self._cluster = None
        self._collections = {}
        self._pid = os.getpid()

    def _connect(self) -> None:
        settings = self.settings
        timeouts = ClusterTimeoutOptions(
            kv_timeout=timedelta(milliseconds=settings.kv_timeout_ms),
            connect_timeout=timedelta(milliseconds=settings.connect_timeout_ms),
            bootstrap_timeout=timedelta(milliseconds=settings.connect_timeout_ms),
            management_timeout=timedelta(milliseconds=settings.connect_timeout_ms),
        )
        authenticator = PasswordAuthenticator(self._username, self._password, cert_path=settings.ca_cert)
        with map_errors(f"connecting to Couchbase at {settings.connstr} bucket {settings.bucket!r}"):
            try:
                cluster = Cluster(settings.connstr, ClusterOptions(authenticator, timeout_options=timeouts))
            except AuthenticationException as exc:
                raise StoreError(
                    f"Couchbase at {settings.connstr} rejected the credentials of user "
                    f"{self._username!r}; check STREAMFIT_COUCHBASE_USERNAME and the password"
                ) from exc
            try:
                cluster.wait_until_ready(
                    timedelta(milliseconds=settings.connect_timeout_ms),
                    WaitUntilReadyOptions(service_types=[ServiceType.KeyValue]),
                )
                bucket = cluster.bucket(settings.bucket)
                created = False
                if settings.create_collections and not self._collections_checked:
                    created = _ensure_collections(bucket, settings.scope)
                    self._collections_checked = True
                # The first requests of a new connection were seen to time
                # out on gocaves, and new collections need their manifest
                # first. Probing each collection here keeps both away from
                # the store's first real operation.
                _wait_until_usable(bucket, settings.scope, settings.connect_timeout_ms / 1000, created)
            except BaseException:
                cluster.close()
                raise
        scope = bucket.scope(settings.scope)
        self._cluster = cluster
        self._collections = {name: scope.collection(name) for name in _keys.COLLECTIONS}
        log.info(
            "connected to Couchbase at %s, bucket %r, scope %r",
            settings.connstr, settings.bucket, settings.scope,
        )


def _ensure_collections(bucket, scope: str) -> bool:
    """Create the scope and the store's collections when missing; return True if any was missing.

    Another process may create them at the same time, so "already exists"
    counts as success.
    """
    manager = bucket.collections()
    existing = {spec.name: {c.name for c in spec.collections} for spec in manager.get_all_scopes()}
    missing = scope not in existing
    if missing:
        try:
            manager.create_scope(scope)
            log.info("created Couchbase scope %r", scope)
        except ScopeAlreadyExistsException:
            pass
        existing[scope] = set()
    for name in _keys.COLLECTIONS:
        if name in existing[scope]:
            continue
        missing = True
        try:
            manager.create_collection(scope, name)
            log.info("created Couchbase collection %s.%s", scope, name)
        except CollectionAlreadyExistsException:
            pass
    return missing


# Read from every collection until it responds. The key is not a store key,
# so the read finds nothing.
_PROBE_KEY = "streamfit-collection-probe"
_PROBE_TIMEOUT = timedelta(seconds=1)
_NOT_READY = (CollectionNotFoundException, ScopeNotFoundException)


def _wait_until_usable(bucket, scope: str, timeout_s: float, created: bool = True) -> None:
    """Wait until key-value reads reach each of the store's collections.

    A collection created through the collection manager is not usable at
    once: until the data service has the new collection manifest, reads and
    writes time out or fail with CollectionNotFound. When nothing was
    created here, a missing collection is an error at once.
    """
    deadline = time.monotonic() + timeout_s
    for name in _keys.COLLECTIONS:
        collection = bucket.scope(scope).collection(name)
        while True:
            try:
                collection.get(_PROBE_KEY, GetOptions(timeout=_PROBE_TIMEOUT))
                break
            except DocumentNotFoundException:
                break
            except _NOT_READY + UNAVAILABLE as exc:
                missing = isinstance(exc, _NOT_READY)
                if missing and not created:
                    raise StoreError(
                        f"collection {scope}.{name} does not exist in bucket {bucket.name!r}; "
                        "create the store's collections or set create_collections=true"
                    ) from exc
                if time.monotonic() >= deadline:
                    state = "was created but is not usable after" if missing else "did not respond within"
                    raise StoreUnavailable(
                        f"collection {scope}.{name} {state} {timeout_s:g} s "
                        f"({type(exc).__name__}); retry later"
                    ) from exc
                time.sleep(0.1)


@contextmanager
def map_errors(what: str, passthrough: tuple[type[CouchbaseException], ...] = ()) -> Iterator[None]:
    """Turn SDK errors into StoreUnavailable or StoreError, except the ``passthrough`` types."""
    try:
        yield
    except passthrough:
        raise
    except UNAVAILABLE as exc:
        raise StoreUnavailable(
            f"{what} failed: Couchbase timed out or is unavailable ({type(exc).__name__}); retry later"
        ) from exc
    except CouchbaseException as exc:
        raise StoreError(f"{what} failed: {type(exc).__name__}: {_describe(exc)}") from exc


def _describe(exc: CouchbaseException) -> str:
    # The SDK's str() contains the whole error context, and its message is enough.
    message = getattr(exc, "message", None)
    return message if isinstance(message, str) and message else str(exc)[:300]
