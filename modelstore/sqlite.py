"""The embedded model store: one SQLite file in WAL mode.

A worker and a predictor can share one file from two processes on one
machine: WAL lets readers run while a writer commits, and ``busy_timeout``
makes a second writer wait instead of failing at once. A publish is one
``BEGIN IMMEDIATE`` transaction, so a crash at any step rolls the whole
version back and leaves no orphaned artifacts.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

from modelstore import _artifacts, _chunks, _publish, _retention
from modelstore import _sqlite_lifecycle as _lifecycle
from modelstore._sqlite_connection import SQLiteConnection
from modelstore.base import ONNX_BINARY, Head, ModelStore, Reuse, VersionInfo
from modelstore.errors import (
    ArtifactCorrupt,
    ConfigError,
    ModelExists,
    ModelNotFound,
    VersionConflict,
    VersionNotFound,
)
from modelstore.names import validate_alias_name, validate_model_name
from modelstore.predictions import check_document, check_expiry, check_key

log = logging.getLogger(__name__)

DEFAULT_BUSY_TIMEOUT_MS = 5000
_INT_OPTIONS = ("busy_timeout_ms", "chunk_size_bytes", "max_artifact_bytes", "keep_versions")


class SQLiteStore(ModelStore):
    """Model store in one SQLite file; see the module docstring for the concurrency model."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        chunk_size_bytes: int = _chunks.DEFAULT_CHUNK_SIZE_BYTES,
        max_artifact_bytes: int = _publish.DEFAULT_MAX_ARTIFACT_BYTES,
        onnx_format: str = ONNX_BINARY,
        keep_versions: int = 0,
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
        self.max_artifact_bytes = _publish.check_positive("max_artifact_bytes", max_artifact_bytes)
        self.onnx_format = _artifacts.check_format(onnx_format)
        self.keep_versions = _retention.check_keep("keep_versions", keep_versions, minimum=0)
        self._db = SQLiteConnection(self.path, busy_timeout_ms)
        # Open now, so a wrong path or a newer schema fails at start-up.
        with self._connection():
            pass

    @classmethod
    def from_url(cls, url: str) -> "SQLiteStore":
        """Open ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.

        Query options: ``busy_timeout_ms``, ``chunk_size_bytes``,
        ``max_artifact_bytes`` and ``keep_versions`` (integers; see
        ``modelstore.open_store``), and ``onnx_format`` (binary or json).
        """
        parts = urlsplit(url)
        if parts.scheme != "sqlite" or parts.netloc or not parts.path.startswith("/"):
            raise ConfigError(
                f"invalid SQLite store URL {url!r}: expected sqlite:///relative/path.db "
                "or sqlite:////absolute/path.db"
            )
        path = unquote(parts.path[1:])
        options: dict[str, Any] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "onnx_format":
                options[key] = value
                continue
            if key not in _INT_OPTIONS:
                raise ConfigError(
                    f"invalid SQLite store URL {url!r}: unknown option {key!r}; "
                    f"known options are {', '.join([*_INT_OPTIONS, 'onnx_format'])}"
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

    def heads(self, models: Iterable[str]) -> dict[str, Head]:
        names = [validate_model_name(model) for model in models]
        found = {}
        with self._connection() as conn:
            # SQLite limits the number of parameters of one statement.
            for start in range(0, len(names), 500):
                batch = names[start:start + 500]
                rows = conn.execute(
                    "SELECT model, latest, latest_id, aliases, cas, updated_at FROM heads "
                    f"WHERE model IN ({', '.join('?' * len(batch))})", batch,
                ).fetchall()
                for model, latest, latest_id, aliases, cas, updated_at in rows:
                    found[model] = Head(model, latest, latest_id,
                                        _load_json(aliases, f"aliases of model {model!r}"), updated_at, cas)
        return found

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
            raise _retention.version_not_found(model, number, head.latest)
        return self._version_info(model, number, *row)

    def _version_info(self, model: str, number: int, publish_id: str, text: str) -> VersionInfo:
        where = f"{model!r} version {number} in {self.url}"
        metadata = _publish.check_stored_metadata(
            _load_json(text, f"metadata {where}"), model, where, version=number, publish_id=publish_id
        )
        return VersionInfo(model, number, publish_id, metadata)

    def versions(self, model: str) -> list[VersionInfo]:
        validate_model_name(model)
        with self._connection() as conn:
            conn.execute("BEGIN")
            try:
                self._read_head(conn, model)
                rows = conn.execute(
                    "SELECT version, publish_id, metadata FROM versions WHERE model = ? ORDER BY version",
                    (model,),
                ).fetchall()
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        return [self._version_info(model, *row) for row in rows]

    def artifact(self, info: VersionInfo, kind: str) -> bytes:
        validate_model_name(info.model)
        _publish.validate_kind(kind)
        data = {}
        for part in _artifacts.parts(info, kind):
            data[part.kind] = self._read_part(info, part)
        return _artifacts.assemble(info, kind, data)

    def _read_part(self, info: VersionInfo, part: _artifacts.Part) -> bytes:
        name = f"{info.model}::{part.publish_id}::{part.kind}"
        owner = f"model {info.model!r} version {info.version}"
        expected = _chunks.expected_chunks(part.entry, name)
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT chunk, bytes FROM artifacts WHERE model = ? AND publish_id = ? AND kind = ? "
                "ORDER BY chunk",
                (info.model, part.publish_id, part.kind),
            ).fetchall()
        parts = []
        for index, want in enumerate(expected):
            where = f"{name}::{index} of {owner} in {self.url}"
            if index >= len(rows) or rows[index][0] != index:
                raise ArtifactCorrupt(f"chunk {where} is missing")
            data = rows[index][1]
            if isinstance(data, str) and part.kind == _artifacts.JSON_PART:
                # The JSON part is stored as TEXT, so SQLite's JSON functions can read it.
                data = data.encode()
            if not isinstance(data, bytes):
                raise ArtifactCorrupt(f"chunk {where} is not a BLOB but {type(data).__name__}")
            _chunks.verify_chunk(data, want, where)
            parts.append(data)
        if len(rows) != len(expected):
            raise ArtifactCorrupt(
                f"artifact {name} of {owner} in {self.url} has "
                f"{len(rows)} chunks stored, {len(expected)} expected"
            )
        return _chunks.join_verified(parts, part.entry, f"{name} of {owner}")

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
        artifacts: Mapping[str, bytes | Reuse],
        metadata: Mapping[str, Any],
    ) -> VersionInfo:
        _publish.check_expected_head(expected)
        plan = self._plan(expected, artifacts, metadata)
        info = self._commit(expected, plan)
        _retention.apply_after_publish(self, info)
        return info

    def _plan(self, expected: Head, artifacts: Mapping[str, bytes | Reuse], metadata: Mapping[str, Any],
              lineage: Mapping[str, Any] | None = None) -> _publish.PublishPlan:
        return _publish.plan_publish(
            expected, artifacts, metadata, chunk_size_bytes=self.chunk_size_bytes,
            max_artifact_bytes=self.max_artifact_bytes, onnx_format=self.onnx_format, lineage=lineage,
        )

    def _commit(self, expected: Head, plan: _publish.PublishPlan) -> VersionInfo:
        """Write a planned version in one transaction."""
        with self._write_transaction() as conn:
            # Checked first so a stale writer stops before writing its chunks;
            # the UPDATE in _write_head is what decides.
            self._check_head(conn, expected)
            self._check_reused(conn, plan)
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

    def _check_reused(self, conn: sqlite3.Connection, plan: _publish.PublishPlan) -> None:
        """Raise VersionNotFound if retention removed the chunks that a Reuse refers to."""
        info = VersionInfo(plan.model, plan.version, plan.publish_id, plan.metadata)
        for kind in plan.metadata["artifacts"]:
            for part in _artifacts.parts(info, kind):
                if part.publish_id == plan.publish_id:
                    continue
                count = conn.execute(
                    "SELECT COUNT(*) FROM artifacts WHERE model = ? AND publish_id = ? AND kind = ?",
                    (plan.model, part.publish_id, part.kind),
                ).fetchone()[0]
                if count != len(part.entry.get("chunks", ())):
                    raise VersionNotFound(
                        f"artifact {kind!r} reused by model {plan.model!r} version {plan.version} "
                        f"is no longer stored ({count} chunks of {part.publish_id}::{part.kind}); "
                        "retention removed its version"
                    )

    def _write_artifacts(self, conn: sqlite3.Connection, plan: _publish.PublishPlan) -> None:
        conn.executemany(
            "INSERT INTO artifacts (model, publish_id, kind, chunk, bytes) VALUES (?, ?, ?, ?, ?)",
            [
                (plan.model, plan.publish_id, kind, index,
                 chunk.decode() if kind == _artifacts.JSON_PART else chunk)
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

    # ------------------------------------------------------------ lifecycle

    def set_alias(self, model: str, alias: str, version: int | None) -> Head:
        validate_model_name(model)
        validate_alias_name(alias)
        if version is not None:
            _publish.validate_version_number(version)
        with self._write_transaction() as conn:
            return _lifecycle.set_alias(self, conn, model, alias, version)

    def rollback(self, model: str, to_version: int | None = None) -> VersionInfo:
        validate_model_name(model)
        if to_version is not None:
            _publish.validate_version_number(to_version)
        with self._write_transaction() as conn:
            head = self._read_head(conn, model)
            latest = self._read_version(conn, model, head.latest, head.latest)
            target = _retention.rollback_target(latest, to_version)
            source = self._read_version(conn, model, target, head.latest)
            metadata, lineage = _publish.rollback_lineage(source, latest)
            reused = {kind: Reuse(source, kind) for kind in source.metadata["artifacts"]}
            plan = self._plan(head, reused, metadata, lineage)
            self._check_reused(conn, plan)
            self._write_metadata(conn, plan)
            self._write_head(conn, head, plan)
        info = VersionInfo(plan.model, plan.version, plan.publish_id, dict(plan.metadata))
        log.info("model %r rolled back from version %d to version %d as version %d",
                 model, latest.version, target, info.version)
        return info

    def apply_retention(self, model: str, keep_last: int) -> list[int]:
        validate_model_name(model)
        _retention.check_keep("keep_last", keep_last, minimum=1)
        with self._write_transaction() as conn:
            return _lifecycle.apply_retention(self, conn, model, keep_last)

    def delete_model(self, model: str) -> None:
        validate_model_name(model)
        with self._write_transaction() as conn:
            _lifecycle.delete_model(self, conn, model)
            conn.execute("DELETE FROM predictions WHERE model = ?", (model,))
        log.info("deleted model %r from %s", model, self.url)

    # ------------------------------------------------------------ predictions

    def put_predictions(self, model: str, predictions: Mapping[str, bytes], expiry_s: int) -> None:
        validate_model_name(model)
        check_expiry(expiry_s)
        rows = [(model, check_key(key), check_document(model, key, body)) for key, body in predictions.items()]
        now = time.time()
        with self._write_transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO predictions (model, key, body, expires_at) VALUES (?, ?, ?, ?)",
                [(m, k, b, now + expiry_s) for m, k, b in rows],
            )
            # Expired documents go with the next write, so the table does not grow without bound.
            conn.execute("DELETE FROM predictions WHERE expires_at < ?", (now,))

    def prediction(self, model: str, key: str) -> dict[str, Any] | None:
        validate_model_name(model)
        check_key(key)
        with self._connection() as conn:
            row = conn.execute(
                "SELECT body FROM predictions WHERE model = ? AND key = ? AND expires_at >= ?",
                (model, key, time.time()),
            ).fetchone()
        return json.loads(row[0]) if row else None

    def import_version(self, expected: Head, metadata: Mapping[str, Any],
                       artifacts: Mapping[str, bytes | Reuse]) -> VersionInfo:
        _publish.check_expected_head(expected)
        parent = metadata.get("parent") if isinstance(metadata, Mapping) else None
        parent_id = None
        if isinstance(parent, int) and not isinstance(parent, bool):
            with self._connection() as conn:
                row = conn.execute(
                    "SELECT publish_id FROM versions WHERE model = ? AND version = ?",
                    (expected.model, parent),
                ).fetchone()
            parent_id = row[0] if row else None
        lineage = _publish.import_lineage(metadata, expected.latest, parent_id)
        plan = self._plan(expected, artifacts, metadata, lineage)
        return self._commit(expected, plan)

    def _read_version(self, conn: sqlite3.Connection, model: str, number: int, latest: int) -> VersionInfo:
        row = conn.execute(
            "SELECT publish_id, metadata FROM versions WHERE model = ? AND version = ?", (model, number)
        ).fetchone()
        if row is None:
            raise _retention.version_not_found(model, number, latest)
        return self._version_info(model, number, *row)

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

