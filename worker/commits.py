"""Offset commits after publishes, and the per-partition lag they leave.

A commit sends, per partition, the first offset not yet published, rejected
or skipped (``OffsetTracker.committable``), so a commit never passes a record
that its model has not learned. Dead letters are flushed first, so a
rejected record is durable in the dead-letter topic before its offset is
committed. A failed commit costs only a re-read: the stored offsets of each
model skip what was learned.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from worker.backoff import Backoff
from worker.metrics import WorkerMetrics
from worker.sources import CommitFailed
from worker.state import WorkState

log = logging.getLogger(__name__)

# Commits of offsets that only moved past rejected or skipped records wait
# this long, so a stream of bad records does not commit after every poll.
IDLE_COMMIT_INTERVAL_S = 5.0
# Lag and connection gauges are refreshed this often, because reading
# kafka-python's metrics builds a dict of every client metric.
GAUGE_INTERVAL_S = 2.0
# While the broker is unreachable each commit waits commit_timeout_ms, so
# failed commits back off up to this long instead of stalling every step.
MAX_COMMIT_BACKOFF_S = 30.0


class Committer:
    """Commits the committable offsets of assigned partitions and updates the lag gauges."""

    def __init__(
        self,
        source: Any,
        state: WorkState,
        lock: threading.RLock,
        metrics: WorkerMetrics,
        dead_letters: Any,
        clock: Callable[[], float],
    ):
        self._source = source
        self._state = state
        self._lock = lock
        self._metrics = metrics
        self._dead_letters = dead_letters
        self._clock = clock
        self._backoff = Backoff(1.0, MAX_COMMIT_BACKOFF_S, clock)
        self._published = False
        self._last_commit = clock()
        self._last_gauges = float("-inf")

    def published(self) -> None:
        """Ask for a commit at the next step, because a version was published."""
        self._published = True

    def broker_answered(self) -> None:
        """Retry a failed commit at the next step, because a fetch returned records."""
        if self._backoff.active:
            self._backoff.retry_now()

    def maybe_commit(self) -> None:
        now = self._clock()
        if not self._backoff.waiting():
            if self._published or now - self._last_commit >= IDLE_COMMIT_INTERVAL_S:
                self.commit()
        if now - self._last_gauges >= GAUGE_INTERVAL_S:
            self.update_gauges()

    def commit(self) -> bool:
        """Commit what is committable; return False when the commit failed or timed out."""
        with self._lock:
            offsets = self._state.tracker.uncommitted()
        self._published = False
        self._last_commit = self._clock()
        if not offsets:
            return True
        if self._dead_letters is not None and not self._dead_letters.flush():
            self._backoff.failed()
            return False

        try:
            committed = self._source.commit(offsets)
        except CommitFailed as err:
            self._metrics.commit_failures.inc()
            delay = self._backoff.failed()
            log.warning(
                "Offset commit failed: %s; next attempt in %.0f s. The records may be read "
                "again after a restart or rebalance, and the stored offsets skip those "
                "already learned",
                err, delay,
            )
            return False

        with self._lock:
            self._state.tracker.mark_committed(committed)
        if self._backoff.succeeded():
            log.info("Offset commits succeed again")
        log.debug("Committed offsets %s", committed)
        self.update_gauges()
        return True

    def update_gauges(self) -> None:
        self._last_gauges = self._clock()
        with self._lock:
            for partition, highwater in self._source.highwaters().items():
                base = self._state.tracker.lag_base(partition)
                if base is not None:
                    self._metrics.partition_lag.labels(partition).set(max(0, highwater - base))
        connections = self._source.connection_count()
        if connections is not None:
            self._metrics.broker_connections.set(connections)
