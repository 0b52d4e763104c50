"""Aliases, retention and deletion in the SQLite store, each inside the caller's write transaction.

Each function runs in one ``BEGIN IMMEDIATE`` transaction that the store
opened, so a crash at any statement rolls the whole change back.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import TYPE_CHECKING

from modelstore import _retention
from modelstore.base import Head
from modelstore.errors import ModelNotFound

if TYPE_CHECKING:
    from modelstore.sqlite import SQLiteStore


def set_alias(store: "SQLiteStore", conn: sqlite3.Connection, model: str, alias: str,
              version: int | None) -> Head:
    head = store._read_head(conn, model)
    aliases = dict(head.aliases)
    if version is None:
        aliases.pop(alias, None)
    else:
        # Raises VersionNotFound for a version never published or removed.
        store._read_version(conn, model, version, head.latest)
        aliases[alias] = version
    # A new CAS, like every head write, so a writer that read the head
    # before this change gets VersionConflict and reads it again.
    cas, now = store._next_cas(conn), time.time()
    conn.execute(
        "UPDATE heads SET aliases = ?, cas = ?, updated_at = ? WHERE model = ?",
        (json.dumps(aliases, sort_keys=True), cas, now, model),
    )
    return Head(model, head.latest, head.latest_id, aliases, now, cas)


def apply_retention(store: "SQLiteStore", conn: sqlite3.Connection, model: str, keep_last: int) -> list[int]:
    head = store._read_head(conn, model)
    rows = conn.execute(
        "SELECT version, publish_id, metadata FROM versions WHERE model = ?", (model,)
    ).fetchall()
    live = [store._version_info(model, *row) for row in rows]
    plan = _retention.plan(live, head.aliases, keep_last)
    if not plan.remove:
        return []

    conn.executemany(
        "DELETE FROM artifacts WHERE model = ? AND publish_id = ? AND kind = ?",
        [(model, publish_id, kind) for publish_id, kind, _ in plan.parts],
    )
    conn.executemany(
        "DELETE FROM versions WHERE model = ? AND version = ?",
        [(model, info.version) for info in plan.remove],
    )
    # The head stays as it is: retention never removes the latest version,
    # so a concurrent publisher's head is still valid.
    return [info.version for info in plan.remove]


def delete_model(store: "SQLiteStore", conn: sqlite3.Connection, model: str) -> None:
    if conn.execute("DELETE FROM heads WHERE model = ?", (model,)).rowcount != 1:
        raise ModelNotFound(f"model {model!r} not found in {store.url}; nothing was deleted")
    conn.execute("DELETE FROM versions WHERE model = ?", (model,))
    conn.execute("DELETE FROM artifacts WHERE model = ?", (model,))
