"""LRU cache of warmed onnxruntime sessions and the hot swap to new versions.

Two kinds of entries share one LRU bound: the latest version of a model
(key ``(name, None)``), which the head watcher moves forward, and a pinned
version (key ``(name, version)``), which never changes.

A swap is one assignment of the entry under ``_lock``. A request takes its
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

from modelstore.base import ModelStore
from modelstore.errors import ModelNotFound, StoreError, StreamfitError

from predictor.loader import LoadedModel, LoadFailed, load_version
from predictor.metrics import PredictorMetrics
from predictor.settings import PredictorSettings

logger = logging.getLogger(__name__)

# Number of versions, from the head down, that one load tries before it
# gives up, so a model whose newest versions are broken still serves.
MAX_FALLBACK_VERSIONS = 5
# Bounds of the memory of versions that failed for good and of names that
# the store did not find (one entry each).
MAX_FAILED_VERSIONS = 10_000
MAX_MISSING_NAMES = 10_000
LOAD_LOCK_STRIPES = 64
# Loads that fail because the store is down are logged at most this often,
# because during an outage every model name a client sends fails its load.
UNAVAILABLE_LOG_INTERVAL_S = 60.0

Key = tuple[str, "int | None"]


class NotServable(StreamfitError):
    """No loadable version can serve the request; the message gives the reason.

    ``public`` is the message for clients, without the store's internal
    hosts and paths. ``store_failed`` is set when the store failed to
    respond, so the model may not even exist.
    """

    def __init__(
        self, message: str, retriable: bool, public: str | None = None, store_failed: bool = False
    ):
        super().__init__(message)
        self.retriable = retriable
        self.public = message if public is None else public
        self.store_failed = store_failed


class SessionCache:
    """Sessions of the models being served, loaded lazily and bounded by count."""

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
        self._load = load
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, LoadedModel] = OrderedDict()
        # Striped locks let one thread load a given key while requests for
        # other models go on, without a lock object per requested name.
        self._load_locks = [threading.Lock() for _ in range(LOAD_LOCK_STRIPES)]
        # Message and public message of each version that failed for good.
        self._failed: OrderedDict[tuple[str, int], tuple[str, str]] = OrderedDict()
        self._unavailable_logged_at = float("-inf")
        self._unavailable_suppressed = 0
        self._missing: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def latest(self, name: str) -> LoadedModel:
        """Return the served latest version of ``name``, loading it on first use.

        Raises ModelNotFound, StoreError (first use only) or NotServable.
        """
        key = (name, None)
        model = self._touch(key)
        if model is not None:
            return model
        with self._load_lock(key):
            model = self._touch(key)
            if model is not None:
                return model
            with self._remember_missing(name):
                head = self._store.head(name)
            model = self._load_newest(name, head.latest, floor=0)
            self._insert(key, model)
            self._set_gauges(model)
            logger.info(
                "model %s: serving version %d, loaded in %.3f s",
                name, model.version, model.load_seconds,
            )
            return model

    def pinned(self, name: str, version: int) -> LoadedModel:
        """Return version ``version`` of ``name``, loading it on first use.

        Raises ModelNotFound, VersionNotFound or NotServable.
        """
        with self._lock:
            current = self._entries.get((name, None))
        if current is not None and current.version == version:
            self._touch((name, None))
            return current

        key = (name, version)
        model = self._touch(key)
        if model is not None:
            return model
        with self._load_lock(key):
            model = self._touch(key)
            if model is not None:
                return model
            with self._remember_missing(name):
                model = self._load_one(name, version)
            self._insert(key, model)
            return model

    def loaded_latest(self) -> list[LoadedModel]:
        """Return the latest-version entries, for the head watcher."""
        with self._lock:
            return [m for (_, v), m in self._entries.items() if v is None]

    def refresh(self, name: str, current: LoadedModel) -> LoadedModel | None:
        """Load the newest version of ``name`` above ``current`` and swap it in.

        Returns the new model, or None when there is nothing newer that
        loads. Runs on the head watcher's thread, never on a request's.
        """
        head = self._store.head(name)
        if head.latest <= current.version:
            return None
        try:
            new = self._load_newest(name, head.latest, floor=current.version)
        except NotServable:
            return None
        return new if self._swap(name, new) else None

    def update_gauges(self) -> None:
        for model in self.loaded_latest():
            self._set_gauges(model)
        with self._lock:
            self._metrics.cache_models.set(len(self._entries))

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _load_newest(self, name: str, latest: int, floor: int) -> LoadedModel:
        """Load the newest version in (floor, latest] that loads, trying at most a few."""
        lowest = max(floor + 1, 1, latest - MAX_FALLBACK_VERSIONS + 1)
        if latest < lowest:
            raise NotServable(
                f"model {name!r} has no published version yet (its latest is version "
                f"{latest}, which carries only the spec); publish a trained version first",
                retriable=True,
            )
        reasons, public_reasons = [], []
        for version in range(latest, lowest - 1, -1):
            try:
                return self._load_one(name, version)
            except NotServable as exc:
                if exc.retriable:
                    raise
                reasons.append(str(exc))
                public_reasons.append(exc.public)
        prefix = f"model {name!r}: no version from {latest} down to {lowest} can be served: "
        raise NotServable(
            prefix + "; ".join(reasons), retriable=False, public=prefix + "; ".join(public_reasons)
        )

    def _load_one(self, name: str, version: int) -> LoadedModel:
        with self._lock:
            failure = self._failed.get((name, version))
        if failure is not None:
            raise NotServable(failure[0], retriable=False, public=failure[1])
        try:
            model = self._load(self._store, name, version, self._settings)
        except LoadFailed as exc:
            self._record_failure(name, version, exc)
            raise NotServable(
                str(exc), retriable=exc.retriable, public=exc.public, store_failed=exc.retriable
            ) from None
        except StoreError:
            raise
        except Exception as exc:
            # Stored content that the loader does not expect, such as deeply
            # nested metadata, must not fail every request with a 500 or be
            # read again for each one.
            logger.exception("model %s version %d: unexpected error while loading", name, version)
            failed = LoadFailed(
                "invalid", f"model {name!r} version {version}: unexpected error while loading: "
                f"{type(exc).__name__}: {exc}",
                public=f"model {name!r} version {version}: the version cannot be loaded "
                f"({type(exc).__name__}); the predictor log has the details",
            )
            self._record_failure(name, version, failed)
            raise NotServable(str(failed), retriable=False, public=failed.public) from None
        self._metrics.model_loads.labels(result="ok").inc()
        return model

    def _record_failure(self, name: str, version: int, exc: LoadFailed) -> None:
        self._metrics.model_loads.labels(result=exc.result).inc()
        if exc.retriable:
            # A store outage is retried on the next request or refresh. A
            # client can name any number of models while the store is down,
            # so the warnings are rate-limited instead of kept per version.
            self._log_unavailable(exc)
            return
        with self._lock:
            self._failed[(name, version)] = (str(exc), exc.public)
            while len(self._failed) > MAX_FAILED_VERSIONS:
                self._failed.popitem(last=False)
        logger.error("%s; this version is never served (load result %s)", exc, exc.result)

    def _log_unavailable(self, exc: LoadFailed) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._unavailable_logged_at < UNAVAILABLE_LOG_INTERVAL_S:
                self._unavailable_suppressed += 1
                return
            self._unavailable_logged_at = now
            suppressed, self._unavailable_suppressed = self._unavailable_suppressed, 0
        logger.warning(
            "%s; the version will be loaded again later (%d similar failures not logged "
            "in the last %.0f s)", exc, suppressed, UNAVAILABLE_LOG_INTERVAL_S,
        )

    def _swap(self, name: str, new: LoadedModel) -> bool:
        with self._lock:
            current = self._entries.get((name, None))
            # An evicted model is loaded again by its next request, and a
            # concurrent load may already have put a newer version in place.
            if current is None or current.version >= new.version:
                return False
            self._entries[(name, None)] = new
        self._metrics.swaps.inc()
        self._set_gauges(new)
        logger.info(
            "model %s: swapped version %d for version %d, loaded and warmed in %.3f s",
            name, current.version, new.version, new.load_seconds,
        )
        return True

    def _touch(self, key: Key) -> LoadedModel | None:
        with self._lock:
            model = self._entries.get(key)
            if model is not None:
                self._entries.move_to_end(key)
            return model

    def _insert(self, key: Key, model: LoadedModel) -> None:
        evicted = []
        with self._lock:
            self._entries[key] = model
            self._entries.move_to_end(key)
            while len(self._entries) > self._settings.cache_max_models:
                evicted.append(self._entries.popitem(last=False))
            size = len(self._entries)
        self._metrics.cache_models.set(size)
        for (name, version), old in evicted:
            self._metrics.cache_evictions.inc()
            if version is None:
                self._metrics.forget_model(name)
            logger.debug("evicted model %s version %d from the session cache", name, old.version)

    def _set_gauges(self, model: LoadedModel) -> None:
        self._metrics.served_version.labels(model=model.name).set(model.version)
        age = model.age_seconds()
        if age is not None:
            self._metrics.version_age.labels(model=model.name).set(age)

    @contextlib.contextmanager
    def _remember_missing(self, name: str) -> Iterator[None]:
        """Raise a remembered ModelNotFound for one refresh interval after the store raised it.

        Requests for names that are not in the store would otherwise cost a
        store read each.
        """
        now = time.monotonic()
        with self._lock:
            entry = self._missing.get(name)
        if entry is not None and entry[0] > now:
            raise ModelNotFound(entry[1])
        try:
            yield
        except ModelNotFound as exc:
            expires = now + self._settings.refresh_interval_ms / 1000.0
            with self._lock:
                self._missing[name] = (expires, str(exc))
                self._missing.move_to_end(name)
                while len(self._missing) > MAX_MISSING_NAMES:
                    self._missing.popitem(last=False)
            raise

    def _load_lock(self, key: Key) -> threading.Lock:
        return self._load_locks[hash(key) % LOAD_LOCK_STRIPES]

