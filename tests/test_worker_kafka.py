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
import uuid

import pytest
from kafka import KafkaConsumer

from modelstore import open_store
from worker_support import (
    REPO_ROOT,
    WorkerThread,
    committed_offsets,
    create_models,
    create_topic,
    end_offsets,
    kafka_source,
    log_contains,
    produce,
    record_x,
    samples_learned,
    start_worker_process,
    wait_until,
)

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


def test_bad_bytes_between_good_records(kafka_server, kafka_topic, store_url, caplog):
    topic = kafka_topic(1)
    create_models(store_url, "sensor")
    produce(kafka_server.bootstrap, topic, [(b"sensor", value) for value in BAD_BYTES_STREAM])
    group = f"bad-bytes-{uuid.uuid4().hex[:8]}"

    caplog.set_level(logging.WARNING, logger="worker.rejections")
    worker = WorkerThread(source=kafka_source(kafka_server.bootstrap, topic), store=store_url, group_id=group).start()
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

    messages = [r.getMessage() for r in caplog.records if r.name == "worker.rejections"]
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
        source=kafka_source(kafka_server.bootstrap, topic), store=store_url, group_id=group, batch_max_records=2
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


MiB = 1024 * 1024
# A value of 5 MiB, valid JSON, above the worker's default max_record_bytes (1 MiB).
HUGE_VALUE = b'{"features":{"x":1.0},"label":0,"padding":"' + b"a" * (5 * MiB) + b'"}'

# (key, value, the reason it is rejected for)
BAD_CORPUS = [
    (b"m", b"\xff\xfe\x00garbage", "not_utf8"),
    (b"m", b'{"features": {"x": 1', "invalid_json"),
    (b"m", b"[1, 2, 3]", "not_object"),
    (b"m", b'{"features": {"x": "high"}, "label": 0}', "wrong_type"),
    (b"m", b'{"features": {"x": NaN}, "label": 0}', "non_finite"),
    (b"m", b'{"features": {"x": Infinity}, "label": 1}', "non_finite"),
    (b"m", b'{"features": [1.0, 2.0], "label": 0}', "wrong_width"),
    (b"m", b'{"features": {"x": 1.0}, "label": 7}', "unknown_label"),
    (b"m", HUGE_VALUE, "too_large"),
    (b"m", b"", "empty"),
    (None, b'{"features": {"x": 1.0}, "label": 1}', "missing_model"),
]


@pytest.mark.slow
def test_bad_input_corpus(kafka_server, store_url):
    # The topic accepts messages up to 6 MiB, above the broker's default
    # message.max.bytes (1 MB), so the 5 MiB record reaches the worker.
    topic = create_topic(kafka_server.bootstrap, 1, "corpus", {"max.message.bytes": str(6 * MiB)})
    dead = create_topic(kafka_server.bootstrap, 1, "corpus-dead")
    create_models(store_url, "m")
    # A good record before, between and after the bad ones.
    messages = [(b"m", record_x(0))]
    for i, (key, value, _) in enumerate(BAD_CORPUS, start=1):
        messages += [(key, value), (b"m", record_x(i))]
    produce(kafka_server.bootstrap, topic, messages, max_request_size=6 * MiB)
    group = f"corpus-{uuid.uuid4().hex[:8]}"

    worker = WorkerThread(
        source=kafka_source(kafka_server.bootstrap, topic), store=store_url, group_id=group,
        dead_letter_topic=dead,
    ).start()
    try:
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group).get(f"{topic}/0") == len(messages),
                   "the committed offset reaches the end of the partition")
    finally:
        assert worker.stop() == 0

    good = len(BAD_CORPUS) + 1
    with open_store(store_url) as store:
        versions = store.versions("m")
    info = max(versions, key=lambda v: v.version)
    assert info.samples_learned == good
    assert info.offsets == {f"{topic}/0": len(messages)}
    # Records rejected after their model was found are counted in its versions.
    stored_rejections: dict[str, int] = {}
    for version in versions:
        for reason, count in version.metadata.get("rejected", {}).items():
            stored_rejections[reason] = stored_rejections.get(reason, 0) + count
    assert stored_rejections == {"wrong_type": 1, "wrong_width": 1, "unknown_label": 1}
    assert worker.metric("streamfit_worker_model_records_rejected_total", model="m") == 3
    assert worker.metric("streamfit_worker_records_learned_total", model="m") == good
    expected: dict[str, int] = {}
    for _, _, reason in BAD_CORPUS:
        expected[reason] = expected.get(reason, 0) + 1
    for reason, count in expected.items():
        assert worker.rejected(reason) == count, reason
    total_rejected = sum(
        sample.value for metric in worker.registry.collect()
        if metric.name == "streamfit_worker_records_rejected"
        for sample in metric.samples if sample.name.endswith("_total")
    )
    assert total_rejected == len(BAD_CORPUS)

    consumer = KafkaConsumer(
        dead, bootstrap_servers=kafka_server.bootstrap, auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
    )
    try:
        letters = [record for _, record in zip(range(len(BAD_CORPUS)), consumer)]
    finally:
        consumer.close()
    assert len(letters) == len(BAD_CORPUS)
    for letter, (key, value, reason) in zip(letters, BAD_CORPUS):
        headers = dict(letter.headers)
        assert headers["streamfit.reason"] == reason.encode()
        assert headers["streamfit.source"] == f"{topic}/0".encode()
        assert headers["streamfit.detail"]
        assert letter.key == key
        if reason == "too_large":
            assert letter.value is None
            assert headers["streamfit.value_bytes"] == str(len(HUGE_VALUE)).encode()
        else:
            assert letter.value == value, reason
    # Bad record i sits at offset 2 * i - 1, between good records.
    assert [int(dict(letter.headers)["streamfit.offset"]) for letter in letters] == [
        2 * i - 1 for i in range(1, len(BAD_CORPUS) + 1)
    ]


def test_restart_learns_nothing_twice(kafka_server, kafka_topic, store_url):
    topic = kafka_topic(1)
    create_models(store_url, "r")
    first = [(b"r", json.dumps({"features": {"x": i}, "label": i % 2}).encode()) for i in range(10)]
    produce(kafka_server.bootstrap, topic, first)
    group = f"restart-{uuid.uuid4().hex[:8]}"
    source = kafka_source(kafka_server.bootstrap, topic)

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
        source=kafka_source(kafka_server.bootstrap, topic), store=store_url, group_id=group, dead_letter_topic=dead
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
        "worker", "--source", kafka_source(kafka_server.bootstrap, topic), "--store", store_url,
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


def test_sigterm_during_slow_refits(kafka_server, kafka_topic, store_url, tmp_path):
    topic = kafka_topic(1)
    create_models(store_url, "slow")
    produce(kafka_server.bootstrap, topic, [(b"slow", record_x(i)) for i in range(30)])
    group = f"sigterm-{uuid.uuid4().hex[:8]}"
    args = [
        "--source", kafka_source(kafka_server.bootstrap, topic), "--store", store_url,
        "--group-id", group, "--metrics-port", "0", "--batch-max-records", "10",
        "--shutdown-timeout-ms", "5000",
    ]
    log_path = tmp_path / "worker.log"

    # Every refit takes 3 s, so the 5 s shutdown bound cannot publish all
    # three batches that are buffered or running when SIGTERM arrives.
    worker = start_worker_process(args, log_path, refit_delay_s=3)
    try:
        wait_until(log_contains(log_path, "Worker started"), "the worker starts")
        wait_until(lambda: "Published model slow version 1" in log_path.read_text(),
                   "the worker publishes its first version")
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert "Worker stopped with 10 records not published" in text, text[-3000:]

    # Only what was published is committed, and a second run learns the rest once.
    with open_store(store_url) as store:
        stored = store.version("slow").offsets
    assert committed_offsets(kafka_server.bootstrap, group) == stored
    assert stored[f"{topic}/0"] == 20
    second = WorkerThread(source=kafka_source(kafka_server.bootstrap, topic), store=store_url, group_id=group).start()
    try:
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group).get(f"{topic}/0") == 30,
                   "a second worker learns the rest")
    finally:
        assert second.stop() == 0
    assert samples_learned(store_url, "slow") == 30
