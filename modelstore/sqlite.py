"""The embedded model store: one SQLite file in WAL mode.

A worker and a predictor can share one file from two processes on one
machine: WAL lets readers run while a writer commits, and ``busy_timeout``
makes a second writer wait instead of failing at once. A publish is one
``BEGIN IMMEDIATE`` transaction, so a crash at any step rolls the whole
version back and leaves no orphaned artifacts.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

from modelstore import _chunks, _publish
from modelstore._sqlite_connection import SQLiteConnection
from modelstore.base import Head, ModelStore, VersionInfo
from modelstore.errors import (
    ArtifactCorrupt,
    ConfigError,
    ModelExists,
    ModelNotFound,
    VersionConflict,
    VersionNotFound,
)
from modelstore.names import validate_model_name

DEFAULT_BUSY_TIMEOUT_MS = 5000


class SQLiteStore(ModelStore):
    """Model store in one SQLite file; see the module docstring for the concurrency model."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        chunk_size_bytes: int = _chunks.DEFAULT_CHUNK_SIZE_BYTES,
        max_artifact_bytes: int = _publish.DEFAULT_MAX_ARTIFACT_BYTES,
    ) -> None:
        self.path = Path(path)
        if str(path) in ("", ":memory:"):
            raise ConfigError(
                f"invalid SQLite path {str(path)!r}: the store must be a file that a worker "
                "and a predictor can share, for example sqlite:///models.db"
            )
        if isinstance(busy_timeout_ms, bool) or not isinstance(busy_timeout_ms, int) or busy_timeout_ms < 0:
            raise ConfigError(f"invalid busy_timeout_ms {busy_timeout_ms!r}: expected an integer >= 0")
        self.url = f"sqlite:///{self.path}"
        self.busy_timeout_ms = busy_timeout_ms
        self.chunk_size_bytes = _publish.check_chunk_size(chunk_size_bytes, 2**30)
        self.max_artifact_bytes = max_artifact_bytes
        self._db = SQLiteConnection(self.path, busy_timeout_ms)
        # Open now, so a wrong path or a newer schema fails at start-up.
        with self._connection():
            pass

    @classmethod
    def from_url(cls, url: str) -> "SQLiteStore":
        """Open ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.

        Query options: ``busy_timeout_ms`` and ``chunk_size_bytes`` (integers).
        """
        parts = urlsplit(url)
        if parts.scheme != "sqlite" or parts.netloc or not parts.path.startswith("/"):
            raise ConfigError(
                f"invalid SQLite store URL {url!r}: expected sqlite:///relative/path.db "
                "or sqlite:////absolute/path.db"
            )
        path = unquote(parts.path[1:])
        options: dict[str, int] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in ("busy_timeout_ms", "chunk_size_bytes"):
                raise ConfigError(
                    f"invalid SQLite store URL {url!r}: unknown option {key!r}; "
                    "known options are busy_timeout_ms and chunk_size_bytes"
                )
            try:
                options[key] = int(value)
            except ValueError:
                raise ConfigError(
                    f"invalid SQLite store URL {url!r}: option {key}={value!r} is not an integer"
                ) from None
        return cls(path, **options)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._db.connection() as conn:
            yield conn

    @contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        with self._db.write_transaction() as conn:
            yield conn

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------ reads

    def head(self, model: str) -> Head:
        validate_model_name(model)
        with self._connection() as conn:
            return self._read_head(conn, model)

    def _read_head(self, conn: sqlite3.Connection, model: str) -> Head:
        row = conn.execute(
            "SELECT latest, latest_id, aliases, cas, updated_at FROM heads WHERE model = ?", (model,)
        ).fetchone()
        if row is None:
            raise ModelNotFound(f"model {model!r} not found in {self.url}; create it first")
        latest, latest_id, aliases, cas, updated_at = row
        return Head(model, latest, latest_id, _load_json(aliases, f"aliases of model {model!r}"), updated_at, cas)

    def version(self, model: str, version: int | None = None) -> VersionInfo:
        validate_model_name(model)
        if version is not None:
            _publish.validate_version_number(version)
        with self._connection() as conn:
            # One read transaction, so the head and the version row come from
            # the same snapshot even while a writer commits.
            conn.execute("BEGIN")
            try:
                head = self._read_head(conn, model)
                number = head.latest if version is None else version
                row = conn.execute(
                    "SELECT publish_id, metadata FROM versions WHERE model = ? AND version = ?",
                    (model, number),
                ).fetchone()
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        if row is None:
            raise VersionNotFound(
                f"version {number} of model {model!r} not found; the latest is {head.latest}"
            )
        publish_id, text = row
        where = f"{model!r} version {number} in {self.url}"
        metadata = _publish.check_stored_metadata(
            _load_json(text, f"metadata {where}"), model, where, version=number, publish_id=publish_id
        )
        return VersionInfo(model, number, publish_id, metadata)

    def artifact(self, info: VersionInfo, kind: str) -> bytes:
        validate_model_name(info.model)
        _publish.validate_kind(kind)
        entry = info.metadata.get("artifacts", {}).get(kind)
        if entry is None:
            raise VersionNotFound(
                f"version {info.version} of model {info.model!r} has no {kind!r} artifact "
                f"(it has: {sorted(info.metadata.get('artifacts', {})) or 'none'})"
            )
        expected = _chunks.expected_chunks(entry, f"{info.model}::{info.publish_id}::{kind}")
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT chunk, bytes FROM artifacts WHERE model = ? AND publish_id = ? AND kind = ? "
                "ORDER BY chunk",
                (info.model, info.publish_id, kind),
            ).fetchall()
        parts = []
        for index, want in enumerate(expected):
            where = f"{info.model}::{info.publish_id}::{kind}::{index} in {self.url}"
            if index >= len(rows) or rows[index][0] != index:
                raise ArtifactCorrupt(f"chunk {where} is missing")
            data = rows[index][1]
            if not isinstance(data, bytes):
                raise ArtifactCorrupt(f"chunk {where} is not a BLOB but {type(data).__name__}")
            _chunks.verify_chunk(data, want, where)
            parts.append(data)
        if len(rows) != len(expected):
            raise ArtifactCorrupt(
                f"artifact {info.model}::{info.publish_id}::{kind} in {self.url} has "
                f"{len(rows)} chunks stored, {len(expected)} expected"
            )
        return _chunks.join_verified(parts, entry, f"{info.model}::{info.publish_id}::{kind}")

    def list_models(self) -> list[str]:
        with self._connection() as conn:
            return [row[0] for row in conn.execute("SELECT model FROM heads ORDER BY model")]

    # ------------------------------------------------------------ writes

    def create_model(self, model: str, spec: Mapping[str, Any]) -> Head:
        validate_model_name(model)
        publish_id = _publish.new_publish_id()
        metadata = _publish.initial_metadata(model, spec, publish_id)
        text = _publish.encode_json(metadata, f"spec of model {model!r}")
        now = time.time()
        with self._write_transaction() as conn:
            if conn.execute("SELECT 1 FROM heads WHERE model = ?", (model,)).fetchone():
                raise ModelExists(f"model {model!r} already exists in {self.url}")
            cas = self._next_cas(conn)
            conn.execute(
                "INSERT INTO versions (model, publish_id, version, metadata) VALUES (?, ?, 0, ?)",
                (model, publish_id, text),
            )
            conn.execute(
                "INSERT INTO heads (model, latest, latest_id, aliases, cas, updated_at) "
                "VALUES (?, 0, ?, '{}', ?, ?)",
                (model, publish_id, cas, now),
            )
        return Head(model, 0, publish_id, {}, now, cas)

    def publish(
        self,
        expected: Head,
        artifacts: Mapping[str, bytes],
        metadata: Mapping[str, Any],
    ) -> VersionInfo:
        _publish.check_expected_head(expected)
        plan = _publish.plan_publish(
            expected, artifacts, metadata, self.chunk_size_bytes, self.max_artifact_bytes
        )
        with self._write_transaction() as conn:
            # Checked first so a stale writer stops before writing its chunks;
            # the UPDATE in _write_head is what decides.
            self._check_head(conn, expected)
            self._write_artifacts(conn, plan)
            self._write_metadata(conn, plan)
            self._write_head(conn, expected, plan)
        return VersionInfo(plan.model, plan.version, plan.publish_id, dict(plan.metadata))

    def _check_head(self, conn: sqlite3.Connection, expected: Head) -> None:
        current = self._read_head(conn, expected.model)
        if current.cas != expected.cas:
            raise VersionConflict(
                f"model {expected.model!r} moved to version {current.latest} since the caller read "
                f"version {expected.latest}; reload the head and re-apply the batch"
            )

    def _write_artifacts(self, conn: sqlite3.Connection, plan: _publish.PublishPlan) -> None:
        conn.executemany(
            "INSERT INTO artifacts (model, publish_id, kind, chunk, bytes) VALUES (?, ?, ?, ?, ?)",
            [
                (plan.model, plan.publish_id, kind, index, chunk)
                for kind, parts in plan.chunks.items()
                for index, chunk in enumerate(parts)
            ],
        )

    def _write_metadata(self, conn: sqlite3.Connection, plan: _publish.PublishPlan) -> None:
        try:
            conn.execute(
                "INSERT INTO versions (model, publish_id, version, metadata) VALUES (?, ?, ?, ?)",
                (plan.model, plan.publish_id, plan.version,
                 _publish.encode_json(plan.metadata, f"metadata of model {plan.model!r}")),
            )
        except sqlite3.IntegrityError:
            # Version numbers are unique per model, so a stale writer whose
            # version number is taken loses here, before the head UPDATE.
            raise VersionConflict(
                f"model {plan.model!r}: version {plan.version} was already published by another "
                "writer; reload the head and re-apply the batch"
            ) from None

    def _write_head(self, conn: sqlite3.Connection, expected: Head, plan: _publish.PublishPlan) -> None:
        changed = conn.execute(
            "UPDATE heads SET latest = ?, latest_id = ?, cas = ?, updated_at = ? "
            "WHERE model = ? AND cas = ? AND latest = ? AND latest_id = ?",
            (plan.version, plan.publish_id, self._next_cas(conn), time.time(),
             plan.model, expected.cas, expected.latest, expected.latest_id),
        ).rowcount
        if changed != 1:
            raise VersionConflict(
                f"model {plan.model!r}: the head is no longer version {expected.latest} with CAS "
                f"{expected.cas}; reload the head and re-apply the batch"
            )

    @staticmethod
    def _next_cas(conn: sqlite3.Connection) -> int:
        # One counter over all heads, so a CAS token is never valid for
        # another model's head nor for an older state of the same head.
        return conn.execute("SELECT COALESCE(MAX(cas), 0) + 1 FROM heads").fetchone()[0]


def _load_json(text: object, where: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ArtifactCorrupt(f"stored {where} is not valid JSON ({exc})") from None
