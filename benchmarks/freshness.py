"""Measure freshness: the time from producing a record to the first prediction served by a version that learned it.

Runs the real pieces on one machine: a single-node Kafka broker and gocaves
(started with tests/servers/servers.py), and ``streamfit worker`` and
``streamfit predictor`` as subprocesses on a Couchbase store in gocaves.
Flights records keyed by one model are produced at a steady rate. Three
observers time each record's journey, all with the wall clock of this
machine:

- published: the ``created_at`` of the first version whose stored offsets
  pass the record (set by the store when the worker publishes);
- in the store: the first time a loop that reads the model's head directly
  (every ``--poll-ms``) reads that version or a later one. This is the
  peer: freshness without the predictor;
- served: the first time a client that sends predict requests back to back
  gets an answer from that version or a later one.

served minus "in the store" is what the predictor adds: its head refresh
interval (``--refresh-interval-ms``) and the time to load and warm the new
version. The figures depend on the batch settings, so they are printed
with them.

Usage:
    .venv/bin/python benchmarks/freshness.py                        # defaults below
    .venv/bin/python benchmarks/freshness.py --records 1200 --rate 40 --batch-max-wait-ms 200
    .venv/bin/python benchmarks/freshness.py --out freshness.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from modelstore import open_store  # noqa: E402
from streamfit.flights import read_flights  # noqa: E402

MODEL = "freshness"
READY_TIMEOUT_S = 120.0


def load_servers():
    spec = importlib.util.spec_from_file_location("streamfit_test_servers", ROOT / "tests" / "servers" / "servers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Timeline:
    """First wall-clock time at which each version number was observed."""

    first_seen: dict[int, float] = field(default_factory=dict)
    observations: int = 0
    gaps_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _last: float | None = None

    def saw(self, version: int, at: float) -> None:
        self.observations += 1
        if self._last is not None:
            self.gaps_s.append(at - self._last)
        self._last = at
        self.first_seen.setdefault(version, at)

    def first_at_least(self, version: int) -> float | None:
        times = [t for v, t in self.first_seen.items() if v >= version]
        return min(times) if times else None


def poll_store(store_url: str, stop: threading.Event, timeline: Timeline, poll_s: float) -> None:
    with open_store(store_url) as store:
        while not stop.is_set():
            try:
                latest = store.head(MODEL).latest
            except Exception as err:  # the benchmark reports it; polling goes on
                timeline.errors.append(repr(err))
                latest = None
            if latest is not None:
                timeline.saw(latest, time.time())
            stop.wait(poll_s)


def poll_predictor(base: str, features: dict, stop: threading.Event, timeline: Timeline) -> None:
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            try:
                response = client.post(f"{base}/v1/models/{MODEL}/predict", json={"features": features})
            except httpx.TransportError as err:
                timeline.errors.append(repr(err))
                stop.wait(0.05)
                continue
            at = time.time()
            if response.status_code == 200:
                timeline.saw(int(response.json()["version"]), at)
            elif response.status_code not in (404, 503):
                timeline.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")


def produce(bootstrap: str, topic: str, records: list[dict], rate: float) -> list[tuple[int, float]]:
    """Send records at ``rate`` per second; return (offset, send time) per record."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=[bootstrap], acks="all", linger_ms=0)
    sent: list[tuple[object, float]] = []
    start = time.monotonic()
    try:
        for i, record in enumerate(records):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            at = time.time()
            future = producer.send(topic, key=MODEL.encode(), value=json.dumps(record).encode())
            sent.append((future, at))
        producer.flush()
        return [(future.get(timeout=30).offset, at) for future, at in sent]
    finally:
        producer.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50_s": round(percentile(values, 0.50), 4),
        "p99_s": round(percentile(values, 0.99), 4),
        "max_s": round(max(values), 4),
    }


def start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streamfit.cli", *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(os.environ),
        )


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout_s: float, what: str, processes: list[tuple[subprocess.Popen, Path]]):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process, log in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{what}: a process exited with {process.returncode}; see {log}")
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not reached within {timeout_s} s")


def measure(args: argparse.Namespace, bootstrap: str, store_url: str, workdir: Path) -> dict:
    from kafka import KafkaAdminClient

    topic = f"freshness-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics({topic: {"num_partitions": 1, "replication_factor": 1}}, wait_for_metadata=True)
    admin.close()

    flights = read_flights(limit=args.warmup + args.records)
    spec = json.loads((resources.files("trainer") / "specs" / "flights.json").read_text())
    with open_store(store_url) as store:
        store.create_model(MODEL, spec)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    worker_log, predictor_log = workdir / "worker.log", workdir / "predictor.log"
    predictor = start(["predictor", "--store", store_url, "--host", "127.0.0.1", "--port", str(port),
                       "--refresh-interval-ms", str(args.refresh_interval_ms), "--log-level", "WARNING"], predictor_log)
    worker = start(["worker", "--source", f"kafka://{bootstrap}/{topic}", "--store", store_url, "--model", MODEL,
                    "--group-id", f"freshness-{uuid.uuid4().hex[:8]}",
                    "--batch-max-records", str(args.batch_max_records),
                    "--batch-max-wait-ms", str(args.batch_max_wait_ms),
                    "--metrics-port", "0", "--log-level", "WARNING"], worker_log)
    processes = [(worker, worker_log), (predictor, predictor_log)]
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        features = flights[0]["features"]

        def served_version() -> int | None:
            try:
                response = httpx.post(f"{base}/v1/models/{MODEL}/predict", json={"features": features}, timeout=5)
            except httpx.TransportError:
                return None
            return response.json()["version"] if response.status_code == 200 else None

        # Warm-up: the first version makes the predictor load the model and
        # the worker cache its learner, which the measured records then find ready.
        produce(bootstrap, topic, flights[: args.warmup], rate=1000)
        wait_until(served_version, READY_TIMEOUT_S, "the predictor serves the warm-up version", processes)

        store_timeline, served_timeline = Timeline(), Timeline()
        threads = [
            threading.Thread(target=poll_store, args=(store_url, stop, store_timeline, args.poll_ms / 1000), daemon=True),
            threading.Thread(target=poll_predictor, args=(base, features, stop, served_timeline), daemon=True),
        ]
        for thread in threads:
            thread.start()

        sent = produce(bootstrap, topic, flights[args.warmup:], args.rate)
        last_offset = sent[-1][0]
        partition = f"{topic}/0"

        with open_store(store_url) as store:
            def learned_all():
                return store.version(MODEL).offsets.get(partition, 0) > last_offset

            wait_until(learned_all, READY_TIMEOUT_S, "the worker learns every record", processes)
            final = store.head(MODEL).latest
            wait_until(lambda: served_timeline.first_at_least(final), READY_TIMEOUT_S,
                       "the predictor serves the last version", processes)
            versions = [v for v in store.versions(MODEL) if v.version > 0]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        stop_process(worker)
        stop_process(predictor)

    return analyse(args, sent, partition, versions, store_timeline, served_timeline)


def analyse(args, sent, partition, versions, store_timeline: Timeline, served_timeline: Timeline) -> dict:
    ordered = sorted(versions, key=lambda v: v.version)
    published, in_store, served = [], [], []
    for offset, sent_at in sent:
        version = next(v for v in ordered if v.offsets.get(partition, 0) > offset)
        published.append(float(version.metadata["created_at"]) - sent_at)
        in_store.append(store_timeline.first_at_least(version.version) - sent_at)
        served.append(served_timeline.first_at_least(version.version) - sent_at)

    predictor_adds = [s - t for s, t in zip(served, in_store)]
    return {
        "settings": {
            "records": args.records, "rate_per_s": args.rate, "batch_max_records": args.batch_max_records,
            "batch_max_wait_ms": args.batch_max_wait_ms, "refresh_interval_ms": args.refresh_interval_ms,
            "store_poll_ms": args.poll_ms,
        },
        "versions_published": len({v.version for v in ordered if v.offsets.get(partition, 0) > sent[0][0]}),
        "published": summary(published),
        "in_store": summary(in_store),
        "served": summary(served),
        "predictor_adds": summary(predictor_adds),
        "served_poll_gap_p50_s": round(percentile(served_timeline.gaps_s, 0.5), 5),
        "store_poll_gap_p50_s": round(percentile(store_timeline.gaps_s, 0.5), 5),
        "observer_errors": (store_timeline.errors + served_timeline.errors)[:5],
    }


def report(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"freshness of {s['records']} records at {s['rate_per_s']}/s, batches of {s['batch_max_records']} records "
        f"or {s['batch_max_wait_ms']} ms, predictor refresh {s['refresh_interval_ms']} ms, "
        f"{result['versions_published']} versions",
        f"  {'':28} {'p50':>8} {'p99':>8} {'max':>8}",
    ]
    for key, label in (("published", "version published"), ("in_store", "seen in the store (peer)"),
                       ("served", "first served prediction"), ("predictor_adds", "predictor adds")):
        row = result[key]
        lines.append(f"  {label:28} {row['p50_s'] * 1000:7.0f}ms {row['p99_s'] * 1000:7.0f}ms {row['max_s'] * 1000:7.0f}ms")
    lines.append(f"  observer resolution: predict requests every {result['served_poll_gap_p50_s'] * 1000:.1f} ms, "
                 f"store reads every {result['store_poll_gap_p50_s'] * 1000:.1f} ms (medians)")
    if result["observer_errors"]:
        lines.append(f"  observer errors: {result['observer_errors']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=600, help="measured records (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=20.0, help="records produced per second (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=200, help="records learned before measuring (default: %(default)s)")
    parser.add_argument("--batch-max-records", type=int, default=500, help="worker setting (default: %(default)s)")
    parser.add_argument("--batch-max-wait-ms", type=int, default=1000, help="worker setting (default: %(default)s)")
    parser.add_argument("--refresh-interval-ms", type=int, default=250, help="predictor setting (default: %(default)s)")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="store read interval of the peer (default: %(default)s)")
    parser.add_argument("--out", help="also write the result as JSON to this file")
    args = parser.parse_args()
    if args.records < 1 or args.rate <= 0 or args.warmup < 1:
        parser.error("--records and --warmup must be at least 1 and --rate above 0")

    servers = load_servers()
    workdir = ROOT / ".work" / "benchmarks" / f"freshness-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir.mkdir(parents=True, exist_ok=True)
    kafka = servers.start_kafka(workdir / "kafka")
    try:
        gocaves = servers.start_gocaves(workdir / "gocaves")
        try:
            os.environ["STREAMFIT_COUCHBASE_USERNAME"] = gocaves.username
            os.environ["STREAMFIT_COUCHBASE_PASSWORD"] = gocaves.password
            store_url = f"{gocaves.connstr}/{gocaves.bucket}?scope=freshness_{uuid.uuid4().hex[:8]}"
            result = measure(args, kafka.bootstrap, store_url, workdir)
        finally:
            gocaves.stop()
    finally:
        kafka.stop()

    print(report(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
