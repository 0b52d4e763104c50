"""Settings of one worker process, validated at start-up.

The CLI builds a plain mapping from flags, ``STREAMFIT_*`` environment
variables and an optional TOML file. ``WorkerSettings.from_mapping`` turns it
into one typed object, or raises ConfigError naming the key, the value and
the fix.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from modelstore.errors import ConfigError, InvalidModelName
from modelstore.names import validate_model_name
from worker.kafka_config import check_options, masked, resolve_options

MiB = 1024 * 1024


# Records per refit of a model when neither the worker nor the model's spec sets it.
DEFAULT_BATCH_MAX_RECORDS = 1000


@dataclass(frozen=True)
class KafkaSourceConfig:
    """A ``kafka://host:port[,host:port]/topic[,topic]`` source."""

    bootstrap_servers: tuple[str, ...]
    topics: tuple[str, ...]


@dataclass(frozen=True)
class FileSourceConfig:
    """A ``file:PATH`` source: CSV (``.csv``) or JSON lines (``.jsonl``, ``.ndjson``, ``.json``)."""

    path: str
    format: str


@dataclass(frozen=True)
class WorkerSettings:
    """All options of a worker process; field names match the CLI flags.

    ``exit_at_end`` None means: stop at the end of a file source, run until
    stopped on Kafka. ``metrics_port`` 0 turns the metrics server off.
    """

    source: str = field(metadata={"help": "kafka://host:port[,host:port]/topic[,topic] or file:PATH (.csv or .jsonl)"})
    store: str = field(
        default="sqlite:///models.db",
        metadata={"help": "model store URL: sqlite:///PATH or couchbase://host/bucket?scope=NAME"},
    )
    group_id: str = field(default="streamfit-worker", metadata={"help": "Kafka consumer group"})
    model: str | None = field(
        default=None,
        metadata={"help": "train this model on every record (default: the record's 'model' field, else its key)"},
    )
    model_spec: str | None = field(
        default=None,
        metadata={"help": "model spec file, JSON or TOML (*.toml); models missing from the store are created from it"},
    )
    batch_max_records: int | None = field(
        default=None,
        metadata={"help": "refit a model when its buffer has this many records (default: the model "
                          "spec's batch.max_records, else 1000)"},
    )
    batch_max_wait_ms: int = field(
        default=1000, metadata={"help": "refit a model when its oldest buffered record is this many milliseconds old"}
    )
    poll_timeout_ms: int = field(default=500, metadata={"help": "longest wait of one Kafka poll, in milliseconds"})
    max_record_bytes: int = field(default=MiB, metadata={"help": "reject record values larger than this many bytes"})
    dead_letter_topic: str | None = field(
        default=None, metadata={"help": "Kafka topic that receives rejected records with their reason"}
    )
    metrics_port: int = field(default=9101, metadata={"help": "port of the Prometheus metrics endpoint; 0 turns it off"})
    metrics_host: str = field(
        default="0.0.0.0",
        metadata={"help": "address of the metrics endpoint; 127.0.0.1 keeps it on this machine"},
    )
    kafka_options: Mapping[str, Any] = field(
        default_factory=dict, metadata={"help": "extra KafkaConsumer options, such as TLS and SASL settings"}
    )
    label_column: str = field(default="label", metadata={"help": "CSV column that holds the label"})
    exit_at_end: bool | None = field(
        default=None,
        metadata={"help": "stop at the end of the source: true or false (default: true for files, false for Kafka)"},
    )
    commit_timeout_ms: int = field(
        default=10_000, metadata={"help": "longest wait for an offset commit or a dead-letter flush, in milliseconds"}
    )
    max_retry_backoff_ms: int = field(
        default=30_000, metadata={"help": "longest pause between retries while the store is unavailable, in milliseconds"}
    )
    max_buffered_records: int = field(
        default=20_000,
        metadata={"help": "pause fetching while this many records are buffered or being refit; "
                          "at least batch_max_records"},
    )
    shutdown_timeout_ms: int = field(
        default=30_000,
        metadata={"help": "on SIGTERM, longest time spent publishing buffered records before the rest "
                          "is left to be read again, in milliseconds"},
    )
    max_conflict_attempts: int = field(
        default=3,
        metadata={"help": "publish attempts of one batch when other writers publish the same model "
                          "first; then the batch is retried later"},
    )
    learner_cache_size: int = field(
        default=1000, metadata={"help": "learners (one per model) kept in memory between refits"}
    )
    learner_cache_bytes: int = field(
        default=512 * MiB,
        metadata={"help": "memory for cached learners, in bytes; estimated from model_spec when it is set"},
    )

    def __repr__(self) -> str:
        # The generated repr would show secret consumer options such as a
        # SASL password, and settings end up in logs and tracebacks.
        values = ", ".join(
            f"{f.name}={masked(self.kafka_options) if f.name == 'kafka_options' else getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
        )
        return f"WorkerSettings({values})"

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "WorkerSettings":
        """Build validated settings from a mapping; unknown keys raise ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(
                f"unknown worker settings {unknown}; the known settings are {sorted(known)}"
            )
        if "source" not in raw or raw["source"] in (None, ""):
            raise ConfigError(
                "missing setting 'source': use kafka://host:port/topic or file:PATH"
            )
        values = dict(raw)
        if values.get("kafka_options") is None:
            values["kafka_options"] = {}
        if isinstance(values.get("exit_at_end"), str):
            values["exit_at_end"] = _parse_bool("exit_at_end", values["exit_at_end"])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check every value and the rules between them; raise ConfigError on the first failure."""
        _require_str("source", self.source)
        _require_str("store", self.store)
        _require_str("group_id", self.group_id)
        _require_str("label_column", self.label_column)
        _require_str("metrics_host", self.metrics_host)
        if self.batch_max_records is not None:
            _require_int("batch_max_records", self.batch_max_records, 1, 1_000_000)
        _require_int("batch_max_wait_ms", self.batch_max_wait_ms, 0, 24 * 3600 * 1000)
        _require_int("poll_timeout_ms", self.poll_timeout_ms, 1, 60_000)
        _require_int("max_record_bytes", self.max_record_bytes, 1, 64 * MiB)
        _require_int("metrics_port", self.metrics_port, 0, 65535)
        _require_int("commit_timeout_ms", self.commit_timeout_ms, 100, 600_000)
        _require_int("max_retry_backoff_ms", self.max_retry_backoff_ms, 100, 3_600_000)
        _require_int("max_buffered_records", self.max_buffered_records, 1, 10_000_000)
        _require_int("shutdown_timeout_ms", self.shutdown_timeout_ms, 0, 3_600_000)
        _require_int("max_conflict_attempts", self.max_conflict_attempts, 1, 100)
        _require_int("learner_cache_size", self.learner_cache_size, 1, 1_000_000)
        _require_int("learner_cache_bytes", self.learner_cache_bytes, MiB, 1024 * 1024 * MiB)
        if self.batch_max_records is not None and self.max_buffered_records < self.batch_max_records:
            raise ConfigError(
                f"max_buffered_records {self.max_buffered_records} is below batch_max_records "
                f"{self.batch_max_records}, so a batch could never fill; raise max_buffered_records "
                "or lower batch_max_records"
            )
        if self.exit_at_end is not None and not isinstance(self.exit_at_end, bool):
            raise ConfigError(
                f"invalid exit_at_end {self.exit_at_end!r}: expected true or false"
            )
        if self.model is not None:
            try:
                validate_model_name(self.model)
            except InvalidModelName as err:
                raise ConfigError(f"invalid setting model: {err}") from None
        if self.model_spec is not None:
            _require_str("model_spec", self.model_spec)
            if not os.path.isfile(self.model_spec):
                raise ConfigError(
                    f"invalid model_spec {self.model_spec!r}: no such file; "
                    "give the path of a JSON or TOML model spec"
                )
        check_options(self.kafka_options)

        source = self.parsed_source()
        if self.dead_letter_topic is not None:
            _require_str("dead_letter_topic", self.dead_letter_topic)
            if not isinstance(source, KafkaSourceConfig):
                raise ConfigError(
                    f"dead_letter_topic {self.dead_letter_topic!r} needs a Kafka source, "
                    f"but source is {self.source!r}; remove dead_letter_topic or read from Kafka"
                )
            if self.dead_letter_topic in source.topics:
                raise ConfigError(
                    f"dead_letter_topic {self.dead_letter_topic!r} is also a source topic; "
                    "rejected records would be read again, so choose another topic"
                )

    def parsed_source(self) -> KafkaSourceConfig | FileSourceConfig:
        return parse_source(self.source)

    def batch_size(self, spec_batch: int | None) -> int:
        """Return a model's records per refit: this setting, else its spec's, else the default.

        The result never exceeds max_buffered_records, so every batch can fill.
        """
        size = self.batch_max_records or spec_batch or DEFAULT_BATCH_MAX_RECORDS
        return min(size, self.max_buffered_records)

    def stops_at_end(self) -> bool:
        if self.exit_at_end is not None:
            return self.exit_at_end
        return isinstance(self.parsed_source(), FileSourceConfig)

    def consumer_options(self) -> dict[str, Any]:
        """Return the KafkaConsumer options with defaults applied and secrets read."""
        return resolve_options(self.kafka_options)


def parse_source(source: str) -> KafkaSourceConfig | FileSourceConfig:
    """Parse ``kafka://host:port[,host:port]/topic[,topic]`` or ``file:PATH``."""
    if source.startswith("kafka://"):
        rest = source[len("kafka://"):]
        hosts, sep, topics = rest.partition("/")
        servers = tuple(h for h in hosts.split(",") if h)
        names = tuple(t for t in topics.split(",") if t)
        if not sep or not servers or not names:
            raise ConfigError(
                f"invalid source {source!r}: use kafka://host:port[,host:port]/topic[,topic]"
            )
        for server in servers:
            host, colon, port = server.rpartition(":")
            if not colon or not host or not port.isdigit():
                raise ConfigError(
                    f"invalid broker {server!r} in source {source!r}: use host:port"
                )
        return KafkaSourceConfig(bootstrap_servers=servers, topics=names)

    if source.startswith("file:"):
        path = source[len("file:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ConfigError(f"invalid source {source!r}: use file:PATH")
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".csv":
            fmt = "csv"
        elif suffix in (".jsonl", ".ndjson", ".json"):
            fmt = "jsonl"
        else:
            raise ConfigError(
                f"invalid source {source!r}: a file source must end in .csv "
                "(CSV with a header row) or .jsonl / .ndjson / .json (one JSON object per line)"
            )
        return FileSourceConfig(path=path, format=fmt)

    raise ConfigError(
        f"invalid source {source!r}: use kafka://host:port/topic or file:PATH"
    )


def _parse_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"invalid {key} {value!r}: expected true or false")


def _require_str(key: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"invalid {key} {value!r}: expected a non-empty string")


def _require_int(key: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"invalid {key} {value!r}: expected an integer from {low} to {high}"
        )
