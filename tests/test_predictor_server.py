"""The predictor process under load: hot swaps while requests arrive, over real HTTP.

The predictor runs as its own process (``predictor.server.run``) on a free
port of 127.0.0.1 and shares a SQLite store file with the test, which
publishes new versions as a worker would.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from modelstore import open_store
from modelstore.errors import ConfigError
from predictor.server import check_single_process

import predictor_support as pm

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE = (
    "import sys\n"
    "from predictor.server import run\n"
    "from predictor.settings import PredictorSettings\n"
    "run(PredictorSettings(store=sys.argv[1], port=int(sys.argv[2]), intra_op_threads=1))\n"
)
# Generous bounds for a shared 2-core machine; the measured delays are printed.
SERVED_WITHIN_S = 15.0
START_WITHIN_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PredictorProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "models.db"


@pytest.fixture
def store(db_path):
    store = open_store(f"sqlite:///{db_path}")
    yield store
    store.close()


@pytest.fixture
def predictor_process(store, tmp_path):
    log_path = tmp_path / "predictor.log"
    started: list[subprocess.Popen] = []

    def start() -> PredictorProcess:
        port = free_port()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", SERVE, store.url, str(port)],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "WEB_CONCURRENCY"},
            )
        started.append(proc)
        server = PredictorProcess(proc, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + START_WITHIN_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the predictor exited early:\n{server.log()}"
            try:
                if httpx.get(f"{server.url}/v2/health/ready", timeout=1.0).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the predictor was not ready within {START_WITHIN_S} s:\n{server.log()}")

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@dataclass
class LoadResult:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)
    first_seen: dict[int, float] = field(default_factory=dict)
    versions: set[int] = field(default_factory=set)


class Load:
    """Client threads that send predictions continuously and check each response."""

    def __init__(self, url: str, threads: int = 2, pause_s: float = 0.005):
        self.url = url
        self.pause_s = pause_s
        self.result = LoadResult()
        self.max_seen = 0
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, index: int) -> None:
        rows = pm.sample_rows(4, seed=index)
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            while not self.stop_event.is_set():
                with self.lock:
                    current = self.max_seen
                try:
                    response = client.post("/v1/models/flights/predict", json={"instances": rows})
                except httpx.HTTPError as exc:
                    self._fail(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    self._fail(f"{response.status_code}: {response.text[:300]}")
                    continue
                self._record(response.json(), current)
                time.sleep(self.pause_s)

    def _fail(self, message: str) -> None:
        with self.lock:
            self.result.failures.append(message)

    def _record(self, body: dict, current: int) -> None:
        version = body["version"]
        with self.lock:
            self.result.ok += 1
            self.result.versions.add(version)
            if version < current:
                self.result.regressions.append(f"answered by {version} after {current} was served")
            if version not in self.result.first_seen:
                self.result.first_seen[version] = time.monotonic()
            self.max_seen = max(self.max_seen, version)

    def wait_for(self, version: int, timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if version in self.result.first_seen:
                    return self.result.first_seen[version]
            time.sleep(0.005)
        return None


def scrape(url: str, name: str, labels: str) -> list[float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    pattern = re.compile(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", re.M)
    return [float(v) for v in pattern.findall(text)]


def wait_for_metric(url: str, name: str, labels: str, timeout_s: float = SERVED_WITHIN_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if scrape(url, name, labels):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_swap_under_load(store, db_path, predictor_process):
    pm.publish(store, "flights", "sgd", seed=1)
    server = predictor_process()
    # Good versions, one that onnxruntime cannot load, one whose bytes fail
    # the sha256 check, and large networks whose sessions take longest to build.
    plan = ["sgd", "mlp", "sgd", "invalid", "sgd", "corrupt", "mlp", "sgd", "sgd"]
    delays: dict[int, float] = {}
    broken: list[int] = []

    with Load(server.url) as load:
        assert load.wait_for(1, SERVED_WITHIN_S) is not None
        for seed, step in enumerate(plan, start=10):
            if step == "invalid":
                broken.append(pm.publish(store, "flights", "sgd", seed=seed, onnx_bytes=b"\x08garbage").version)
                assert wait_for_metric(server.url, "streamfit_predictor_model_loads_total", 'result="invalid"')
                continue
            if step == "corrupt":
                # The predictor is paused so that it cannot read the version
                # between its publish and the flipped byte.
                os.kill(server.proc.pid, signal.SIGSTOP)
                try:
                    info = pm.publish(store, "flights", "sgd", seed=seed)
                    pm.corrupt_artifact(db_path, info)
                finally:
                    os.kill(server.proc.pid, signal.SIGCONT)
                broken.append(info.version)
                assert wait_for_metric(server.url, "streamfit_predictor_model_loads_total", 'result="corrupt"')
                continue

            info = pm.publish(store, "flights", step, seed=seed)
            published_at = time.monotonic()
            seen_at = load.wait_for(info.version, SERVED_WITHIN_S)
            assert seen_at is not None, f"version {info.version} not served within {SERVED_WITHIN_S} s"
            delays[info.version] = round(seen_at - published_at, 3)
        # Requests keep flowing a little after the last swap.
        time.sleep(0.3)

    result = load.result
    print(f"\n{result.ok} requests answered; delay from publish to first answer by version: {delays}")
    assert result.failures == []
    assert result.regressions == []
    assert result.ok > 0
    assert result.versions.isdisjoint(broken)
    assert result.versions == {1, *delays}

    for name, labels, expected in [
        ("streamfit_predictor_model_loads_total", 'result="invalid"', 1.0),
        ("streamfit_predictor_model_loads_total", 'result="corrupt"', 1.0),
        ("streamfit_predictor_swaps_total", "", float(len(delays))),
        ("streamfit_predictor_served_version", 'model="flights"', float(max(delays))),
    ]:
        if labels:
            assert scrape(server.url, name, labels) == [expected], name
        else:
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            assert re.findall(rf"^{name} (\S+)$", text, re.M) == [repr(expected)], name

    # One process counts every request: each scrape reads the same total,
    # from one series.
    for _ in range(10):
        assert scrape(server.url, "streamfit_predictor_requests_total", 'model="flights",status="200"') == [
            float(result.ok)
        ]

    log = server.log()
    assert "intra_op_threads=1 inter_op_threads=1" in log
    assert log.count("is never served") == 2, log


def test_run_rejects_several_workers(store, tmp_path):
    env = dict(os.environ, WEB_CONCURRENCY="4")
    out = subprocess.run(
        [sys.executable, "-c", SERVE, store.url, str(free_port())],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    assert "WEB_CONCURRENCY='4'" in out.stderr
    assert "one process per container" in out.stderr


def test_single_process_check():
    check_single_process({})
    check_single_process({"WEB_CONCURRENCY": "1"})
    with pytest.raises(ConfigError, match="run more containers"):
        check_single_process({"WEB_CONCURRENCY": "2"})


def predictor_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamfit.cli", "predictor", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )


def test_bad_store_url_is_one_line(tmp_path):
    out = predictor_command("--store", "sqlite://models.db", "--port", str(free_port()))
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("streamfit predictor: error: invalid SQLite store URL 'sqlite://models.db'")
    assert "Traceback" not in out.stderr


def test_port_in_use_is_one_line(store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = predictor_command("--store", store.url, "--port", str(port))
    assert out.returncode == 2
    assert f"invalid address 127.0.0.1:{port}" in out.stderr
    assert "choose another --port" in out.stderr
    assert "Traceback" not in out.stderr
    assert "predictor is ready" not in out.stderr


def test_empty_store_noted_at_start(tmp_path, caplog):
    from prometheus_client import CollectorRegistry

    from predictor.app import create_app
    from predictor.settings import PredictorSettings
    from predictor_support import LiveServer

    url = f"sqlite:///{tmp_path / 'typo.db'}"
    server = LiveServer(create_app(PredictorSettings(store=url), registry=CollectorRegistry())).start()
    try:
        assert server.client.get("/v1/models/flights/predict").status_code in (404, 405)
    finally:
        server.stop()
    assert any("has no models yet" in r.getMessage() and "typo.db" in r.getMessage() for r in caplog.records)
