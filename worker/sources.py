"""Record sources of the worker: a Kafka consumer group, or a CSV / JSON-lines file.

Both yield SourceRecord objects with a partition name and an offset, so that
the versions' stored offsets (``{"topic/partition": next_offset}``) resume a
file exactly like a topic. A file is one partition named
``file:<file name>/0`` whose offsets are 0-based line numbers (JSON lines) or
data-row numbers after the header (CSV).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata, TopicPartition

from modelstore.errors import ConfigError, RecordRejected
from worker.settings import FileSourceConfig, KafkaSourceConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceRecord:
    """One record as read, before decoding.

    ``rejection`` is set when the source itself found the record unusable
    (for example a CSV row with the wrong number of cells).
    """

    partition: str
    offset: int
    key: bytes | None
    value: bytes | None
    rejection: RecordRejected | None = None


class PartitionHandler(Protocol):
    """Callbacks that a source invokes when the consumer group moves partitions."""

    def partitions_assigned(self, partitions: list[str]) -> dict[str, int]:
        """Return offsets to seek to before fetching from the assigned partitions."""

    def partitions_revoked(self, partitions: list[str]) -> dict[str, int]:
        """Drop the partitions' buffers and return the offsets that may still be committed."""

    def partitions_lost(self, partitions: list[str]) -> None: ...

    def revoke_commit_done(self, offsets: dict[str, int], error: Exception | None) -> None: ...


class CommitFailed(Exception):
    """An offset commit did not complete; the cause is chained."""


def partition_name(topic: str, partition: int) -> str:
    return f"{topic}/{partition}"


def topic_partition(name: str) -> TopicPartition:
    topic, _, number = name.rpartition("/")
    return TopicPartition(topic, int(number))


class KafkaSource:
    """A consumer in a group, with auto-commit off and manual commits after publishes."""

    at_end = False

    def __init__(
        self,
        config: KafkaSourceConfig,
        *,
        group_id: str,
        options: Mapping[str, Any],
        handler: PartitionHandler,
        commit_timeout_ms: int,
    ):
        self._commit_timeout_ms = commit_timeout_ms
        self._consumer = KafkaConsumer(
            bootstrap_servers=list(config.bootstrap_servers),
            group_id=group_id,
            # Offsets are committed only after the version holding the
            # records is published, never on a timer.
            enable_auto_commit=False,
            # A new group starts at the beginning; the stored offsets of each
            # model skip what was already learned.
            auto_offset_reset="earliest",
            **options,
        )
        # The topics' metadata is loaded before joining the group, so that
        # the first assignment already covers every partition and the
        # metadata's arrival does not force a second rebalance at once.
        for topic in config.topics:
            if not self._consumer.partitions_for_topic(topic):
                log.warning(
                    "Topic %s has no partitions on %s; it may not exist yet, and its partitions "
                    "are assigned once it does",
                    topic, ",".join(config.bootstrap_servers),
                )
        self._consumer.subscribe(
            topics=list(config.topics), listener=_RebalanceListener(self._consumer, handler)
        )
        log.info(
            "Subscribed to topics %s on %s as group %s",
            ",".join(config.topics), ",".join(config.bootstrap_servers), group_id,
        )

    def poll(self, timeout_ms: int) -> list[SourceRecord]:
        self._finish_stuck_rebalance()
        batches = self._consumer.poll(timeout_ms=timeout_ms)
        out = []
        for tp, records in batches.items():
            name = partition_name(tp.topic, tp.partition)
            for record in records:
                out.append(SourceRecord(name, record.offset, record.key, record.value))
        return out

    def _finish_stuck_rebalance(self) -> None:
        """Restart a rebalance that kafka-python 3.0.12 left unfinished.

        A rebalance the client starts on a metadata change stops counting as
        needed once the leader computes the assignment. When the poll times
        out before the SyncGroup response, no later poll completes it, every
        commit fails with RebalanceInProgressError and the session expires.
        """
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is None or not coordinator.rebalance_in_progress() or coordinator.need_rejoin():
            return
        log.warning("The consumer group's rebalance stopped before it finished; joining the group again")
        coordinator.request_rejoin()

    def commit(self, offsets: Mapping[str, int]) -> dict[str, int]:
        """Commit ``offsets`` of partitions still assigned; return what was committed.

        Raises CommitFailed when the broker rejects the commit or it times out.
        """
        assigned = self._consumer.assignment()
        request = {}
        committed = {}
        for name, offset in offsets.items():
            tp = topic_partition(name)
            if tp in assigned:
                request[tp] = OffsetAndMetadata(offset, "", -1)
                committed[name] = offset
        if not request:
            return {}
        try:
            self._consumer.commit(request, timeout_ms=self._commit_timeout_ms)
        except Exception as err:
            raise CommitFailed(f"commit of {committed} failed: {err!r}") from err
        return committed

    def pause(self) -> None:
        """Stop fetching from every assigned partition, including ones assigned since the last call."""
        unpaused = self._consumer.assignment() - self._consumer.paused()
        if unpaused:
            self._consumer.pause(*unpaused)

    def resume(self) -> None:
        paused = self._consumer.paused()
        if paused:
            self._consumer.resume(*paused)

    def highwaters(self) -> dict[str, int]:
        """Return the log end offset of each assigned partition, as seen in the last fetch."""
        out = {}
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                out[partition_name(tp.topic, tp.partition)] = highwater
        return out

    def connection_count(self) -> float | None:
        """Return the number of open broker connections, from kafka-python's own metrics."""
        metrics = self._consumer.metrics()
        return metrics.get("consumer-metrics", {}).get("connection-count")

    def close(self) -> None:
        # close() runs the revocation callback, which commits what is
        # committable, and then leaves the group so partitions move at once.
        self._consumer.close(autocommit=False, timeout_ms=self._commit_timeout_ms)


class _RebalanceListener(AsyncConsumerRebalanceListener):
    # kafka-python 3.0 runs rebalance callbacks on its IO thread, where a
    # blocking consumer.commit() raises RuntimeError, so the revocation commit
    # awaits commit_async() instead. The worker's main thread is inside
    # poll() or close() while these callbacks run.

    def __init__(self, consumer: KafkaConsumer, handler: PartitionHandler):
        self._consumer = consumer
        self._handler = handler

    async def on_partitions_revoked(self, revoked):
        names = sorted(partition_name(tp.topic, tp.partition) for tp in revoked)
        log.info("Partitions revoked: %s", ",".join(names) or "none")
        offsets = self._handler.partitions_revoked(names)
        if not offsets:
            return
        request = {topic_partition(n): OffsetAndMetadata(o, "", -1) for n, o in offsets.items()}
        try:
            # NOTE: bounded by the consumer's request_timeout_ms, not by commit_timeout_ms.
            await self._consumer.commit_async(request)
        except Exception as err:  # any failure only means the next owner re-reads and skips
            self._handler.revoke_commit_done(offsets, err)
        else:
            self._handler.revoke_commit_done(offsets, None)

    async def on_partitions_assigned(self, assigned):
        names = sorted(partition_name(tp.topic, tp.partition) for tp in assigned)
        log.info("Partitions assigned: %s", ",".join(names) or "none")
        seeks = self._handler.partitions_assigned(names)
        for name, offset in seeks.items():
            # seek() only sets the local fetch position, so it is safe on the IO thread.
            self._consumer.seek(topic_partition(name), offset)
        if seeks:
            log.info("Resuming kept partitions at the first unpublished record: %s", seeks)

    async def on_partitions_lost(self, lost):
        names = sorted(partition_name(tp.topic, tp.partition) for tp in lost)
        log.warning(
            "Partitions lost (group membership expired): %s; their buffered records are "
            "dropped and will be read again by the next owner",
            ",".join(names),
        )
        self._handler.partitions_lost(names)


_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
# Exported data writes missing or broken numbers as these words; parsing them
# as floats lets the decoder reject them as non-finite instead of as strings.
_NON_FINITE_WORDS = {"nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


def parse_cell(cell: str) -> Any:
    """Return a CSV cell as an int or float when it looks numeric, else as the string."""
    text = cell.strip()
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text) or text.lower() in _NON_FINITE_WORDS:
        return float(text)
    return cell


class FileSource:
    """Reads a CSV or JSON-lines file once, as one partition."""

    def __init__(self, config: FileSourceConfig, *, label_column: str = "label", max_records: int = 500):
        self.partition = f"file:{os.path.basename(config.path)}/0"
        self.at_end = False
        self._paused = False
        self._max_records = max_records
        self._label_column = label_column
        self._offset = 0
        try:
            # surrogateescape keeps undecodable bytes visible, so one bad line
            # is rejected as not UTF-8 instead of ending the whole file.
            self._file = open(config.path, encoding="utf-8", errors="surrogateescape", newline="")
        except OSError as err:
            raise ConfigError(f"cannot open source file {config.path!r}: {err.strerror}") from None
        self._format = config.format
        self._header: list[str] | None = None
        if config.format == "csv":
            self._rows = csv.reader(self._file)
            try:
                self._read_header(config.path)
            except ConfigError:
                self._file.close()
                raise
        log.info("Reading %s as %s partition %s", config.path, config.format, self.partition)

    def _read_header(self, path: str) -> None:
        try:
            header = next(self._rows)
        except StopIteration:
            self.at_end = True
            return
        header = [name.strip() for name in header]
        if self._label_column not in header:
            raise ConfigError(
                f"CSV file {path!r} has no column {self._label_column!r} for the label; "
                f"its columns are {header}; set label_column to the label's column"
            )
        self._header = header

    def poll(self, timeout_ms: int = 0) -> list[SourceRecord]:
        if self.at_end or self._paused:
            # Nothing to read: wait like a consumer poll would, so the loop
            # does not spin while it backs off or idles after the end.
            time.sleep(timeout_ms / 1000)
            return []
        out: list[SourceRecord] = []
        while not self.at_end and len(out) < self._max_records:
            record = self._next_csv() if self._format == "csv" else self._next_line()
            if record is None:
                self.at_end = True
            else:
                out.append(record)
        return out

    def _next_line(self) -> SourceRecord | None:
        line = self._file.readline()
        if not line:
            return None
        offset = self._offset
        self._offset += 1
        value = line.rstrip("\r\n").encode("utf-8", errors="surrogateescape")
        return SourceRecord(self.partition, offset, None, value)

    def _next_csv(self) -> SourceRecord | None:
        if self._header is None:
            return None
        try:
            cells = next(self._rows)
        except StopIteration:
            return None
        except csv.Error as err:
            # The reader cannot recover its position inside a broken quoted
            # cell, so the rest of the file is not read.
            log.error("CSV file %s is malformed after row %d: %s", self.partition, self._offset, err)
            return None
        offset = self._offset
        self._offset += 1
        try:
            value = self._csv_value(cells)
        except RecordRejected as rejection:
            return SourceRecord(self.partition, offset, None, None, rejection)
        return SourceRecord(self.partition, offset, None, value)

    def _csv_value(self, cells: list[str]) -> bytes:
        header = self._header or []
        if len(cells) != len(header):
            raise RecordRejected(
                "wrong_width", f"the row has {len(cells)} cells, the header has {len(header)}"
            )
        features: dict[str, Any] = {}
        record: dict[str, Any] = {"features": features}
        for name, cell in zip(header, cells):
            if _has_surrogates(cell):
                raise RecordRejected("not_utf8", f"column {name!r} is not UTF-8")
            if cell.strip() == "":
                continue
            if name == self._label_column:
                record["label"] = parse_cell(cell)
            elif name == "model":
                record["model"] = cell.strip()
            else:
                features[name] = parse_cell(cell)
        return json.dumps(record).encode("utf-8")

    def commit(self, offsets: Mapping[str, int]) -> dict[str, int]:
        # A file has no group to commit to; the versions' stored offsets are
        # what resumes it.
        return dict(offsets)

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def highwaters(self) -> dict[str, int]:
        # A file's length is not known before it is read to the end.
        return {}

    def connection_count(self) -> float | None:
        return None

    def close(self) -> None:
        self._file.close()


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def open_source(settings, handler: PartitionHandler) -> KafkaSource | FileSource:
    """Open the source named by ``settings.source``."""
    config = settings.parsed_source()
    if isinstance(config, KafkaSourceConfig):
        return KafkaSource(
            config,
            group_id=settings.group_id,
            options=settings.consumer_options(),
            handler=handler,
            commit_timeout_ms=settings.commit_timeout_ms,
        )
    return FileSource(config, label_column=settings.label_column)
