"""Units and buckets of the predictor's metrics."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from modelstore import open_store
from predictor.app import create_app
from predictor.metrics import REQUEST_BUCKETS, PredictorMetrics
from predictor.settings import PredictorSettings

import predictor_support as pm

DURATION = "streamfit_predictor_request_duration_seconds"


def bucket(registry: CollectorRegistry, le: str, route: str = "v1_predict") -> float:
    return registry.get_sample_value(f"{DURATION}_bucket", {"route": route, "le": le})


def test_three_ms_lands_in_middle_bucket():
    registry = CollectorRegistry()
    metrics = PredictorMetrics(registry)
    metrics.request_duration.labels(route="v1_predict").observe(0.003)

    assert REQUEST_BUCKETS[0] < 0.001
    assert bucket(registry, "0.0025") == 0
    assert bucket(registry, "0.005") == 1
    assert bucket(registry, "+Inf") == 1
    lower = [b for b in REQUEST_BUCKETS if b < 0.003]
    higher = [b for b in REQUEST_BUCKETS if b > 0.003]
    assert len(lower) >= 3
    assert len(higher) >= 3
    assert registry.get_sample_value(f"{DURATION}_sum", {"route": "v1_predict"}) == pytest.approx(0.003)


def test_request_duration_in_seconds(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'models.db'}")
    pm.publish(store, "flights", "sgd", seed=1)
    settings = PredictorSettings(store=store.url, intra_op_threads=1)
    server = pm.LiveServer(create_app(settings, registry=CollectorRegistry())).start()
    try:
        rows = pm.sample_rows(3, seed=1)
        started = time.perf_counter()
        for _ in range(5):
            assert server.client.post("/v1/models/flights/predict", json={"instances": rows}).status_code == 200
        elapsed = time.perf_counter() - started
        registry = server.app.state.metrics.registry
        count = registry.get_sample_value(f"{DURATION}_count", {"route": "v1_predict"})
        total = registry.get_sample_value(f"{DURATION}_sum", {"route": "v1_predict"})
    finally:
        server.stop()
        store.close()
    assert count == 5
    # The server's time is part of the client's, so in seconds it cannot
    # exceed the client's elapsed seconds; in milliseconds it would.
    assert 0 < total <= elapsed
