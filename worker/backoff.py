"""Capped exponential back-off between retries, and the store's health built on it."""

from __future__ import annotations

import logging
import time
from typing import Callable

from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class Backoff:
    """Tracks consecutive failures and the time of the next allowed attempt.

    The n-th consecutive failure waits ``first_s * 2 ** (n - 1)`` seconds,
    at most ``max_s``. A success resets the count.
    """

    def __init__(self, first_s: float, max_s: float, clock: Callable[[], float] = time.monotonic):
        self.first_s = first_s
        self.max_s = max_s
        self._clock = clock
        self.failures = 0
        self.retry_at = 0.0

    @property
    def active(self) -> bool:
        """True from the first failure until the next success."""
        return self.failures > 0

    def failed(self) -> float:
        """Count a failure and return the delay before the next attempt, in seconds."""
        self.failures += 1
        delay = min(self.max_s, self.first_s * 2 ** min(self.failures - 1, 62))
        self.retry_at = self._clock() + delay
        return delay

    def succeeded(self) -> int:
        """Reset after a success; return how many failures came before it."""
        failures = self.failures
        self.failures = 0
        self.retry_at = 0.0
        return failures

    def retry_now(self) -> None:
        """Allow the next attempt at once, for example when the cause of the failures went away."""
        self.retry_at = 0.0

    def waiting(self) -> bool:
        """True while the next attempt is not yet allowed."""
        return self._clock() < self.retry_at

    def seconds_left(self) -> float:
        return max(0.0, self.retry_at - self._clock())


class StoreHealth:
    """Availability of the model store, which decides when the worker backs off and stops fetching.

    Every store call of the loop (a model lookup, a refit) reports here.
    The first failure starts a capped exponential back-off, and the next
    success ends it.
    """

    def __init__(self, metrics: WorkerMetrics, first_s: float, max_s: float, clock: Callable[[], float]):
        self._metrics = metrics
        self.backoff = Backoff(first_s, max_s, clock)

    @property
    def down(self) -> bool:
        return self.backoff.active

    def failed(self, err: Exception, action: str) -> None:
        delay = self.backoff.failed()
        self._metrics.store_retries.inc()
        self._metrics.store_available.set(0)
        log.warning(
            "Store unavailable while %s (%r); retry %d in %.1f s. Fetching is paused, buffered "
            "records are kept and offsets are not committed past them",
            action, err, self.backoff.failures, delay,
        )

    def ok(self) -> None:
        failures = self.backoff.succeeded()
        if failures:
            self._metrics.store_available.set(1)
            log.info("Store available again after %d failed attempts; fetching resumes", failures)
