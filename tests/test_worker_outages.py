"""The worker through outages of the broker and the store, and over a SASL listener.

These tests start their own Kafka broker, because they stop and restart it
(on the same ports and log directory) and because it has a SASL_PLAINTEXT
listener. The store outage pauses gocaves with SIGSTOP, which keeps its
in-memory data, for 20 s.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from importlib import resources

import pytest

from worker_support import (
    IGNORE_UNCLOSED_SOCKETS,
    REPO_ROOT,
    WorkerThread,
    audit_versions,
    collect_sockets,  # noqa: F401  (a fixture, used by name)
    committed_offsets,
    couchbase_url,
    create_models,
    create_topic,
    end_offsets,
    flights_values,
    kafka_source,
    produce,
    produce_flights,
    record_x,
    samples_learned,
    wait_until,
)

SASL_USER = "streamfit-worker"
# Random per run, so finding it in a log cannot be a coincidence.
SASL_PASSWORD = "pw-" + uuid.uuid4().hex
BROKER_DOWN_S = 60
STORE_PAUSE_S = 20
FLIGHTS_SPEC = str(resources.files("trainer") / "specs" / "flights.json")


@pytest.fixture(scope="module")
def own_broker():
    servers = sys.modules["streamfit_test_servers"]  # registered by tests/conftest.py
    workdir = REPO_ROOT / ".work" / "servers" / f"restartable-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        server = servers.start_kafka(workdir, sasl_users={SASL_USER: SASL_PASSWORD})
    except servers.ToolMissingError as exc:
        if os.environ.get("CI", "").strip().lower() in {"true", "1"}:
            pytest.fail(f"CI=true and a test server cannot start: {exc}", pytrace=False)
        pytest.skip(f"test server not started: {exc}")
    yield server
    server.stop()
    assert not server.unsupported_version_lines(), server.unsupported_version_lines()[:10]


@pytest.fixture
def store_url(tmp_path):
    return f"sqlite:///{tmp_path}/models.db"


@pytest.fixture
def broker_back(own_broker):
    """Restart the broker after a test that stopped it, even when the test failed."""
    yield own_broker
    if not own_broker.is_running():
        own_broker.start_again()


@pytest.mark.slow
@IGNORE_UNCLOSED_SOCKETS
@pytest.mark.usefixtures("collect_sockets")
def test_broker_down_and_back(broker_back, store_url):
    broker = broker_back
    topic = create_topic(broker.bootstrap, 1, "broker-down")
    create_models(store_url, "k4")
    group = f"broker-down-{uuid.uuid4().hex[:8]}"
    produce(broker.bootstrap, topic, [(b"k4", record_x(i)) for i in range(5)])

    worker = WorkerThread(
        source=kafka_source(broker.bootstrap, topic), store=store_url, group_id=group,
        batch_max_wait_ms=3000, commit_timeout_ms=3000,
    ).start()
    try:
        wait_until(lambda: committed_offsets(broker.bootstrap, group).get(f"{topic}/0") == 5,
                   "the worker learns and commits the first records")

        # Five records wait 3 s in the buffer, so their version is published,
        # and its commit attempted, while the broker is down.
        produce(broker.bootstrap, topic, [(b"k4", record_x(i)) for i in range(5, 10)])
        wait_until(lambda: worker.metric("streamfit_worker_records_buffered") == 5, "five records are buffered")
        stopped_at = time.monotonic()
        broker.stop()
        wait_until(lambda: samples_learned(store_url, "k4") == 10,
                   "the buffered records are learned while the broker is down")
        wait_until(lambda: worker.metric("streamfit_worker_commit_failures_total") >= 1,
                   "a commit fails during the outage instead of blocking the loop")
        wait_until(lambda: worker.metric("streamfit_worker_broker_connections") == 0,
                   "the metrics show no broker connection")
        assert worker.alive

        # The outage lasts 60 s in all, longer than the session timeout (45 s).
        time.sleep(max(0.0, BROKER_DOWN_S - (time.monotonic() - stopped_at)))
        broker.start_again()
        produce(broker.bootstrap, topic, [(b"k4", record_x(i)) for i in range(10, 20)])
        wait_until(lambda: committed_offsets(broker.bootstrap, group).get(f"{topic}/0") == 20,
                   "the worker learns the ten new records and commits without a restart", timeout=180,
                   seen=lambda: (samples_learned(store_url, "k4"), committed_offsets(broker.bootstrap, group)))
        assert worker.alive
    finally:
        assert worker.stop() == 0

    assert audit_versions(store_url, "k4").samples_learned == 20
    assert worker.metric("streamfit_worker_broker_connections") >= 1


@pytest.mark.slow
@IGNORE_UNCLOSED_SOCKETS
@pytest.mark.usefixtures("collect_sockets")
def test_store_paused_and_broker_restarted(broker_back, gocaves_pausable, monkeypatch):
    broker = broker_back
    monkeypatch.setenv("STREAMFIT_COUCHBASE_USERNAME", gocaves_pausable.username)
    monkeypatch.setenv("STREAMFIT_COUCHBASE_PASSWORD", gocaves_pausable.password)
    store_url = couchbase_url(gocaves_pausable, "outage")
    topic = create_topic(broker.bootstrap, 3, "outages")
    group = f"outages-{uuid.uuid4().hex[:8]}"
    values = flights_values(6000)

    worker = WorkerThread(
        source=kafka_source(broker.bootstrap, topic), store=store_url, group_id=group,
        model="flights", model_spec=FLIGHTS_SPEC, batch_max_records=200,
        max_retry_backoff_ms=2000, commit_timeout_ms=3000,
    ).start()

    def learned():
        return worker.metric("streamfit_worker_records_learned_total", model="flights")

    try:
        produce_flights(broker.bootstrap, topic, values[:2000])
        wait_until(lambda: learned() >= 1000, "the worker learns the first records", timeout=120)

        # The store freezes while records keep arriving.
        gocaves_pausable.pause()
        paused_at = time.monotonic()
        try:
            produce_flights(broker.bootstrap, topic, values[2000:4000], start=2000)
            wait_until(lambda: worker.metric("streamfit_worker_store_available") == 0,
                       "the worker notices the store outage")
            wait_until(lambda: worker.metric("streamfit_worker_fetch_paused") == 1,
                       "the worker pauses fetching")
            time.sleep(max(0.0, STORE_PAUSE_S - (time.monotonic() - paused_at)))
        finally:
            gocaves_pausable.resume()
        wait_until(lambda: learned() == 4000, "the worker learns everything after the store is back",
                   timeout=180, seen=learned)
        assert worker.metric("streamfit_worker_store_available") == 1

        # The broker stops while the last records are being learned.
        produce_flights(broker.bootstrap, topic, values[4000:], start=4000)
        broker.stop()
        learned_at_stop = learned()
        broker.start_again()
        ends = end_offsets(broker.bootstrap, topic, 3)
        wait_until(lambda: committed_offsets(broker.bootstrap, group) == ends,
                   "the group commits every partition to its end after the restart", timeout=180,
                   seen=lambda: (learned_at_stop, learned(), committed_offsets(broker.bootstrap, group)))
    finally:
        gocaves_pausable.resume()
        assert worker.stop() == 0

    info = audit_versions(store_url, "flights")
    assert info.samples_learned == len(values)
    assert info.offsets == ends
    assert learned() == len(values)
    assert worker.metric("streamfit_worker_store_retries_total") >= 1


def test_sasl_password_never_logged(own_broker, store_url, tmp_path, monkeypatch, caplog):
    topic = create_topic(own_broker.bootstrap, 1, "sasl")
    dead = create_topic(own_broker.bootstrap, 1, "sasl-dead")
    create_models(store_url, "secure")
    produce(own_broker.bootstrap, topic, [(b"secure", record_x(i)) for i in range(5)] + [(b"secure", b"[]")])
    secret_file = tmp_path / "kafka-password"
    secret_file.write_text(SASL_PASSWORD + "\n")
    monkeypatch.setenv("STREAMFIT_TEST_SASL_PASSWORD", SASL_PASSWORD)
    sasl = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_plain_username": SASL_USER}
    source = kafka_source(own_broker.sasl_bootstrap, topic)

    # kafka-python logs its SASL request, password included, at DEBUG level.
    caplog.set_level(logging.DEBUG)
    by_file = WorkerThread(
        source=source, store=store_url, group_id=f"sasl-{uuid.uuid4().hex[:8]}", dead_letter_topic=dead,
        kafka_options={**sasl, "sasl_plain_password_file": str(secret_file)},
    ).start()
    try:
        wait_until(lambda: samples_learned(store_url, "secure") == 5, "the worker learns over SASL")
        wait_until(lambda: by_file.metric("streamfit_worker_dead_letters_total") == 1,
                   "the dead-letter producer writes over SASL")
    finally:
        assert by_file.stop() == 0

    wrong = WorkerThread(
        source=source, store=store_url, group_id=f"sasl-{uuid.uuid4().hex[:8]}",
        kafka_options={**sasl, "sasl_plain_password_env": "STREAMFIT_TEST_SASL_PASSWORD",
                       "sasl_plain_username": "nobody", "bootstrap_timeout_ms": 3000},
    ).start()
    wait_until(lambda: not wrong.alive, "the worker with unknown credentials gives up")
    assert wrong.exit_code == 1

    texts = [r.getMessage() for r in caplog.records]
    assert any("SaslAuthenticate" in t for t in texts), "kafka-python's request log was not captured"
    assert not [t for t in texts if SASL_PASSWORD in t]
    for worker in (by_file, wrong):
        assert SASL_PASSWORD not in repr(worker.settings)
        assert SASL_PASSWORD not in str(worker.settings)
