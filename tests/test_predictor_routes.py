"""Routes added for the Open Inference Protocol: server metadata, aliases, OpenAPI, unmatched paths."""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelstore import open_store
from modelstore.schema import FeatureSchema
from predictor import protocol
from predictor.app import ROUTES, create_app
from predictor.loader import LoadedModel
from predictor.protocol import RequestError
from predictor.settings import PredictorSettings

import predictor_support as pm
from predictor_support import LiveServer


@pytest.fixture
def store(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'models.db'}")
    yield store
    store.close()


@pytest.fixture
def server(store):
    for seed in (1, 2, 3):
        pm.publish(store, "flights", "sgd", seed=seed)
    store.set_alias("flights", "production", 2)
    settings = PredictorSettings(store=store.url, refresh_interval_ms=50, intra_op_threads=1)
    server = LiveServer(create_app(settings, registry=CollectorRegistry())).start()
    yield server
    server.stop()


@pytest.fixture
def client(server):
    return server.client


def v2_request(rows):
    return {"inputs": [
        {"name": "month", "shape": [len(rows)], "datatype": "INT64", "data": [r["month"] for r in rows]},
        {"name": "distance", "shape": [len(rows)], "datatype": "FP32", "data": [r["distance"] for r in rows]},
        {"name": "carrier", "shape": [len(rows)], "datatype": "BYTES", "data": [r["carrier"] for r in rows]},
    ]}


def test_server_metadata(client):
    body = client.get("/v2").json()
    assert body["name"] == "streamfit-predictor"
    assert body["version"]
    assert body["extensions"] == ["streamfit_json_v1"]


def test_openapi_lists_every_route(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"] == "3.1.0"
    served = {(path, method.lower()) for path, method, _ in ROUTES}
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert documented == served
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]
    schema_ref = infer["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert schema_ref == "#/components/schemas/InferenceRequest"
    tensor = document["components"]["schemas"]["InferenceRequest"]["properties"]["inputs"]["items"]
    assert tensor["properties"]["data"]["maxItems"] == 10_000


def test_alias_routes(client):
    rows = pm.sample_rows(3, seed=4)
    v1 = client.post("/v1/models/flights/versions/production/predict", json={"instances": rows})
    assert v1.status_code == 200, v1.text
    assert v1.json()["version"] == 2
    assert v1.json()["alias"] == "production"
    assert v1.json()["predictions"] == pm.sklearn_predict("sgd", 2, rows).tolist()

    v2 = client.post("/v2/models/flights/versions/production/infer", json=v2_request(rows))
    assert v2.status_code == 200, v2.text
    assert v2.json()["model_version"] == "2"
    assert v2.json()["parameters"]["alias"] == "production"

    latest = client.post("/v1/models/flights/predict", json={"instances": rows}).json()
    assert latest["version"] == 3
    assert "alias" not in latest


def test_moved_alias_served_within_refresh(store, client):
    row = pm.sample_rows(1, seed=1)[0]
    path = "/v1/models/flights/versions/production/predict"
    assert client.post(path, json={"features": row}).json()["version"] == 2
    store.set_alias("flights", "production", 1)
    deadline = time.monotonic() + 15
    version = 2
    while version != 1 and time.monotonic() < deadline:
        version = client.post(path, json={"features": row}).json()["version"]
        time.sleep(0.01)
    assert version == 1


def test_metadata_names_versions_aliases_age(client):
    body = client.get("/v2/models/flights").json()
    assert body["versions"] == ["2", "3"]
    assert body["parameters"]["version"] == 3
    assert body["parameters"]["aliases"] == {"production": 2}
    assert body["parameters"]["version_age_seconds"] >= 0

    pinned = client.get("/v2/models/flights/versions/1").json()
    assert pinned["parameters"]["version"] == 1
    aliased = client.get("/v2/models/flights/versions/production").json()
    assert aliased["parameters"]["version"] == 2
    assert aliased["parameters"]["alias"] == "production"

    ready = client.get("/v2/models/flights/versions/production/ready").json()
    assert ready["version"] == "2"
    assert ready["version_age_seconds"] >= 0


@pytest.mark.parametrize(
    "method, path, status, model",
    [
        ("GET", "/v2/models/flights/infer", 405, "flights"),
        ("POST", "/v2/models/flights", 405, "flights"),
        ("GET", "/v2/models/flights/versions/1/explain", 404, "flights"),
        ("POST", "/v1/models/flights/score", 404, "flights"),
        ("GET", "/nothing/here", 404, None),
    ],
)
def test_unmatched_paths_get_json(client, server, method, path, status, model):
    response = client.request(method, path)
    assert response.status_code == status
    body = response.json()
    assert body.get("model") == model
    if status == 405:
        assert "allowed" in body["error"]
        assert response.headers["allow"]
    else:
        assert "/openapi.json" in body["error"]
    assert server.metric("streamfit_predictor_requests_total", {"model": "_unknown", "status": str(status)}) >= 1


def test_every_model_response_names_version_and_age(client):
    rows = pm.sample_rows(2, seed=3)
    responses = [
        client.post("/v1/models/flights/predict", json={"instances": rows}).json(),
        client.post("/v1/models/flights/versions/1/predict", json={"instances": rows}).json(),
    ]
    for body in responses:
        assert body["model"] == "flights"
        assert isinstance(body["version"], int)
        assert body["version_age_seconds"] >= 0
    for path in ("/v2/models/flights/infer", "/v2/models/flights/versions/1/infer"):
        body = client.post(path, json=v2_request(rows)).json()
        assert body["model_name"] == "flights"
        assert body["model_version"] in ("1", "3")
        assert body["parameters"]["version_age_seconds"] >= 0


def wide_model(width: int) -> LoadedModel:
    features = [{"name": f"x{i}"} for i in range(width)] + [
        {"name": "c", "type": "categorical", "vocabulary": ["a", "b"], "unknown": "ignore"}
    ]
    return LoadedModel(
        name="wide", version=1, publish_id="p", created_at=None, task="regression",
        schema=FeatureSchema.from_list(features), classes=None, input_name="features",
        outputs={"value": "variable"}, session=None, load_seconds=0.0,
    )


def test_v2_columns_encode_like_rows():
    model = wide_model(300)
    rng = np.random.default_rng(0)
    rows = 50
    data = {f"x{i}": rng.normal(size=rows).tolist() for i in range(300)}
    data["c"] = [["a", "b", "z"][i % 3] for i in range(rows)]
    inputs = [
        {"name": name, "shape": [rows], "datatype": "BYTES" if name == "c" else "FP64", "data": values}
        for name, values in data.items()
    ]
    encoded, _ = protocol.decode_v2({"inputs": inputs}, model, max_rows=1000)
    expected = model.schema.encode([{n: v[r] for n, v in data.items()} for r in range(rows)])
    np.testing.assert_array_equal(encoded, expected)


def test_v2_columns_fall_back_for_errors():
    model = wide_model(3)
    inputs = [
        {"name": "x0", "shape": [2], "datatype": "FP64", "data": [1.0, 2.0]},
        {"name": "x1", "shape": [2], "datatype": "FP64", "data": [1.0, 1e39]},
        {"name": "x2", "shape": [2], "datatype": "FP64", "data": [1.0, 2.0]},
        {"name": "c", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]},
    ]
    with pytest.raises(RequestError, match=r"row 1: feature 'x1' is 1e\+39") as error:
        protocol.decode_v2({"inputs": inputs}, model, max_rows=10)
    assert error.value.reason == "non_finite"
