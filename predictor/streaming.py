"""Stream predictions: feature records from Kafka topics in, prediction records out.

One daemon thread polls a batch of records and groups them by model. It
predicts each group with one session run of the model's served latest
version, from the session cache and head watcher that serve HTTP, so hot
swaps apply here too. It sends one prediction per record to
``output_topic`` and each rejected record to the dead-letter topic, flushes
the producer, and only then commits the batch's offsets. Delivery is at least once: a crash between the flush
and the commit sends the batch's predictions again on restart.

A record that cannot be predicted is rejected with a reason and counted.
It goes to ``stream_dead_letter_topic`` when one is set, and is logged
(rate limited) otherwise. It never stops the stream. A failure that is not the record's
fault (the store or Kafka is down, a first load is still running) rewinds
the batch and reads it again after a back-off, so nothing is lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from modelstore.base import ModelStore
from modelstore.errors import ConfigError, ModelNotFound, RecordRejected, StoreError
from modelstore.predictions import prediction_key

from predictor.metrics import PredictorMetrics
from predictor.sessions import NotServable, SessionCache
from predictor.settings import PredictorSettings, parse_kafka_source
from predictor.stream_records import FeatureRecord, decode_record, non_finite_rows, prediction_value

logger = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 200
FLUSH_TIMEOUT_S = 30.0
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
REJECT_LOG_INTERVAL_S = 10.0
MAX_DETAIL_CHARS = 300


class _Retry(Exception):
    """The batch must be read again: a failure that is not the records' fault."""


@dataclass
class _Outcome:
    predictions: list[tuple[Any, bytes | None, bytes]]
    rejected: list[tuple[Any, str, str]]
    # Per model, the prediction documents to keep in the store, by prediction key.
    stored: dict[str, dict[str, bytes]] = field(default_factory=lambda: defaultdict(dict))


class StreamPredictor:
    """Consume feature records and produce predictions on one daemon thread."""

    def __init__(
        self,
        settings: PredictorSettings,
        cache: SessionCache,
        metrics: PredictorMetrics,
        store: ModelStore | None = None,
    ):
        if settings.store_predictions and store is None:
            raise ConfigError("store_predictions needs the model store to write to")
        self._settings = settings
        self._store = store
        self._source = parse_kafka_source(settings.source)
        self._cache = cache
        self._metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._backoff_s = BACKOFF_FIRST_S
        self._rejects_logged_at = float("-inf")
        self._rejects_unlogged = 0
        self._errors_logged_at = float("-inf")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Connect to Kafka and start the thread; raises when the brokers cannot be reached."""
        servers = list(self._source.bootstrap_servers)
        try:
            self._consumer = KafkaConsumer(
                *self._source.topics,
                bootstrap_servers=servers,
                group_id=self._settings.stream_group_id,
                client_id="streamfit-predictor",
                # Offsets are committed after the predictions are flushed.
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=self._settings.stream_batch_records,
            )
            self._producer = KafkaProducer(
                bootstrap_servers=servers,
                client_id="streamfit-predictor",
                linger_ms=5,
                # A dead letter copies a record of up to stream_max_record_bytes, plus headers.
                max_request_size=self._settings.stream_max_record_bytes + 64 * 1024,
            )
        except KafkaError as exc:
            if self._consumer is not None:
                self._consumer.close(autocommit=False)
            raise ConfigError(
                f"cannot connect to the Kafka brokers {','.join(servers)} of source: {exc!r}; "
                "check the source setting and that the brokers are running"
            ) from None
        self._thread = threading.Thread(target=self._run, name="streamfit-stream-predictor", daemon=True)
        self._thread.start()
        logger.info(
            "predicting records of %s from %s as group %s into %s (dead letters: %s)",
            ",".join(self._source.topics), ",".join(servers), self._settings.stream_group_id,
            self._settings.output_topic, self._settings.stream_dead_letter_topic or "counted only",
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("the stream predictor did not stop within %.1f s", timeout_s)
                return
        if self._producer is not None:
            self._producer.close(timeout=FLUSH_TIMEOUT_S)
        if self._consumer is not None:
            # The last batch was committed after its flush, so nothing is committed here.
            self._consumer.close(autocommit=False)
        logger.info("stream predictor stopped")

    # ------------------------------------------------------------ loop

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
                records = [record for part in batch.values() for record in part]
                if records:
                    self.handle(records)
            except Exception as exc:
                # The thread must outlive any single failure; the batch is
                # uncommitted, so it is read again after the rewind.
                self._log_error("the stream predictor failed on a batch; reading it again", exc)
                self._metrics.stream_retries.inc()
                self._wait_backoff()

    def handle(self, records: list[Any]) -> None:
        """Predict one polled batch, send the results, then commit its offsets.

        Any failure rewinds the consumer to the batch's first offsets, so the
        batch is read again and no record is skipped.
        """
        try:
            outcome = self._predict(records)
            for record, key, value in outcome.predictions:
                self._producer.send(self._settings.output_topic, key=key, value=value)
            for record, reason, detail in outcome.rejected:
                self._dead_letter(record, reason, detail)
            self._producer.flush(timeout=FLUSH_TIMEOUT_S)
            self._store_predictions(outcome)
        except _Retry as exc:
            self._rewind(records)
            self._metrics.stream_retries.inc()
            self._log_error(f"{exc}; the batch is read again after {self._backoff_s:.1f} s", None)
            self._wait_backoff()
            return
        except Exception:
            self._rewind(records)
            raise
        self._commit(records)

        self._metrics.stream_records.labels(result="predicted").inc(len(outcome.predictions))
        self._metrics.stream_records.labels(result="rejected").inc(len(outcome.rejected))
        for record, reason, detail in outcome.rejected:
            self._metrics.stream_rejected.labels(reason=reason).inc()
        if self._settings.stream_dead_letter_topic is not None:
            self._metrics.stream_dead_letters.inc(len(outcome.rejected))
        self._backoff_s = BACKOFF_FIRST_S

    def _store_predictions(self, outcome: _Outcome) -> None:
        """Keep the batch's predictions in the store when configured; a store failure retries the batch."""
        if not self._settings.store_predictions:
            return
        for name, documents in outcome.stored.items():
            try:
                self._store.put_predictions(name, documents, self._settings.prediction_expiry_s)
            except StoreError as exc:
                if not exc.retriable:
                    raise
                raise _Retry(f"storing the predictions of model {name!r} failed: {exc}") from None
            self._metrics.stream_stored.inc(len(documents))

    def _predict(self, records: list[Any]) -> _Outcome:
        outcome = _Outcome([], [])
        groups: dict[str, list[tuple[Any, FeatureRecord]]] = defaultdict(list)
        for record in records:
            try:
                decoded = decode_record(
                    record.key, record.value, self._settings.stream_model,
                    self._settings.stream_max_record_bytes,
                )
            except RecordRejected as exc:
                outcome.rejected.append((record, exc.reason, exc.detail))
                continue
            groups[decoded.model].append((record, decoded))
        for name, group in groups.items():
            self._predict_group(name, group, outcome)
        return outcome

    def _predict_group(self, name: str, group: list[tuple[Any, FeatureRecord]], outcome: _Outcome) -> None:
        try:
            model = self._cache.latest(name)
        except ModelNotFound:
            detail = f"model {name!r} not found in the model store"
            outcome.rejected.extend((record, "unknown_model", detail) for record, _ in group)
            return
        except NotServable as exc:
            if exc.retriable:
                raise _Retry(f"model {name!r} cannot be loaded now: {exc}") from None
            outcome.rejected.extend((record, "not_servable", exc.public) for record, _ in group)
            return
        except StoreError as exc:
            raise _Retry(f"the model store failed while loading model {name!r}: {exc}") from None

        rows, kept = [], []
        for record, decoded in group:
            try:
                rows.append(model.schema.encode_one(decoded.features))
            except RecordRejected as exc:
                outcome.rejected.append((record, exc.reason, f"model {name!r}: {exc.detail}"))
                continue
            kept.append((record, decoded))
        if not kept:
            return
        arrays = model.predict(np.stack(rows))
        bad = non_finite_rows(arrays)
        for row, (record, decoded) in enumerate(kept):
            if bad[row]:
                outcome.rejected.append((
                    record, "non_finite_output",
                    f"model {name!r} version {model.version} returns a non-finite output for these "
                    "features; check them for extreme magnitudes",
                ))
                continue
            source = (record.topic, record.partition, record.offset)
            value = prediction_value(model, arrays, row, decoded, source)
            outcome.predictions.append((record, record.key, value))
            if self._settings.store_predictions:
                outcome.stored[name][prediction_key(decoded.id, *source)] = value

    # ------------------------------------------------------------ Kafka

    def _dead_letter(self, record: Any, reason: str, detail: str) -> None:
        topic = self._settings.stream_dead_letter_topic
        if topic is None:
            self._log_reject(record, reason, detail)
            return
        headers = [
            ("streamfit.reason", reason.encode()),
            ("streamfit.detail", detail[:MAX_DETAIL_CHARS].encode("utf-8", errors="replace")),
            ("streamfit.source", f"{record.topic}/{record.partition}".encode()),
            ("streamfit.offset", str(record.offset).encode()),
        ]
        value = record.value
        if value is not None and len(value) > self._settings.stream_max_record_bytes:
            # The topic would reject a copy of a record this large as well.
            headers.append(("streamfit.value_bytes", str(len(value)).encode()))
            value = None
        self._producer.send(topic, key=record.key, value=value, headers=headers)

    def _commit(self, records: list[Any]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, -1), record.offset + 1)
        assigned = self._consumer.assignment()
        request = {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items() if tp in assigned}
        if not request:
            return
        try:
            self._consumer.commit(request)
        except Exception as exc:
            # The predictions are sent; the partition's next owner sends
            # them again (at least once).
            self._log_error(f"commit of offsets {_names(request)} failed; they will be predicted again", exc)

    def _rewind(self, records: list[Any]) -> None:
        first: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            first[tp] = min(first.get(tp, record.offset), record.offset)
        assigned = self._consumer.assignment()
        for tp, offset in first.items():
            # A partition moved to another member in a rebalance is read
            # there from its committed offset.
            if tp in assigned:
                self._consumer.seek(tp, offset)

    # ------------------------------------------------------------ pacing and logs

    def _wait_backoff(self) -> None:
        self._stop.wait(self._backoff_s)
        self._backoff_s = min(BACKOFF_MAX_S, self._backoff_s * 2)

    def _log_reject(self, record: Any, reason: str, detail: str) -> None:
        now = time.monotonic()
        if now - self._rejects_logged_at < REJECT_LOG_INTERVAL_S:
            self._rejects_unlogged += 1
            return
        self._rejects_logged_at = now
        unlogged, self._rejects_unlogged = self._rejects_unlogged, 0
        logger.warning(
            "rejected record %s/%d offset %d (%s): %s; no stream_dead_letter_topic is set, so it "
            "is counted only (%d more rejections not logged in the last %.0f s)",
            record.topic, record.partition, record.offset, reason, detail[:MAX_DETAIL_CHARS],
            unlogged, REJECT_LOG_INTERVAL_S,
        )

    def _log_error(self, message: str, exc: Exception | None) -> None:
        now = time.monotonic()
        if now - self._errors_logged_at < REJECT_LOG_INTERVAL_S:
            return
        self._errors_logged_at = now
        if exc is None:
            logger.warning("%s", message)
        else:
            logger.error("%s: %r", message, exc)


def _names(offsets: dict[TopicPartition, OffsetAndMetadata]) -> str:
    return ",".join(f"{tp.topic}/{tp.partition}@{o.offset}" for tp, o in sorted(offsets.items()))
