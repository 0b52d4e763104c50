"""The worker loop: poll, decode, skip what is learned, buffer, refit, commit.

Delivery: a record's offset is committed only once the version that learned
it is published (or once it is rejected or skipped). Every version stores the
next offset it learned per partition, and the worker skips records below the
stored offset of their model. A record that is read again after a crash, a
failed commit or a rebalance is therefore not learned twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from modelstore import open_store
from modelstore.errors import ModelNotFound, PublishRejected, RecordRejected, StreamfitError
from trainer.refit import Batch, Trainer
from worker.batcher import Batcher, BufferedRecord
from worker.catalog import ModelCatalog
from worker.metrics import WorkerMetrics, serve_metrics
from worker.offsets import OffsetTracker
from worker.records import decode_record, encode_record, short_detail
from worker.settings import WorkerSettings
from worker.sources import CommitFailed, SourceRecord, open_source
from worker.startup import install_signal_handlers, load_model_spec, open_dead_letters

log = logging.getLogger(__name__)

# Commits of offsets that only moved past rejected or skipped records wait
# this long, so a stream of bad records does not commit after every poll.
IDLE_COMMIT_INTERVAL_S = 5.0
SHUTDOWN_PUBLISH_ATTEMPTS = 3
FIRST_RETRY_BACKOFF_S = 0.1


class Worker:
    """One consumer's loop; ``run(source)`` returns the process exit code.

    The rebalance callbacks (``partitions_*``) run on the Kafka client's IO
    thread while the loop's thread waits inside ``source.poll`` or
    ``source.close``. The lock keeps the state consistent should a client
    version call them at another time.
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
        self._batcher = Batcher(settings.batch_max_records, settings.batch_max_wait_ms, clock)
        self._tracker = OffsetTracker()
        self._backlog: deque[SourceRecord] = deque()
        # Rejections of records whose model is known, stored with its next version.
        self._rejected_by_model: dict[str, dict[str, int]] = {}
        self._rejections = _RejectionLog()
        self._refresh_needed = False
        # Where to resume each revoked partition if the next assignment keeps it here.
        self._resume_offsets: dict[str, int] = {}
        self._published_since_commit = False
        self._last_commit = clock()
        self._retry_attempts = 0
        self._retry_at = 0.0
        self._source: Any = None

    # -- the loop --------------------------------------------------------

    def run(self, source: Any) -> int:
        self._source = source
        stops_at_end = self.settings.stops_at_end()
        log.info(
            "Worker started: source %s, store %s, batches of up to %d records or %d ms",
            self.settings.source, self.settings.store,
            self.settings.batch_max_records, self.settings.batch_max_wait_ms,
        )
        while not self._stop.is_set():
            self._step()
            if source.at_end and not self._backlog and self._retry_at <= self._clock():
                if stops_at_end:
                    log.info("Reached the end of %s", self.settings.source)
                    break
                self._flush_all_once()
                self._commit()
                self._stop.wait(self.settings.poll_timeout_ms / 1000)
        return self._shutdown()

    def _step(self) -> None:
        records = self._source.poll(self._poll_timeout_ms())
        with self._lock:
            self._backlog.extend(records)
            if self._refresh_needed:
                self._refresh_needed = False
                self._catalog.invalidate()
            if self._clock() < self._retry_at:
                # Pausing again covers partitions assigned during the back-off.
                self._source.pause()
                return
            if self._process_backlog():
                self._flush_due()
        self._maybe_commit()

    def _poll_timeout_ms(self) -> int:
        now = self._clock()
        if now < self._retry_at:
            wait = self._retry_at - now
        elif self._backlog:
            return 0
        else:
            wait = self._batcher.seconds_until_due()
        limit = self.settings.poll_timeout_ms
        if wait is None:
            return limit
        return max(0, min(limit, int(wait * 1000)))

    def _process_backlog(self) -> bool:
        """Handle backlog records in order; return False when the store needs a back-off."""
        while self._backlog:
            record = self._backlog[0]
            try:
                full_model = self._handle(record)
            except StreamfitError as err:
                if not err.retriable:
                    raise
                self._store_failed(err, f"looking up the model of {record.partition} offset {record.offset}")
                return False
            self._backlog.popleft()
            if full_model is not None and not self._refit(full_model):
                return False
        return True

    def _handle(self, record: SourceRecord) -> str | None:
        """Reject, skip or buffer one record; return its model when that buffer is full."""
        position = (record.partition, record.offset)
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
                self._metrics.records_consumed.inc()
                self._metrics.records_skipped.inc()
                self._tracker.consumed(*position)
                return None
            encoded = encode_record(decoded, entry.spec)
        except RecordRejected as rejection:
            # The record is done once it is counted: consumed() comes after
            # the store lookups, so a retried lookup never lets a commit pass it.
            self._metrics.records_consumed.inc()
            self._tracker.consumed(*position)
            self._reject(record, rejection)
            if model is not None and rejection.reason != "model_error":
                counts = self._rejected_by_model.setdefault(model, {})
                counts[rejection.reason] = counts.get(rejection.reason, 0) + 1
            return None

        self._metrics.records_consumed.inc()
        if encoded.extra_keys:
            self._metrics.extra_features.inc(len(encoded.extra_keys))
        self._tracker.consumed(*position)
        self._tracker.add_pending(*position)
        self._metrics.records_buffered.inc()
        source = record if self._dead_letters is not None else None
        full = self._batcher.add(model, BufferedRecord(encoded.row, encoded.label, position, source))
        return model if full else None

    def _reject(self, record: SourceRecord, rejection: RecordRejected) -> None:
        self._metrics.records_rejected.labels(rejection.reason).inc()
        self._rejections.log(record.partition, record.offset, rejection)
        if self._dead_letters is not None:
            self._dead_letters.send(
                key=record.key,
                value=record.value,
                partition=record.partition,
                offset=record.offset,
                reason=rejection.reason,
                detail=rejection.detail,
            )

    # -- refits ----------------------------------------------------------

    def _flush_due(self) -> None:
        for model in self._batcher.due():
            if not self._refit(model):
                return

    def _flush_all_once(self) -> bool:
        with self._lock:
            for model in self._batcher.models():
                while model in self._batcher.models():
                    if not self._refit(model):
                        return False
        return True

    def _refit(self, model: str) -> bool:
        """Refit ``model`` on its buffered records; return False when the store needs a back-off."""
        items = self._batcher.take(model)
        if not items:
            return True
        positions = [item.position for item in items]
        batch = Batch(
            X=np.vstack([item.row for item in items]).astype(np.float32, copy=False),
            y=_label_array([item.label for item in items]),
            positions=positions,
            rejected=self._rejected_by_model.pop(model, {}),
        )
        self._metrics.batch_size.observe(len(items))

        # NOTE: the refit runs on the polling thread. One that outlasts the
        # consumer's max_poll_interval_ms costs the group membership: the
        # version is still published and the stored offsets prevent learning
        # twice, but the following commit fails and the next owner re-reads.
        started = self._clock()
        try:
            with self._metrics.refit_duration.time():
                result = self._trainer.refit(model, batch)
        except PublishRejected as err:
            self._publish_rejected(model, items, err)
            return True
        except ModelNotFound:
            self._catalog.forget(model)
            self._finish(items)
            deleted = RecordRejected("unknown_model", f"model {model!r} was deleted from the store")
            for item in items:
                self._reject_buffered(item, deleted)
            return True
        except StreamfitError as err:
            if not err.retriable:
                self._model_failed(model, items, err)
                return True
            self._batcher.put_back(model, items)
            for reason, count in batch.rejected.items():
                counts = self._rejected_by_model.setdefault(model, {})
                counts[reason] = counts.get(reason, 0) + count
            self._store_failed(err, f"refitting model {model}")
            return False

        self._metrics.publish_duration.observe(self._clock() - started)
        self._store_ok()
        self._finish(items)
        self._metrics.records_learned.labels(model).inc(result.learned)
        self._metrics.records_skipped.inc(result.skipped)
        self._metrics.publish_conflicts.inc(result.conflicts)
        if result.version is not None:
            self._metrics.latest_version.labels(model).set(result.version.version)
            self._catalog.update_offsets(model, result.version.offsets)
            self._published_since_commit = True
            log.info(
                "Published model %s version %d: %d records learned, %d already learned, %d conflicts",
                model, result.version.version, result.learned, result.skipped, result.conflicts,
            )
        return True

    def _publish_rejected(self, model: str, items: list[BufferedRecord], err: PublishRejected) -> None:
        # The head stays on the last good version. Holding the batch would
        # fail the same check again and stall every model on these partitions.
        self._metrics.publish_rejected.labels(err.reason).inc()
        self._finish(items)
        log.error(
            "Version of model %s not published (%s: %s); %d records of %s offsets %d-%d are "
            "dropped as rejected",
            model, err.reason, err.detail, len(items), items[0].position[0],
            items[0].position[1], items[-1].position[1],
        )
        rejection = RecordRejected(err.reason, err.detail)
        for item in items:
            self._reject_buffered(item, rejection)

    def _model_failed(self, model: str, items: list[BufferedRecord], err: StreamfitError) -> None:
        # A model whose stored state or spec cannot be used fails the same way
        # on every retry. Rejecting its batch keeps the other models and the
        # partitions' commits moving.
        self._catalog.forget(model)
        self._finish(items)
        log.error(
            "Refit of model %s failed and cannot succeed on retry (%r); %d records of %s "
            "offsets %d-%d are rejected as model_error",
            model, err, len(items), items[0].position[0], items[0].position[1], items[-1].position[1],
        )
        rejection = RecordRejected("model_error", f"model {model!r} cannot be refit: {err}")
        for item in items:
            self._reject_buffered(item, rejection)

    def _reject_buffered(self, item: BufferedRecord, rejection: RecordRejected) -> None:
        self._metrics.records_rejected.labels(rejection.reason).inc()
        if self._dead_letters is not None and item.source is not None:
            self._dead_letters.send(
                key=item.source.key,
                value=item.source.value,
                partition=item.position[0],
                offset=item.position[1],
                reason=rejection.reason,
                detail=rejection.detail,
            )

    def _finish(self, items: list[BufferedRecord]) -> None:
        self._tracker.done(item.position for item in items)
        self._metrics.records_buffered.dec(len(items))

    # -- store back-off --------------------------------------------------

    def _store_failed(self, err: Exception, action: str) -> None:
        self._retry_attempts += 1
        delay = min(
            self.settings.max_retry_backoff_ms / 1000,
            FIRST_RETRY_BACKOFF_S * 2 ** (self._retry_attempts - 1),
        )
        self._retry_at = self._clock() + delay
        self._metrics.store_retries.inc()
        if self._retry_attempts == 1:
            # Fetching stops while the store is down, so buffers stay bounded;
            # polling goes on, which keeps the group membership.
            self._source.pause()
        log.warning(
            "Store unavailable while %s (%r); retry %d in %.1f s, buffered records are kept "
            "and offsets are not committed past them",
            action, err, self._retry_attempts, delay,
        )

    def _store_ok(self) -> None:
        if self._retry_attempts:
            log.info("Store available again after %d retries", self._retry_attempts)
            self._retry_attempts = 0
            self._retry_at = 0.0
            self._source.resume()

    # -- commits ---------------------------------------------------------

    def _maybe_commit(self) -> None:
        if self._published_since_commit or self._clock() - self._last_commit >= IDLE_COMMIT_INTERVAL_S:
            self._commit()

    def _commit(self) -> None:
        with self._lock:
            offsets = self._tracker.uncommitted()
        self._published_since_commit = False
        self._last_commit = self._clock()
        if not offsets:
            return
        if self._dead_letters is not None and not self._dead_letters.flush():
            return
        try:
            committed = self._source.commit(offsets)
        except CommitFailed as err:
            self._metrics.commit_failures.inc()
            log.warning(
                "Offset commit failed: %s; the records may be read again after a restart "
                "or rebalance, and the stored offsets skip those already learned",
                err,
            )
            return
        with self._lock:
            self._tracker.mark_committed(committed)
        log.debug("Committed offsets %s", committed)

    # -- rebalance callbacks (Kafka client IO thread) --------------------

    def partitions_assigned(self, partitions: list[str]) -> dict[str, int]:
        """Return the offsets to seek to in partitions this worker kept through a rebalance.

        kafka-python 3.0 keeps the fetch position of a partition that stays
        with the same consumer, but the revocation dropped that partition's
        unpublished records, so reading resumes at the first dropped one.
        """
        with self._lock:
            seeks = {p: self._resume_offsets[p] for p in partitions if p in self._resume_offsets}
            self._resume_offsets.clear()
            # The previous owner may have published meanwhile, so the stored
            # offsets are read again before the next record is handled.
            self._refresh_needed = True
        return seeks

    def partitions_revoked(self, partitions: list[str]) -> dict[str, int]:
        """Drop the partitions' unpublished records; return the offsets to commit for them."""
        with self._lock:
            offsets = self._tracker.uncommitted(partitions)
            self._resume_offsets.update(self._first_unfinished(partitions))
            self._drop(partitions, "revoked")
        if offsets and self._dead_letters is not None and not self._dead_letters.flush():
            return {}
        return offsets

    def partitions_lost(self, partitions: list[str]) -> None:
        with self._lock:
            self._resume_offsets.clear()
            self._drop(partitions, "lost")

    def _first_unfinished(self, partitions: list[str]) -> dict[str, int]:
        # The committable offset is the first record not yet published,
        # rejected or skipped. A partition with only unread (backlog)
        # records starts at the first of them.
        first = self._tracker.committable(partitions)
        for record in self._backlog:
            if record.partition in partitions and record.partition not in first:
                first[record.partition] = record.offset
        return first

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
        names = set(partitions)
        dropped = self._batcher.drop_partitions(names)
        before = len(self._backlog)
        self._backlog = deque(r for r in self._backlog if r.partition not in names)
        self._tracker.forget(names)
        self._metrics.records_buffered.set(len(self._batcher))
        if dropped or before != len(self._backlog):
            log.info(
                "Dropped %d buffered and %d unread records of %s partitions %s; "
                "they are read again from the first unfinished offset",
                dropped, before - len(self._backlog), cause, ",".join(sorted(names)),
            )

    # -- shutdown --------------------------------------------------------

    def _shutdown(self) -> int:
        log.info("Worker stopping: publishing %d buffered records", len(self._batcher))
        for _ in range(SHUTDOWN_PUBLISH_ATTEMPTS):
            if self._flush_all_once():
                break
            time.sleep(max(0.0, min(self._retry_at - self._clock(), 5.0)))
        left = len(self._batcher)
        self._commit()
        self._source.close()
        if left:
            log.error(
                "Worker stopped with %d records not published because the store is "
                "unavailable; their offsets are not committed, so they are read again",
                left,
            )
            return 1
        log.info("Worker stopped")
        return 0


class _RejectionLog:
    """Logs the first 10 rejections of each reason, then every 1000th."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def log(self, partition: str, offset: int, rejection: RecordRejected) -> None:
        count = self._counts.get(rejection.reason, 0) + 1
        self._counts[rejection.reason] = count
        if count <= 10 or count % 1000 == 0:
            log.warning(
                "Rejected record %s offset %d: %s: %s (%d rejected for %s so far)",
                partition, offset, rejection.reason, short_detail(rejection.detail),
                count, rejection.reason,
            )


def _label_array(labels: list[Any]) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype.kind in "US":
        # String class labels stay Python objects, as scikit-learn's classes_ are.
        return np.asarray(labels, dtype=object)
    return y


def run(
    settings: WorkerSettings,
    *,
    stop: threading.Event | None = None,
    registry: CollectorRegistry | None = None,
) -> int:
    """Run a worker until ``stop`` is set, SIGTERM/SIGINT arrives or a file source ends.

    Returns the exit code: 0 after a clean stop, 1 when records were left
    unpublished or the loop failed. Raises ConfigError for settings that can
    only be checked at start-up (the model spec file, a CSV header).
    """
    stop = stop or threading.Event()
    registry = registry if registry is not None else CollectorRegistry()
    metrics = WorkerMetrics(registry)
    create_spec = load_model_spec(settings.model_spec) if settings.model_spec else None
    if settings.metrics_port:
        serve_metrics(registry, settings.metrics_port)
        log.info("Serving metrics on port %d", settings.metrics_port)

    store = open_store(settings.store)
    dead_letters = None
    source = None
    restore = install_signal_handlers(stop)
    try:
        trainer = Trainer(store)
        catalog = ModelCatalog(store, trainer, create_spec=create_spec)
        dead_letters = open_dead_letters(settings, metrics)
        worker = Worker(
            settings, trainer=trainer, catalog=catalog, metrics=metrics, stop=stop,
            dead_letters=dead_letters,
        )
        try:
            source = open_source(settings, worker)
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
