"""Measure the worker's learned records per second against a raw kafka-python consumer.

One run produces the first N labelled flights to a fresh 3-partition topic
(keyed by record id), then reads the whole topic twice:

1. raw: a kafka-python consumer in a new group that only decodes each value
   with ``json.loads``, with the worker's consumer options;
2. worker: ``worker.loop.run`` in a new group, learning every record into
   the model ``flights`` (default flights spec) and publishing versions.

Each rate is records divided by the time from the first record read to the
last one decoded (raw) or learned in a published version (worker). The
order of the two readers alternates over ``--rounds``, and the median of
each is reported.

Without ``--bootstrap`` the script starts its own broker with
tests/servers/servers.py (Java and Maven needed). The store is SQLite in a
temporary folder, or gocaves with ``--couchbase`` (started the same way).

Usage:
    .venv/bin/python benchmarks/worker_throughput.py
    .venv/bin/python benchmarks/worker_throughput.py --records 50000 --batch-max-records 2000 --rounds 3
    .venv/bin/python benchmarks/worker_throughput.py --bootstrap 127.0.0.1:9092 --couchbase
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer  # noqa: E402
from kafka.admin import NewTopic  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from streamfit.flights import iter_json_lines, read_flights  # noqa: E402
from worker.loop import run  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402

PARTITIONS = 3
SAMPLE_S = 0.01
RAW_POLL_TIMEOUT_MS = 50


def load_servers():
    spec = importlib.util.spec_from_file_location("streamfit_test_servers", REPO_ROOT / "tests" / "servers" / "servers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def produce(bootstrap: str, records: int) -> str:
    topic = f"throughput-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)], wait_for_metadata=True)
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for i, line in enumerate(iter_json_lines(read_flights(limit=records))):
        producer.send(topic, key=str(i).encode(), value=line.encode())
    producer.flush()
    producer.close()
    return topic


def raw_rate(bootstrap: str, topic: str, records: int, consumer_options: dict) -> float:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=f"raw-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False, auto_offset_reset="earliest", **consumer_options,
    )
    # As the worker does: loading the topic's metadata before joining avoids
    # an empty first assignment in kafka-python 3.0.12.
    consumer.partitions_for_topic(topic)
    consumer.subscribe([topic])
    read = 0
    first = None
    try:
        while read < records:
            # A short timeout is the fastest way to read with kafka-python
            # 3.0.12: a 500 ms one reads at about half the rate.
            for batch in consumer.poll(timeout_ms=RAW_POLL_TIMEOUT_MS).values():
                if first is None:
                    first = time.perf_counter()
                for record in batch:
                    json.loads(record.value)
                    read += 1
        return records / (time.perf_counter() - first)
    finally:
        consumer.close()


def worker_rate(bootstrap: str, topic: str, records: int, store: str, batch_max_records: int,
                kafka_options: dict) -> tuple[float, dict]:
    settings = WorkerSettings.from_mapping({
        "source": f"kafka://{bootstrap}/{topic}",
        "store": store,
        "group_id": f"worker-{uuid.uuid4().hex[:8]}",
        "model": "flights",
        "model_spec": str(resources.files("trainer") / "specs" / "flights.json"),
        "batch_max_records": batch_max_records,
        "max_buffered_records": max(20_000, 4 * batch_max_records),
        "metrics_port": 0,
        "kafka_options": kafka_options,
    })
    registry = CollectorRegistry()
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(settings,), kwargs={"stop": stop, "registry": registry})
    thread.start()

    def value(name, labels=None):
        return registry.get_sample_value(name, labels) or 0

    try:
        while value("streamfit_worker_records_consumed_total") == 0:
            time.sleep(SAMPLE_S)
        first = time.perf_counter()
        while value("streamfit_worker_records_learned_total", {"model": "flights"}) < records:
            if not thread.is_alive():
                raise RuntimeError("the worker stopped before learning every record")
            time.sleep(SAMPLE_S)
        elapsed = time.perf_counter() - first
    finally:
        stop.set()
        thread.join()
    refits = value("streamfit_worker_refit_duration_seconds_count")
    details = {
        "versions": int(refits),
        "refit_seconds_mean": round(value("streamfit_worker_refit_duration_seconds_sum") / refits, 4) if refits else None,
    }
    return records / elapsed, details


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_gib, 1),
            "python": platform.python_version()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000, help="flights records to produce and read")
    parser.add_argument("--batch-max-records", type=int, default=5000, help="the worker's batch_max_records")
    parser.add_argument("--rounds", type=int, default=2, help="raw and worker reads each, alternating")
    parser.add_argument("--bootstrap", help="an existing broker (default: start one with tests/servers)")
    parser.add_argument("--couchbase", action="store_true", help="store in gocaves instead of SQLite")
    parser.add_argument("--kafka-options", default="{}", help="JSON consumer options for both readers")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="worker-throughput-"))
    started = []
    servers = None
    try:
        bootstrap = args.bootstrap
        if bootstrap is None:
            servers = load_servers()
            broker = servers.start_kafka(workdir / "kafka")
            started.append(broker)
            bootstrap = broker.bootstrap
        store = f"sqlite:///{workdir}/models.db"
        if args.couchbase:
            servers = servers or load_servers()
            gocaves = servers.start_gocaves(workdir / "gocaves")
            started.append(gocaves)
            os.environ["STREAMFIT_COUCHBASE_USERNAME"] = gocaves.username
            os.environ["STREAMFIT_COUCHBASE_PASSWORD"] = gocaves.password

        kafka_options = json.loads(args.kafka_options)
        # The raw consumer gets the options the worker gives its consumer.
        consumer_options = WorkerSettings.from_mapping(
            {"source": f"kafka://{bootstrap}/t", "kafka_options": kafka_options}
        ).consumer_options()
        topic = produce(bootstrap, args.records)

        raw, learned, details = [], [], []
        for round_ in range(args.rounds):
            order = ("raw", "worker") if round_ % 2 == 0 else ("worker", "raw")
            for reader in order:
                if reader == "raw":
                    raw.append(raw_rate(bootstrap, topic, args.records, consumer_options))
                else:
                    round_store = store
                    if args.couchbase:
                        round_store = f"{gocaves.connstr}/{gocaves.bucket}?scope=bench_{uuid.uuid4().hex[:8]}"
                    elif round_:
                        round_store = f"sqlite:///{workdir}/models-{round_}.db"
                    rate, info = worker_rate(bootstrap, topic, args.records, round_store,
                                             args.batch_max_records, kafka_options)
                    learned.append(rate)
                    details.append(info)
                print(f"round {round_ + 1} {reader}: {(raw if reader == 'raw' else learned)[-1]:,.0f} records/s",
                      file=sys.stderr)

        result = {
            "records": args.records,
            "partitions": PARTITIONS,
            "batch_max_records": args.batch_max_records,
            "store": "couchbase (gocaves)" if args.couchbase else "sqlite",
            "kafka_options": kafka_options,
            "raw_records_per_s": [round(r) for r in raw],
            "worker_learned_per_s": [round(r) for r in learned],
            "worker_details": details,
            "median_ratio": round(statistics.median(learned) / statistics.median(raw), 3),
            "machine": machine(),
        }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        for server in reversed(started):
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
