"""Prometheus metrics of the worker, registered on a registry passed in.

Labels stay bounded: ``model`` (the name of a model that exists in the
store), ``reason`` (a rejection code from ``worker.records`` or a publish
check) and ``partition`` (``topic/partition`` of a partition assigned to this
worker; its series are removed when the partition is revoked or lost).
Offsets, keys and ids are never labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from modelstore.errors import ConfigError

# Refits of large batches with ONNX export can take minutes, so the buckets
# reach 10 minutes.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000)


class WorkerMetrics:
    """All ``streamfit_worker_*`` metrics of one worker process."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        p = "streamfit_worker_"
        self.records_consumed = Counter(
            p + "records_consumed", "Records read from the source.", registry=registry
        )
        self.records_learned = Counter(
            p + "records_learned", "Records learned in a published version.", ["model"],
            registry=registry,
        )
        self.records_rejected = Counter(
            p + "records_rejected", "Records rejected, by reason.", ["reason"], registry=registry
        )
        self.records_skipped = Counter(
            p + "records_skipped",
            "Records skipped because the model's stored offsets show them already learned.",
            registry=registry,
        )
        self.extra_features = Counter(
            p + "extra_features",
            "Feature keys that the model's schema does not know (ignored).",
            registry=registry,
        )
        self.records_buffered = Gauge(
            p + "records_buffered", "Records buffered or being refit, not yet published.",
            registry=registry,
        )
        self.batch_size = Histogram(
            p + "batch_size_records", "Records per refit batch.", buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.refit_duration = Histogram(
            p + "refit_duration_seconds",
            "Time of one refit: load, score, learn, export, check and publish.",
            buckets=DURATION_BUCKETS, registry=registry,
        )
        self.publish_duration = Histogram(
            p + "publish_duration_seconds",
            "Time from taking a batch to its version being published, retries included.",
            buckets=DURATION_BUCKETS, registry=registry,
        )
        self.latest_version = Gauge(
            p + "latest_version", "Latest version this worker published.", ["model"],
            registry=registry,
        )
        self.publish_conflicts = Counter(
            p + "publish_conflicts",
            "Publishes that lost a compare-and-swap to another writer and were rebased or retried.",
            registry=registry,
        )
        self.publish_rejected = Counter(
            p + "publish_rejected", "Versions that failed a publish check, by reason.", ["reason"],
            registry=registry,
        )
        self.commit_failures = Counter(
            p + "commit_failures", "Offset commits that failed (the stored offsets prevent relearning).",
            registry=registry,
        )
        self.store_retries = Counter(
            p + "store_retries", "Store operations retried after the store was unavailable.",
            registry=registry,
        )
        self.dead_letters = Counter(
            p + "dead_letters", "Rejected records sent to the dead-letter topic.", registry=registry
        )
        self.model_records_rejected = Counter(
            p + "model_records_rejected",
            "Records rejected, by model, for records whose model exists.", ["model"],
            registry=registry,
        )
        self.scored_records = Counter(
            p + "scored_records",
            "Records scored by the version they then updated (test-then-train), by model.", ["model"],
            registry=registry,
        )
        self.scored_correct = Counter(
            p + "scored_correct", "Scored records a classifier predicted right, by model.", ["model"],
            registry=registry,
        )
        self.scored_baseline_correct = Counter(
            p + "scored_baseline_correct",
            "Scored records the running majority-class baseline predicted right, by model.", ["model"],
            registry=registry,
        )
        self.scored_absolute_error = Counter(
            p + "scored_absolute_error", "Sum of the absolute errors of a regressor's scored records, by model.",
            ["model"], registry=registry,
        )
        self.drift_detections = Counter(
            p + "drift_detections",
            "Changes of a model's test-then-train error rate found by its drift detector, by model and "
            "direction (increase or decrease).",
            ["model", "direction"], registry=registry,
        )
        self.last_publish = Gauge(
            p + "last_publish_timestamp_seconds",
            "Unix time of the latest version this worker published, by model.", ["model"],
            registry=registry,
        )
        self.partition_lag = Gauge(
            p + "partition_lag_records",
            "Log end offset minus the offset this worker last committed, by partition.",
            ["partition"], registry=registry,
        )
        self.store_available = Gauge(
            p + "store_available",
            "1 while the model store answers, 0 from a failed store call until one succeeds.",
            registry=registry,
        )
        self.store_available.set(1)
        self.fetch_paused = Gauge(
            p + "fetch_paused",
            "1 while fetching is paused (store unavailable, buffers full or shutting down).",
            registry=registry,
        )
        self.assigned_partitions = Gauge(
            p + "assigned_partitions", "Partitions assigned to this worker by its consumer group.",
            registry=registry,
        )
        self.broker_connections = Gauge(
            p + "broker_connections", "Open connections to Kafka brokers (0 while they are unreachable).",
            registry=registry,
        )
        self.dead_letter_failures = Counter(
            p + "dead_letter_failures", "Rejected records the dead-letter topic did not accept.",
            registry=registry,
        )


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> None:
    """Serve ``registry`` over HTTP on ``host``:``port`` in a daemon thread.

    Raises ConfigError when the address cannot be bound, for example a port in use.
    """
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise ConfigError(
            f"invalid metrics address {host}:{port}: {err.strerror or err}; check metrics_host, "
            "choose another metrics_port, or set metrics_port 0 to turn the endpoint off"
        ) from None
