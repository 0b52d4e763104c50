"""The main job end to end: Kafka records refit a model that the predictor serves.

Flights records go to a 3-partition topic on the real broker; ``streamfit
worker`` and ``streamfit predictor`` run as subprocesses on a store in
gocaves, as they would in production.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from importlib import resources
from pathlib import Path

import httpx
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from modelstore import open_store
from streamfit.flights import read_flights, write_json_lines
from streamfit.produce import produce_file
from worker_support import audit_versions

RECORDS = 100_000
MODEL = "flights"
LEARN_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streamfit.cli", *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )


def _stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"process {process.pid} ignored SIGTERM for 30 s")
    return process.returncode


def _wait_for(predicate, timeout_s: float, what: str, processes=()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process, log in processes:
            if process.poll() is not None:
                pytest.fail(f"{what}: process exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"{what}: not reached after {timeout_s} s")


def _committed_and_end(bootstrap: str, topic: str, group: str) -> tuple[dict, dict]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        end = consumer.end_offsets(partitions)
        committed = {tp: consumer.committed(tp) for tp in partitions}
        return committed, end
    finally:
        consumer.close()


@pytest.fixture
def couchbase_store_url(gocaves_server, monkeypatch):
    scope = "e2e_" + uuid.uuid4().hex[:8]
    monkeypatch.setenv("STREAMFIT_COUCHBASE_USERNAME", gocaves_server.username)
    monkeypatch.setenv("STREAMFIT_COUCHBASE_PASSWORD", gocaves_server.password)
    return f"{gocaves_server.connstr}/{gocaves_server.bucket}?scope={scope}"


@pytest.mark.slow
def test_flights_learned_and_served(kafka_server, kafka_topic, couchbase_store_url, tmp_path):
    topic = kafka_topic(partitions=3)
    group = "e2e-" + uuid.uuid4().hex[:8]
    data = tmp_path / "flights.jsonl"
    write_json_lines(read_flights(limit=RECORDS), data)
    assert produce_file(str(data), topic, kafka_server.bootstrap, key_field="id") == RECORDS

    env = dict(os.environ)
    spec = resources.files("trainer") / "specs" / "flights.json"
    port = _free_port()
    worker_log, predictor_log = tmp_path / "worker.log", tmp_path / "predictor.log"
    worker = _start([
        "worker", "--source", f"kafka://{kafka_server.bootstrap}/{topic}",
        "--store", couchbase_store_url, "--group-id", group, "--model", MODEL,
        "--model-spec", str(spec), "--batch-max-records", "50", "--metrics-port", "0",
    ], worker_log, env)
    predictor = _start([
        "predictor", "--store", couchbase_store_url, "--host", "127.0.0.1", "--port", str(port),
    ], predictor_log, env)
    watched = [(worker, worker_log), (predictor, predictor_log)]

    try:
        store = open_store(couchbase_store_url)

        def learned_all():
            try:
                info = store.version(MODEL)
            except LookupError:
                return None
            return info if info.samples_learned >= RECORDS else None

        info = _wait_for(learned_all, LEARN_TIMEOUT_S, "worker learned every record", watched)
        assert info.samples_learned == RECORDS
        assert sum(info.offsets.values()) == RECORDS
        # Every version learned exactly the records its offsets moved past.
        assert audit_versions(couchbase_store_url, MODEL).version == info.version

        def committed_at_end():
            committed, end = _committed_and_end(kafka_server.bootstrap, topic, group)
            return (committed, end) if all(committed[tp] == end[tp] for tp in end) else None

        committed, end = _wait_for(committed_at_end, 60, "committed offsets reach the end", watched)
        assert sum(end.values()) == RECORDS
        assert {f"{tp.topic}/{tp.partition}": o for tp, o in end.items()} == info.offsets

        metrics = info.metadata["metrics"]
        assert metrics["n_scored"] > RECORDS // 2
        assert metrics["accuracy"] > metrics["baseline_accuracy"], metrics

        features = read_flights(limit=1)[0]["features"]

        def served_latest():
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{port}/v1/models/{MODEL}/predict",
                    json={"features": features}, timeout=5,
                )
            except httpx.TransportError:
                return None
            if response.status_code == 200 and response.json()["version"] == info.version:
                return response.json()
            return None

        answer = _wait_for(served_latest, 30, "predictor serves the latest version", watched)
        assert answer["model"] == MODEL
        assert answer["predictions"][0] in (0, 1)
        store.close()
    finally:
        worker_code = _stop(worker)
        predictor_code = _stop(predictor)
    assert worker_code == 0, worker_log.read_text()[-3000:]
    assert predictor_code == 0, predictor_log.read_text()[-3000:]
