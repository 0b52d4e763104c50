"""Checks that the test servers behave like the services the project relies on.

These tests run against the broker and gocaves from tests/servers. A broken
server would make every integration test fail for an unclear reason, so these
tests point at the server at fault first.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

# tests/conftest.py registers tests/servers/servers.py under this name.
import streamfit_test_servers as servers

POLL_DEADLINE_S = 30.0


def _consumer(kafka_server, group_id: str) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=kafka_server.bootstrap,
        group_id=group_id,
        client_id=f"test-{group_id}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )


def _poll_records(consumer: KafkaConsumer, count: int) -> list:
    records = []
    deadline = time.monotonic() + POLL_DEADLINE_S
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    return records


def _join_group(consumer: KafkaConsumer) -> set[TopicPartition]:
    deadline = time.monotonic() + POLL_DEADLINE_S
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(timeout_ms=500)
    return consumer.assignment()


def test_kafka_roundtrip_in_group(kafka_server, kafka_topic):
    topic = kafka_topic(partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_server.bootstrap, acks="all")
    try:
        metadata = producer.send(topic, key=b"model-a", value=b'{"label": 1}').get(timeout=30)
    finally:
        producer.close()
    assert metadata.topic == topic
    assert metadata.offset == 0

    group_id = f"roundtrip-{uuid.uuid4().hex[:8]}"
    consumer = _consumer(kafka_server, group_id)
    try:
        consumer.subscribe([topic])
        records = _poll_records(consumer, 1)
        assert len(records) == 1
        assert records[0].key == b"model-a"
        assert records[0].value == b'{"label": 1}'

        consumer.commit()
        assert consumer.committed(TopicPartition(topic, 0)) == 1
    finally:
        consumer.close()


def test_kafka_offset_apis(kafka_server, kafka_topic, kafka_broker_log):
    topic = kafka_topic(partitions=2)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    producer = KafkaProducer(bootstrap_servers=kafka_server.bootstrap, acks="all")
    try:
        for i in range(3):
            producer.send(topic, value=f"p0-{i}".encode(), partition=0)
        producer.send(topic, value=b"p1-0", partition=1)
        producer.flush(timeout=30)
    finally:
        producer.close()

    consumer = _consumer(kafka_server, f"offsets-{uuid.uuid4().hex[:8]}")
    try:
        consumer.subscribe([topic])
        assert _join_group(consumer) == {p0, p1}

        assert consumer.beginning_offsets([p0, p1]) == {p0: 0, p1: 0}
        assert consumer.end_offsets([p0, p1]) == {p0: 3, p1: 1}
        assert consumer.committed(p0) is None

        consumer.commit({p0: OffsetAndMetadata(2, "", -1)})
        assert consumer.committed(p0) == 2

        consumer.pause(p1)
        consumer.seek(p0, 1)
        records = _poll_records(consumer, 2)
        assert [(r.partition, r.offset, r.value) for r in records] == [(0, 1, b"p0-1"), (0, 2, b"p0-2")]
    finally:
        consumer.close()

    lines = kafka_broker_log.read_text(errors="replace").splitlines()
    assert [line for line in lines if "UnsupportedVersion" in line] == []


def test_kafka_topic_rejects_zero_partitions(kafka_topic):
    with pytest.raises(ValueError, match="partitions=0"):
        kafka_topic(partitions=0)


@pytest.fixture
def couchbase_cluster(gocaves_server):
    from couchbase.auth import PasswordAuthenticator
    from couchbase.cluster import Cluster
    from couchbase.options import ClusterOptions

    cluster = Cluster(
        gocaves_server.connstr,
        ClusterOptions(PasswordAuthenticator(gocaves_server.username, gocaves_server.password)),
    )
    try:
        cluster.wait_until_ready(timedelta(seconds=30))
        yield cluster
    finally:
        cluster.close()


def test_gocaves_upsert_get_replace_cas(gocaves_server, couchbase_cluster):
    from couchbase.exceptions import CasMismatchException

    collection = couchbase_cluster.bucket(gocaves_server.bucket).default_collection()
    key = f"doc-{uuid.uuid4().hex}"

    first = collection.upsert(key, {"version": 1})
    fetched = collection.get(key)
    assert fetched.content_as[dict] == {"version": 1}
    assert fetched.cas == first.cas

    second = collection.replace(key, {"version": 2}, cas=fetched.cas)
    assert second.cas != first.cas
    with pytest.raises(CasMismatchException):
        collection.replace(key, {"version": 3}, cas=fetched.cas)
    assert collection.get(key).content_as[dict] == {"version": 2}


def test_gocaves_create_scope_and_collection(gocaves_server, couchbase_cluster):
    bucket = couchbase_cluster.bucket(gocaves_server.bucket)
    manager = bucket.collections()
    scope_name = f"s{uuid.uuid4().hex[:8]}"

    manager.create_scope(scope_name)
    manager.create_collection(scope_name, "models")

    scopes = {scope.name: {c.name for c in scope.collections} for scope in manager.get_all_scopes()}
    assert scopes.get(scope_name) == {"models"}

    collection = bucket.scope(scope_name).collection("models")
    collection.upsert("head", {"latest": 1})
    assert collection.get("head").content_as[dict] == {"latest": 1}


def test_gocaves_pause_blocks_until_resume(gocaves_pausable, couchbase_cluster):
    from couchbase.exceptions import AmbiguousTimeoutException, UnAmbiguousTimeoutException
    from couchbase.options import GetOptions

    collection = couchbase_cluster.bucket(gocaves_pausable.bucket).default_collection()
    key = f"pause-{uuid.uuid4().hex}"
    collection.upsert(key, {"n": 1})

    gocaves_pausable.pause()
    try:
        with pytest.raises((AmbiguousTimeoutException, UnAmbiguousTimeoutException)):
            collection.get(key, GetOptions(timeout=timedelta(seconds=1)))
    finally:
        gocaves_pausable.resume()

    # Data survives a pause, unlike a restart of the in-memory mock.
    assert collection.get(key, GetOptions(timeout=timedelta(seconds=10))).content_as[dict] == {"n": 1}


def test_external_servers_reject_bad_addresses():
    with pytest.raises(ValueError, match="invalid Kafka bootstrap 'localhost'"):
        servers.ExternalKafkaServer("localhost")
    with pytest.raises(ValueError, match="invalid Couchbase connection string 'http://x'"):
        servers.ExternalCouchbaseServer("http://x")
