"""The worker against a real Kafka broker and a SQLite store.

Each test runs the worker in a thread of the test process and stops it
through its stop event, except one that runs the ``streamfit worker``
command as a subprocess and kills it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
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

# The five messages of one partition: good, undecodable bytes, truncated
# JSON, a JSON array, good.
BAD_BYTES_STREAM = [
    b'{"features":{"x":1.0},"label":0}',
    bytes.fromhex("fffe0067617262"),
    b'{"features":{"x":',
    b"[1,2,3]",
    b'{"features":{"x":2.0},"label":1}',
]


@pytest.fixture
def store_url(tmp_path):
    return f"sqlite:///{tmp_path}/models.db"


def create_models(store_url, *names, spec=SPEC_X):
    with open_store(store_url) as store:
        for name in names:
            store.create_model(name, spec)


def produce(bootstrap, topic, messages, partition=None):
    """Send (key, value) pairs and wait until the broker acknowledged all of them."""
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value, partition=partition)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)


_admins: dict[str, KafkaAdminClient] = {}


@pytest.fixture(autouse=True)
def _close_admins():
    yield
    while _admins:
        _admins.popitem()[1].close()


def committed_offsets(bootstrap, group_id):
    """Return the group's committed offsets as {"topic/partition": offset}."""
    admin = _admins.get(bootstrap)
    if admin is None:
        admin = _admins[bootstrap] = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets({group_id: None}).get(group_id, {})
    except KafkaError as err:
        # The group coordinator is not ready right after the broker starts.
        if not err.retriable:
            raise
        return {}
    return {f"{tp.topic}/{tp.partition}": meta.offset for tp, meta in offsets.items()}


def end_offsets(bootstrap, topic, partitions):
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = consumer.end_offsets(tps)
    finally:
        consumer.close()
    return {f"{tp.topic}/{tp.partition}": offset for tp, offset in ends.items()}


def samples_learned(store_url, model):
    with open_store(store_url) as store:
        return store.version(model).samples_learned


def wait_until(predicate, description, timeout=WAIT_S, seen=None):
    """Poll ``predicate`` until it is true; ``seen()`` describes the last state on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
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

    def metric(self, name, **labels):
        return self.registry.get_sample_value(name, labels or None) or 0

    def rejected(self, reason):
        return self.metric("streamfit_worker_records_rejected_total", reason=reason)


def kafka_source(kafka_server, topic):
    return f"kafka://{kafka_server.bootstrap}/{topic}"


def test_bad_bytes_between_good_records(kafka_server, kafka_topic, store_url, caplog):
    topic = kafka_topic(1)
    create_models(store_url, "sensor")
    produce(kafka_server.bootstrap, topic, [(b"sensor", value) for value in BAD_BYTES_STREAM])
    group = f"bad-bytes-{uuid.uuid4().hex[:8]}"

    caplog.set_level(logging.WARNING, logger="worker.loop")
    worker = WorkerThread(source=kafka_source(kafka_server, topic), store=store_url, group_id=group).start()
    try:
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group).get(f"{topic}/0") == 5,
                   "the committed offset reaches the end of the partition")
    finally:
        assert worker.stop() == 0

    assert samples_learned(store_url, "sensor") == 2
    assert worker.rejected("not_utf8") == 1
    assert worker.rejected("invalid_json") == 1
    assert worker.rejected("not_object") == 1
    assert worker.metric("streamfit_worker_records_consumed_total") == 5
    assert worker.metric("streamfit_worker_records_learned_total", model="sensor") == 2
    assert committed_offsets(kafka_server.bootstrap, group) == end_offsets(kafka_server.bootstrap, topic, 1)
    with open_store(store_url) as store:
        assert store.version("sensor").offsets == {f"{topic}/0": 5}

    messages = [r.getMessage() for r in caplog.records if r.name == "worker.loop"]
    for offset, reason in [(1, "not_utf8"), (2, "invalid_json"), (3, "not_object")]:
        assert any(f"{topic}/0 offset {offset}: {reason}" in m for m in messages), (offset, reason)


# (key, value, rejection reason or None for a good record)
MIXED = [
    (b"a", b'{"features":{"x":1.0},"label":0}', None),
    (b"a", b"\xc3\x28\x00", "not_utf8"),
    (b"b", b'{"features":{"x":2.0},"label":1}', None),
    (b"a", b'"just a string"', "not_object"),
    (b"b", b'{"features":{"x":3.0}}', "missing_label"),
    (b"a", b'{"features":{"x":4.0},"label":1}', None),
    (b"b", b'{"features":[1.0,2.0],"label":0}', "wrong_width"),
    (b"a", b'{"features":{"x":NaN},"label":0}', "non_finite"),
    (b"b", b'{"features":{"x":5.0},"label":3}', "unknown_label"),
    (b"b", b'{"features":{"x":6.0},"label":0}', None),
    (b"zz", b'{"features":{"x":6.0},"label":0}', "unknown_model"),
    (None, b'{"features":{"x":6.0},"label":0}', "missing_model"),
    (b"a", b'{"features":{"x":7.0},"label":0}', None),
]


def test_mixed_bad_input_stream(kafka_server, kafka_topic, store_url):
    topic = kafka_topic(2)
    create_models(store_url, "a", "b")
    # Both models share each partition: half the records go to each.
    for i, (key, value, _) in enumerate(MIXED):
        produce(kafka_server.bootstrap, topic, [(key, value)], partition=i % 2)
    group = f"mixed-{uuid.uuid4().hex[:8]}"
    ends = end_offsets(kafka_server.bootstrap, topic, 2)

    worker = WorkerThread(
        source=kafka_source(kafka_server, topic), store=store_url, group_id=group, batch_max_records=2
    ).start()
    try:
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group) == ends,
                   "every partition is committed to its end")
    finally:
        assert worker.stop() == 0

    good = {"a": 0, "b": 0}
    for key, _, reason in MIXED:
        if reason is None:
            good[key.decode()] += 1
    assert samples_learned(store_url, "a") == good["a"]
    assert samples_learned(store_url, "b") == good["b"]
    for _, _, reason in MIXED:
        if reason is not None:
            assert worker.rejected(reason) == 1, reason
    assert worker.metric("streamfit_worker_records_consumed_total") == len(MIXED)


def test_restart_learns_nothing_twice(kafka_server, kafka_topic, store_url):
    topic = kafka_topic(1)
    create_models(store_url, "r")
    first = [(b"r", json.dumps({"features": {"x": i}, "label": i % 2}).encode()) for i in range(10)]
    produce(kafka_server.bootstrap, topic, first)
    group = f"restart-{uuid.uuid4().hex[:8]}"
    source = kafka_source(kafka_server, topic)

    worker = WorkerThread(source=source, store=store_url, group_id=group, batch_max_records=4).start()
    try:
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group).get(f"{topic}/0") == 10,
                   "the first run commits offset 10")
    finally:
        assert worker.stop() == 0
    assert samples_learned(store_url, "r") == 10
    with open_store(store_url) as store:
        version_after_first = store.version("r").version

    # A group with no committed offsets reads everything again, as after a
    # crash between publish and commit: the stored offsets skip it all.
    lost_commit = WorkerThread(source=source, store=store_url, group_id=group + "-lost").start()
    try:
        wait_until(lambda: lost_commit.metric("streamfit_worker_records_skipped_total") == 10,
                   "the re-read records are skipped")
    finally:
        assert lost_commit.stop() == 0
    assert samples_learned(store_url, "r") == 10
    with open_store(store_url) as store:
        assert store.version("r").version == version_after_first

    # The first group resumes from its committed offset and learns only the new records.
    more = [(b"r", json.dumps({"features": {"x": i}, "label": i % 2}).encode()) for i in range(10, 15)]
    produce(kafka_server.bootstrap, topic, more)
    resumed = WorkerThread(source=source, store=store_url, group_id=group).start()
    try:
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group).get(f"{topic}/0") == 15,
                   "the resumed run commits offset 15")
    finally:
        assert resumed.stop() == 0
    assert resumed.metric("streamfit_worker_records_consumed_total") == 5
    assert resumed.metric("streamfit_worker_records_skipped_total") == 0
    assert samples_learned(store_url, "r") == 15


def test_dead_letters_carry_reason(kafka_server, kafka_topic, store_url):
    topic = kafka_topic(1)
    dead = kafka_topic(1)
    create_models(store_url, "sensor")
    produce(kafka_server.bootstrap, topic, [(b"sensor", value) for value in BAD_BYTES_STREAM])
    group = f"dlq-{uuid.uuid4().hex[:8]}"

    worker = WorkerThread(
        source=kafka_source(kafka_server, topic), store=store_url, group_id=group, dead_letter_topic=dead
    ).start()
    try:
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group).get(f"{topic}/0") == 5,
                   "the committed offset reaches the end of the partition")
    finally:
        assert worker.stop() == 0
    assert worker.metric("streamfit_worker_dead_letters_total") == 3

    consumer = KafkaConsumer(
        dead, bootstrap_servers=kafka_server.bootstrap, auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
    )
    try:
        letters = [record for _, record in zip(range(3), consumer)]
    finally:
        consumer.close()
    assert [r.value for r in letters] == BAD_BYTES_STREAM[1:4]
    headers = [dict(r.headers) for r in letters]
    assert [h["streamfit.reason"] for h in headers] == [b"not_utf8", b"invalid_json", b"not_object"]
    assert [h["streamfit.offset"] for h in headers] == [b"1", b"2", b"3"]
    assert all(h["streamfit.source"] == f"{topic}/0".encode() for h in headers)
    assert all(r.key == b"sensor" for r in letters)


def test_rebalance_drops_unpublished_buffers(kafka_server, kafka_topic, store_url, caplog):
    topic = kafka_topic(4)
    models = ["m0", "m1", "m2", "m3"]
    create_models(store_url, *models)
    group = f"pair-{uuid.uuid4().hex[:8]}"
    source = kafka_source(kafka_server, topic)

    def produce_range(start, stop):
        # Model i's records go to partition i, so every partition has records.
        for partition, model in enumerate(models):
            produce(kafka_server.bootstrap, topic, [
                (model.encode(), json.dumps({"features": {"x": i}, "label": i % 2}).encode())
                for i in range(start, stop)
            ], partition=partition)

    caplog.set_level(logging.INFO, logger="worker.loop")
    # The first worker keeps its records buffered for 5 s, and its short
    # heartbeat interval makes it see the second member join well before that.
    first = WorkerThread(
        source=source, store=store_url, group_id=group, batch_max_wait_ms=5000,
        kafka_options={"heartbeat_interval_ms": 300},
    ).start()
    produce_range(0, 20)
    wait_until(lambda: first.metric("streamfit_worker_records_buffered") == 80,
               "the first worker buffers all 80 records")
    second = WorkerThread(source=source, store=store_url, group_id=group, batch_max_records=5).start()
    produce_range(20, 40)
    ends = end_offsets(kafka_server.bootstrap, topic, 4)
    try:
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group) == ends,
                   f"every partition is committed to its end {ends}",
                   seen=lambda: (committed_offsets(kafka_server.bootstrap, group),
                                 [(w.metric("streamfit_worker_records_consumed_total"),
                                   w.metric("streamfit_worker_records_buffered"),
                                   w.metric("streamfit_worker_records_skipped_total")) for w in (first, second)]))
    finally:
        assert first.stop() == 0
        assert second.stop() == 0

    messages = [r.getMessage() for r in caplog.records if r.name == "worker.loop"]
    assert any(m.startswith("Dropped ") and " buffered " in m and "revoked" in m for m in messages), \
        "the first worker never dropped its buffered records on revocation"
    for model in models:
        assert samples_learned(store_url, model) == 40, model
    learned = sum(
        w.metric("streamfit_worker_records_learned_total", model=m) for w in (first, second) for m in models
    )
    assert learned == 160


@pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL and SIGTERM")
def test_cli_worker_killed_and_restarted(kafka_server, kafka_topic, store_url, tmp_path):
    topic = kafka_topic(1)
    create_models(store_url, "cli")
    produce(kafka_server.bootstrap, topic, [
        (b"cli", json.dumps({"features": {"x": i}, "label": i % 2}).encode()) for i in range(30)
    ])
    group = f"cli-{uuid.uuid4().hex[:8]}"
    command = [
        sys.executable, "-c", "import sys; from streamfit.cli import main; sys.exit(main())",
        "worker", "--source", kafka_source(kafka_server, topic), "--store", store_url,
        "--group-id", group, "--metrics-port", "0", "--batch-max-records", "10",
        "--batch-max-wait-ms", "100",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    # SIGKILL as soon as a version is published: the commit may or may not
    # have happened, which is the crash this design must survive.
    first_log = tmp_path / "first.log"
    with first_log.open("w") as log_file:
        killed = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=log_file)
    try:
        wait_until(lambda: _latest_version(store_url, "cli") >= 1, "the first version is published")
    finally:
        killed.kill()
        killed.wait(30)

    second_log = tmp_path / "second.log"
    with second_log.open("w") as log_file:
        worker = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=log_file)
    try:
        # SIGTERM before the handlers are installed would kill it outright.
        wait_until(lambda: "Worker started" in second_log.read_text(), "the restarted worker starts")
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group).get(f"{topic}/0") == 30,
                   "the restarted worker commits offset 30")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    stderr = second_log.read_text()
    assert worker.returncode == 0, stderr[-2000:]
    assert "Worker stopped" in stderr
    assert samples_learned(store_url, "cli") == 30


def _latest_version(store_url, model):
    with open_store(store_url) as store:
        return store.head(model).latest
