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

import modelstore.couchbase
from trainer.refit import Trainer
from worker_support import (
    WorkerThread,
    audit_versions,
    committed_offsets,
    couchbase_url,
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
        partitions = [f"{topic}/{i}" for i in range(4)]
        wait_until(lambda: [lag(first, p) for p in partitions] == [20] * 4,
                   "the first worker reports a lag of 20 records on each partition",
                   seen=lambda: [lag(first, p) for p in partitions])

        second = WorkerThread(source=source, store=store_url, group_id=group, batch_max_records=5).start()
        dropped = wait_until(lambda: [m for m in (r.getMessage() for r in caplog.records)
                                      if m.startswith("Dropped 40 buffered") and "revoked" in m],
                             "the first worker drops the records of the two partitions it gives up")
        # Nothing of them was published, so the revocation commits nothing.
        assert not [r for r in caplog.records if r.getMessage().startswith("Committed offsets")]
        assert first.metric("streamfit_worker_records_buffered") == 40
        revoked = dropped[0].split(" partitions ")[1].split(";")[0].split(",")
        assert len(revoked) == 2
        # The lag series of revoked partitions are removed, the others stay.
        for partition in partitions:
            assert (lag(first, partition) is None) == (partition in revoked), partition

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


def lag(worker, partition):
    return worker.registry.get_sample_value("streamfit_worker_partition_lag_records", {"partition": partition})


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


@pytest.mark.slow
def test_lost_partitions_commit_nothing(kafka_server, kafka_topic, store_url, tmp_path):
    topic = kafka_topic(4)
    models = ["m0", "m1", "m2", "m3"]
    create_models(store_url, *models)
    group = f"lost-{uuid.uuid4().hex[:8]}"
    source = kafka_source(kafka_server.bootstrap, topic)
    produce_per_partition(kafka_server.bootstrap, topic, models, 0, 20)

    port = free_port()
    log_path = tmp_path / "frozen.log"
    frozen = start_worker_process([
        "--source", source, "--store", store_url, "--group-id", group, "--metrics-port", str(port),
        "--batch-max-wait-ms", "600000", "--poll-timeout-ms", "200",
    ], log_path, env={"STREAMFIT_KAFKA_OPTIONS": '{"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}'})
    other = None
    try:
        wait_until(lambda: scrape(port, "streamfit_worker_records_buffered") == 80,
                   "the subprocess worker buffers all 80 records", timeout=120,
                   seen=lambda: log_path.read_text()[-2000:])
        frozen.send_signal(signal.SIGSTOP)
        other = WorkerThread(source=source, store=store_url, group_id=group, batch_max_records=5).start()
        ends = end_offsets(kafka_server.bootstrap, topic, 4)
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group) == ends,
                   "the other worker takes every partition over and commits to the end", timeout=180)
        resumed_at = len(log_path.read_text())
        frozen.send_signal(signal.SIGCONT)
        # The resumed worker learns that its membership expired, either from
        # a heartbeat (its partitions are lost) or by rejoining as a new
        # member. kafka-python 3.0.12 then revokes the partitions that moved
        # and may give some back. Either way nothing is committed for them,
        # and records still buffered are skipped by the stored offsets.
        wait_until(lambda: any(mark in log_path.read_text()[resumed_at:]
                               for mark in ("Partitions lost", "Partitions revoked")),
                   "the resumed worker gives up partitions", timeout=180,
                   seen=lambda: log_path.read_text()[-3000:])
        # The resumed worker rejoins and reads on. Its batches wait ten
        # minutes, so stopping it is what publishes the new records it took.
        produce_per_partition(kafka_server.bootstrap, topic, models, 20, 30)
        ends = end_offsets(kafka_server.bootstrap, topic, 4)
        wait_until(lambda: scrape(port, "streamfit_worker_assigned_partitions") == 2,
                   "the resumed worker is assigned two partitions again", timeout=180,
                   seen=lambda: log_path.read_text()[-2000:])
        code = stop_process(frozen)
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group) == ends,
                   "the group commits the new records to the end", timeout=180,
                   seen=lambda: committed_offsets(kafka_server.bootstrap, group))
    finally:
        code = stop_process(frozen)
        if other is not None:
            assert other.stop() == 0
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    resumed = text[resumed_at:]
    given_up = min(i for i in (resumed.find("Partitions lost"), resumed.find("Partitions revoked")) if i >= 0)
    before_rejoin = text[:resumed_at + given_up]
    assert "Committed offsets" not in before_rejoin, text[-3000:]
    assert "Offset commit failed" not in before_rejoin, text[-3000:]
    for model in models:
        assert audit_versions(store_url, model).samples_learned == 30, model


@pytest.mark.slow
def test_two_workers_one_model(kafka_server, kafka_topic, gocaves_server, monkeypatch):
    monkeypatch.setenv("STREAMFIT_COUCHBASE_USERNAME", gocaves_server.username)
    monkeypatch.setenv("STREAMFIT_COUCHBASE_PASSWORD", gocaves_server.password)
    store_url = couchbase_url(gocaves_server, "shared")
    topic = kafka_topic(4)
    create_models(store_url, "shared")
    group = f"shared-{uuid.uuid4().hex[:8]}"
    settings = dict(source=kafka_source(kafka_server.bootstrap, topic), store=store_url, group_id=group,
                    model="shared", batch_max_records=50, max_conflict_attempts=2)

    # The first publish of each worker waits until the other one reaches its
    # first publish too. Both then publish on the same version, so one of
    # them must lose the compare-and-swap and rebase. Without the barrier a
    # conflict is likely but not certain.
    barrier = threading.Barrier(2, timeout=60)
    arrived: set[int] = set()
    original = modelstore.couchbase.CouchbaseStore.publish

    def publish_after_both_ready(self, *args, **kwargs):
        if not barrier.broken and threading.get_ident() not in arrived:
            arrived.add(threading.get_ident())
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modelstore.couchbase.CouchbaseStore, "publish", publish_after_both_ready)
    workers = [WorkerThread(**settings).start(), WorkerThread(**settings).start()]
    try:
        wait_until(lambda: [w.metric("streamfit_worker_assigned_partitions") for w in workers] == [2, 2],
                   "each worker is assigned two of the four partitions", timeout=120,
                   seen=lambda: [w.metric("streamfit_worker_assigned_partitions") for w in workers])
        total = 3000
        # Keyed by record id, so the model's records are spread over all four partitions.
        produce(kafka_server.bootstrap, topic, [(str(i).encode(), record_x(i)) for i in range(total)])
        ends = end_offsets(kafka_server.bootstrap, topic, 4)
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group) == ends,
                   "the group commits every partition to its end", timeout=240,
                   seen=lambda: committed_offsets(kafka_server.bootstrap, group))
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [0, 0]
    assert not barrier.broken, "one worker never reached its first publish while the other waited"

    # No lost update: every record is in the final version exactly once.
    info = audit_versions(store_url, "shared")
    assert info.samples_learned == total
    assert info.offsets == ends
    learned = [w.metric("streamfit_worker_records_learned_total", model="shared") for w in workers]
    assert sum(learned) == total and all(n > 0 for n in learned), learned
    conflicts = [w.metric("streamfit_worker_publish_conflicts_total") for w in workers]
    assert sum(conflicts) >= 1, conflicts


class _Partitions:
    """A partition handler that records assignments and keeps no buffers."""

    def __init__(self):
        self.assigned: set[str] = set()

    def partitions_assigned(self, partitions):
        self.assigned.update(partitions)
        return {}

    def partitions_revoked(self, partitions):
        self.assigned.difference_update(partitions)
        return {}

    def partitions_lost(self, partitions):
        self.assigned.difference_update(partitions)

    def revoke_commit_done(self, offsets, error):
        pass


def test_unfinished_rebalance_is_joined_again(kafka_server, kafka_topic, caplog):
    # kafka-python 3.0.12 can leave a member rebalancing with no rejoin
    # requested, so no poll finishes the rebalance. The source must return
    # the member to a stable generation.
    from kafka.coordinator.base import MemberState

    from worker.settings import KafkaSourceConfig
    from worker.sources import KafkaSource

    topic = kafka_topic(1)
    produce(kafka_server.bootstrap, topic, [(b"m", record_x(i)) for i in range(3)])
    handler = _Partitions()
    source = KafkaSource(
        KafkaSourceConfig((kafka_server.bootstrap,), (topic,)), group_id=f"stuck-{uuid.uuid4().hex[:8]}",
        options={}, handler=handler, commit_timeout_ms=10_000,
    )
    coordinator = source._consumer._coordinator
    try:
        read = []
        wait_until(lambda: read.extend(source.poll(100)) or len(read) == 3, "the source reads the three records")
        assert coordinator.generation_if_stable() is not None

        with coordinator._lock:
            coordinator.state = MemberState.REBALANCING
        assert not coordinator.need_rejoin()

        wait_until(lambda: source.poll(100) == [] and coordinator.generation_if_stable() is not None,
                   "the member is in a stable generation again", timeout=60,
                   seen=lambda: (coordinator.state, coordinator.need_rejoin()))
        assert source.commit({f"{topic}/0": 3}) == {f"{topic}/0": 3}
        assert handler.assigned == {f"{topic}/0"}
        assert any("rebalance stopped before it finished" in r.getMessage() for r in caplog.records)
    finally:
        source.close()
