"""Per-partition bookkeeping of which consumed offsets may be committed.

A record is pending from the moment it is buffered for a model until the
version that learned it is published (or the publish gate rejects its batch).
Records that were rejected or skipped are never pending. The committable
offset of a partition is its smallest pending offset, or the last consumed
offset + 1 when nothing is pending. A commit therefore never passes a record
that a model has not yet learned, even when many models share one partition.

Partitions are named ``"topic/partition"``, as in the versions' stored offsets.
"""

from __future__ import annotations

from typing import Iterable


class OffsetTracker:
    """Pending and consumed offsets of every partition this worker reads."""

    def __init__(self) -> None:
        self._pending: dict[str, set[int]] = {}
        self._next: dict[str, int] = {}
        self._committed: dict[str, int] = {}
        self._first: dict[str, int] = {}

    def consumed(self, partition: str, offset: int) -> None:
        """Record that ``offset`` was read; it is done unless ``add_pending`` follows."""
        if partition not in self._next:
            self._first[partition] = offset
        self._next[partition] = offset + 1

    def add_pending(self, partition: str, offset: int) -> None:
        self._pending.setdefault(partition, set()).add(offset)

    def done(self, positions: Iterable[tuple[str, int]]) -> None:
        """Mark buffered records as finished (published, or rejected by the publish gate)."""
        for partition, offset in positions:
            pending = self._pending.get(partition)
            if pending is None:
                continue
            pending.discard(offset)
            if not pending:
                del self._pending[partition]

    def pending_count(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def committable(self, partitions: Iterable[str] | None = None) -> dict[str, int]:
        """Return the offset each partition may commit (all known partitions by default)."""
        names = self._next.keys() if partitions is None else partitions
        out = {}
        for partition in names:
            if partition not in self._next:
                continue
            pending = self._pending.get(partition)
            out[partition] = min(pending) if pending else self._next[partition]
        return out

    def uncommitted(self, partitions: Iterable[str] | None = None) -> dict[str, int]:
        """Return the committable offsets that moved past the last commit.

        Before this worker's first commit of a partition, the first offset
        read counts as committed: the consumer started there, so committing
        it again would only repeat the group's offset.
        """
        return {
            partition: offset
            for partition, offset in self.committable(partitions).items()
            if offset > self.lag_base(partition)
        }

    def mark_committed(self, offsets: dict[str, int]) -> None:
        for partition, offset in offsets.items():
            if offset > self._committed.get(partition, -1):
                self._committed[partition] = offset

    def lag_base(self, partition: str) -> int | None:
        """Return the offset lag is counted from: the last commit, else the first offset read.

        A consumer starts reading at the group's committed offset, so before
        this worker's first commit the first offset read stands for it.
        """
        committed = self._committed.get(partition)
        return committed if committed is not None else self._first.get(partition)

    def forget(self, partitions: Iterable[str]) -> None:
        """Drop all state of partitions this worker no longer owns."""
        for partition in partitions:
            self._pending.pop(partition, None)
            self._next.pop(partition, None)
            self._committed.pop(partition, None)
            self._first.pop(partition, None)
