"""``streamfit demo``: the main job on the embedded defaults, with a report.

The demo writes the flights records to a JSON-lines file, starts the
predictor and the worker as two processes on one SQLite store, sends
prediction requests while the worker learns, and prints what happened:
rows learned, versions published, test-then-train accuracy against the
running majority-class baseline, and predict latency percentiles.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import httpx

from modelstore import open_store
from streamfit.flights import read_flights, write_json_lines

MODEL = "flights"
REQUEST_INTERVAL_S = 0.02


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamfit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=".work/demo", help="folder for the data file and the store")
    parser.add_argument("--rows", type=int, default=100_000, help="flights to stream, in time order")
    parser.add_argument("--plot", metavar="FILE", default=None,
                        help="also write a PNG of the model's test-then-train accuracy and samples "
                             "learned across its versions (needs streamfit[plot])")
    parser.add_argument(
        "--batch-max-records", type=int, default=100,
        help="records per refit; small batches let the model follow the drifting delay rate",
    )
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "flights.jsonl"
    db = workdir / "models.db"
    for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        stale.unlink(missing_ok=True)
    store_url = f"sqlite:///{db}"

    started = time.monotonic()
    rows = write_json_lines(read_flights(limit=args.rows), data)
    print(f"wrote {rows} flight records to {data}")

    port = _free_port()
    predictor = _start([
        "predictor", "--store", store_url, "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "WARNING",
    ], workdir / "predictor.log")
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, predictor)
        spec = resources.files("trainer") / "specs" / "flights.json"
        worker = _start([
            "worker", "--source", f"file:{data}", "--store", store_url, "--model", MODEL,
            "--model-spec", str(spec), "--batch-max-records", str(args.batch_max_records),
            "--metrics-port", "0", "--log-level", "WARNING",
        ], workdir / "worker.log")
        samples = _sample_features(data)
        during = _request_until_exit(base, worker, samples)
        worker_code = worker.wait()
        final_version = _latest_version(store_url)
        _wait_for_version(base, samples[0], final_version)
        after = _request_n(base, samples, 1000)
    finally:
        _stop(predictor)

    if worker_code != 0:
        print(f"the worker exited with code {worker_code}; see {workdir / 'worker.log'}")
        return 1
    _report(store_url, rows, during, after, time.monotonic() - started)
    if args.plot:
        from streamfit.plots import plot_model

        with open_store(store_url) as store:
            print(f"  history picture              {plot_model(store, MODEL, args.plot)}")
    return 0


def _start(args: list[str], log_path: Path) -> subprocess.Popen:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "streamfit.cli", *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(base: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the predictor exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the predictor at {base} was not ready after {timeout_s} s")


def _sample_features(data: Path, count: int = 500) -> list[dict]:
    import json

    samples = []
    with data.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i % 97 == 0:
                samples.append(json.loads(line)["features"])
            if len(samples) >= count:
                break
    return samples


class Requests:
    """Client-side record of prediction requests."""

    def __init__(self) -> None:
        self.latencies_s: list[float] = []
        self.versions: set[int] = set()
        self.not_ready = 0
        self.failed = 0
        self.failures: list[str] = []

    def fail(self, detail: str) -> None:
        self.failed += 1
        if len(self.failures) < 5:
            self.failures.append(detail)


def _predict(client: httpx.Client, base: str, features: dict, record: Requests) -> None:
    start = time.perf_counter()
    try:
        response = client.post(f"{base}/v1/models/{MODEL}/predict", json={"features": features})
    except httpx.TransportError as exc:
        record.fail(f"{type(exc).__name__}: {exc}")
        return
    elapsed = time.perf_counter() - start
    if response.status_code in (404, 503) and not record.latencies_s:
        # Before the first publish the model is unknown (404) or has only
        # its version 0 without weights (503).
        record.not_ready += 1
    elif response.status_code == 200:
        record.latencies_s.append(elapsed)
        record.versions.add(response.json()["version"])
    else:
        record.fail(f"HTTP {response.status_code}: {response.text[:200]}")


def _request_until_exit(base: str, worker: subprocess.Popen, samples: list[dict]) -> Requests:
    record = Requests()
    with httpx.Client(timeout=10) as client:
        i = 0
        while worker.poll() is None:
            _predict(client, base, samples[i % len(samples)], record)
            i += 1
            time.sleep(REQUEST_INTERVAL_S)
    return record


def _request_n(base: str, samples: list[dict], count: int) -> Requests:
    record = Requests()
    with httpx.Client(timeout=10) as client:
        for i in range(count):
            _predict(client, base, samples[i % len(samples)], record)
    return record


def _latest_version(store_url: str) -> int:
    with open_store(store_url) as store:
        return store.head(MODEL).latest


def _wait_for_version(base: str, features: dict, version: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = httpx.post(f"{base}/v1/models/{MODEL}/predict", json={"features": features}, timeout=5)
        if response.status_code == 200 and response.json()["version"] >= version:
            return
        time.sleep(0.1)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _report(store_url: str, rows: int, during: Requests, after: Requests, elapsed_s: float) -> None:
    with open_store(store_url) as store:
        info = store.version(MODEL)
    metrics = info.metadata.get("metrics", {})
    latencies = during.latencies_s + after.latencies_s
    lines = [
        "",
        "streamfit demo report",
        f"  records in the stream        {rows}",
        f"  records learned              {info.samples_learned}",
        f"  versions published           {info.version}",
        f"  test-then-train accuracy     {metrics.get('accuracy', float('nan')):.4f}"
        f"  (majority-class baseline {metrics.get('baseline_accuracy', float('nan')):.4f},"
        f" {metrics.get('n_scored', 0)} records scored)",
        f"  predictions served           {len(latencies)}"
        f" ({during.failed + after.failed} failed, {len(during.versions)} versions seen while learning)",
    ]
    if latencies:
        lines.append(
            "  predict latency (client)     "
            f"p50 {_percentile(latencies, 0.50) * 1000:.2f} ms, "
            f"p95 {_percentile(latencies, 0.95) * 1000:.2f} ms, "
            f"p99 {_percentile(latencies, 0.99) * 1000:.2f} ms"
        )
    for failure in during.failures + after.failures:
        lines.append(f"  failed request: {failure}")
    lines.append(f"  elapsed                      {elapsed_s:.1f} s")
    print("\n".join(lines))
