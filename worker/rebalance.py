"""What the worker does when the consumer group moves partitions.

kafka-python 3.0 calls these methods on its IO thread while the loop's
thread waits inside ``poll()`` or ``close()``, so they never run during the
loop's own bookkeeping. A refit may be running on the refit thread meanwhile;
its records of a revoked or lost partition are recognised by the partition's
epoch when the refit returns, and never committed by this worker.

Revoked (another member takes the partition, this member is still in the
group): the unpublished records are dropped and the offsets already covered
by published versions are committed. Lost (this member was fenced, for
example after a pause longer than the session timeout): the records are
dropped and nothing is committed, because the broker no longer accepts this
member's commits. Either way the next owner resumes from the committed
offset and skips the records that the stored offsets show as learned.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from worker.metrics import WorkerMetrics
from worker.state import WorkState

log = logging.getLogger(__name__)


class PartitionMoves:
    """The rebalance callbacks of one worker (``worker.sources.PartitionHandler``)."""

    def __init__(self, state: WorkState, metrics: WorkerMetrics, lock: threading.RLock, dead_letters: Any = None):
        self._state = state
        self._metrics = metrics
        self._lock = lock
        self._dead_letters = dead_letters
        # Where to resume each revoked partition if the next assignment keeps it here.
        self._resume_offsets: dict[str, int] = {}
        self._assigned: set[str] = set()
        self.refresh_needed = False

    def partitions_assigned(self, partitions: list[str]) -> dict[str, int]:
        """Return the offsets to seek to in partitions this worker kept through a rebalance.

        With an eager assignor, kafka-python 3.0 keeps the fetch position of a
        partition that stays with the same consumer, but the revocation
        dropped that partition's unpublished records, so reading resumes at
        the first dropped one.
        """
        with self._lock:
            self._assigned.update(partitions)
            self._metrics.assigned_partitions.set(len(self._assigned))
            seeks = {p: self._resume_offsets[p] for p in partitions if p in self._resume_offsets}
            self._resume_offsets.clear()
            # The previous owner may have published meanwhile, so the stored
            # offsets are read again before the next record is handled.
            self.refresh_needed = True
        return seeks

    def partitions_revoked(self, partitions: list[str]) -> dict[str, int]:
        """Drop the partitions' unpublished records; return the offsets to commit for them."""
        with self._lock:
            offsets = self._state.tracker.uncommitted(partitions)
            self._resume_offsets.update(self._state.first_unfinished(partitions))
            self._drop(partitions, "revoked")
        if offsets and self._dead_letters is not None and not self._dead_letters.flush():
            return {}
        return offsets

    def partitions_lost(self, partitions: list[str]) -> None:
        with self._lock:
            self._resume_offsets.clear()
            self._drop(partitions, "lost")

    def revoke_commit_done(self, offsets: dict[str, int], error: Exception | None) -> None:
        if error is None:
            log.info("Committed offsets %s of revoked partitions", offsets)
            return
        self._metrics.commit_failures.inc()
        log.warning(
            "Commit of revoked partitions' offsets %s failed: %r; the next owner reads them "
            "again and skips what the stored offsets show as learned",
            offsets, error,
        )

    def _drop(self, partitions: list[str], cause: str) -> None:
        self._assigned.difference_update(partitions)
        self._metrics.assigned_partitions.set(len(self._assigned))
        buffered, unread = self._state.drop(partitions)
        for partition in partitions:
            self._metrics.partition_lag.remove(partition)
        self._metrics.records_buffered.set(self._state.held())
        if buffered or unread:
            log.info(
                "Dropped %d buffered and %d unread records of %s partitions %s; "
                "they are read again from the first unfinished offset",
                buffered, unread, cause, ",".join(sorted(partitions)),
            )
