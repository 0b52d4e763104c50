"""Offset bookkeeping and batching: what may be committed, and when a batch is due."""

import numpy as np
import pytest

from worker.batcher import Batcher, BufferedRecord
from worker.offsets import OffsetTracker

P0 = "flights/0"
P1 = "flights/1"


def record(partition, offset):
    return BufferedRecord(np.zeros(1, dtype=np.float32), 0, (partition, offset))


def test_committable_is_last_consumed_plus_one():
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.consumed(P0, offset)
    assert tracker.committable() == {P0: 5}


def test_committable_stops_at_smallest_pending():
    tracker = OffsetTracker()
    for offset in range(10):
        tracker.consumed(P0, offset)
        if offset in (3, 6):
            tracker.add_pending(P0, offset)
    assert tracker.committable() == {P0: 3}

    tracker.done([(P0, 6)])
    assert tracker.committable() == {P0: 3}

    tracker.done([(P0, 3)])
    assert tracker.committable() == {P0: 10}


def test_models_sharing_partition_hold_commit():
    # Model a's records 0 and 2 are published first. Model b's record 1 keeps
    # the partition's commit at 1.
    tracker = OffsetTracker()
    for offset in range(3):
        tracker.consumed(P0, offset)
        tracker.add_pending(P0, offset)
    tracker.done([(P0, 0), (P0, 2)])
    assert tracker.committable() == {P0: 1}
    tracker.done([(P0, 1)])
    assert tracker.committable() == {P0: 3}


def test_partitions_tracked_separately():
    tracker = OffsetTracker()
    tracker.consumed(P0, 7)
    tracker.add_pending(P0, 7)
    tracker.consumed(P1, 40)
    assert tracker.committable() == {P0: 7, P1: 41}
    assert tracker.committable([P1]) == {P1: 41}
    assert tracker.pending_count() == 1


def test_uncommitted_only_reports_progress():
    tracker = OffsetTracker()
    tracker.consumed(P0, 4)
    tracker.consumed(P1, 9)
    assert tracker.uncommitted() == {P0: 5, P1: 10}

    tracker.mark_committed({P0: 5, P1: 10})
    assert tracker.uncommitted() == {}

    tracker.consumed(P1, 10)
    assert tracker.uncommitted() == {P1: 11}


def test_forget_drops_partition_state():
    tracker = OffsetTracker()
    tracker.consumed(P0, 2)
    tracker.add_pending(P0, 2)
    tracker.consumed(P1, 3)
    tracker.mark_committed({P1: 4})
    tracker.forget([P0, P1])
    assert tracker.committable() == {}
    assert tracker.pending_count() == 0

    # After a partition comes back it is read again from its committed offset.
    tracker.consumed(P1, 3)
    assert tracker.uncommitted() == {P1: 4}


def test_done_ignores_unknown_positions():
    tracker = OffsetTracker()
    tracker.consumed(P0, 0)
    tracker.done([(P0, 0), (P1, 5)])
    assert tracker.committable() == {P0: 1}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_batch_due_when_full():
    batcher = Batcher(max_records=3, max_wait_ms=60_000, clock=Clock())
    assert batcher.add("a", record(P0, 0)) is False
    assert batcher.add("a", record(P0, 1)) is False
    assert batcher.due() == []
    assert batcher.add("a", record(P0, 2)) is True
    assert batcher.due() == ["a"]
    assert batcher.seconds_until_due() == 0.0


def test_batch_due_by_age_of_oldest():
    clock = Clock()
    batcher = Batcher(max_records=100, max_wait_ms=1000, clock=clock)
    batcher.add("a", record(P0, 0))
    clock.now += 0.6
    batcher.add("b", record(P0, 1))
    assert batcher.seconds_until_due() == pytest.approx(0.4)
    clock.now += 0.5
    batcher.add("a", record(P0, 2))
    assert batcher.due() == ["a"]
    clock.now += 0.5
    assert batcher.due() == ["a", "b"]


def test_take_returns_at_most_max_records():
    batcher = Batcher(max_records=2, max_wait_ms=1000, clock=Clock())
    for offset in range(5):
        batcher.add("a", record(P0, offset))
    first = batcher.take("a")
    assert [r.position[1] for r in first] == [0, 1]
    assert len(batcher) == 3
    assert batcher.due() == ["a"]
    batcher.take("a")
    last = batcher.take("a")
    assert [r.position[1] for r in last] == [4]
    assert batcher.models() == []
    assert batcher.seconds_until_due() is None


def test_put_back_keeps_order_and_is_due():
    clock = Clock()
    batcher = Batcher(max_records=10, max_wait_ms=60_000, clock=clock)
    for offset in range(3):
        batcher.add("a", record(P0, offset))
    taken = batcher.take("a")
    batcher.add("a", record(P0, 3))
    batcher.put_back("a", taken)
    assert batcher.due() == ["a"]
    assert [r.position[1] for r in batcher.take("a")] == [0, 1, 2, 3]


def test_drop_partitions_removes_their_records():
    batcher = Batcher(max_records=10, max_wait_ms=1000, clock=Clock())
    batcher.add("a", record(P0, 0))
    batcher.add("a", record(P1, 0))
    batcher.add("b", record(P1, 1))
    assert batcher.drop_partitions([P1]) == 2
    assert batcher.models() == ["a"]
    assert [r.position for r in batcher.take("a")] == [(P0, 0)]
