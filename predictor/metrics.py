"""Prometheus metrics of the predictor, registered on a registry passed in.

Every series is per process. The predictor runs one process per container
(see ``predictor.server``), so a scrape of one container counts each of
its requests exactly once.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "streamfit_predictor"

# A linear model predicts a row in well under a millisecond, and a large
# network or a big batch takes seconds, so the buckets cover both ends.
REQUEST_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)


# Label value for requests whose model name is invalid or not in the store,
# so that clients cannot create a series per made-up name. A valid model
# name never starts with '_'.
UNKNOWN_MODEL = "_unknown"


class PredictorMetrics:
    """The predictor's metrics; one instance per app and registry."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter(
            f"{PREFIX}_requests_total",
            "Prediction and metadata requests by model and HTTP status code.",
            ["model", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time to answer a prediction request, from the first body byte read "
            "to the response, in seconds.",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.rows_predicted = Counter(
            f"{PREFIX}_rows_predicted_total",
            "Rows predicted, by model.",
            ["model"],
            registry=registry,
        )
        self.model_loads = Counter(
            f"{PREFIX}_model_loads_total",
            "Attempts to load and warm a model version, by result "
            "(ok, corrupt, invalid, warm_failed, unavailable, no_artifact).",
            ["result"],
            registry=registry,
        )
        self.swaps = Counter(
            f"{PREFIX}_swaps_total",
            "Times a newer version replaced the served version of a model.",
            registry=registry,
        )
        self.served_version = Gauge(
            f"{PREFIX}_served_version",
            "Version number that serves requests for the model's latest version.",
            ["model"],
            registry=registry,
        )
        self.version_age = Gauge(
            f"{PREFIX}_version_age_seconds",
            "Seconds since the served version of the model was published.",
            ["model"],
            registry=registry,
        )
        self.alias_version = Gauge(
            f"{PREFIX}_alias_version",
            "Version number that serves requests for an alias of the model.",
            ["model", "alias"],
            registry=registry,
        )
        self.cache_models = Gauge(
            f"{PREFIX}_cache_models",
            "onnxruntime sessions held in the cache (latest, alias and pinned entries).",
            registry=registry,
        )
        self.cache_bytes = Gauge(
            f"{PREFIX}_cache_bytes",
            "Estimated memory of the cached sessions, in bytes (a fixed part per session "
            "plus twice its ONNX size).",
            registry=registry,
        )
        self.cache_evictions = Counter(
            f"{PREFIX}_cache_evictions_total",
            "Sessions evicted from the cache, by the bound that was reached (count, memory).",
            ["reason"],
            registry=registry,
        )
        self.head_checks = Counter(
            f"{PREFIX}_head_checks_total",
            "Sweeps of the head watcher over the heads of the cached models, by result (ok, failed).",
            ["result"],
            registry=registry,
        )
        self.last_head_check = Gauge(
            f"{PREFIX}_last_head_check_timestamp_seconds",
            "Unix time of the last sweep that read every cached model's head; the served "
            "versions are at most this stale.",
            registry=registry,
        )
        self.head_check_duration = Gauge(
            f"{PREFIX}_head_check_duration_seconds",
            "Duration of the last sweep of the head watcher, loads of new versions included.",
            registry=registry,
        )
        self.stream_stored = Counter(
            f"{PREFIX}_stream_stored_predictions_total",
            "Predictions of the source topics kept in the store's predictions collection.",
            registry=registry,
        )
        self.stream_records = Counter(
            f"{PREFIX}_stream_records_total",
            "Records of the source topics, by result (predicted, rejected).",
            ["result"],
            registry=registry,
        )
        self.stream_rejected = Counter(
            f"{PREFIX}_stream_rejected_total",
            "Records of the source topics that could not be predicted, by reason.",
            ["reason"],
            registry=registry,
        )
        self.stream_dead_letters = Counter(
            f"{PREFIX}_stream_dead_letters_total",
            "Rejected records sent to the dead-letter topic.",
            registry=registry,
        )
        self.stream_retries = Counter(
            f"{PREFIX}_stream_retries_total",
            "Batches of source records read again because the store or Kafka failed.",
            registry=registry,
        )

    def forget_model(self, model: str) -> None:
        """Drop the per-model gauges of a model that is no longer served."""
        for gauge in (self.served_version, self.version_age):
            try:
                gauge.remove(model)
            except KeyError:
                pass

    def forget_alias(self, model: str, alias: str) -> None:
        """Drop the gauge of an alias that is no longer served."""
        try:
            self.alias_version.remove(model, alias)
        except KeyError:
            pass
