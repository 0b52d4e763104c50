"""The worker killed with SIGKILL at random moments while it learns, on the real broker and gocaves.

The seed of the random moments is printed in every failure message; set
STREAMFIT_TEST_CHAOS_SEED to replay one.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from importlib import resources

import pytest

from worker_support import (
    audit_versions,
    committed_offsets,
    couchbase_url,
    create_topic,
    end_offsets,
    flights_values,
    kafka_source,
    log_contains,
    produce_flights,
    samples_learned,
    start_worker_process,
    stop_process,
    wait_until,
)

RECORDS = 100_000
KILLS = 5
FLIGHTS_SPEC = str(resources.files("trainer") / "specs" / "flights.json")


@pytest.mark.slow
def test_sigkill_chaos_learns_each_record_once(kafka_server, gocaves_server, tmp_path, monkeypatch):
    seed = int(os.environ.get("STREAMFIT_TEST_CHAOS_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    store_url = couchbase_url(gocaves_server, "chaos")
    topic = create_topic(kafka_server.bootstrap, 3, "chaos")
    group = f"chaos-{uuid.uuid4().hex[:8]}"
    produce_flights(kafka_server.bootstrap, topic, flights_values(RECORDS))
    ends = end_offsets(kafka_server.bootstrap, topic, 3)

    monkeypatch.setenv("STREAMFIT_COUCHBASE_USERNAME", gocaves_server.username)
    monkeypatch.setenv("STREAMFIT_COUCHBASE_PASSWORD", gocaves_server.password)
    env = {
        "STREAMFIT_COUCHBASE_USERNAME": gocaves_server.username,
        "STREAMFIT_COUCHBASE_PASSWORD": gocaves_server.password,
        # A killed member leaves the group after the session timeout (the
        # broker's minimum, 6 s), so its successor is not kept waiting 45 s.
        "STREAMFIT_KAFKA_OPTIONS": '{"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}',
    }
    args = [
        "--source", kafka_source(kafka_server.bootstrap, topic), "--store", store_url,
        "--group-id", group, "--model", "flights", "--model-spec", FLIGHTS_SPEC,
        "--batch-max-records", "100", "--metrics-port", "0",
    ]
    log_path = tmp_path / "worker.log"
    kills = []
    for run in range(KILLS):
        marker = f"--- run {run} ---\n"
        with log_path.open("a") as log_file:
            log_file.write(marker)
        process = start_worker_process(args, log_path, env)
        try:
            # Each kill falls at a random moment after the run's first publish.
            wait_until(lambda: "Published model flights" in log_path.read_text().split(marker)[-1],
                       f"worker run {run} publishes a version (seed {seed})", timeout=120)
            delay = rng.uniform(0.0, 3.0)
            time.sleep(delay)
            assert process.poll() is None, f"worker run {run} exited early (seed {seed}):\n{log_path.read_text()[-3000:]}"
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(30)
        kills.append((round(delay, 2), samples_learned(store_url, "flights")))

    final = start_worker_process(args, log_path, env)
    try:
        wait_until(log_contains(log_path, "Worker started"), "the last worker starts")
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group) == ends,
                   f"the last worker commits every partition to its end (seed {seed}, kills {kills})",
                   timeout=600, seen=lambda: committed_offsets(kafka_server.bootstrap, group))
    finally:
        code = stop_process(final)
    assert code == 0, log_path.read_text()[-3000:]

    info = audit_versions(store_url, "flights")
    assert info.samples_learned == RECORDS, f"seed {seed}"
    assert info.offsets == ends, f"seed {seed}"
    # Every kill fell while records were still left to learn.
    assert all(0 < learned < RECORDS for _, learned in kills), f"seed {seed}, kills {kills}"
