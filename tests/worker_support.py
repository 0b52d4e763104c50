"""Helpers for the worker tests: producing, reading group offsets, running workers, auditing versions."""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from modelstore import open_store
from worker.loop import run
from worker.settings import WorkerSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 60

SPEC_X = {
    "estimator": "SGDClassifier",
    "params": {"loss": "log_loss"},
    "features": [{"name": "x"}],
    "labels": [0, 1],
}


# kafka-python 3.0.12 does not close a socket whose connect() fails
# (kafka/net/inet.py, sock_connect), so every reconnect attempt to a stopped
# broker leaves a socket for the garbage collector, which warns about it.
IGNORE_UNCLOSED_SOCKETS = pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")


@pytest.fixture
def collect_sockets():
    """Let the sockets of failed broker connections be collected during the test.

    kafka-python logs each failed connection with its exception, whose
    traceback keeps the socket alive. pytest keeps captured log records
    until the test ends, so the socket would be collected during a later
    test, outside this test's warning filters. Raising the level of the
    ``kafka`` loggers to CRITICAL means such records are never created.
    """
    kafka_logger = logging.getLogger("kafka")
    level = kafka_logger.level
    kafka_logger.setLevel(logging.CRITICAL)
    try:
        yield
        gc.collect()
        # A few such sockets stay referenced from outside the garbage
        # collector's view until later. Closing the never-connected ones now
        # keeps their warnings out of other tests.
        for obj in gc.get_objects():
            if type(obj) is socket.socket and obj.fileno() != -1 and _never_connected(obj):
                obj.close()
    finally:
        kafka_logger.setLevel(level)


def _never_connected(sock: socket.socket) -> bool:
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return False
    try:
        sock.getpeername()
    except OSError:
        return True
    return False


def create_models(store_url, *names, spec=SPEC_X):
    with open_store(store_url) as store:
        for name in names:
            store.create_model(name, spec)


def record_x(i: int) -> bytes:
    return json.dumps({"features": {"x": i % 17}, "label": i % 2}).encode()


def produce(bootstrap, topic, messages, partition=None, **options):
    """Send (key, value) pairs and wait until the broker acknowledged all of them."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, **options)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value, partition=partition)
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)


def create_topic(bootstrap, partitions=1, prefix="t", configs=None) -> str:
    """Create a uniquely named topic with topic-level ``configs`` (kafka_topic cannot set them)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics(
            [NewTopic(name, partitions, 1, topic_configs=configs or {})], wait_for_metadata=True
        )
    finally:
        admin.close()
    return name


def committed_offsets(bootstrap, group_id) -> dict[str, int]:
    """Return the group's committed offsets as {"topic/partition": offset}; {} while the broker is not ready."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    except KafkaError:
        return {}
    try:
        offsets = admin.list_group_offsets({group_id: None}).get(group_id, {})
    except KafkaError as err:
        # The group coordinator is not ready right after the broker starts.
        if not err.retriable:
            raise
        return {}
    finally:
        admin.close()
    return {f"{tp.topic}/{tp.partition}": meta.offset for tp, meta in offsets.items()}


def end_offsets(bootstrap, topic, partitions) -> dict[str, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
    finally:
        consumer.close()
    return {f"{tp.topic}/{tp.partition}": offset for tp, offset in ends.items()}


def samples_learned(store_url, model) -> int:
    with open_store(store_url) as store:
        return store.version(model).samples_learned


def wait_until(predicate, description, timeout=WAIT_S, seen=None):
    """Poll ``predicate`` until it returns a true value, which is returned; ``seen()`` describes the last state on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    last = f"; last seen: {seen()}" if seen is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting until {description}{last}")


class WorkerThread:
    """Runs ``worker.loop.run`` in a thread; ``stop()`` returns its exit code."""

    def __init__(self, **mapping):
        mapping.setdefault("metrics_port", 0)
        mapping.setdefault("batch_max_wait_ms", 200)
        mapping.setdefault("poll_timeout_ms", 200)
        self.settings = WorkerSettings.from_mapping(mapping)
        self.registry = CollectorRegistry()
        self.stop_event = threading.Event()
        self.exit_code = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.exit_code = run(self.settings, stop=self.stop_event, registry=self.registry)

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout=WAIT_S):
        self.stop_event.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the worker did not stop"
        return self.exit_code

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def metric(self, name, **labels):
        return self.registry.get_sample_value(name, labels or None) or 0

    def rejected(self, reason):
        return self.metric("streamfit_worker_records_rejected_total", reason=reason)


def kafka_source(bootstrap, topic):
    return f"kafka://{bootstrap}/{topic}"


@functools.cache
def flights_values(count: int) -> tuple[bytes, ...]:
    """The first ``count`` flights records as message values, in departure order."""
    from streamfit.flights import iter_json_lines, read_flights

    return tuple(line.encode() for line in iter_json_lines(read_flights(limit=count)))


def produce_flights(bootstrap, topic, values, start=0):
    """Send flights values keyed by their position, so they spread over all partitions."""
    produce(bootstrap, topic, [(str(start + i).encode(), v) for i, v in enumerate(values)], linger_ms=5)


def audit_versions(store_url, model) -> Any:
    """Check that every version learned exactly the records between its parent's stored offsets and its own.

    Holds for a model that learns every record of its partitions (no
    rejections, no other model on them). A record learned twice makes some
    version's sample count grow by more than its offsets moved, and a
    record skipped makes it grow by less. Returns the latest version.
    """
    with open_store(store_url) as store:
        versions = sorted(store.versions(model), key=lambda info: info.version)
    assert [info.version for info in versions] == list(range(versions[0].version, versions[-1].version + 1))
    for parent, child in zip(versions, versions[1:]):
        moved = 0
        for partition, offset in child.offsets.items():
            before = parent.offsets.get(partition, 0)
            assert offset >= before, (child.version, partition, before, offset)
            moved += offset - before
        learned = child.samples_learned - parent.samples_learned
        assert learned == moved, (
            f"version {child.version} learned {learned} records but its offsets moved by {moved}: "
            f"{parent.offsets} -> {child.offsets}"
        )
    return versions[-1]


def couchbase_url(gocaves_server, prefix: str) -> str:
    scope = f"{prefix}_{uuid.uuid4().hex[:8]}"
    return f"{gocaves_server.connstr}/{gocaves_server.bucket}?scope={scope}"


# Code run by a worker subprocess before the streamfit command: it slows every
# refit by STREAMFIT_TEST_REFIT_DELAY_S seconds. It lives in the tests only.
SLOW_REFIT_PRELUDE = """
import os, sys, time
import trainer.refit
_refit = trainer.refit.Trainer.refit
def _slow_refit(self, model, batch):
    time.sleep(float(os.environ["STREAMFIT_TEST_REFIT_DELAY_S"]))
    return _refit(self, model, batch)
trainer.refit.Trainer.refit = _slow_refit
"""


def start_worker_process(args: list[str], log_path: Path, env: dict[str, str] | None = None,
                         refit_delay_s: float | None = None) -> subprocess.Popen:
    """Start ``streamfit worker ARGS`` as a subprocess writing to ``log_path``."""
    prelude = SLOW_REFIT_PRELUDE if refit_delay_s is not None else ""
    code = prelude + "\nfrom streamfit.cli import main\nsys.exit(main())\n"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    if refit_delay_s is not None:
        environment["STREAMFIT_TEST_REFIT_DELAY_S"] = str(refit_delay_s)
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", "import sys\n" + code, "worker", *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment,
        )


def stop_process(process: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM the process and wait for its exit code; SIGKILL it if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"process {process.pid} did not exit {timeout_s} s after SIGTERM")
    return process.returncode


def log_contains(path: Path, text: str) -> Callable[[], bool]:
    return lambda: text in path.read_text(errors="replace")
