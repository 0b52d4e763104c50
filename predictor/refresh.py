"""Background thread that moves loaded models to their newest version.

Requests never read the store to find the latest version: this thread reads
the head of every loaded model each ``refresh_interval_ms``, and loads and
warms a newer version before the cache swaps it in. A new version is
therefore served about one interval after its publish, plus its load time.
"""

from __future__ import annotations

import logging
import threading
import time

from modelstore.base import ModelStore
from modelstore.errors import ModelNotFound, StoreError

from predictor.sessions import SessionCache

logger = logging.getLogger(__name__)

# Unexpected errors of the loop are logged at most this often.
ERROR_LOG_INTERVAL_S = 60.0


class HeadWatcher:
    """Poll model heads on one daemon thread and mark the service ready once the store responds."""

    def __init__(self, store: ModelStore, cache: SessionCache, interval_ms: int):
        self._store = store
        self._cache = cache
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
        """Check the head of every loaded model once and swap in newer versions."""
        for current in self._cache.loaded_latest():
            if self._stop.is_set():
                return
            try:
                self._cache.refresh(current.name, current)
            except ModelNotFound:
                self._log_error(
                    f"model {current.name!r} is not in the store any more; version "
                    f"{current.version} keeps serving until it is evicted",
                    exc_info=False,
                )
            except StoreError as exc:
                self._note_store_down(exc)
                return
        self._note_store_up()

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
