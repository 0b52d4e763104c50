"""Cache of warmed onnxruntime sessions and the hot swap to new versions.

Entries of the hot pool are keyed ``(name, None)`` for the latest version of
a model and ``(name, alias)`` for an alias. The head watcher moves them when
the model's head changes. Entries of the pinned pool are keyed
``(name, version)`` and never change. Both pools are LRUs bounded by count,
and all sessions together are bounded by estimated memory (see
``predictor._pools``).

A swap is one assignment of an entry under ``_lock``. A request takes its
own reference to the LoadedModel before it runs, so requests in flight end
on the session they started with, and the replaced session is freed when
the last of them returns.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Iterator

from modelstore.base import Head, ModelStore
from modelstore.errors import ModelNotFound, VersionNotFound

from predictor._pools import HOT, PINNED, Eviction, LoadTimeout, SessionPools, SingleFlight
from predictor.loader import LoadedModel, load_version
from predictor.metrics import PredictorMetrics
from predictor.settings import PredictorSettings
from predictor.versions import NotServable, VersionLoader

__all__ = ["NotServable", "SessionCache"]

logger = logging.getLogger(__name__)

# Bound of the memory of names, versions and aliases that the store did
# not find (one entry each).
MAX_MISSING_NAMES = 10_000

LATEST = None


class SessionCache:
    """Sessions of the models being served, loaded lazily and bounded by count and memory."""

    def __init__(
        self,
        store: ModelStore,
        settings: PredictorSettings,
        metrics: PredictorMetrics,
        load: Callable[..., LoadedModel] = load_version,
    ):
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._versions = VersionLoader(store, settings, metrics, load)
        self._lock = threading.Lock()
        self._pools = SessionPools(
            settings.cache_max_models, settings.cache_max_pinned, settings.cache_max_bytes
        )
        # Selectors of the hot entries of each model (None for the latest
        # version, else an alias) and the head last read for the model.
        # A model has both only while it has a hot entry.
        self._selectors: dict[str, set[str | None]] = {}
        self._heads: dict[str, Head] = {}
        self._loads = SingleFlight(settings.load_wait_ms / 1000.0)
        # Keys (name, None), (name, alias) or (name, version) that the store did not find.
        self._missing: OrderedDict[tuple, tuple[float, Exception]] = OrderedDict()

    # ------------------------------------------------------------ requests

    def latest(self, name: str) -> LoadedModel:
        """Return the served latest version of ``name``, loading it on first use.

        Raises ModelNotFound, StoreError (first use only) or NotServable.
        """
        key = (name, LATEST)
        return self._single_flight(key, lambda: self._get(HOT, key), lambda: self._load_latest(name))

    def aliased(self, name: str, alias: str) -> LoadedModel:
        """Return the version that ``alias`` names in the model's head, loading it on first use.

        The alias is read from the head that the watcher keeps fresh, so a
        moved alias is served within one refresh interval. Raises
        ModelNotFound, VersionNotFound (no such alias), StoreError or
        NotServable.
        """
        key = (name, alias)
        return self._single_flight(key, lambda: self._get(HOT, key), lambda: self._load_alias(name, alias))

    def pinned(self, name: str, version: int) -> LoadedModel:
        """Return version ``version`` of ``name``, loading it on first use.

        A version that a hot entry serves runs on that entry's session.
        Raises ModelNotFound, VersionNotFound or NotServable.
        """
        if version == 0:
            # Every model has version 0 and it never has a model, so asking
            # for it is the client's mistake, not an outage.
            raise VersionNotFound(
                f"model {name!r} version 0 carries only the spec and has no model to serve; "
                "request version 1 or later"
            )
        key = (name, version)

        def lookup() -> LoadedModel | None:
            return self._hot_version(name, version) or self._get(PINNED, key)

        def load() -> LoadedModel:
            with self._remember_missing(key):
                model = self._versions.one(name, version)
            self._put(PINNED, key, model)
            return model

        return self._single_flight(("pinned", name, version), lookup, load)

    def cached(self, name: str, selector: str | int | None) -> LoadedModel | None:
        """Return the cached session for the latest version (None), an alias or a version number.

        Never reads the store or waits for a load; returns None when the
        session is not cached.
        """
        if isinstance(selector, int):
            return self._hot_version(name, selector) or self._get(PINNED, (name, selector))
        return self._get(HOT, (name, selector))

    # ------------------------------------------------------------ head watcher

    def tracked_models(self) -> list[str]:
        """Return the names of the models with hot entries, whose heads the watcher reads."""
        with self._lock:
            return list(self._selectors)

    def apply_head(self, head: Head) -> LoadedModel | None:
        """Move the hot entries of ``head.model`` to the versions that ``head`` names.

        Returns the new latest version when it was swapped in, else None.
        Runs on the head watcher's thread, never on a request's.
        """
        name = head.model
        with self._lock:
            if name not in self._selectors:
                return None
            self._heads[name] = head
            selectors = set(self._selectors[name])
        swapped = None
        if LATEST in selectors:
            swapped = self._refresh_latest(head)
        for alias in sorted(s for s in selectors if s is not LATEST):
            self._refresh_alias(head, alias)
        return swapped

    def refresh(self, name: str, current: LoadedModel) -> LoadedModel | None:
        """Read the head of ``name`` and swap in a newer latest version than ``current``.

        Returns the new model, or None when there is nothing newer that loads.
        """
        head = self._store.head(name)
        with self._lock:
            if self._pools.get(HOT, (name, LATEST), touch=False) is not current:
                return None
        return self.apply_head(head)

    def loaded_latest(self) -> list[LoadedModel]:
        """Return the latest-version entries."""
        with self._lock:
            return [m for (_, s), m in self._pools.pools[HOT].items() if s is LATEST]

    def known_head(self, name: str) -> Head | None:
        """Return the head last read for a model with hot entries, without a store read."""
        with self._lock:
            return self._heads.get(name)

    def update_gauges(self) -> None:
        with self._lock:
            hot = list(self._pools.pools[HOT].items())
            size, estimated = len(self._pools), self._pools.bytes
        for (name, selector), model in hot:
            self._set_gauges(model, selector)
        self._metrics.cache_models.set(size)
        self._metrics.cache_bytes.set(estimated)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pools)

    # ------------------------------------------------------------ loading

    def _single_flight(self, key, lookup, load) -> LoadedModel:
        try:
            return self._loads.run(key, lookup, load)
        except LoadTimeout as exc:
            name = key[1] if key[0] == "pinned" else key[0]
            message = (
                f"model {name!r} is still loading after {exc.waited_s:.1f} s (another request "
                "started the load); retry later"
            )
            raise NotServable(message, retriable=True) from None

    def _load_latest(self, name: str) -> LoadedModel:
        head = self._read_head(name, (name, None))
        model = self._versions.newest(name, head.latest, floor=0)
        self._put(HOT, (name, LATEST), model, head)
        logger.info(
            "model %s: serving version %d, loaded in %.3f s", name, model.version, model.load_seconds
        )
        return model

    def _load_alias(self, name: str, alias: str) -> LoadedModel:
        head = self.known_head(name) or self._read_head(name, (name, alias))
        version = head.aliases.get(alias)
        if version is None:
            error = VersionNotFound(
                f"model {name!r} has no alias {alias!r}; its aliases are {sorted(head.aliases)}"
            )
            self._remember((name, alias), error)
            raise error
        model = self._loaded_version(name, version) or self._versions.one(name, version)
        self._put(HOT, (name, alias), model, head)
        logger.info("model %s: serving alias %s with version %d", name, alias, model.version)
        return model

    def _read_head(self, name: str, missing_key: tuple[str, str | None]) -> Head:
        with self._remember_missing(missing_key):
            return self._store.head(name)

    # ------------------------------------------------------------ swaps

    def _refresh_latest(self, head: Head) -> LoadedModel | None:
        name = head.model
        with self._lock:
            current = self._pools.get(HOT, (name, LATEST), touch=False)
        if current is None or head.latest <= current.version:
            return None
        try:
            new = self._versions.newest(name, head.latest, floor=current.version)
        except NotServable:
            return None
        return new if self._swap(name, LATEST, current, new) else None

    def _refresh_alias(self, head: Head, alias: str) -> None:
        name = head.model
        with self._lock:
            current = self._pools.get(HOT, (name, alias), touch=False)
        if current is None:
            return
        target = head.aliases.get(alias)
        if target is None:
            with self._lock:
                if self._pools.get(HOT, (name, alias), touch=False) is current:
                    self._drop_hot(name, alias)
            logger.info("model %s: alias %s was removed; it is no longer served", name, alias)
            return
        if target == current.version:
            return
        # An alias may move back to an older version, so unlike the latest
        # entry it swaps in any version it names.
        try:
            new = self._loaded_version(name, target) or self._versions.one(name, target)
        except NotServable as exc:
            # The version loader has logged a lasting failure; the old version stays.
            logger.debug("model %s: alias %s stays on version %d: %s", name, alias, current.version, exc)
            return
        self._swap(name, alias, current, new)

    def _swap(self, name: str, selector: str | None, current: LoadedModel, new: LoadedModel) -> bool:
        with self._lock:
            # An evicted entry is loaded again by its next request, and a
            # concurrent load may already have put another version in place.
            if self._pools.get(HOT, (name, selector), touch=False) is not current:
                return False
            evicted = self._pools.put(HOT, (name, selector), new, touch=False)
            for eviction in evicted:
                if eviction.pool == HOT:
                    self._forget_selector(*eviction.key)
        for eviction in evicted:
            self._note_eviction(eviction)
        self._metrics.swaps.inc()
        self._set_gauges(new, selector)
        logger.info(
            "model %s%s: swapped version %d for version %d, loaded and warmed in %.3f s",
            name, "" if selector is LATEST else f" alias {selector}",
            current.version, new.version, new.load_seconds,
            extra={"model": name, "version": new.version},
        )
        return True

    # ------------------------------------------------------------ entries

    def _get(self, pool: str, key: tuple) -> LoadedModel | None:
        with self._lock:
            return self._pools.get(pool, key)

    def _hot_version(self, name: str, version: int) -> LoadedModel | None:
        """Return a hot entry of ``name`` that serves ``version``, touching it."""
        with self._lock:
            for selector in self._selectors.get(name, ()):
                model = self._pools.get(HOT, (name, selector), touch=False)
                if model is not None and model.version == version:
                    return self._pools.get(HOT, (name, selector))
        return None

    def _loaded_version(self, name: str, version: int) -> LoadedModel | None:
        """Return any cached session of ``name`` at ``version``, without touching LRU order."""
        with self._lock:
            for selector in self._selectors.get(name, ()):
                model = self._pools.get(HOT, (name, selector), touch=False)
                if model is not None and model.version == version:
                    return model
            return self._pools.get(PINNED, (name, version), touch=False)

    def _put(self, pool: str, key: tuple, model: LoadedModel, head: Head | None = None) -> None:
        name, selector = key
        with self._lock:
            evicted = self._pools.put(pool, key, model)
            if pool == HOT:
                self._selectors.setdefault(name, set()).add(selector)
                # The watcher keeps a known head fresh; a load only adds one.
                if head is not None and name not in self._heads:
                    self._heads[name] = head
            for eviction in evicted:
                if eviction.pool == HOT:
                    self._forget_selector(*eviction.key)
            size, estimated = len(self._pools), self._pools.bytes
        if pool == HOT:
            self._set_gauges(model, selector)
        self._metrics.cache_models.set(size)
        self._metrics.cache_bytes.set(estimated)
        for eviction in evicted:
            self._note_eviction(eviction)

    def _drop_hot(self, name: str, selector: str | None) -> None:
        """Remove a hot entry. The caller must have acquired ``_lock``."""
        if self._pools.remove(HOT, (name, selector)) is not None:
            self._forget_selector(name, selector)
            self._forget_gauges(name, selector)

    def _forget_selector(self, name: str, selector: str | None) -> None:
        selectors = self._selectors.get(name)
        if selectors is None:
            return
        selectors.discard(selector)
        if not selectors:
            del self._selectors[name]
            self._heads.pop(name, None)

    def _note_eviction(self, eviction: Eviction) -> None:
        self._metrics.cache_evictions.labels(reason=eviction.reason).inc()
        name, selector = eviction.key
        if eviction.pool == HOT:
            self._forget_gauges(name, selector)
        logger.debug(
            "evicted model %s version %d from the %s pool (bound: %s)",
            name, eviction.model.version, eviction.pool, eviction.reason,
        )

    def _set_gauges(self, model: LoadedModel, selector: str | None) -> None:
        if selector is not LATEST:
            self._metrics.alias_version.labels(model=model.name, alias=selector).set(model.version)
            return
        self._metrics.served_version.labels(model=model.name).set(model.version)
        age = model.age_seconds()
        if age is not None:
            self._metrics.version_age.labels(model=model.name).set(age)

    def _forget_gauges(self, name: str, selector: str | None) -> None:
        if selector is LATEST:
            self._metrics.forget_model(name)
        else:
            self._metrics.forget_alias(name, selector)

    # ------------------------------------------------------------ names not found

    @contextlib.contextmanager
    def _remember_missing(self, key: tuple) -> Iterator[None]:
        """Raise a remembered ModelNotFound or VersionNotFound for one refresh interval.

        Requests for names or versions that are not in the store would
        otherwise cost a store read each. A missing model is remembered
        under ``(name, None)``, so every key of that name raises it. A
        missing version or alias is remembered under ``key``.
        """
        now = time.monotonic()
        with self._lock:
            entries = [self._missing.get((key[0], None)), self._missing.get(key)]
        for entry in entries:
            if entry is not None and entry[0] > now:
                raise type(entry[1])(str(entry[1]))
        try:
            yield
        except ModelNotFound as exc:
            self._remember((key[0], None), exc)
            raise
        except VersionNotFound as exc:
            self._remember(key, exc)
            raise

    def _remember(self, key: tuple, exc: Exception) -> None:
        expires = time.monotonic() + self._settings.refresh_interval_ms / 1000.0
        with self._lock:
            self._missing[key] = (expires, type(exc)(str(exc)))
            self._missing.move_to_end(key)
            while len(self._missing) > MAX_MISSING_NAMES:
                self._missing.popitem(last=False)
