"""Session cache, hot swap and head watcher against a real SQLite store."""

from __future__ import annotations

import gc
import logging
import time
import weakref

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelstore import open_store
from modelstore.errors import ModelNotFound, VersionNotFound
from predictor.loader import LoadFailed, load_version
from predictor.metrics import PredictorMetrics
from predictor.refresh import HeadWatcher
from predictor.sessions import NotServable, SessionCache
from predictor.settings import PredictorSettings

import predictor_support as pm


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "models.db"


@pytest.fixture
def store(db_path):
    store = open_store(f"sqlite:///{db_path}")
    yield store
    store.close()


@pytest.fixture
def metrics():
    return PredictorMetrics(CollectorRegistry())


def make_cache(store, metrics, load=load_version, **overrides) -> SessionCache:
    settings = PredictorSettings(store=store.url, **{"intra_op_threads": 1, **overrides})
    return SessionCache(store, settings, metrics, load=load)


def value(metrics: PredictorMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def loads(metrics: PredictorMetrics, result: str) -> float:
    return value(metrics, "streamfit_predictor_model_loads_total", {"result": result})


def test_latest_loads_once_and_predicts(store, metrics):
    pm.publish(store, "flights", "sgd", seed=1)
    cache = make_cache(store, metrics)
    first = cache.latest("flights")
    assert cache.latest("flights") is first
    assert first.version == 1
    assert loads(metrics, "ok") == 1

    rows = pm.sample_rows(10, seed=4)
    arrays = first.predict(pm.SCHEMA.encode(rows))
    assert arrays["label"].tolist() == pm.sklearn_predict("sgd", 1, rows).tolist()
    assert arrays["probabilities"].shape == (10, 2)


def test_unknown_model_and_version(store, metrics):
    pm.publish(store, "flights", "sgd", seed=1)
    cache = make_cache(store, metrics)
    with pytest.raises(ModelNotFound):
        cache.latest("absent")
    with pytest.raises(VersionNotFound):
        cache.pinned("flights", 7)
    with pytest.raises(VersionNotFound, match="carries only the spec"):
        cache.pinned("flights", 0)
    assert len(cache) == 0


def test_refresh_swaps_newer_version(store, metrics):
    pm.publish(store, "flights", "sgd", seed=1)
    cache = make_cache(store, metrics)
    old = cache.latest("flights")
    assert cache.refresh("flights", old) is None

    pm.publish(store, "flights", "sgd", seed=2)
    new = cache.refresh("flights", old)
    assert new is not None and new.version == 2
    assert cache.latest("flights") is new
    assert value(metrics, "streamfit_predictor_swaps_total") == 1
    assert value(metrics, "streamfit_predictor_served_version", {"model": "flights"}) == 2
    # A pinned request for the replaced version loads it again, on its own.
    assert cache.pinned("flights", 1).version == 1
    assert cache.pinned("flights", 2) is new


def test_corrupt_artifact_keeps_old_version(store, metrics, db_path, caplog):
    pm.publish(store, "flights", "sgd", seed=1)
    cache = make_cache(store, metrics)
    old = cache.latest("flights")

    bad = pm.publish(store, "flights", "sgd", seed=2)
    pm.corrupt_artifact(db_path, bad)
    with caplog.at_level(logging.ERROR, logger="predictor.sessions"):
        for _ in range(5):
            assert cache.refresh("flights", old) is None
    assert cache.latest("flights") is old
    assert loads(metrics, "corrupt") == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "version 2" in errors[0].getMessage()
    assert "sha256" in errors[0].getMessage()
    with pytest.raises(NotServable, match="sha256"):
        cache.pinned("flights", 2)
    assert loads(metrics, "corrupt") == 1

    pm.publish(store, "flights", "sgd", seed=3)
    assert cache.refresh("flights", old).version == 3


@pytest.mark.parametrize(
    "broken, result, fragment",
    [
        ({"onnx_bytes": b"not an onnx graph"}, "invalid", "onnxruntime cannot load"),
        ({"spec": dict(pm.CLASSIFIER_SPEC, labels=["a", "b", "c"])}, "warm_failed", "expected (1, 3)"),
        ({"onnx": {"input": "features", "width": 9, "outputs": {"label": "label"}}}, "invalid", "width 9"),
        ({"onnx": {"input": "x", "width": 5, "outputs": {"label": "label"}}}, "invalid", "expected one float input 'x'"),
    ],
)
def test_broken_version_is_never_served(store, metrics, broken, result, fragment):
    pm.publish(store, "flights", "sgd", seed=1)
    cache = make_cache(store, metrics)
    old = cache.latest("flights")

    pm.publish(store, "flights", "sgd", seed=2, **broken)
    assert cache.refresh("flights", old) is None
    assert cache.latest("flights") is old
    assert loads(metrics, result) == 1
    with pytest.raises(NotServable, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        cache.pinned("flights", 2)
    assert loads(metrics, result) == 1


def test_cold_start_falls_back_below_broken_head(store, metrics):
    pm.publish(store, "flights", "sgd", seed=1)
    pm.publish(store, "flights", "sgd", seed=2, onnx_bytes=b"garbage")
    model = make_cache(store, metrics).latest("flights")
    assert model.version == 1
    assert loads(metrics, "invalid") == 1


def test_store_outage_during_load_is_retried(store, metrics, caplog):
    attempts = []

    def flaky_load(*args, **kwargs):
        attempts.append(args[2])
        if len(attempts) <= 2:
            raise LoadFailed("unavailable", "store timed out")
        return load_version(*args, **kwargs)

    pm.publish(store, "flights", "sgd", seed=1)
    cache = make_cache(store, metrics, load=flaky_load)
    with caplog.at_level(logging.WARNING, logger="predictor.sessions"):
        for _ in range(2):
            with pytest.raises(NotServable, match="timed out"):
                cache.latest("flights")
    assert cache.latest("flights").version == 1
    assert loads(metrics, "unavailable") == 2
    assert len([r for r in caplog.records if "timed out" in r.getMessage()]) == 1


def test_lru_evicts_least_recently_used(store, metrics):
    for name in ("a", "b", "c"):
        pm.publish(store, name, "sgd", seed=1)
    cache = make_cache(store, metrics, cache_max_models=2)
    a = cache.latest("a")
    cache.latest("b")
    assert cache.latest("a") is a
    cache.latest("c")

    assert len(cache) == 2
    assert value(metrics, "streamfit_predictor_cache_evictions_total", {"reason": "count"}) == 1
    assert value(metrics, "streamfit_predictor_cache_models") == 2
    assert cache.latest("a") is a
    assert {m.name for m in cache.loaded_latest()} == {"a", "c"}
    assert metrics.registry.get_sample_value("streamfit_predictor_served_version", {"model": "b"}) is None


def test_replaced_sessions_are_freed(store, metrics):
    pm.publish(store, "flights", "sgd", seed=1)
    cache = make_cache(store, metrics)
    current = cache.latest("flights")
    row = pm.SCHEMA.encode(pm.sample_rows(1, seed=0))

    # A request in flight keeps its own reference: the old session finishes it.
    in_flight = cache.latest("flights")
    replaced = []
    for seed in range(2, 22):
        pm.publish(store, "flights", "sgd", seed=seed)
        new = cache.refresh("flights", current)
        assert new is not None
        replaced.append(weakref.ref(current))
        current = new
    del new

    assert in_flight.predict(row)["label"].shape == (1,)
    assert in_flight.version == 1
    del in_flight
    gc.collect()
    alive = [r().version for r in replaced if r() is not None]
    assert alive == []
    assert cache.latest("flights").version == 21


def test_head_watcher_serves_new_version(store, metrics):
    pm.publish(store, "flights", "sgd", seed=1)
    cache = make_cache(store, metrics)
    watcher = HeadWatcher(store, cache, interval_ms=20)
    watcher.start()
    try:
        assert watcher.ready.wait(10)
        assert cache.latest("flights").version == 1
        published = pm.publish(store, "flights", "sgd", seed=2)
        deadline = time.monotonic() + 10
        while cache.latest("flights").version < published.version and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cache.latest("flights").version == published.version
    finally:
        watcher.stop()
    assert value(metrics, "streamfit_predictor_version_age_seconds", {"model": "flights"}) >= 0


def test_session_threads_are_set(store, metrics):
    pm.publish(store, "flights", "sgd", seed=1)
    model = make_cache(store, metrics, intra_op_threads=1).latest("flights")
    options = model.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert np.isfinite(model.predict(pm.SCHEMA.encode(pm.sample_rows(2, 1)))["probabilities"]).all()


class CountingStore:
    """The real store, with a count of head reads."""

    def __init__(self, store):
        self.store = store
        self.head_reads = 0

    def head(self, name):
        self.head_reads += 1
        return self.store.head(name)

    def __getattr__(self, attr):
        return getattr(self.store, attr)


def test_missing_model_answered_from_memory_briefly(store, metrics):
    counting = CountingStore(store)
    cache = make_cache(counting, metrics, refresh_interval_ms=1000)
    for _ in range(5):
        with pytest.raises(ModelNotFound, match="later"):
            cache.latest("later")
    assert counting.head_reads == 1

    pm.publish(store, "later", "sgd", seed=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            assert cache.latest("later").version == 1
            break
        except ModelNotFound:
            time.sleep(0.02)
    assert cache.latest("later").version == 1
    assert counting.head_reads >= 2
