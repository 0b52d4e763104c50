"""Workers in consumer groups: long refits, revoked and lost partitions, two writers of one model.

Workers run against the real Kafka broker, in threads of the test process
(so a test can slow a refit down with monkeypatch) or as ``streamfit
worker`` subprocesses (so a test can freeze one with SIGSTOP).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
import uuid

import httpx
import pytest

import modelstore.sqlite
from trainer.refit import Trainer
from worker_support import (
    WorkerThread,
    audit_versions,
    committed_offsets,
    create_models,
    end_offsets,
    kafka_source,
    produce,
    record_x,
    samples_learned,
    start_worker_process,
    stop_process,
    wait_until,
)


@pytest.fixture
def store_url(tmp_path):
    return f"sqlite:///{tmp_path}/models.db"


def produce_per_partition(bootstrap, topic, models, start, stop):
    # Model i's records go to partition i, so every partition has records.
    for partition, model in enumerate(models):
        produce(bootstrap, topic, [(model.encode(), record_x(i)) for i in range(start, stop)], partition=partition)


def test_long_refit_keeps_membership(kafka_server, kafka_topic, store_url, monkeypatch, caplog):
    topic = kafka_topic(1)
    create_models(store_url, "slow")
    produce(kafka_server.bootstrap, topic, [(b"slow", record_x(i)) for i in range(20)])
    group = f"long-refit-{uuid.uuid4().hex[:8]}"

    # The first refit takes 15 s, longer than max_poll_interval_ms (10 s).
    refit_started = threading.Event()
    delays = [15.0]
    original = Trainer.refit

    def slow_refit(self, model, batch):
        if delays:
            refit_started.set()
            time.sleep(delays.pop())
        return original(self, model, batch)

    monkeypatch.setattr(Trainer, "refit", slow_refit)
    caplog.set_level(logging.INFO)
    worker = WorkerThread(
        source=kafka_source(kafka_server.bootstrap, topic), store=store_url, group_id=group,
        batch_max_records=20,
        kafka_options={"max_poll_interval_ms": 10_000, "session_timeout_ms": 10_000,
                       "heartbeat_interval_ms": 1000},
    ).start()
    try:
        assert refit_started.wait(60), "the first refit never started"
        produce(kafka_server.bootstrap, topic, [(b"slow", record_x(i)) for i in range(20, 40)])
        # The loop keeps polling during the refit, so the next records are read meanwhile.
        wait_until(lambda: worker.metric("streamfit_worker_records_consumed_total") == 40,
                   "the records produced during the slow refit are read")
        assert samples_learned(store_url, "slow") == 0, "the slow refit finished too early to prove anything"
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group).get(f"{topic}/0") == 40,
                   "the committed offset reaches 40", timeout=90)
        before_stop = [r.getMessage() for r in caplog.records]
    finally:
        assert worker.stop() == 0

    assert not [m for m in before_stop if "poll timeout has expired" in m]
    assert not [m for m in before_stop if m.startswith(("Partitions revoked", "Partitions lost"))]
    assert worker.metric("streamfit_worker_commit_failures_total") == 0
    assert audit_versions(store_url, "slow").samples_learned == 40


def test_revoked_partitions_commit_only_published(kafka_server, kafka_topic, store_url, caplog):
    topic = kafka_topic(4)
    models = ["m0", "m1", "m2", "m3"]
    create_models(store_url, *models)
    group = f"revoke-{uuid.uuid4().hex[:8]}"
    source = kafka_source(kafka_server.bootstrap, topic)

    caplog.set_level(logging.INFO)
    # The first worker keeps its records buffered for 60 s, and its short
    # heartbeat interval makes it see the second member join well before that.
    first = WorkerThread(
        source=source, store=store_url, group_id=group, batch_max_wait_ms=60_000,
        kafka_options={"heartbeat_interval_ms": 300},
    ).start()
    second = None
    try:
        produce_per_partition(kafka_server.bootstrap, topic, models, 0, 20)
        wait_until(lambda: first.metric("streamfit_worker_records_buffered") == 80,
                   "the first worker buffers all 80 records")
        second = WorkerThread(source=source, store=store_url, group_id=group, batch_max_records=5).start()
        wait_until(lambda: any(m.startswith("Dropped 40 buffered") and "revoked" in m
                               for m in (r.getMessage() for r in caplog.records)),
                   "the first worker drops the records of the two partitions it gives up")
        # Nothing of them was published, so the revocation commits nothing.
        assert not [r for r in caplog.records if r.getMessage().startswith("Committed offsets")]
        assert first.metric("streamfit_worker_records_buffered") == 40

        # Stopping publishes the first worker's buffered records, then its
        # partitions move to the second worker, which reads on from there.
        assert first.stop() == 0
        produce_per_partition(kafka_server.bootstrap, topic, models, 20, 40)
        ends = end_offsets(kafka_server.bootstrap, topic, 4)
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group) == ends,
                   f"every partition is committed to its end {ends}",
                   seen=lambda: committed_offsets(kafka_server.bootstrap, group))
    finally:
        first.stop()
        if second is not None:
            assert second.stop() == 0

    for model in models:
        assert audit_versions(store_url, model).samples_learned == 40, model
    learned = sum(
        w.metric("streamfit_worker_records_learned_total", model=m) for w in (first, second) for m in models
    )
    assert learned == 160


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int, name: str) -> float | None:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.TransportError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


