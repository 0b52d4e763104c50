"""The worker loop: poll, decode, skip what is learned, buffer, refit, commit.

Delivery: a record's offset is committed only once the version that learned
it is published (or once it is rejected or skipped). Every version stores the
next offset it learned per partition, and the worker skips records below the
stored offset of their model. A record that is read again after a crash, a
failed commit or a rebalance is therefore not learned twice.

Threads: the loop's thread polls, decodes and makes every change to the
worker's state. The refit thread (``worker.refits``) only runs
``Trainer.refit``, so a long refit never keeps the loop from calling poll()
and the worker keeps its group membership. Rebalance callbacks
(``worker.rebalance``) run on kafka-python's IO thread while the loop's
thread waits inside poll() or close().
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from modelstore import open_store
from modelstore.errors import RecordRejected, StreamfitError
from trainer.refit import Trainer
from worker.backoff import StoreHealth
from worker.batcher import BufferedRecord
from worker.catalog import ModelCatalog
from worker.commits import Committer
from worker.kafka_config import secret_values
from worker.metrics import WorkerMetrics, serve_metrics
from worker.outcomes import RefitOutcomes
from worker.rebalance import PartitionMoves
from worker.redaction import redact_in_logs
from worker.records import decode_record, encode_record
from worker.refits import RefitJob, RefitThread, make_batch
from worker.rejections import Rejections
from worker.settings import WorkerSettings
from worker.sources import SourceRecord, open_source
from worker.startup import install_signal_handlers, learner_cache_size, load_model_spec, open_dead_letters
from worker.state import WorkState

log = logging.getLogger(__name__)

FIRST_RETRY_BACKOFF_S = 0.1
# While a refit runs, poll() returns at least this often so that its result
# is applied (and the next batch started) soon after it is ready.
REFIT_CHECK_S = 0.02
# While records arrive, poll() waits at most this long. kafka-python 3.0.12
# sleeps up to min(timeout, retry_backoff_ms) whenever its fetch buffer runs
# dry, and with a 500 ms timeout that halves the rate a consumer reads at
# (measured with benchmarks/worker_throughput.py).
FLOWING_POLL_S = 0.05


class Worker:
    """One consumer's loop; ``run(source)`` returns the process exit code.

    ``moves`` is the rebalance handler to give the source.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        trainer: Any,
        catalog: ModelCatalog,
        metrics: WorkerMetrics,
        stop: threading.Event,
        dead_letters: Any = None,
        clock=time.monotonic,
    ):
        self.settings = settings
        self._trainer = trainer
        self._catalog = catalog
        self._metrics = metrics
        self._stop = stop
        self._dead_letters = dead_letters
        self._clock = clock
        self._lock = threading.RLock()
        self._state = WorkState(settings.batch_size(None), settings.batch_max_wait_ms, clock)
        self.moves = PartitionMoves(self._state, metrics, self._lock, dead_letters)
        self._rejections = Rejections(metrics, dead_letters)
        self._store = StoreHealth(metrics, FIRST_RETRY_BACKOFF_S, settings.max_retry_backoff_ms / 1000, clock)
        # The record whose model lookup failed. Handling it later proves the store is back.
        self._failed_lookup: SourceRecord | None = None
        self._stopping = False
        self._flowing = False
        self._source: Any = None
        self._refits: RefitThread | None = None
        self._committer: Committer | None = None
        self._outcomes: RefitOutcomes | None = None

    # -- the loop --------------------------------------------------------

    def run(self, source: Any) -> int:
        self._source = source
        self._committer = Committer(
            source, self._state, self._lock, self._metrics, self._dead_letters, self._clock
        )
        self._refits = RefitThread(self._trainer.refit, self._clock)
        self._outcomes = RefitOutcomes(
            self._state, self._catalog, self._metrics, self._rejections, self._store,
            self._committer, self.settings.max_conflict_attempts, self._clock,
        )
        stops_at_end = self.settings.stops_at_end()
        if self.settings.batch_max_records is not None:
            sizes = f"{self.settings.batch_max_records} records"
        else:
            sizes = f"each model spec's batch.max_records (else {self.settings.batch_size(None)}) records"
        log.info(
            "Worker started: source %s, store %s, batches of up to %s or %d ms",
            self.settings.source, self.settings.store, sizes, self.settings.batch_max_wait_ms,
        )
        while not self._stop.is_set():
            self._step()
            if stops_at_end and source.at_end and self._idle():
                log.info("Reached the end of %s", self.settings.source)
                break
        return self._shutdown()

    def _step(self) -> None:
        self._collect()
        self._update_fetching()
        records = self._source.poll(self._poll_timeout_ms())
        self._flowing = bool(records)
        if records:
            self._committer.broker_answered()
        with self._lock:
            self._state.backlog.extend(records)
            if self.moves.refresh_needed:
                self.moves.refresh_needed = False
                self._catalog.invalidate()
            self._collect()
            if not self._store.backoff.waiting() and self._process_backlog():
                self._dispatch()
        self._committer.maybe_commit()

    def _idle(self) -> bool:
        return not self._state.backlog and not self._state.held() and not self._refits.busy

    def _full(self) -> bool:
        return len(self._state.backlog) + self._state.held() >= self.settings.max_buffered_records

    def _update_fetching(self) -> None:
        # Fetching pauses while the store is down or the buffers are full.
        # poll() goes on, which keeps the group membership.
        paused = self._stopping or self._store.down or self._full()
        if paused:
            self._source.pause()
        else:
            self._source.resume()
        self._metrics.fetch_paused.set(1 if paused else 0)

    def _poll_timeout_ms(self) -> int:
        waits = [self.settings.poll_timeout_ms / 1000]
        if self._store.backoff.waiting():
            waits.append(self._store.backoff.seconds_left())
        elif self._state.backlog:
            return 0
        if self._flowing:
            waits.append(FLOWING_POLL_S)
        if self._refits.busy:
            waits.append(REFIT_CHECK_S)
        else:
            due = self._state.batcher.seconds_until_due()
            if due is not None:
                waits.append(due)
        return max(0, int(min(waits) * 1000))

    def _process_backlog(self) -> bool:
        """Handle backlog records in order; return False when the store needs a back-off."""
        backlog = self._state.backlog
        handled = 0
        try:
            while backlog:
                record = backlog[0]
                try:
                    self._handle(record)
                except StreamfitError as err:
                    if not err.retriable:
                        raise
                    self._failed_lookup = record
                    self._store.failed(err, f"looking up the model of {record.partition} offset {record.offset}")
                    return False
                backlog.popleft()
                handled += 1
                if record is self._failed_lookup:
                    self._failed_lookup = None
                    self._store.ok()
            return True
        finally:
            # Counted once per poll, not per record: the loop's thread reads
            # every record, so per-record lock round trips add up.
            self._metrics.records_consumed.inc(handled)
            self._metrics.records_buffered.set(self._state.held())

    def _handle(self, record: SourceRecord) -> None:
        """Reject, skip or buffer one record."""
        position = (record.partition, record.offset)
        tracker = self._state.tracker
        model = None
        try:
            if record.rejection is not None:
                raise record.rejection
            decoded = decode_record(
                record.value,
                record.key,
                forced_model=self.settings.model,
                max_record_bytes=self.settings.max_record_bytes,
            )
            entry = self._catalog.lookup(decoded.model)
            model = decoded.model
            if record.offset < entry.offsets.get(record.partition, 0):
                self._metrics.records_skipped.inc()
                tracker.consumed(*position)
                return
            encoded = encode_record(decoded, entry.spec)
        except RecordRejected as rejection:
            # The record is done once it is counted: consumed() comes after
            # the store lookups, so a retried lookup never lets a commit pass it.
            tracker.consumed(*position)
            self._rejections.reject(
                record.partition, record.offset, record.key, record.value, rejection, model
            )
            if model is not None:
                self._state.count_rejection(model, rejection.reason)
            return

        if encoded.extra_keys:
            self._metrics.extra_features.inc(len(encoded.extra_keys))
        tracker.consumed(*position)
        tracker.add_pending(*position)
        source = record if self._dead_letters is not None else None
        size = self.settings.batch_size(getattr(entry.spec, "batch_max_records", None))
        self._state.batcher.add(model, BufferedRecord(encoded.row, encoded.label, position, source), size)

    # -- refits ----------------------------------------------------------

    def _dispatch(self) -> None:
        """Start a refit of the next model whose batch is due, unless one is running."""
        if self._refits.busy:
            return
        model = self._next_model()
        if model is None:
            return
        items = self._state.batcher.take(model)
        batch = make_batch(items, self._state.take_rejections(model))
        job = RefitJob(model, items, batch, self._state.epochs_of(items))
        self._state.in_flight = len(items)
        self._state.first_taken.setdefault(model, self._clock())
        self._metrics.batch_size.observe(len(items))
        self._refits.submit(job)

    def _next_model(self) -> str | None:
        batcher = self._state.batcher
        due = batcher.due()
        if due:
            return due[0]
        # Waiting for a batch to fill makes no sense when no more records
        # will come (end of file, shutdown) or none can be fetched (full).
        if self._stopping or self._source.at_end or self._full():
            return batcher.oldest()
        return None

    def _collect(self, timeout_s: float = 0.0) -> bool:
        """Apply the result of a finished refit; return False when none has finished."""
        job = self._refits.finished(timeout_s)
        if job is None:
            return False
        with self._lock:
            self._state.in_flight = 0
            # Records of partitions revoked or lost during the refit belong
            # to their next owner now: their offsets are neither committed
            # nor retried here. A version that learned them is still valid,
            # and its stored offsets make the next owner skip them.
            owned = self._state.owned(job.items, job.epochs)
            self._metrics.refit_duration.observe(job.duration_s)
            self._outcomes.apply(job, owned)
            self._metrics.records_buffered.set(self._state.held())
        return True

    # -- shutdown --------------------------------------------------------

    def _shutdown(self) -> int:
        """Publish what is buffered within shutdown_timeout_ms, commit, leave the group.

        Records left unpublished at the bound are not committed, so the next
        owner reads them again. Returns 0: an abandoned batch loses nothing.
        """
        self._stopping = True
        deadline = self._clock() + self.settings.shutdown_timeout_ms / 1000
        with self._lock:
            # Unread records were never marked consumed, so no commit passes them.
            self._state.backlog.clear()
        log.info(
            "Worker stopping: publishing %d buffered records within %.0f s",
            self._state.held(), self.settings.shutdown_timeout_ms / 1000,
        )
        while self._state.held() and self._clock() < deadline:
            self._update_fetching()
            with self._lock:
                self._collect()
                if not self._store.backoff.waiting():
                    self._dispatch()
            # Polling with fetching paused keeps the group membership while
            # the last refits run. Anything it still returns is not tracked.
            wait = min(deadline - self._clock(), max(REFIT_CHECK_S, self._store.backoff.seconds_left()))
            self._source.poll(max(0, int(wait * 1000)))

        left = self._state.held()
        if self._refits.busy:
            log.warning(
                "Refit of model %s still running at the shutdown bound; its version may "
                "still be published, and its offsets are not committed",
                self._refits.current.model,
            )
        self._committer.commit()
        self._refits.close()
        self._source.close()
        if left:
            log.warning(
                "Worker stopped with %d records not published (store unavailable or "
                "shutdown_timeout_ms reached); their offsets are not committed, so they are "
                "read again",
                left,
            )
        else:
            log.info("Worker stopped")
        return 0


def run(
    settings: WorkerSettings,
    *,
    stop: threading.Event | None = None,
    registry: CollectorRegistry | None = None,
) -> int:
    """Run a worker until ``stop`` is set, SIGTERM/SIGINT arrives or a file source ends.

    Returns the exit code: 0 after a clean stop, 1 when Kafka is unreachable
    at start or the loop failed. Raises ConfigError for settings that can
    only be checked at start-up (the model spec file, a CSV header).
    """
    stop = stop or threading.Event()
    registry = registry if registry is not None else CollectorRegistry()
    metrics = WorkerMetrics(registry)
    create_spec = load_model_spec(settings.model_spec) if settings.model_spec else None
    if settings.metrics_port:
        serve_metrics(registry, settings.metrics_port, settings.metrics_host)
        log.info("Serving metrics on %s:%d", settings.metrics_host, settings.metrics_port)

    redact_in_logs(secret_values(settings.consumer_options()))
    store = open_store(settings.store)
    dead_letters = None
    restore = install_signal_handlers(stop)
    try:
        trainer = Trainer(
            store,
            max_conflict_attempts=settings.max_conflict_attempts,
            cache_size=learner_cache_size(settings, create_spec),
        )
        catalog = ModelCatalog(store, trainer, create_spec=create_spec)
        dead_letters = open_dead_letters(settings, metrics)
        worker = Worker(
            settings, trainer=trainer, catalog=catalog, metrics=metrics, stop=stop,
            dead_letters=dead_letters,
        )
        try:
            source = open_source(settings, worker.moves)
        except KafkaError as err:
            log.error("Cannot connect to Kafka for source %s: %r", settings.source, err)
            return 1
        try:
            return worker.run(source)
        except Exception:
            log.exception(
                "Worker loop failed; buffered records are not published and their offsets "
                "are not committed, so they are read again after a restart"
            )
            _close_quietly(source)
            return 1
    finally:
        if dead_letters is not None:
            dead_letters.close()
        store.close()
        restore()


def _close_quietly(source: Any) -> None:
    try:
        source.close()
    except Exception as err:
        log.warning("Closing the source failed: %r", err)
