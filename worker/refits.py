"""Refits on a background thread, so that the poll loop never stops calling poll().

kafka-python leaves the consumer group when poll() is not called for
``max_poll_interval_ms``. A refit (load, learn, ONNX export, checks, publish)
can take longer than that, so it runs here while the loop keeps polling, with
fetching paused once the buffers are full. One refit runs at a time: refits
of one model must be applied in offset order, and learning is mostly
single-threaded Python, which a second thread would not speed up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from trainer.refit import Batch
from worker.batcher import BufferedRecord

log = logging.getLogger(__name__)


@dataclass
class RefitJob:
    """One model's batch, handed to the refit thread and back.

    ``epochs`` holds the assignment epoch of each partition in the batch
    when it was taken. A partition revoked or lost meanwhile has a newer
    epoch, which tells the loop that this job's records of it no longer
    belong to this worker.
    """

    model: str
    items: list[BufferedRecord]
    batch: Batch
    epochs: dict[str, int]
    started: float = 0.0
    finished: float = 0.0
    result: Any = None
    error: BaseException | None = None

    @property
    def duration_s(self) -> float:
        return self.finished - self.started


def make_batch(items: list[BufferedRecord], rejected: dict[str, int]) -> Batch:
    """Stack buffered records into a trainer Batch, in buffer order."""
    return Batch(
        X=np.vstack([item.row for item in items]).astype(np.float32, copy=False),
        y=label_array([item.label for item in items]),
        positions=[item.position for item in items],
        rejected=rejected,
    )


def label_array(labels: list[Any]) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype.kind in "US":
        # String class labels stay Python objects, as scikit-learn's classes_ are.
        return np.asarray(labels, dtype=object)
    return y


class RefitThread:
    """Runs ``refit(model, batch)`` for one job at a time on a daemon thread.

    The thread is a daemon so that a refit stuck on an unreachable store
    cannot hold the process after the shutdown bound. Killing it mid-publish
    is safe: the store makes a version visible only by its final
    compare-and-swap, and offsets are committed only after that.
    """

    def __init__(self, refit: Callable[[str, Batch], Any], clock: Callable[[], float] = time.monotonic):
        self._refit = refit
        self._clock = clock
        self._jobs: queue.Queue[RefitJob | None] = queue.Queue()
        self._done: queue.Queue[RefitJob] = queue.Queue()
        self.current: RefitJob | None = None
        self._thread = threading.Thread(target=self._run, name="streamfit-refit", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """True from ``submit`` until the loop has taken the job back with ``finished``."""
        return self.current is not None

    def submit(self, job: RefitJob) -> None:
        if self.current is not None:
            raise RuntimeError(f"a refit of model {self.current.model!r} is still running")
        self.current = job
        job.started = self._clock()
        self._jobs.put(job)

    def finished(self, timeout_s: float = 0.0) -> RefitJob | None:
        """Return the current job once its refit has returned or raised, else None after ``timeout_s``."""
        if self.current is None:
            return None
        try:
            job = self._done.get(timeout=timeout_s) if timeout_s > 0 else self._done.get_nowait()
        except queue.Empty:
            return None
        self.current = None
        return job

    def close(self) -> None:
        """Stop the thread after the running refit, without waiting for it."""
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.result = self._refit(job.model, job.batch)
            except BaseException as err:  # handed back whole; the loop decides what it means
                job.error = err
            job.finished = self._clock()
            self._done.put(job)
