"""Handling of connections that a child process inherits through fork().

A child must neither use nor close its parent's connections. The Couchbase
SDK's I/O threads exist only in the parent, so a call on an inherited Cluster
blocks forever and destroying it at the child's exit aborts the child
(``std::system_error``), as seen with SDK 4.6.3. An inherited SQLite
connection must not be closed in the child either, because SQLite's unix
locks are per process and a close could checkpoint or delete the WAL file
that the parent still uses. Each owner therefore registers here, drops its
connections in the child right after fork(), and opens new ones when next
used.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from typing import Protocol


class ForkAware(Protocol):
    def _reset_after_fork(self) -> None: ...


_OWNERS: "weakref.WeakSet[ForkAware]" = weakref.WeakSet()


def register(owner: ForkAware) -> None:
    """Call ``owner._reset_after_fork()`` in every child forked from now on."""
    _OWNERS.add(owner)


def abandon(resource: object) -> None:
    """Keep ``resource`` alive until this process ends, so it is never closed or destroyed here.

    An extra reference that no Python object owns keeps the refcount above
    zero even while the interpreter shuts down, where a list entry would be
    released.
    """
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(resource))


def _reset_owners_in_child() -> None:
    for owner in list(_OWNERS):
        owner._reset_after_fork()


os.register_at_fork(after_in_child=_reset_owners_in_child)
