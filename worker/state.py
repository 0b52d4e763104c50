"""The state a worker keeps between reading a record and committing its offset."""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable

from worker.batcher import Batcher, BufferedRecord
from worker.offsets import OffsetTracker
from worker.sources import SourceRecord


class WorkState:
    """Read records not yet handled, per-model buffers, pending offsets and partition epochs.

    A partition's epoch grows each time it is revoked or lost. A refit job
    remembers the epochs of its partitions, so the loop can tell which of
    its records still belong to this worker when the job comes back.
    """

    def __init__(self, batch_max_records: int, batch_max_wait_ms: int, clock: Callable[[], float]):
        self.backlog: deque[SourceRecord] = deque()
        self.batcher = Batcher(batch_max_records, batch_max_wait_ms, clock)
        self.tracker = OffsetTracker()
        self.in_flight = 0
        # When each model's oldest unpublished batch was first taken for a refit.
        self.first_taken: dict[str, float] = {}
        self._epochs: dict[str, int] = {}
        # Rejections of records whose model exists, stored with its next version.
        self._rejected_by_model: dict[str, dict[str, int]] = {}

    def held(self) -> int:
        """Return the number of records buffered or being refit."""
        return len(self.batcher) + self.in_flight

    def count_rejection(self, model: str, reason: str, count: int = 1) -> None:
        counts = self._rejected_by_model.setdefault(model, {})
        counts[reason] = counts.get(reason, 0) + count

    def take_rejections(self, model: str) -> dict[str, int]:
        return self._rejected_by_model.pop(model, {})

    def give_back_rejections(self, model: str, counts: dict[str, int]) -> None:
        for reason, count in counts.items():
            self.count_rejection(model, reason, count)

    def epochs_of(self, items: Iterable[BufferedRecord]) -> dict[str, int]:
        return {item.position[0]: self._epochs.get(item.position[0], 0) for item in items}

    def owned(self, items: list[BufferedRecord], epochs: dict[str, int]) -> list[BufferedRecord]:
        """Return the items whose partition has not been revoked or lost since ``epochs`` was taken."""
        return [item for item in items if self._epochs.get(item.position[0], 0) == epochs[item.position[0]]]

    def first_unfinished(self, partitions: list[str]) -> dict[str, int]:
        """Return, per partition, the first offset not yet published, rejected or skipped.

        A partition with only unread (backlog) records starts at the first of them.
        """
        first = self.tracker.committable(partitions)
        for record in self.backlog:
            if record.partition in partitions and record.partition not in first:
                first[record.partition] = record.offset
        return first

    def drop(self, partitions: Iterable[str]) -> tuple[int, int]:
        """Forget everything of ``partitions``; return the buffered and unread records dropped."""
        names = set(partitions)
        for name in names:
            self._epochs[name] = self._epochs.get(name, 0) + 1
        buffered = self.batcher.drop_partitions(names)
        before = len(self.backlog)
        self.backlog = deque(r for r in self.backlog if r.partition not in names)
        self.tracker.forget(names)
        return buffered, before - len(self.backlog)
