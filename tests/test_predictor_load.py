"""The predictor under sustained change: many publishes under load, memory across swaps, 10,000 models.

The predictor runs as its own process where memory or swaps are measured,
and shares a real SQLite store file with the test, which publishes as a
worker would. Time is never asserted; the measurements are printed.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelstore import open_store
from predictor.app import create_app
from predictor.settings import PredictorSettings

import predictor_support as pm
from predictor_support import LiveServer, PredictorProcess

# Generous bounds for a shared 2-core machine.
SERVED_WITHIN_S = 15.0
# Distinct fitted models that the versions cycle through.
SEEDS = 8


@pytest.fixture
def store(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'models.db'}")
    yield store
    store.close()


@pytest.fixture
def predictor(store, tmp_path):
    started = []

    def start(**settings) -> PredictorProcess:
        process = PredictorProcess(tmp_path / f"predictor-{len(started)}.log", store=store.url, **settings)
        started.append(process)
        return process.wait_ready()

    yield start
    for process in started:
        process.stop()


class Requests:
    """Client threads that predict continuously and check each response's version.

    A response must come from a version at least as new as the newest
    version any response returned before the request was sent: that
    version was being served when the request arrived, and the served
    version never goes back.
    """

    def __init__(self, url: str, threads: int = 2):
        self.url = url
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.regressions: list[str] = []
        self.newest = 0
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> "Requests":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, index: int) -> None:
        rows = pm.sample_rows(3, seed=index)
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            while not self.stop_event.is_set():
                with self.lock:
                    floor = self.newest
                try:
                    response = client.post("/v1/models/flights/predict", json={"instances": rows})
                except httpx.HTTPError as exc:
                    self._record_failure(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    self._record_failure(f"{response.status_code}: {response.text[:300]}")
                    continue
                version = response.json()["version"]
                with self.lock:
                    self.ok += 1
                    if version < floor:
                        self.regressions.append(f"version {version} answered after {floor} was served")
                    self.newest = max(self.newest, version)

    def _record_failure(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)

    def wait_for(self, version: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if self.newest >= version:
                    return True
            time.sleep(0.002)
        return False


@pytest.mark.slow
def test_hundred_publishes_under_load(store, predictor):
    for seed in range(SEEDS):
        pm.onnx_model("sgd", seed)
    pm.publish(store, "flights", "sgd", seed=0)
    server = predictor(refresh_interval_ms=50)
    published = []
    with Requests(server.url) as requests:
        assert requests.wait_for(1, SERVED_WITHIN_S)
        for i in range(100):
            info = pm.publish(store, "flights", "sgd", seed=(i + 1) % SEEDS)
            published.append(info.version)
            # Every fifth version is waited for, so swaps happen throughout
            # the run; the others may be skipped by a newer one.
            if i % 5 == 4:
                assert requests.wait_for(info.version, SERVED_WITHIN_S), f"version {info.version} not served"
        assert requests.wait_for(published[-1], SERVED_WITHIN_S)

    swaps = pm.scrape_value(server.url, "streamfit_predictor_swaps_total")
    print(f"\n{requests.ok} requests answered while {len(published)} versions were published; {swaps:.0f} swaps")
    assert len(published) == 100
    assert requests.failures == []
    assert requests.regressions == []
    assert requests.newest == published[-1] == 101
    assert 20 <= swaps <= 100


@pytest.mark.slow
def test_thousand_swaps_keep_memory_flat(store, predictor):
    for seed in range(SEEDS):
        pm.onnx_model("sgd", seed)
    pm.publish(store, "flights", "sgd", seed=0)
    # Four pinned sessions fill their pool well before swap 100, so the
    # pool's own growth is not mistaken for a leak.
    server = predictor(refresh_interval_ms=10, cache_max_pinned=4)
    rows = pm.sample_rows(2, seed=1)
    rss: dict[int, int] = {}

    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        assert client.post("/v1/models/flights/predict", json={"instances": rows}).json()["version"] == 1
        for swap in range(1, 1001):
            if swap % 100 == 50:
                # A version onnxruntime cannot load: logged, counted, never served.
                broken = pm.publish(store, "flights", "sgd", seed=swap % SEEDS, onnx_bytes=b"not onnx")
                assert wait_for_sample(server.url, "streamfit_predictor_model_loads_total",
                                       'result="invalid"', swap // 100 + 1)
                response = client.post("/v1/models/flights/predict", json={"instances": rows})
                assert response.json()["version"] == broken.version - 1
            info = pm.publish(store, "flights", "sgd", seed=swap % SEEDS)
            deadline = time.monotonic() + SERVED_WITHIN_S
            served = 0
            while served != info.version:
                response = client.post("/v1/models/flights/predict", json={"instances": rows})
                assert response.status_code == 200, response.text
                served = response.json()["version"]
                assert time.monotonic() < deadline, f"version {info.version} not served after swap {swap}"
            # Requests that fail or pin old versions, which could hold on to
            # replaced sessions through a traceback or a cache entry.
            assert client.post("/v1/models/flights/predict", json={"features": [1]}).status_code == 400
            assert client.post("/v1/models/absent/predict", json={"features": {}}).status_code == 404
            if swap % 10 == 0:
                pinned = client.post(f"/v1/models/flights/versions/{info.version - 5}/predict", json={"instances": rows})
                assert pinned.status_code in (200, 503), pinned.text
            if swap % 100 == 0:
                rss[swap] = server.rss_bytes()

    growth = (rss[1000] - rss[100]) / rss[100]
    measured = (
        f"resident memory after swap 100: {rss[100] / 2**20:.1f} MiB, after swap 1000: "
        f"{rss[1000] / 2**20:.1f} MiB ({growth:+.2%}); every 100 swaps (MiB): "
        + " ".join(f"{value / 2**20:.1f}" for _, value in sorted(rss.items()))
    )
    print("\n" + measured)
    assert abs(growth) <= 0.05, measured
    swaps = pm.scrape_value(server.url, "streamfit_predictor_swaps_total")
    assert swaps == 1000, measured
    assert pm.scrape_value(server.url, "streamfit_predictor_model_loads_total", 'result="invalid"') == 10


def wait_for_sample(url: str, name: str, labels: str, value: float) -> bool:
    deadline = time.monotonic() + SERVED_WITHIN_S
    while time.monotonic() < deadline:
        if pm.scrape_value(url, name, labels) == value:
            return True
        time.sleep(0.01)
    return False


def zipf_ranks(count: int, draws: int, exponent: float, seed: int) -> np.ndarray:
    """Draw ``draws`` indexes in [0, count) with P(rank k) proportional to 1 / k**exponent."""
    weights = 1.0 / np.arange(1, count + 1) ** exponent
    rng = np.random.default_rng(seed)
    return rng.choice(count, size=draws, p=weights / weights.sum())


@pytest.fixture
def fast_store_dir(tmp_path):
    # Publishing 10,000 models is 20,000 commits; on tmpfs a commit's fsync
    # costs nothing. The store is the same SQLite file format either way.
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=root, prefix="streamfit-10k-") as folder:
        yield Path(folder)


@pytest.mark.slow
def test_ten_thousand_models_zipf(fast_store_dir):
    models = 10_000
    cache_max = 500
    store = open_store(f"sqlite:///{fast_store_dir / 'models.db'}")
    started = time.perf_counter()
    names = [f"model-{i:05d}" for i in range(models)]
    for i, name in enumerate(names):
        pm.create_and_publish(store, name, "sgd", seed=i % SEEDS)
    built_s = time.perf_counter() - started

    rows = pm.sample_rows(4, seed=11)
    expected = {seed: pm.sklearn_predict("sgd", seed, rows).tolist() for seed in range(SEEDS)}
    # Rank 1 is a random model, so popular models are spread over the seeds.
    order = np.random.default_rng(5).permutation(models)
    picks = order[zipf_ranks(models, 4000, exponent=1.1, seed=6)]

    settings = PredictorSettings(
        store=store.url, intra_op_threads=1, cache_max_models=cache_max, cache_max_pinned=8
    )
    server = LiveServer(create_app(settings, registry=CollectorRegistry())).start()
    wrong, sizes = [], []
    try:
        started = time.perf_counter()
        for n, index in enumerate(picks):
            name = names[index]
            response = server.client.post(f"/v1/models/{name}/predict", json={"instances": rows})
            body = response.json()
            if response.status_code != 200 or body["predictions"] != expected[index % SEEDS]:
                wrong.append(f"{name}: {response.status_code} {response.text[:200]}")
            if n % 200 == 0:
                sizes.append(server.metric("streamfit_predictor_cache_models"))
        served_s = time.perf_counter() - started
        sizes.append(server.metric("streamfit_predictor_cache_models"))
        evictions = server.metric("streamfit_predictor_cache_evictions_total", {"reason": "count"})
        loads = server.metric("streamfit_predictor_model_loads_total", {"result": "ok"})
    finally:
        server.stop()
        store.close()

    distinct = len(set(picks.tolist()))
    print(
        f"\n{models} models published in {built_s:.1f} s; {len(picks)} requests over {distinct} "
        f"models in {served_s:.1f} s; {loads:.0f} loads, {evictions:.0f} evictions, "
        f"hit ratio {1 - loads / len(picks):.2f}"
    )
    assert wrong == []
    assert max(sizes) <= cache_max
    assert sizes[-1] == cache_max
    assert distinct > cache_max
    assert evictions == loads - cache_max
