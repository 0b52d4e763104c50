"""The two LRU pools of the session cache and the single-flight of loads.

``SessionPools`` is not thread-safe: the session cache calls it under its
own lock. ``SingleFlight`` has its own lock.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, TypeVar

from predictor.loader import LoadedModel

HOT = "hot"
PINNED = "pinned"

T = TypeVar("T")


@dataclass(frozen=True)
class Eviction:
    pool: str
    key: tuple
    model: LoadedModel
    reason: str  # "count" or "memory"


class SessionPools:
    """Two LRU pools of sessions under one memory bound.

    The hot pool contains the latest version and the aliased versions of
    models. The pinned pool contains versions requested by number. Each pool
    has its own count bound. When the estimated memory of all sessions is
    over ``max_bytes``, pinned sessions are evicted first, then hot ones,
    least recently used first. A session held by several entries (a
    version that is both the latest and ``production``) is counted once.
    """

    def __init__(self, max_hot: int, max_pinned: int, max_bytes: int):
        self.limits = {HOT: max_hot, PINNED: max_pinned}
        self.max_bytes = max_bytes
        self.pools: dict[str, OrderedDict[tuple, LoadedModel]] = {HOT: OrderedDict(), PINNED: OrderedDict()}
        self.bytes = 0
        # Entries per session object, so shared sessions count once.
        self._refs: dict[int, int] = {}

    def get(self, pool: str, key: tuple, touch: bool = True) -> LoadedModel | None:
        entries = self.pools[pool]
        model = entries.get(key)
        if model is not None and touch:
            entries.move_to_end(key)
        return model

    def put(self, pool: str, key: tuple, model: LoadedModel, touch: bool = True) -> list[Eviction]:
        """Insert or replace an entry; return the entries evicted.

        With ``touch`` the entry becomes the most recently used. A swap
        replaces an entry without touching it, so a model that only the
        head watcher refreshes still ages out.
        """
        entries = self.pools[pool]
        old = entries.get(key)
        entries[key] = model
        if touch or old is None:
            entries.move_to_end(key)
        self._ref(model)
        if old is not None:
            self._unref(old)

        evicted = []
        while len(entries) > self.limits[pool]:
            evicted.append(self._pop_oldest(pool, "count"))
        # The entry just inserted is never evicted: a single session over
        # the memory bound is still served.
        for victim_pool in (PINNED, HOT):
            while self.bytes > self.max_bytes:
                victim = self._oldest_other(victim_pool, pool, key)
                if victim is None:
                    break
                evicted.append(self._pop(victim_pool, victim, "memory"))
        return evicted

    def remove(self, pool: str, key: tuple) -> LoadedModel | None:
        model = self.pools[pool].pop(key, None)
        if model is not None:
            self._unref(model)
        return model

    def __len__(self) -> int:
        return len(self.pools[HOT]) + len(self.pools[PINNED])

    def _oldest_other(self, pool: str, kept_pool: str, kept_key: tuple) -> tuple | None:
        """Return the least recently used key of ``pool`` other than the kept entry."""
        for key in self.pools[pool]:
            if not (pool == kept_pool and key == kept_key):
                return key
        return None

    def _pop_oldest(self, pool: str, reason: str) -> Eviction:
        key = next(iter(self.pools[pool]))
        return self._pop(pool, key, reason)

    def _pop(self, pool: str, key: tuple, reason: str) -> Eviction:
        model = self.pools[pool].pop(key)
        self._unref(model)
        return Eviction(pool, key, model, reason)

    def _ref(self, model: LoadedModel) -> None:
        count = self._refs.get(id(model), 0)
        if count == 0:
            self.bytes += model.estimated_bytes
        self._refs[id(model)] = count + 1

    def _unref(self, model: LoadedModel) -> None:
        count = self._refs[id(model)] - 1
        if count == 0:
            del self._refs[id(model)]
            self.bytes -= model.estimated_bytes
        else:
            self._refs[id(model)] = count


class LoadTimeout(Exception):
    """Another request is loading the same key and did not finish within the wait."""

    def __init__(self, waited_s: float):
        super().__init__(f"still loading after {waited_s:.1f} s")
        self.waited_s = waited_s


class SingleFlight:
    """Run at most one load per key; other callers wait for it, for at most ``wait_s``.

    Loads of different keys never wait for each other. A caller that finds
    no result after the load it waited for (the load failed) runs the load
    itself, so an error reaches every caller as its own exception, with its
    own traceback.
    """

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._running: dict[Hashable, threading.Event] = {}

    def run(self, key: Hashable, lookup: Callable[[], T | None], load: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.wait_s
        while True:
            found = lookup()
            if found is not None:
                return found
            with self._lock:
                event = self._running.get(key)
                owner = event is None
                if owner:
                    event = self._running[key] = threading.Event()
            if owner:
                try:
                    return load()
                finally:
                    with self._lock:
                        del self._running[key]
                    event.set()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not event.wait(remaining):
                raise LoadTimeout(self.wait_s)

    def running(self) -> int:
        with self._lock:
            return len(self._running)
