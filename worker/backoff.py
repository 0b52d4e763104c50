"""Capped exponential back-off between retries of a failing operation."""

from __future__ import annotations

import time
from typing import Callable


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
