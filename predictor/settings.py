"""Settings of one predictor process, validated at start-up."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from modelstore.errors import ConfigError, InvalidModelName
from modelstore.names import validate_model_name
from modelstore.predictions import DEFAULT_EXPIRY_S, MAX_EXPIRY_S

CPU_MAX_PATH = Path("/sys/fs/cgroup/cpu.max")


def cpu_quota_cores(cpu_max_path: Path = CPU_MAX_PATH) -> int:
    """Return the number of cores this process may use, at least 1.

    The cgroup v2 CPU quota (``cpu.max``, "<quota> <period>" or "max <period>")
    is rounded up to whole cores and capped by the CPUs the process may run
    on. Without a quota file the CPU count is used.
    """
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max_path.read_text().split()[:2]
    except (OSError, ValueError):
        return max(1, cores)
    if quota == "max":
        return max(1, cores)
    try:
        limit = math.ceil(int(quota) / int(period))
    except (ValueError, ZeroDivisionError):
        return max(1, cores)
    return max(1, min(cores, limit))


@dataclass(frozen=True)
class PredictorSettings:
    """Options of the predictor service; each field's ``help`` is its flag's help text."""

    store: str = field(
        default="sqlite:///models.db",
        metadata={"help": "model store to serve from (sqlite:///models.db or couchbase://...)"},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address the HTTP server listens on"})
    port: int = field(default=8080, metadata={"help": "port the HTTP server listens on"})
    refresh_interval_ms: int = field(
        default=250,
        metadata={"help": "interval between reads of the heads of cached models, in ms; a new "
                          "version or a moved alias is served about this long after the head "
                          "changes, plus the time to read the heads and load the version"},
    )
    cache_max_models: int = field(
        default=256,
        metadata={"help": "maximum number of onnxruntime sessions kept for the latest version "
                          "or an alias of a model (least recently used are evicted)"},
    )
    cache_max_pinned: int = field(
        default=32,
        metadata={"help": "maximum number of sessions kept for versions requested by number; "
                          "they have their own LRU, so a client walking old versions never "
                          "evicts the latest versions of other models"},
    )
    cache_max_bytes: int = field(
        default=1024**3,
        metadata={"help": "maximum estimated memory of all cached sessions, in bytes; pinned "
                          "versions are evicted first, then the least recently used"},
    )
    load_wait_ms: int = field(
        default=10_000,
        metadata={"help": "longest wait, in ms, of a request for a model version that another "
                          "request is loading; after it the request gets a 503 to retry"},
    )
    max_body_bytes: int = field(
        default=4 * 1024 * 1024, metadata={"help": "maximum request body size in bytes (413 above)"}
    )
    max_batch_rows: int = field(
        default=10_000, metadata={"help": "maximum rows in one prediction request (413 above)"}
    )
    intra_op_threads: int = field(
        default_factory=cpu_quota_cores,
        metadata={"help": "onnxruntime threads inside one operator, per session; "
                          "defaults to the container's CPU quota"},
    )
    inter_op_threads: int = field(
        default=1,
        metadata={"help": "onnxruntime threads running operators in parallel; sessions run "
                          "in sequential execution mode, so 1 is enough"},
    )

    source: str | None = field(
        default=None,
        metadata={"help": "kafka://host:port[,host:port]/topic[,topic]: also predict the feature "
                          "records of these topics and send the predictions to output_topic"},
    )
    output_topic: str | None = field(
        default=None, metadata={"help": "topic that receives one prediction per record of source"},
    )
    stream_dead_letter_topic: str | None = field(
        default=None,
        metadata={"help": "topic that receives the records of source that cannot be predicted, "
                          "with the reason in headers (default: count and log them only)"},
    )
    stream_group_id: str = field(
        default="streamfit-predictor",
        metadata={"help": "Kafka consumer group of the source; the offsets of predicted "
                          "records are committed to it"},
    )
    stream_model: str | None = field(
        default=None,
        metadata={"help": "predict every record of source with this model (default: the "
                          "record's 'model' field, else its message key)"},
    )
    stream_max_record_bytes: int = field(
        default=1024 * 1024,
        metadata={"help": "maximum size of one record value of source, in bytes; larger "
                          "records are rejected as too_large"},
    )
    stream_batch_records: int = field(
        default=500,
        metadata={"help": "maximum records of source read and predicted in one batch"},
    )
    store_predictions: bool = field(
        default=False,
        metadata={"help": "also keep each prediction of source in the store's predictions "
                          "collection, under the record's id, else its topic/partition/offset"},
    )
    prediction_expiry_s: int = field(
        default=DEFAULT_EXPIRY_S,
        metadata={"help": "seconds a stored prediction is kept (default: 7 days, at most 30 days)"},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.store, str) or not self.store:
            raise ConfigError(f"store: expected a store URL, got {self.store!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host: expected a host name or address, got {self.host!r}")
        _check_int("port", self.port, 0, 65535)
        _check_int("refresh_interval_ms", self.refresh_interval_ms, 10, 3_600_000)
        _check_int("cache_max_models", self.cache_max_models, 1, 1_000_000)
        _check_int("cache_max_pinned", self.cache_max_pinned, 1, 1_000_000)
        _check_int("cache_max_bytes", self.cache_max_bytes, 64 * 1024, 2**50)
        _check_int("load_wait_ms", self.load_wait_ms, 1, 3_600_000)
        _check_int("max_body_bytes", self.max_body_bytes, 1024, 1024**3)
        _check_int("max_batch_rows", self.max_batch_rows, 1, 10_000_000)
        _check_int("intra_op_threads", self.intra_op_threads, 1, 1024)
        _check_int("inter_op_threads", self.inter_op_threads, 1, 1024)
        _check_int("stream_max_record_bytes", self.stream_max_record_bytes, 64, 1024**3)
        _check_int("stream_batch_records", self.stream_batch_records, 1, 100_000)
        _check_int("prediction_expiry_s", self.prediction_expiry_s, 1, MAX_EXPIRY_S)
        if not isinstance(self.store_predictions, bool):
            raise ConfigError(f"store_predictions: expected true or false, got {self.store_predictions!r}")
        self._check_stream()

    def _check_stream(self) -> None:
        for name in ("source", "output_topic", "stream_dead_letter_topic", "stream_model"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name}: expected a non-empty string or no value, got {value!r}")
        if not isinstance(self.stream_group_id, str) or not self.stream_group_id:
            raise ConfigError(
                f"stream_group_id: expected a consumer group name, got {self.stream_group_id!r}"
            )
        if self.source is None:
            for name in ("output_topic", "stream_dead_letter_topic", "stream_model"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{name}={getattr(self, name)!r} needs a source; set source to "
                        "kafka://host:port/topic or remove the setting"
                    )
            if self.store_predictions:
                raise ConfigError(
                    "store_predictions stores the predictions of a source; set source to "
                    "kafka://host:port/topic or turn store_predictions off"
                )
            return
        source = parse_kafka_source(self.source)
        if self.output_topic is None:
            raise ConfigError(
                f"source {self.source!r} needs output_topic, the topic that receives the predictions"
            )
        for name in ("output_topic", "stream_dead_letter_topic"):
            topic = getattr(self, name)
            if topic is not None:
                check_topic_name(name, topic)
                if topic in source.topics:
                    raise ConfigError(
                        f"{name} {topic!r} is also a source topic, so the predictor would read "
                        "its own output; choose another topic"
                    )
        if self.output_topic == self.stream_dead_letter_topic:
            raise ConfigError(
                f"output_topic and stream_dead_letter_topic are both {self.output_topic!r}; "
                "send rejected records to another topic"
            )
        if self.stream_model is not None:
            try:
                validate_model_name(self.stream_model)
            except InvalidModelName as exc:
                raise ConfigError(f"stream_model: {exc}") from None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "PredictorSettings":
        """Build settings from flags, environment variables or a TOML table.

        String values (from the command line or the environment) are converted
        to the option's type. Unknown keys are rejected.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if "workers" in unknown:
            raise ConfigError(
                "workers: the predictor runs exactly one process per container, because "
                "its metrics and sessions live in that process; run more containers "
                "(replicas) instead of setting workers"
            )
        if unknown:
            raise ConfigError(
                f"unknown predictor settings {unknown}; known settings are {sorted(known)}"
            )
        converted = {}
        for key, value in values.items():
            if known[key].type in ("bool", bool) and isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ConfigError(f"{key}: expected true or false, got {value!r}")
                value = lowered in ("true", "1", "yes")
            if known[key].type in ("int", int) and isinstance(value, str):
                try:
                    value = int(value.strip())
                except ValueError:
                    raise ConfigError(
                        f"{key}: expected an integer, got {value!r}"
                    ) from None
            converted[key] = value
        return cls(**converted)

    def public_dict(self) -> dict[str, Any]:
        """Return the settings for logging, with the store URL's password masked."""
        out = dataclasses.asdict(self)
        out["store"] = mask_url_password(self.store)
        return out


def mask_url_password(url: str) -> str:
    """Return ``url`` with any ``user:password@`` password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostport}{slash}{path}"


@dataclass(frozen=True)
class KafkaSource:
    """A parsed ``kafka://host:port[,host:port]/topic[,topic]`` URL."""

    bootstrap_servers: tuple[str, ...]
    topics: tuple[str, ...]


# Kafka's own rule for topic names: at most 249 of these characters.
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def parse_kafka_source(url: str) -> KafkaSource:
    """Parse a source URL, or raise ConfigError naming the URL and the expected form."""
    expected = "expected kafka://host:port[,host:port]/topic[,topic]"
    scheme, sep, rest = url.partition("://")
    hosts, slash, topics = rest.partition("/")
    if "@" in hosts:
        # The URL is not echoed, because it may contain a password.
        raise ConfigError(
            "source: the URL contains user information (user:password@); Kafka credentials "
            "are not taken from the source URL"
        )
    if scheme != "kafka" or not sep:
        raise ConfigError(f"source {url!r}: {expected}")
    servers = tuple(h for h in hosts.split(",") if h)
    names = tuple(t for t in topics.split(",") if t)
    if not slash or not servers or not names:
        raise ConfigError(f"source {url!r}: {expected}")
    for server in servers:
        host, colon, port = server.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"source {url!r}: {server!r} is not host:port; {expected}")
    for name in names:
        check_topic_name("source", name)
    return KafkaSource(servers, names)


def check_topic_name(setting: str, topic: str) -> None:
    if not _TOPIC.fullmatch(topic) or topic in (".", ".."):
        raise ConfigError(
            f"{setting}: {topic[:80]!r} is not a Kafka topic name; use 1 to 249 ASCII letters, "
            "digits, '.', '_' or '-'"
        )


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name}: {value} is out of range; use {low} to {high}")
