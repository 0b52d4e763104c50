"""Per-model buffers of encoded records, flushed by size or by age."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np


class BufferedRecord(NamedTuple):
    """One encoded record waiting for its model's next refit.

    ``source`` is the raw record, kept only when rejected batches go to a
    dead-letter topic. A tuple, because one is created per record and a
    frozen dataclass takes several times longer to build.
    """

    row: np.ndarray
    label: Any
    position: tuple[str, int]
    source: Any = None


class _Buffer:
    __slots__ = ("records", "oldest", "max_records")

    def __init__(self, oldest: float, max_records: int):
        self.records: list[BufferedRecord] = []
        self.oldest = oldest
        self.max_records = max_records


class Batcher:
    """Buffers records per model until the model's batch size or ``max_wait_ms`` is reached.

    ``max_records`` is the batch size of models added without one of their own.

    The age of a buffer is the time since its oldest record arrived, so a
    slow model is refit at most ``max_wait_ms`` after its first record.
    """

    def __init__(
        self,
        max_records: int,
        max_wait_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_records = max_records
        self.max_wait_s = max_wait_ms / 1000
        self._clock = clock
        self._buffers: dict[str, _Buffer] = {}
        # Batch sizes of models added with their own, kept while their buffer is empty.
        self._sizes: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(len(b.records) for b in self._buffers.values())

    def models(self) -> list[str]:
        return list(self._buffers)

    def add(self, model: str, record: BufferedRecord, max_records: int | None = None) -> bool:
        """Buffer ``record`` and return True when the model's buffer is full.

        ``max_records`` sets the model's batch size, else ``self.max_records`` applies.
        """
        buffer = self._buffers.get(model)
        if buffer is None:
            if max_records is not None:
                self._sizes[model] = max_records
            buffer = self._buffers[model] = _Buffer(self._clock(), self.batch_size(model))
        buffer.records.append(record)
        return len(buffer.records) >= buffer.max_records

    def batch_size(self, model: str) -> int:
        """Return the number of records per refit of ``model``."""
        return self._sizes.get(model, self.max_records)

    def due(self) -> list[str]:
        """Return the models whose buffer is full or older than ``max_wait_ms``, oldest first."""
        now = self._clock()
        ready = [
            (buffer.oldest, model)
            for model, buffer in self._buffers.items()
            if len(buffer.records) >= buffer.max_records or now - buffer.oldest >= self.max_wait_s
        ]
        return [model for _, model in sorted(ready)]

    def seconds_until_due(self) -> float | None:
        """Return the time until the next buffer is due, 0 if one is due now, None if all are empty."""
        if not self._buffers:
            return None
        now = self._clock()
        waits = []
        for buffer in self._buffers.values():
            if len(buffer.records) >= buffer.max_records:
                return 0.0
            waits.append(buffer.oldest + self.max_wait_s - now)
        return max(0.0, min(waits))

    def take(self, model: str) -> list[BufferedRecord]:
        """Remove and return the model's buffered records, at most one batch of them."""
        buffer = self._buffers.get(model)
        if buffer is None:
            return []
        taken = buffer.records[: buffer.max_records]
        rest = buffer.records[buffer.max_records:]
        if rest:
            buffer.records = rest
            # The rest keeps its age: it was waiting as long as the batch taken.
        else:
            del self._buffers[model]
        return taken

    def oldest(self) -> str | None:
        """Return the model whose buffer waited longest, or None when all are empty."""
        if not self._buffers:
            return None
        return min(self._buffers.items(), key=lambda item: item[1].oldest)[0]

    def put_back(self, model: str, records: list[BufferedRecord], delay_s: float = 0.0) -> None:
        """Return records taken by ``take`` to the front of the model's buffer.

        The buffer is due after ``delay_s`` (at once by default) instead of
        waiting for ``max_wait_ms`` again: the caller has already decided
        when to retry.
        """
        if not records:
            return
        buffer = self._buffers.get(model)
        if buffer is None:
            buffer = self._buffers[model] = _Buffer(0.0, self.batch_size(model))
        buffer.oldest = float("-inf") if delay_s <= 0 else self._clock() + delay_s - self.max_wait_s
        buffer.records[:0] = records

    def drop_partitions(self, partitions: Iterable[str]) -> int:
        """Remove every buffered record of ``partitions`` and return how many were removed."""
        names = set(partitions)
        dropped = 0
        for model in list(self._buffers):
            buffer = self._buffers[model]
            kept = [r for r in buffer.records if r.position[0] not in names]
            dropped += len(buffer.records) - len(kept)
            if kept:
                buffer.records = kept
            else:
                del self._buffers[model]
        return dropped
