"""Send a file of records to a Kafka topic, one message per record."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Iterator

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaTimeoutError, TopicAlreadyExistsError

from modelstore.errors import ConfigError

log = logging.getLogger(__name__)


def produce_file(
    path: str,
    topic: str,
    bootstrap_servers: str,
    *,
    key_field: str | None = "id",
    limit: int | None = None,
    partitions: int | None = None,
    replication_factor: int = 1,
) -> int:
    """Send each record of a JSON-lines or CSV file to ``topic``; return the count.

    JSON lines are sent byte for byte, even when a line is not valid JSON,
    so a bad line reaches the worker and is rejected there with a reason.
    A CSV row becomes ``{"features": {...}, "label": ...}`` with the
    ``label`` column as the label. The key is the record's ``key_field``.
    With ``partitions``, the topic is created with that many partitions when
    it does not exist.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"input file {path!r} not found")
    if partitions is not None:
        create_topic(bootstrap_servers, topic, partitions, replication_factor)

    # The default 16 KiB batches keep each partition's records in small
    # record batches, as a live feed would produce them; a consumer then
    # interleaves partitions finely instead of returning thousands of one
    # partition's records before the next.
    producer = KafkaProducer(
        bootstrap_servers=bootstrap_servers.split(","), acks="all", linger_ms=5, max_block_ms=15_000
    )
    sent = 0
    try:
        for key, value in _messages(file, key_field):
            if limit is not None and sent >= limit:
                break
            producer.send(topic, key=key, value=value)
            sent += 1
        producer.flush()
    except KafkaTimeoutError:
        raise ConfigError(
            f"topic {topic!r} not found on {bootstrap_servers} within 15 s; create it, "
            "for example with --partitions 3, or check the bootstrap servers"
        ) from None
    finally:
        producer.close()
    log.info("sent %s records from %s to topic %s", sent, path, topic)
    return sent


def create_topic(bootstrap_servers: str, topic: str, partitions: int, replication_factor: int = 1) -> bool:
    """Create ``topic``; return False if it already exists."""
    if partitions < 1 or replication_factor < 1:
        raise ConfigError(
            f"invalid partitions {partitions} or replication factor {replication_factor}: "
            "expected 1 or more"
        )
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers.split(","))
    try:
        admin.create_topics([NewTopic(topic, partitions, replication_factor)])
    except TopicAlreadyExistsError:
        return False
    finally:
        admin.close()
    log.info("created topic %s with %s partitions", topic, partitions)
    return True


def _messages(file: Path, key_field: str | None) -> Iterator[tuple[bytes | None, bytes]]:
    if file.suffix.lower() == ".csv":
        yield from _csv_messages(file, key_field)
        return
    with file.open("rb") as f:
        for line in f:
            line = line.rstrip(b"\r\n")
            if line:
                yield _key_of(line, key_field), line


def _key_of(line: bytes, key_field: str | None) -> bytes | None:
    if key_field is None:
        return None
    try:
        value = json.loads(line).get(key_field)
    except (ValueError, AttributeError):
        return None  # A bad line is still sent; the worker rejects it with a reason.
    return None if value is None else str(value).encode()


def _csv_messages(file: Path, key_field: str | None) -> Iterator[tuple[bytes | None, bytes]]:
    with file.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            label = row.pop("label", None)
            key = row.pop(key_field, None) if key_field else None
            record = {"features": {k: _number_or_text(v) for k, v in row.items()}, "label": _number_or_text(label)}
            yield (key.encode() if key else None), json.dumps(record).encode()


def _number_or_text(value: str | None):
    if value is None or value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
