"""Optional dead-letter producer: rejected records go to a topic with their reason.

Each dead letter keeps the original key and value bytes and carries headers
``streamfit.reason`` (the rejection code), ``streamfit.detail``,
``streamfit.source`` (``topic/partition``) and ``streamfit.offset``. A value
larger than ``max_record_bytes`` (rejected as ``too_large``) is not copied:
its dead letter has no value and a ``streamfit.value_bytes`` header with the
original size, because the topic would reject it as too large as well.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from kafka import KafkaProducer

from worker.metrics import WorkerMetrics
from worker.records import short_detail

log = logging.getLogger(__name__)

# Connection and security options of the consumer that the producer shares,
# so a TLS/SASL cluster needs its settings only once.
_SHARED_PREFIXES = ("ssl_", "sasl_", "security_protocol", "proxy_url", "client_dns_lookup")


class DeadLetters:
    """Sends rejected records to ``topic`` and makes them durable before a commit."""

    def __init__(
        self,
        topic: str,
        *,
        bootstrap_servers: list[str],
        consumer_options: Mapping[str, Any],
        max_record_bytes: int,
        metrics: WorkerMetrics,
        flush_timeout_ms: int,
    ):
        shared = {
            key: value
            for key, value in consumer_options.items()
            if key.startswith(_SHARED_PREFIXES) and key in KafkaProducer.DEFAULT_CONFIG
        }
        self.topic = topic
        self._max_value_bytes = max_record_bytes
        self._metrics = metrics
        self._flush_timeout_s = flush_timeout_ms / 1000
        self._failures_logged = 0
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap_servers,
            # Headers add a few hundred bytes to a record of up to max_record_bytes.
            max_request_size=max_record_bytes + 64 * 1024,
            **shared,
        )
        log.info("Sending rejected records to dead-letter topic %s", topic)

    def send(
        self,
        *,
        key: bytes | None,
        value: bytes | None,
        partition: str,
        offset: int,
        reason: str,
        detail: str,
    ) -> None:
        headers = [
            ("streamfit.reason", reason.encode()),
            ("streamfit.detail", short_detail(detail).encode("utf-8", errors="replace")),
            ("streamfit.source", partition.encode()),
            ("streamfit.offset", str(offset).encode()),
        ]
        if value is not None and len(value) > self._max_value_bytes:
            headers.append(("streamfit.value_bytes", str(len(value)).encode()))
            value = None
        try:
            future = self._producer.send(self.topic, value=value, key=key, headers=headers)
        except Exception as err:
            self._failed(partition, offset, err)
            return
        future.add_callback(lambda _: self._metrics.dead_letters.inc())
        future.add_errback(lambda err: self._failed(partition, offset, err))

    def flush(self) -> bool:
        """Wait until every dead letter sent so far is acknowledged; False on timeout."""
        try:
            self._producer.flush(timeout=self._flush_timeout_s)
        except Exception as err:
            log.warning(
                "Dead-letter topic %s did not acknowledge within %.1f s (%r); "
                "offsets are not committed until it does",
                self.topic, self._flush_timeout_s, err,
            )
            return False
        return True

    def close(self) -> None:
        self._producer.close(timeout=self._flush_timeout_s)

    def _failed(self, partition: str, offset: int, err: Exception) -> None:
        self._metrics.dead_letter_failures.inc()
        self._failures_logged += 1
        if self._failures_logged <= 10 or self._failures_logged % 1000 == 0:
            log.error(
                "Dead letter for %s offset %d was not written to %s: %r "
                "(the rejection is still counted and logged; %d failures so far)",
                partition, offset, self.topic, err, self._failures_logged,
            )
