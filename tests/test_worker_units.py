"""Parts of the worker that need no server: back-off, the refit thread, partition epochs, log redaction."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from worker.backoff import Backoff
from worker.batcher import Batcher, BufferedRecord
from worker.offsets import OffsetTracker
from worker.redaction import redact_in_logs
from worker.refits import RefitJob, RefitThread, make_batch
from worker.sources import SourceRecord
from worker.state import WorkState

P0 = "flights/0"
P1 = "flights/1"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def record(partition, offset, label=0):
    return BufferedRecord(np.full(2, offset, dtype=np.float32), label, (partition, offset))


def test_backoff_doubles_up_to_cap():
    clock = Clock()
    backoff = Backoff(0.1, 1.0, clock)
    assert [backoff.failed() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.waiting()
    clock.now += 1.0
    assert not backoff.waiting()
    assert backoff.succeeded() == 6
    assert not backoff.active
    assert backoff.failed() == pytest.approx(0.1)


def test_backoff_retry_now_keeps_count():
    clock = Clock()
    backoff = Backoff(1.0, 30.0, clock)
    backoff.failed()
    backoff.failed()
    backoff.retry_now()
    assert not backoff.waiting()
    assert backoff.failed() == pytest.approx(4.0)


def test_put_back_with_delay_is_due_later():
    clock = Clock()
    batcher = Batcher(max_records=10, max_wait_ms=60_000, clock=clock)
    batcher.put_back("a", [record(P0, 0)], delay_s=2.0)
    assert batcher.due() == []
    assert batcher.seconds_until_due() == pytest.approx(2.0)
    clock.now += 2.0
    assert batcher.due() == ["a"]


def test_oldest_buffer_first():
    clock = Clock()
    batcher = Batcher(max_records=10, max_wait_ms=60_000, clock=clock)
    assert batcher.oldest() is None
    batcher.add("b", record(P0, 0))
    clock.now += 1
    batcher.add("a", record(P0, 1))
    assert batcher.oldest() == "b"


def test_first_read_offset_counts_as_committed():
    tracker = OffsetTracker()
    tracker.consumed(P0, 40)
    tracker.add_pending(P0, 40)
    # The consumer started at 40, so committing 40 again would change nothing.
    assert tracker.uncommitted() == {}
    assert tracker.lag_base(P0) == 40
    tracker.done([(P0, 40)])
    assert tracker.uncommitted() == {P0: 41}
    tracker.mark_committed({P0: 41})
    assert tracker.lag_base(P0) == 41


def test_make_batch_keeps_order_and_labels():
    items = [record(P0, 3, "late"), record(P1, 7, "on_time")]
    batch = make_batch(items, {"wrong_type": 2})
    assert batch.X.dtype == np.float32
    assert batch.X[:, 0].tolist() == [3.0, 7.0]
    assert batch.y.dtype == object
    assert batch.positions == [(P0, 3), (P1, 7)]
    assert batch.rejected == {"wrong_type": 2}


def test_refit_thread_returns_result_and_error():
    release = threading.Event()

    def refit(model, batch):
        release.wait(10)
        if model == "broken":
            raise ValueError("no such estimator")
        return len(batch.positions)

    thread = RefitThread(refit)
    items = [record(P0, 0)]
    thread.submit(RefitJob("ok", items, make_batch(items, {}), {P0: 0}))
    assert thread.busy
    with pytest.raises(RuntimeError, match="still running"):
        thread.submit(RefitJob("other", items, make_batch(items, {}), {P0: 0}))
    assert thread.finished() is None
    release.set()
    job = thread.finished(timeout_s=10)
    assert job.result == 1
    assert job.error is None
    assert not thread.busy

    thread.submit(RefitJob("broken", items, make_batch(items, {}), {P0: 0}))
    job = thread.finished(timeout_s=10)
    assert isinstance(job.error, ValueError)
    thread.close()


def test_revoked_partition_leaves_job_records():
    state = WorkState(10, 1000, Clock())
    items = [record(P0, 0), record(P1, 0)]
    epochs = state.epochs_of(items)
    state.backlog.append(SourceRecord(P1, 1, None, b"{}"))
    buffered, unread = state.drop([P1])
    assert (buffered, unread) == (0, 1)
    # The job taken before the revocation keeps only its records of P0.
    assert state.owned(items, epochs) == [items[0]]


def test_secrets_masked_in_log_records(caplog):
    redact_in_logs(["t0p-s3cret"])
    caplog.set_level(logging.DEBUG, logger="test.redaction")
    logger = logging.getLogger("test.redaction")
    logger.debug("request %s", b"user\x00user\x00t0p-s3cret")
    logger.info("password is t0p-s3cret")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["request b'user\\x00user\\x00***'", "password is ***"]
