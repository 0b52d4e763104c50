"""Session cache bounds, aliases, load waits and head reads, against a real SQLite store."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from modelstore import open_store
from modelstore.errors import ModelNotFound, VersionNotFound
from predictor._pools import SessionPools
from predictor.loader import SESSION_OVERHEAD_BYTES, load_version
from predictor.metrics import PredictorMetrics
from predictor.refresh import HeadWatcher, read_heads
from predictor.sessions import NotServable, SessionCache
from predictor.settings import PredictorSettings

import predictor_support as pm


@pytest.fixture
def store(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'models.db'}")
    yield store
    store.close()


@pytest.fixture
def metrics():
    return PredictorMetrics(CollectorRegistry())


def make_cache(store, metrics, load=load_version, **overrides) -> SessionCache:
    settings = PredictorSettings(store=store.url, **{"intra_op_threads": 1, **overrides})
    return SessionCache(store, settings, metrics, load=load)


def sample(metrics, name, labels=None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


class CountingStore:
    """The real store, with a count of each read by method name."""

    def __init__(self, store):
        self.store = store
        self.reads: dict[str, int] = {}

    def __getattr__(self, attr):
        method = getattr(self.store, attr)
        if attr not in ("head", "heads", "version", "artifact", "list_models"):
            return method

        def call(*args, **kwargs):
            self.reads[attr] = self.reads.get(attr, 0) + 1
            return method(*args, **kwargs)

        return call


def test_pinned_walk_keeps_latest_entries(store, metrics):
    for name in ("hot1", "hot2"):
        pm.publish(store, name, "sgd", seed=1)
    for seed in range(6):
        pm.publish(store, "walked", "sgd", seed=seed)
    cache = make_cache(store, metrics, cache_max_models=2, cache_max_pinned=2)
    hot = [cache.latest("hot1"), cache.latest("hot2")]

    # A client walking the old versions of another model.
    for version in range(1, 6):
        assert cache.pinned("walked", version).version == version

    assert cache.latest("hot1") is hot[0]
    assert cache.latest("hot2") is hot[1]
    assert len(cache) == 4
    assert sample(metrics, "streamfit_predictor_cache_evictions_total", {"reason": "count"}) == 3
    assert sample(metrics, "streamfit_predictor_model_loads_total", {"result": "ok"}) == 7


def test_pinned_latest_version_reuses_session(store, metrics):
    pm.publish(store, "flights", "sgd", seed=1)
    cache = make_cache(store, metrics)
    latest = cache.latest("flights")
    assert cache.pinned("flights", 1) is latest
    assert len(cache) == 1


def test_memory_bound_evicts_pinned_first(store, metrics):
    for name in ("a", "b", "c"):
        pm.publish(store, name, "sgd", seed=1)
    pm.publish(store, "a", "sgd", seed=2)
    one = make_cache(store, metrics).latest("a").estimated_bytes
    # Room for exactly two sessions of this size.
    cache = make_cache(store, metrics, cache_max_bytes=2 * one)

    a = cache.latest("a")
    cache.pinned("a", 1)
    assert len(cache) == 2
    cache.latest("b")
    # The pinned session went first, though the latest of "a" is older.
    assert len(cache) == 2
    assert sample(metrics, "streamfit_predictor_cache_evictions_total", {"reason": "memory"}) == 1
    assert cache.latest("a") is a
    cache.latest("c")
    assert {m.name for m in cache.loaded_latest()} == {"a", "c"}
    assert sample(metrics, "streamfit_predictor_cache_evictions_total", {"reason": "memory"}) == 2
    cache.update_gauges()
    assert sample(metrics, "streamfit_predictor_cache_bytes") == 2 * one


def test_shared_session_counts_once():
    class Model:
        def __init__(self, size):
            self.estimated_bytes = size
            self.version = 1

    pools = SessionPools(max_hot=10, max_pinned=10, max_bytes=10_000)
    model = Model(600)
    assert pools.put("hot", ("m", None), model) == []
    assert pools.put("hot", ("m", "production"), model) == []
    assert pools.bytes == 600
    pools.remove("hot", ("m", None))
    assert pools.bytes == 600
    pools.remove("hot", ("m", "production"))
    assert pools.bytes == 0


def test_single_session_over_memory_bound_is_served():
    class Model:
        estimated_bytes = 5_000
        version = 1

    pools = SessionPools(max_hot=10, max_pinned=10, max_bytes=1_000)
    small = type("Small", (), {"estimated_bytes": 10, "version": 1})()
    pools.put("hot", ("small", None), small)
    evicted = pools.put("hot", ("big", None), Model())
    assert [e.key for e in evicted] == [("small", None)]
    assert pools.get("hot", ("big", None)) is not None


def test_session_estimate_grows_with_artifact(store, metrics):
    pm.publish(store, "small", "sgd", seed=1)
    model = make_cache(store, metrics).latest("small")
    size = len(pm.onnx_model("sgd", 1)[0])
    assert model.estimated_bytes == SESSION_OVERHEAD_BYTES + 2 * size


def test_alias_served_and_moved(store, metrics):
    for seed in range(1, 4):
        pm.publish(store, "flights", "sgd", seed=seed)
    store.set_alias("flights", "production", 1)
    counting = CountingStore(store)
    cache = make_cache(counting, metrics)
    latest = cache.latest("flights")
    production = cache.aliased("flights", "production")
    assert (latest.version, production.version) == (3, 1)
    heads_before = counting.reads.get("head", 0)
    for _ in range(5):
        assert cache.aliased("flights", "production") is production
    assert counting.reads.get("head", 0) == heads_before

    # An alias may move back and forth; the watcher's head read moves it.
    store.set_alias("flights", "production", 3)
    cache.apply_head(store.head("flights"))
    assert cache.aliased("flights", "production") is latest
    store.set_alias("flights", "production", 2)
    cache.apply_head(store.head("flights"))
    assert cache.aliased("flights", "production").version == 2
    assert sample(metrics, "streamfit_predictor_alias_version", {"model": "flights", "alias": "production"}) == 2

    store.set_alias("flights", "production", None)
    cache.apply_head(store.head("flights"))
    with pytest.raises(VersionNotFound, match="no alias 'production'"):
        cache.aliased("flights", "production")
    assert sample(metrics, "streamfit_predictor_alias_version", {"model": "flights", "alias": "production"}) == 0


def test_alias_to_broken_version_keeps_old(store, metrics):
    pm.publish(store, "flights", "sgd", seed=1)
    pm.publish(store, "flights", "sgd", seed=2, onnx_bytes=b"not onnx")
    store.set_alias("flights", "production", 1)
    cache = make_cache(store, metrics)
    old = cache.aliased("flights", "production")

    store.set_alias("flights", "production", 2)
    cache.apply_head(store.head("flights"))
    assert cache.aliased("flights", "production") is old
    assert sample(metrics, "streamfit_predictor_model_loads_total", {"result": "invalid"}) == 1


def test_unknown_alias_and_version_remembered(store, metrics):
    pm.publish(store, "flights", "sgd", seed=1)
    counting = CountingStore(store)
    cache = make_cache(counting, metrics, refresh_interval_ms=60_000)
    for _ in range(3):
        with pytest.raises(VersionNotFound, match="no alias 'canary'"):
            cache.aliased("flights", "canary")
        with pytest.raises(VersionNotFound):
            cache.pinned("flights", 40)
    assert counting.reads.get("head", 0) == 1
    assert counting.reads.get("version", 0) == 1


def test_slow_load_blocks_only_its_key(store, metrics):
    for name in ("slow", "fast"):
        pm.publish(store, name, "sgd", seed=1)
    release = threading.Event()

    def load(store_, name, version, settings):
        if name == "slow":
            release.wait(30)
        return load_version(store_, name, version, settings)

    cache = make_cache(store, metrics, load=load, load_wait_ms=200)
    first = threading.Thread(target=cache.latest, args=("slow",), daemon=True)
    first.start()
    try:
        deadline = time.monotonic() + 10
        while cache._loads.running() == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        # Another model loads while the slow one is still loading.
        assert cache.latest("fast").version == 1
        with pytest.raises(NotServable, match="still loading") as error:
            cache.latest("slow")
        assert error.value.retriable
    finally:
        release.set()
        first.join(30)
    assert cache.latest("slow").version == 1


def test_watcher_reads_heads_in_bulk(store, metrics):
    names = [f"m{i}" for i in range(5)]
    for name in names:
        pm.publish(store, name, "sgd", seed=1)
    counting = CountingStore(store)
    cache = make_cache(counting, metrics)
    for name in names:
        cache.latest(name)
    pm.publish(store, "m3", "sgd", seed=2)
    single_reads = counting.reads.get("head", 0)

    HeadWatcher(counting, cache, interval_ms=60_000, metrics=metrics).refresh_all()
    assert counting.reads["heads"] == 1
    assert counting.reads.get("head", 0) == single_reads
    assert cache.latest("m3").version == 2
    assert sample(metrics, "streamfit_predictor_head_checks_total", {"result": "ok"}) == 1
    assert sample(metrics, "streamfit_predictor_last_head_check_timestamp_seconds") > 0


def test_read_heads_marks_missing_models(store):
    pm.publish(store, "present", "sgd", seed=1)
    heads = read_heads(store, ["present", "gone"])
    assert heads["present"].latest == 1
    assert isinstance(heads["gone"], ModelNotFound)


def test_fallback_skips_removed_versions(store, metrics):
    for seed in range(1, 4):
        pm.publish(store, "flights", "sgd", seed=seed)
    pm.publish(store, "flights", "sgd", seed=4, onnx_bytes=b"not onnx")
    store.apply_retention("flights", keep_last=1)
    cache = make_cache(store, metrics)
    with pytest.raises(NotServable, match="version 3 of model 'flights' not found") as error:
        cache.latest("flights")
    assert "version 3 no longer exists" in error.value.public
    assert not error.value.retriable


def test_watcher_survives_deleted_model(store, metrics):
    for name in ("kept", "deleted"):
        pm.publish(store, name, "sgd", seed=1)
    cache = make_cache(store, metrics)
    cache.latest("kept")
    cache.latest("deleted")
    store.delete_model("deleted")
    pm.publish(store, "kept", "sgd", seed=2)

    HeadWatcher(store, cache, interval_ms=60_000, metrics=metrics).refresh_all()
    assert cache.latest("kept").version == 2
    assert cache.latest("deleted").version == 1
    assert sample(metrics, "streamfit_predictor_head_checks_total", {"result": "ok"}) == 1
