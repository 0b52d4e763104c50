"""One SQLite connection per process: WAL mode, schema, fork safety and error mapping."""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from modelstore import _fork
from modelstore.errors import ConfigError, StoreError, StoreUnavailable

# Version 2 added the predictions table. A version-1 file gets it when it is opened.
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS heads (
    model TEXT PRIMARY KEY,
    latest INTEGER NOT NULL,
    latest_id TEXT NOT NULL,
    aliases TEXT NOT NULL,
    cas INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS heads_cas ON heads (cas);
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL,
    publish_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (model, version),
    UNIQUE (model, publish_id)
);
CREATE TABLE IF NOT EXISTS artifacts (
    model TEXT NOT NULL,
    publish_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    bytes BLOB NOT NULL,
    PRIMARY KEY (model, publish_id, kind, chunk)
);
CREATE TABLE IF NOT EXISTS predictions (
    model TEXT NOT NULL,
    key TEXT NOT NULL,
    body TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (model, key)
);
CREATE INDEX IF NOT EXISTS predictions_expiry ON predictions (expires_at);
"""

# SQLite result codes (primary code, the low byte of the extended one) that
# mean "try again later" rather than "this database is broken".
_RETRIABLE_CODES = {
    5,  # SQLITE_BUSY: another process holds the write lock past busy_timeout
    6,  # SQLITE_LOCKED
    10,  # SQLITE_IOERR
    13,  # SQLITE_FULL
    14,  # SQLITE_CANTOPEN
}

class SQLiteConnection:
    """The connection of this process to one store file, opened lazily and again after fork()."""

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        _fork.register(self)

    def _open(self) -> sqlite3.Connection:
        if not self.path.parent.is_dir():
            raise ConfigError(
                f"invalid SQLite path {str(self.path)!r}: folder {str(self.path.parent)!r} "
                "does not exist; create it first"
            )
        # isolation_level=None leaves transactions to explicit BEGIN statements,
        # so a publish takes the write lock at its start (BEGIN IMMEDIATE) and
        # never fails half-way on a lock upgrade.
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"SQLite store {str(self.path)!r} could not switch to WAL mode (got {mode!r})")
            # The worker commits Kafka offsets once a publish returns, so a
            # committed version must survive a power loss: FULL syncs the WAL
            # on every commit, where NORMAL could roll back the last ones.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._create_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"SQLite store {str(self.path)!r} has schema version {version}, newer than "
                f"{SCHEMA_VERSION} that this streamfit supports; upgrade streamfit"
            )
        # Two processes opening a new file at once both get here. The second
        # waits for the first one's lock, then finds the tables present.
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """Yield this process's connection, reopening it after a fork, with errors mapped."""
        if os.getpid() != self._pid:
            self._reset_after_fork()
        with self._lock, self._sqlite_errors():
            if self._conn is None:
                self._conn = self._open()
            yield self._conn

    def _reset_after_fork(self) -> None:
        # A lock held by another thread of the parent stays held forever in
        # the child, so the child gets a new one as well.
        self._lock = threading.RLock()
        if self._conn is not None:
            _fork.abandon(self._conn)
        self._conn = None
        self._pid = os.getpid()

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            name = getattr(exc, "sqlite_errorname", type(exc).__name__)
            if code is not None and code & 0xFF in _RETRIABLE_CODES:
                raise StoreUnavailable(
                    f"SQLite store {str(self.path)!r} is unavailable ({name}: {exc}); "
                    "retry, and check that no other process keeps a long write transaction open"
                ) from exc
            raise StoreError(f"SQLite store {str(self.path)!r} failed ({name}: {exc})") from exc

    @contextmanager
    def write_transaction(self) -> Iterator[sqlite3.Connection]:
        with self.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                # Some errors (SQLITE_FULL, SQLITE_IOERR) roll the transaction
                # back by themselves, and a second ROLLBACK would hide them.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        if os.getpid() != self._pid:
            self._reset_after_fork()
            return
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
