"""Background thread that moves cached models to the versions their heads name.

Requests never read the store to find the latest version or an alias: this
thread reads the heads of every cached model each ``refresh_interval_ms``,
and loads and warms a new version before the cache swaps it in. A new
version is therefore served about one interval after its publish, plus the
time to read the heads and to load it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterable

from modelstore.base import Head, ModelStore
from modelstore.errors import ModelNotFound, StoreError, VersionNotFound

from predictor.metrics import PredictorMetrics
from predictor.sessions import SessionCache

logger = logging.getLogger(__name__)

# Unexpected errors of the loop are logged at most this often.
ERROR_LOG_INTERVAL_S = 60.0
# Heads read in one call of a store's bulk read, so one sweep over many
# thousands of models does not hold one huge request.
HEAD_BATCH = 1000


def read_heads(store: ModelStore, names: list[str]) -> dict[str, Head | ModelNotFound]:
    """Read the heads of ``names`` in one bulk read: a Head, or ModelNotFound for a model that is gone.

    Raises StoreError when the store fails.
    """
    found = store.heads(names)
    return {
        name: found.get(name) or ModelNotFound(f"model {name!r} not found in the model store")
        for name in names
    }


def _batches(names: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(names), size):
        yield names[start:start + size]


class HeadWatcher:
    """Poll model heads on one daemon thread and mark the service ready once the store responds."""

    def __init__(
        self,
        store: ModelStore,
        cache: SessionCache,
        interval_ms: int,
        metrics: PredictorMetrics | None = None,
    ):
        self._store = store
        self._cache = cache
        self._metrics = metrics
        self._interval_s = interval_ms / 1000.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error_log = 0.0
        self._store_down = False
        self.ready = threading.Event()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the head watcher is already running")
        self._thread = threading.Thread(target=self._run, name="streamfit-head-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning(
                    "the head watcher did not stop within %.1f s (a model load is still running)",
                    timeout_s,
                )
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if self.ready.is_set():
                    self.refresh_all()
                else:
                    self._probe_store()
                self._cache.update_gauges()
            except Exception:
                # The thread must outlive any single failure, or the service
                # would keep serving ever older versions.
                self._log_error(
                    "the head watcher's refresh failed; it runs again next interval", exc_info=True
                )
            elapsed = time.monotonic() - started
            self._stop.wait(max(0.0, self._interval_s - elapsed))

    def refresh_all(self) -> None:
        """Read the head of every cached model once and swap in the versions they name."""
        started = time.monotonic()
        for names in _batches(self._cache.tracked_models(), HEAD_BATCH):
            if self._stop.is_set():
                return
            try:
                heads = read_heads(self._store, names)
                for name in names:
                    self._apply(name, heads[name])
            except StoreError as exc:
                self._note_store_down(exc)
                if self._metrics is not None:
                    self._metrics.head_checks.labels(result="failed").inc()
                return
        self._note_store_up()
        if self._metrics is not None:
            self._metrics.head_checks.labels(result="ok").inc()
            self._metrics.last_head_check.set(time.time())
            self._metrics.head_check_duration.set(time.monotonic() - started)

    def _apply(self, name: str, head: Head | ModelNotFound) -> None:
        if isinstance(head, ModelNotFound):
            self._log_error(
                f"model {name!r} is not in the store any more; its cached versions keep "
                "serving until they are evicted",
                exc_info=False,
            )
            return
        try:
            self._cache.apply_head(head)
        except (ModelNotFound, VersionNotFound) as exc:
            # The model or a version changed between the head read and the
            # load; the next sweep reads the head again.
            self._log_error(
                f"model {name!r}: {exc}; its cached versions keep serving", exc_info=False
            )

    def _probe_store(self) -> None:
        try:
            self._store.list_models()
        except StoreError as exc:
            self._note_store_down(exc)
            return
        self.ready.set()
        self._note_store_up()
        logger.info("the model store responded; the predictor is ready")

    def _note_store_down(self, exc: Exception) -> None:
        if not self._store_down:
            self._store_down = True
            logger.warning(
                "the model store failed (%s); loaded versions keep serving requests and "
                "new versions wait until it responds again", exc,
            )

    def _note_store_up(self) -> None:
        if self._store_down:
            self._store_down = False
            logger.info("the model store responds again")

    def _log_error(self, message: str, exc_info: bool) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            logger.error(message, exc_info=exc_info)
