"""Options the worker passes to kafka-python: checks, secrets and the assignment strategy.

``kafka_options`` takes KafkaConsumer options (kafka-python 3.0) by name, for
example ``security_protocol``, ``ssl_cafile`` or ``sasl_mechanism``. Any
string option can instead be read from an environment variable or a file by
adding ``_env`` or ``_file`` to its name::

    [worker.kafka_options]
    security_protocol = "SASL_SSL"
    sasl_mechanism = "SCRAM-SHA-512"
    sasl_plain_username = "worker"
    sasl_plain_password_file = "/run/secrets/kafka-password"

The values of secret options never appear in an error message or a
settings repr, and ``worker.redaction`` masks them in every log record,
including kafka-python's own DEBUG request logs.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from kafka import KafkaConsumer
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

from modelstore.errors import ConfigError

# The worker sets these consumer options itself, because its delivery
# guarantee depends on them: offsets are committed by hand after a publish,
# and values reach the decoder as raw bytes.
RESERVED_OPTIONS = frozenset(
    {
        "bootstrap_servers",
        "group_id",
        "enable_auto_commit",
        "key_deserializer",
        "value_deserializer",
        "auto_offset_reset",
    }
)

# Options whose value is a password, or may embed one (a proxy URL with
# user:password). Their values are masked wherever settings are shown.
SECRET_OPTIONS = frozenset({"sasl_plain_password", "ssl_password", "proxy_url"})

INDIRECT_SUFFIXES = ("_env", "_file")

ASSIGNORS = {
    "cooperative-sticky": CooperativeStickyAssignor,
    "sticky": StickyPartitionAssignor,
    "range": RangePartitionAssignor,
    "roundrobin": RoundRobinPartitionAssignor,
}

# Fetching at most 16 KiB per partition (kafka-python's default is 1 MiB)
# makes poll() alternate between partitions every hundred records or so, so a
# model whose records are spread over partitions learns them close to their
# production order. Test-then-train learning on a drifting stream depends on
# that order. The cooperative-sticky assignor (KIP-429) revokes only the
# partitions that move to another member, so a rebalance does not drop the
# buffered records of the partitions a worker keeps. Both can be changed in
# kafka_options.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "max_partition_fetch_bytes": 16 * 1024,
    "partition_assignment_strategy": ["cooperative-sticky"],
}

MASK = "***"


def base_name(key: str) -> str:
    """Return the option a key sets: ``sasl_plain_password_file`` sets ``sasl_plain_password``."""
    for suffix in INDIRECT_SUFFIXES:
        if key.endswith(suffix) and key[: -len(suffix)] in KafkaConsumer.DEFAULT_CONFIG:
            return key[: -len(suffix)]
    return key


def check_options(options: Any) -> None:
    """Raise ConfigError for a key kafka-python does not know, a reserved key or an unreadable secret."""
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"invalid kafka_options of type {type(options).__name__}: expected a table of "
            "KafkaConsumer options"
        )
    seen: dict[str, str] = {}
    for key in options:
        name = base_name(key)
        if name in RESERVED_OPTIONS:
            raise ConfigError(
                f"kafka_options.{key} cannot be set: the worker sets it itself "
                "(use the source URL for brokers and the group_id setting for the group)"
            )
        if name not in KafkaConsumer.DEFAULT_CONFIG:
            raise ConfigError(
                f"unknown kafka_options key {key!r}: it is not a KafkaConsumer option "
                "of kafka-python 3.0, nor one with _env or _file added"
            )
        if name in seen:
            raise ConfigError(
                f"kafka_options sets {name} twice, as {seen[name]} and as {key}; keep one of them"
            )
        seen[name] = key
    _check_assignors(options.get("partition_assignment_strategy"))
    # Reading the secrets now makes a missing variable or file fail at start-up.
    resolve_options(options)


def resolve_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Return the consumer options with defaults applied and ``_env`` / ``_file`` values read."""
    resolved = dict(CONSUMER_DEFAULTS)
    for key, value in options.items():
        name = base_name(key)
        if key.endswith("_env") and name != key:
            resolved[name] = _from_env(key, value)
        elif key.endswith("_file") and name != key:
            resolved[name] = _from_file(key, value)
        else:
            resolved[name] = value
    names = resolved.get("partition_assignment_strategy")
    if names and all(isinstance(n, str) for n in names):
        resolved["partition_assignment_strategy"] = tuple(ASSIGNORS[n] for n in names)
    return resolved


def secret_values(options: Mapping[str, Any]) -> list[str]:
    """Return the values of the secret options among resolved ``options``."""
    return [value for key, value in options.items() if key in SECRET_OPTIONS and isinstance(value, str)]


def masked(options: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``options`` with the values of secret options replaced by a mask, for display."""
    return {key: MASK if key in SECRET_OPTIONS else value for key, value in options.items()}


def _from_env(key: str, variable: Any) -> str:
    if not isinstance(variable, str) or not variable:
        raise ConfigError(f"invalid kafka_options.{key}: expected the name of an environment variable")
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(
            f"kafka_options.{key} names the environment variable {variable}, which is not set "
            "or empty; set it before starting the worker"
        )
    return value


def _from_file(key: str, path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"invalid kafka_options.{key}: expected the path of a file")
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read()
    except OSError as err:
        raise ConfigError(f"kafka_options.{key}: cannot read {path!r}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"kafka_options.{key}: {path!r} is not UTF-8 text") from None
    # Secret files written by editors and orchestrators end with a newline
    # that is not part of the secret.
    value = value.rstrip("\r\n")
    if not value:
        raise ConfigError(f"kafka_options.{key}: {path!r} is empty")
    return value


def _check_assignors(names: Any) -> None:
    if names is None:
        return
    valid = isinstance(names, (list, tuple)) and names and all(n in ASSIGNORS for n in names)
    if not valid:
        raise ConfigError(
            f"invalid kafka_options.partition_assignment_strategy {names!r}: expected a list "
            f"of names from {sorted(ASSIGNORS)}"
        )
    cooperative = {n == "cooperative-sticky" for n in names}
    if len(cooperative) > 1:
        raise ConfigError(
            f"invalid kafka_options.partition_assignment_strategy {names!r}: kafka-python "
            "cannot mix cooperative-sticky with eager assignors; list one kind only"
        )
