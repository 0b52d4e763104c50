"""Stream predictions against the real Kafka broker and a real SQLite store.

The predictor app runs in the test process (uvicorn on a thread) with a
Kafka source, except one test that runs ``streamfit predictor --source``
as a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from modelstore import open_store
from modelstore.errors import StoreUnavailable
from predictor.app import create_app
from predictor.settings import PredictorSettings

import predictor_support as pm
from predictor_support import REPO_ROOT, LiveServer

WAIT_S = 60.0


@pytest.fixture
def store(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'models.db'}")
    yield store
    store.close()


def produce(bootstrap: str, topic: str, messages, partition: int | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value, partition=partition)
        producer.flush(30)
    finally:
        producer.close()


def consume(bootstrap: str, topic: str, count: int, timeout_s: float = WAIT_S) -> list:
    """Read the first ``count`` messages of ``topic``; fail after ``timeout_s``."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    messages = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(messages) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                messages.extend(records)
    finally:
        consumer.close()
    assert len(messages) >= count, f"{topic}: {len(messages)} of {count} messages within {timeout_s} s"
    return messages


def committed(bootstrap: str, group: str) -> dict[str, int]:
    """Return the group's committed offsets as {"topic/partition": offset}."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    except KafkaError as exc:
        # The group coordinator may still be loading; the callers poll.
        if not exc.retriable:
            raise
        return {}
    finally:
        admin.close()
    return {f"{tp.topic}/{tp.partition}": meta.offset for tp, meta in offsets.items()}


def wait_until(predicate, description: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting until {description}")


def feature_record(row: dict, record_id=None, model=None) -> bytes:
    body = {"features": row}
    if record_id is not None:
        body["id"] = record_id
    if model is not None:
        body["model"] = model
    return json.dumps(body).encode()


def start_server(store, source_topic: str, bootstrap: str, wrapped_store=None, **overrides) -> LiveServer:
    settings = PredictorSettings(
        store=store.url, refresh_interval_ms=50, intra_op_threads=1,
        source=f"kafka://{bootstrap}/{source_topic}", **overrides,
    )
    app = create_app(settings, store=wrapped_store, registry=CollectorRegistry())
    return LiveServer(app).start()


# (key, value, rejection reason or None for a record that gets a prediction)
BAD_AND_GOOD = [
    (b"flights", feature_record({"month": 3, "distance": 900.0, "carrier": "UA"}, "r0"), None),
    (b"flights", b'{"features": {"month": 3,', "invalid_json"),
    (b"flights", b"\xff\xfe\x00", "not_utf8"),
    (b"flights", b"[1, 2]", "not_object"),
    (b"flights", b'{"id": "r4"}', "missing_features"),
    (b"flights", feature_record({"month": "x", "distance": 1.0, "carrier": "UA"}, "r5"), "wrong_type"),
    (b"flights", b'{"features": {"month": NaN, "distance": 1, "carrier": "UA"}}', "non_finite"),
    (b"ghost", feature_record({"month": 1, "distance": 1.0, "carrier": "UA"}), "unknown_model"),
    (None, feature_record({"month": 1, "distance": 1.0, "carrier": "UA"}), "missing_model"),
    (b"flights", feature_record([1, 2.0]), "wrong_width"),
    (None, feature_record({"month": 7, "distance": 300.0, "carrier": "DL"}, 9, model="delay"), None),
    (b"flights", feature_record({"month": 12, "distance": 2500.0, "carrier": "AA"}, "r11"), None),
]


def test_stream_predicts_and_dead_letters(kafka_server, kafka_topic, store):
    pm.publish(store, "flights", "sgd", seed=1)
    pm.publish(store, "delay", "regressor", seed=2)
    source, output, dead = kafka_topic(2), kafka_topic(1), kafka_topic(1)
    for i, (key, value, _) in enumerate(BAD_AND_GOOD):
        produce(kafka_server.bootstrap, source, [(key, value)], partition=i % 2)
    group = f"stream-{uuid.uuid4().hex[:8]}"
    good = [m for m in BAD_AND_GOOD if m[2] is None]
    bad = [m for m in BAD_AND_GOOD if m[2] is not None]

    server = start_server(
        store, source, kafka_server.bootstrap, output_topic=output,
        stream_dead_letter_topic=dead, stream_group_id=group,
    )
    try:
        predictions = consume(kafka_server.bootstrap, output, len(good))
        dead_letters = consume(kafka_server.bootstrap, dead, len(bad))
        wait_until(lambda: committed(kafka_server.bootstrap, group) == {f"{source}/0": 6, f"{source}/1": 6},
                   "both partitions are committed to their end")

        # A new version is used for the records that follow its swap.
        pm.publish(store, "flights", "sgd", seed=2)
        wait_until(lambda: server.metric("streamfit_predictor_served_version", {"model": "flights"}) == 2,
                   "version 2 of flights is served")
        row = {"month": 5, "distance": 1200.0, "carrier": "DL"}
        produce(kafka_server.bootstrap, source, [(b"flights", feature_record(row, "after-swap"))])
        later = consume(kafka_server.bootstrap, output, len(good) + 1)[-1]
        assert server.client.get("/v2/health/ready").status_code == 200
    finally:
        server.stop()

    by_id = {json.loads(m.value)["id"]: json.loads(m.value) for m in predictions}
    assert set(by_id) == {"r0", 9, "r11"}
    for record_id, (key, value, _) in zip(["r0", 9, "r11"], good):
        body = by_id[record_id]
        features = json.loads(value)["features"]
        if record_id == 9:
            assert (body["model"], body["version"]) == ("delay", 1)
            expected = pm.sklearn_predict("regressor", 2, [features])[0]
            assert body["outputs"]["value"] == pytest.approx(expected, rel=1e-4)
        else:
            assert (body["model"], body["version"]) == ("flights", 1)
            assert body["outputs"]["label"] == pm.sklearn_predict("sgd", 1, [features])[0]
            assert len(body["outputs"]["probabilities"]) == 2
            assert body["labels"] == [0, 1]
        assert body["version_age_seconds"] >= 0
        assert body["source"]["topic"] == source
    assert [m.key for m in predictions if json.loads(m.value)["id"] == "r0"] == [b"flights"]

    reasons = sorted(dict(m.headers)["streamfit.reason"].decode() for m in dead_letters)
    assert reasons == sorted(m[2] for m in bad)
    for message in dead_letters:
        headers = dict(message.headers)
        assert headers["streamfit.source"].decode().startswith(f"{source}/")
        assert int(headers["streamfit.offset"]) >= 0
        assert headers["streamfit.detail"]
    assert {m.value for m in dead_letters} == {m[1] for m in bad}

    after = json.loads(later.value)
    assert (after["id"], after["version"]) == ("after-swap", 2)
    assert after["outputs"]["label"] == pm.sklearn_predict("sgd", 2, [row])[0]
    assert server.metric("streamfit_predictor_stream_records_total", {"result": "predicted"}) == len(good) + 1
    assert server.metric("streamfit_predictor_stream_records_total", {"result": "rejected"}) == len(bad)
    assert server.metric("streamfit_predictor_stream_dead_letters_total") == len(bad)
    for reason in {m[2] for m in bad}:
        assert server.metric("streamfit_predictor_stream_rejected_total", {"reason": reason}) == 1, reason


def test_stream_without_dead_letter_topic_counts(kafka_server, kafka_topic, store):
    pm.publish(store, "flights", "sgd", seed=1)
    source, output = kafka_topic(1), kafka_topic(1)
    produce(kafka_server.bootstrap, source, [
        (b"flights", b"not json"),
        (b"flights", feature_record({"month": 3, "distance": 900.0, "carrier": "ZZ"}, "zz")),
        (b"flights", feature_record({"month": 3, "distance": 900.0, "carrier": "UA"}, "ok")),
    ])
    group = f"count-{uuid.uuid4().hex[:8]}"
    server = start_server(store, source, kafka_server.bootstrap, output_topic=output, stream_group_id=group)
    try:
        predictions = consume(kafka_server.bootstrap, output, 2)
        wait_until(lambda: committed(kafka_server.bootstrap, group) == {f"{source}/0": 3},
                   "the partition is committed to its end")
    finally:
        server.stop()
    # The carrier feature of this model ignores unknown categories, so "ZZ" is predicted.
    assert [json.loads(m.value)["id"] for m in predictions] == ["zz", "ok"]
    assert server.metric("streamfit_predictor_stream_records_total", {"result": "predicted"}) == 2
    assert server.metric("streamfit_predictor_stream_records_total", {"result": "rejected"}) == 1
    assert server.metric("streamfit_predictor_stream_rejected_total", {"reason": "invalid_json"}) == 1
    assert server.metric("streamfit_predictor_stream_dead_letters_total") == 0


class OutageStore:
    """The real SQLite store, with reads that fail while ``down`` is set (an injected outage)."""

    def __init__(self, store):
        self.store = store
        self.down = False

    def __getattr__(self, attr):
        method = getattr(self.store, attr)
        if attr not in ("head", "heads", "version", "artifact"):
            return method

        def call(*args, **kwargs):
            if self.down:
                raise StoreUnavailable(f"SQLite store {self.store.url} timed out (injected outage)")
            return method(*args, **kwargs)

        return call


def test_store_outage_loses_no_record(kafka_server, kafka_topic, store):
    pm.publish(store, "flights", "sgd", seed=1)
    source, output = kafka_topic(1), kafka_topic(1)
    group = f"outage-{uuid.uuid4().hex[:8]}"
    outage = OutageStore(store)
    outage.down = True
    server = start_server(store, source, kafka_server.bootstrap, wrapped_store=outage,
                          output_topic=output, stream_group_id=group)
    try:
        rows = pm.sample_rows(5, seed=3)
        produce(kafka_server.bootstrap, source, [(b"flights", feature_record(r, i)) for i, r in enumerate(rows)])
        wait_until(lambda: (server.metric("streamfit_predictor_stream_retries_total") or 0) >= 2,
                   "the batch is retried while the store is down")
        assert committed(kafka_server.bootstrap, group) == {}
        outage.down = False
        predictions = consume(kafka_server.bootstrap, output, 5)
        wait_until(lambda: committed(kafka_server.bootstrap, group) == {f"{source}/0": 5},
                   "the partition is committed once the store answers")
    finally:
        server.stop()
    assert sorted(json.loads(m.value)["id"] for m in predictions) == [0, 1, 2, 3, 4]
    assert server.metric("streamfit_predictor_stream_rejected_total", {"reason": "unknown_model"}) is None


@pytest.mark.slow
def test_predictor_command_streams(kafka_server, kafka_topic, store, tmp_path):
    pm.publish(store, "flights", "sgd", seed=1)
    source, output = kafka_topic(1), kafka_topic(1)
    rows = pm.sample_rows(3, seed=8)
    produce(kafka_server.bootstrap, source, [(b"flights", feature_record(r, f"c{i}")) for i, r in enumerate(rows)])

    port = pm.free_port()
    log_path = tmp_path / "predictor.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFIT_") and k != "WEB_CONCURRENCY"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamfit.cli", "predictor", "--store", store.url, "--port", str(port),
             "--source", f"kafka://{kafka_server.bootstrap}/{source}", "--output-topic", output,
             "--stream-group-id", f"cli-{uuid.uuid4().hex[:8]}", "--intra-op-threads", "1"],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    try:
        try:
            predictions = consume(kafka_server.bootstrap, output, 3)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; predictor log:\n{log_path.read_text(errors='replace')[-4000:]}") from None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)

    log = log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    bodies = sorted((json.loads(m.value) for m in predictions), key=lambda b: b["id"])
    assert [b["id"] for b in bodies] == ["c0", "c1", "c2"]
    assert [b["outputs"]["label"] for b in bodies] == pm.sklearn_predict("sgd", 1, rows).tolist()
    assert f"predicting records of {source}" in log
    assert "stream predictor stopped" in log


def test_stream_stores_predictions(kafka_server, kafka_topic, store):
    pm.publish(store, "flights", "sgd", seed=1)
    source, output = kafka_topic(1), kafka_topic(1)
    rows = pm.sample_rows(3, seed=4)
    # Two records with an id, one without: its prediction is kept under its position.
    produce(kafka_server.bootstrap, source, [
        (b"flights", feature_record(rows[0], "order-1")),
        (b"flights", feature_record(rows[1], 42)),
        (b"flights", feature_record(rows[2])),
    ])
    server = start_server(store, source, kafka_server.bootstrap, output_topic=output,
                          stream_group_id=f"stored-{uuid.uuid4().hex[:8]}", store_predictions=True,
                          prediction_expiry_s=3600)
    try:
        sent = consume(kafka_server.bootstrap, output, 3)
        wait_until(lambda: server.metric("streamfit_predictor_stream_stored_predictions_total") == 3,
                   "the three predictions are stored")
    finally:
        server.stop()

    stored = [store.prediction("flights", key) for key in ("order-1", "42", f"{source}/0/2")]
    assert stored == [json.loads(m.value) for m in sent]
    assert stored[0]["outputs"]["label"] == pm.sklearn_predict("sgd", 1, [rows[0]])[0]


def test_store_predictions_needs_source(store):
    from modelstore.errors import ConfigError

    with pytest.raises(ConfigError, match="store_predictions stores the predictions of a source"):
        PredictorSettings(store=store.url, store_predictions=True)
