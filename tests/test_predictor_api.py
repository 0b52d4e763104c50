"""HTTP routes of the predictor, served by uvicorn over loopback from a real SQLite store."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelstore import open_store
from modelstore.errors import StoreUnavailable
from predictor.app import create_app
from predictor.settings import PredictorSettings

import predictor_support as pm
from predictor_support import LiveServer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'models.db'}")
    yield store
    store.close()


@pytest.fixture
def make_server(store):
    servers = []

    def make(**overrides) -> LiveServer:
        settings = PredictorSettings(
            store=store.url, refresh_interval_ms=50, intra_op_threads=1, **overrides
        )
        server = LiveServer(create_app(settings, registry=CollectorRegistry())).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(store, make_server):
    pm.publish(store, "flights", "sgd", seed=1)
    return make_server()


@pytest.fixture
def client(server):
    return server.client


def test_health_live_and_ready(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    deadline = time.monotonic() + 10
    response = client.get("/v2/health/ready")
    while response.status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.02)
        response = client.get("/v2/health/ready")
    assert response.status_code == 200
    assert response.json() == {"ready": True}


def test_v1_predict_one_row_matches_sklearn(client):
    rows = pm.sample_rows(1, seed=7)
    response = client.post("/v1/models/flights/predict", json={"features": rows[0]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "flights"
    assert body["version"] == 1
    assert body["version_age_seconds"] >= 0
    assert body["labels"] == [0, 1]
    assert body["predictions"] == pm.sklearn_predict("sgd", 1, rows).tolist()
    assert len(body["probabilities"]) == 1
    assert sum(body["probabilities"][0]) == pytest.approx(1.0, abs=1e-5)
    assert "scores" not in body


def test_v1_predict_instances_and_lists(server, client):
    rows = pm.sample_rows(20, seed=3)
    as_lists = [[r["month"], r["distance"], r["carrier"]] for r in rows]
    by_name = client.post("/v1/models/flights/predict", json={"instances": rows}).json()
    by_order = client.post("/v1/models/flights/predict", json={"instances": as_lists}).json()
    assert by_name["predictions"] == pm.sklearn_predict("sgd", 1, rows).tolist()
    assert by_order["predictions"] == by_name["predictions"]
    assert by_order["probabilities"] == by_name["probabilities"]
    assert server.metric("streamfit_predictor_rows_predicted_total", {"model": "flights"}) == 40


def test_v1_predict_reports_ignored_features(client):
    row = dict(pm.sample_rows(1, seed=3)[0], request_id="abc")
    body = client.post("/v1/models/flights/predict", json={"features": row}).json()
    assert body["ignored_features"] == ["request_id"]


def test_v1_predict_regressor(store, make_server):
    pm.publish(store, "delay", "regressor", seed=2)
    client = make_server().client
    rows = pm.sample_rows(5, seed=4)
    body = client.post("/v1/models/delay/predict", json={"instances": rows}).json()
    assert body["version"] == 1
    np.testing.assert_allclose(body["predictions"], pm.sklearn_predict("regressor", 2, rows), rtol=1e-4)
    assert "labels" not in body
    assert "probabilities" not in body


def test_v1_predict_margin_loss_returns_scores(store, make_server):
    pm.publish(store, "status", "hinge", seed=2)
    client = make_server().client
    rows = pm.sample_rows(6, seed=5)
    body = client.post("/v1/models/status/predict", json={"instances": rows}).json()
    assert body["labels"] == ["early", "late", "on_time"]
    assert body["predictions"] == pm.sklearn_predict("hinge", 2, rows).tolist()
    assert "probabilities" not in body
    assert np.asarray(body["scores"]).shape == (6, 3)


def test_v2_infer_named_tensors(client):
    rows = pm.sample_rows(4, seed=9)
    request = {
        "id": "req-1",
        "inputs": [
            {"name": "month", "shape": [4], "datatype": "INT64", "data": [r["month"] for r in rows]},
            {"name": "distance", "shape": [4, 1], "datatype": "FP64", "data": [[r["distance"]] for r in rows]},
            {"name": "carrier", "shape": [4], "datatype": "BYTES", "data": [r["carrier"] for r in rows]},
        ],
    }
    response = client.post("/v2/models/flights/infer", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "flights"
    assert body["model_version"] == "1"
    assert body["id"] == "req-1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["datatype"] == "INT64"
    assert outputs["label"]["shape"] == [4]
    assert outputs["label"]["data"] == pm.sklearn_predict("sgd", 1, rows).tolist()
    assert outputs["probabilities"]["shape"] == [4, 2]
    assert len(outputs["probabilities"]["data"]) == 8


def test_v2_infer_selected_output_and_pinned_version(store, client):
    pm.publish(store, "flights", "sgd", seed=2)
    request = {
        "inputs": [
            {"name": "month", "shape": [1], "datatype": "FP32", "data": [5]},
            {"name": "distance", "shape": [1], "datatype": "FP32", "data": [800.0]},
            {"name": "carrier", "shape": [1], "datatype": "BYTES", "data": ["UA"]},
        ],
        "outputs": [{"name": "label"}],
    }
    body = client.post("/v2/models/flights/versions/1/infer", json=request).json()
    assert body["model_version"] == "1"
    assert [o["name"] for o in body["outputs"]] == ["label"]
    body = client.post("/v2/models/flights/versions/2/infer", json=request).json()
    assert body["model_version"] == "2"


def test_v2_model_metadata(client):
    body = client.get("/v2/models/flights").json()
    assert body["name"] == "flights"
    assert body["versions"] == ["1"]
    assert body["platform"] == "onnxruntime"
    assert body["inputs"] == [
        {"name": "month", "datatype": "FP32", "shape": [-1]},
        {"name": "distance", "datatype": "FP32", "shape": [-1]},
        {"name": "carrier", "datatype": "BYTES", "shape": [-1]},
    ]
    assert {o["name"] for o in body["outputs"]} == {"label", "probabilities"}
    assert body["parameters"]["labels"] == [0, 1]
    assert client.get("/v2/models/flights/ready").json()["ready"] is True


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        ("/v1/models/flights/predict", {"features": {"month": 1, "distance": 10.0}}, 400, "'carrier' is missing"),
        ("/v1/models/flights/predict", {"features": {"month": "x", "distance": 1.0, "carrier": "UA"}}, 400, "'month' is numeric"),
        ("/v1/models/flights/predict", {"features": [1, 2]}, 400, "features list has 2 values"),
        ("/v1/models/flights/predict", {"instances": []}, 400, "'instances' must be a non-empty list"),
        ("/v1/models/flights/predict", {"rows": []}, 400, "unknown keys ['rows']"),
        ("/v1/models/flights/predict", [1, 2], 400, "must be a JSON object"),
        ("/v1/models/flights/predict", {"features": {}, "instances": []}, 400, "exactly one of"),
        ("/v2/models/flights/infer", {"inputs": []}, 400, "'inputs' must be a non-empty list"),
        ("/v2/models/flights/infer", {"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1]}]}, 400, "'nope' is not an input"),
        ("/v2/models/flights/infer", {"inputs": [{"name": "carrier", "shape": [1], "datatype": "FP32", "data": [1]}]}, 400, "categorical and takes BYTES"),
        ("/v2/models/flights/infer", {"inputs": [{"name": "month", "shape": [2], "datatype": "FP32", "data": [1]}]}, 400, "has 1 values for shape [2]"),
        ("/v2/models/flights/infer", {"inputs": [{"name": "month", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}, 400, "use [n] or [n, 1]"),
        ("/v2/models/flights/infer", {"inputs": [{"name": "month", "shape": [1], "datatype": "INT64", "data": [1.5]}]}, 400, "takes integers"),
        ("/v2/models/flights/infer", {"inputs": [{"name": "month", "shape": [1], "datatype": "FP32", "data": [1]}]}, 400, "'distance' is missing"),
        ("/v1/models/flights/versions/1x/predict", {"features": {}}, 400, "invalid version '1x'"),
        ("/v1/models/flights/versions/x1/predict", {"features": {}}, 404, "has no alias 'x1'"),
        ("/v1/models/flights/versions/x:1/predict", {"features": {}}, 400, "invalid alias name 'x:1'"),
        ("/v1/models/bad:name/predict", {"features": {}}, 400, "invalid model name"),
        ("/v1/models/absent/predict", {"features": {}}, 404, "not found"),
        ("/v1/models/flights/versions/9/predict", {"features": {}}, 404, "version 9"),
    ],
)
def test_bad_requests_get_clear_errors(client, path, body, status, fragment):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    assert "model" in response.json()


def test_missing_feature_error_names_row_and_reason(client):
    rows = pm.sample_rows(3, seed=1)
    rows[2]["carrier"] = 7
    body = client.post("/v1/models/flights/predict", json={"instances": rows}).json()
    assert body["field"] == "instances[2]"
    assert body["reason"] == "wrong_type"
    assert body["version"] == 1


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"{not json", "invalid JSON body"),
        (b'{"features": {"month": NaN, "distance": 1, "carrier": "UA"}}', "NaN is not a JSON number"),
        (b"\xff\xfe", "not UTF-8"),
        (b"", "body is empty"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_json_is_400(client, raw, fragment):
    response = client.post(
        "/v1/models/flights/predict", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


def test_body_and_batch_limits(store, make_server):
    pm.publish(store, "flights", "sgd", seed=1)
    client = make_server(max_body_bytes=2048, max_batch_rows=3).client
    big = {"features": {"month": 1, "distance": 1.0, "carrier": "UA", "pad": "x" * 4096}}
    response = client.post("/v1/models/flights/predict", json=big)
    assert response.status_code == 413
    assert "max_body_bytes" in response.json()["error"]

    # A chunked body declares no length, so the limit applies while reading it.
    response = client.post(
        "/v1/models/flights/predict", content=iter([b'{"features": "', b"y" * 4096, b'"}'])
    )
    assert response.status_code == 413

    rows = pm.sample_rows(4, seed=2)
    response = client.post("/v1/models/flights/predict", json={"instances": rows})
    assert response.status_code == 413
    assert "max_batch_rows" in response.json()["error"]
    response = client.post("/v1/models/flights/predict", json={"instances": rows[:3]})
    assert response.status_code == 200


def test_extreme_input_is_422_not_500(store, make_server):
    pm.publish(store, "delay", "regressor", seed=2)
    client = make_server().client
    row = {"month": 3.0e38, "distance": 3.0e38, "carrier": "UA"}
    # float32 accepts 3e38, but this regressor's output overflows to -inf.
    response = client.post("/v1/models/delay/predict", json={"features": row})
    assert response.status_code == 422, response.text
    assert "not finite" in response.json()["error"]


def test_model_with_only_version_zero_is_503(store, make_server):
    store.create_model("fresh", pm.CLASSIFIER_SPEC)
    client = make_server().client
    response = client.post("/v1/models/fresh/predict", json={"features": pm.sample_rows(1, 0)[0]})
    assert response.status_code == 503
    assert "no published version yet" in response.json()["error"]


def test_request_metrics_bound_labels(server, client):
    client.post("/v1/models/flights/predict", json={"features": pm.sample_rows(1, 0)[0]})
    client.post("/v1/models/made-up-1/predict", json={"features": {}})
    client.post("/v1/models/made-up-2/predict", json={"features": {}})
    client.post("/v1/models/bad:name/predict", json={"features": {}})
    ok = {"model": "flights", "status": "200"}
    assert server.metric("streamfit_predictor_requests_total", ok) == 1
    assert server.metric("streamfit_predictor_requests_total", {"model": "_unknown", "status": "404"}) == 2
    assert server.metric("streamfit_predictor_requests_total", {"model": "_unknown", "status": "400"}) == 1
    assert server.metric("streamfit_predictor_requests_total", {"model": "made-up-1", "status": "404"}) is None

    text = client.get("/metrics").text
    assert 'streamfit_predictor_served_version{model="flights"} 1.0' in text
    assert "streamfit_predictor_cache_models 1.0" in text
    assert 'streamfit_predictor_model_loads_total{result="ok"} 1.0' in text


def test_onnxruntime_threads_logged_at_start(store, caplog):
    settings = PredictorSettings(store=store.url, intra_op_threads=2, inter_op_threads=1)
    with caplog.at_level("INFO", logger="predictor.app"):
        LiveServer(create_app(settings, registry=CollectorRegistry())).start().stop()
    assert any(
        "intra_op_threads=2 inter_op_threads=1" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_predictor_imports_no_sklearn():
    code = (
        "import json, sys\n"
        "import predictor, predictor.app, predictor.server, predictor.sessions, predictor.refresh\n"
        "import predictor.metrics, predictor.settings, predictor.loader, predictor.protocol\n"
        "import predictor.responses, predictor.versions, predictor.openapi, predictor.streaming\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'skl2onnx'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


class OutageStore:
    """The real SQLite store, with reads that fail while ``down`` is set (an injected outage)."""

    def __init__(self, store):
        self.store = store
        self.down = False

    def __getattr__(self, attr):
        method = getattr(self.store, attr)
        if attr not in ("head", "heads", "version", "artifact", "list_models"):
            return method

        def call(*args, **kwargs):
            if self.down:
                raise StoreUnavailable(f"SQLite store {self.store.url} timed out (injected outage)")
            return method(*args, **kwargs)

        return call


def test_store_outage_is_503_without_internals(store):
    pm.publish(store, "flights", "sgd", seed=1)
    outage = OutageStore(store)
    settings = PredictorSettings(store=store.url, refresh_interval_ms=50, intra_op_threads=1)
    server = LiveServer(create_app(settings, store=outage, registry=CollectorRegistry())).start()
    row = pm.sample_rows(1, 0)[0]
    try:
        assert server.client.post("/v1/models/flights/predict", json={"features": row}).status_code == 200
        outage.down = True
        response = server.client.post("/v1/models/other/predict", json={"features": {}})
        # The loaded version keeps serving without the store.
        served = server.client.post("/v1/models/flights/predict", json={"features": row})
        outage.down = False
    finally:
        server.stop()

    assert response.status_code == 503, response.text
    assert "model store is unavailable (StoreUnavailable)" in response.json()["error"]
    assert store.url not in response.text
    assert served.status_code == 200
    assert served.json()["version"] == 1


def test_unknown_model_404_hides_store_url(store, client):
    response = client.post("/v1/models/other/predict", json={"features": {}})
    assert response.status_code == 404
    assert response.json()["error"] == "model 'other' not found in the model store"
