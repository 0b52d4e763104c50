"""The predictor against hostile clients and hostile store content, over real HTTP.

Each test sends input that once made the predictor return 500, leak the
store's path, grow its metric labels without bound or serve a version whose
outputs do not mean what its metadata says. The store is a real SQLite file;
broken content is written into it with sqlite3, as a faulty writer or a
damaged disk would leave it.
"""

from __future__ import annotations

import json
import logging
import sqlite3

import pytest
from prometheus_client import CollectorRegistry

from modelstore import open_store
from predictor.app import create_app
from predictor.settings import PredictorSettings

import predictor_support as pm
from predictor_support import LiveServer

V1 = "/v1/models/flights/predict"
V2 = "/v2/models/flights/infer"


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "models.db"


@pytest.fixture
def store(db_path):
    store = open_store(f"sqlite:///{db_path}")
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
def client(store, make_server):
    pm.publish(store, "flights", "sgd", seed=1)
    return make_server().client


def edit_metadata(db_path, model: str, version: int, change) -> None:
    """Replace the stored metadata text of one version with ``change(text)``."""
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            where = (model, version)
            text = conn.execute(
                "SELECT metadata FROM versions WHERE model = ? AND version = ?", where
            ).fetchone()[0]
            conn.execute(
                "UPDATE versions SET metadata = ? WHERE model = ? AND version = ?",
                (change(text), *where),
            )
    finally:
        conn.close()


def post_raw(client, path: str, raw: bytes):
    return client.post(path, content=raw, headers={"content-type": "application/json"})


def tensor(name: str, data, datatype: str = "FP32") -> dict:
    return {"name": name, "shape": [len(data)], "datatype": datatype, "data": data}


@pytest.mark.parametrize(
    "bad_tensor, fragment",
    [
        (tensor(["month"], [1]), "is not an input"),
        (tensor({"n": 1}, [1]), "is not an input"),
        (tensor("month", [1], datatype=["FP32"]), "takes FP32"),
    ],
)
def test_v2_unhashable_tensor_fields(client, bad_tensor, fragment):
    response = client.post(V2, json={"inputs": [bad_tensor]})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]
    assert response.json()["model"] == "flights"


@pytest.mark.parametrize("digits", [400, 5000])
def test_huge_json_integer_is_400(client, digits):
    number = b"9" * digits
    v1 = post_raw(client, V1, b'{"features": {"month": ' + number + b', "distance": 1, "carrier": "UA"}}')
    v2 = post_raw(
        client, V2,
        b'{"inputs": [{"name": "month", "shape": [1], "datatype": "INT64", "data": [' + number + b"]}]}",
    )
    for response in (v1, v2):
        assert response.status_code == 400, response.text
        assert f"{digits} digits" in response.json()["error"]
        assert response.json()["version"] == 1


def test_error_echo_is_bounded(client):
    huge = "x" * 1_000_000
    response = client.post(V1, json={"features": {"month": huge, "distance": 1, "carrier": "UA"}})
    assert response.status_code == 400
    assert "'month' is numeric" in response.json()["error"]
    assert len(response.content) < 4096

    row = dict(pm.sample_rows(1, 0)[0], **{"y" * 100_000: 1})
    response = client.post(V1, json={"features": row})
    assert response.status_code == 200, response.text[:300]
    assert len(response.content) < 4096
    assert response.json()["ignored_features"][0].startswith("yyy")


def test_corrupt_pinned_version_hides_store_path(store, db_path, make_server):
    pm.publish(store, "flights", "sgd", seed=1)
    bad = pm.publish(store, "flights", "sgd", seed=2)
    pm.corrupt_artifact(db_path, bad)
    client = make_server().client
    row = pm.sample_rows(1, 0)[0]

    response = client.post("/v1/models/flights/versions/2/predict", json={"features": row})
    assert response.status_code == 503, response.text
    assert "corrupt" in response.json()["error"]
    assert str(db_path) not in response.text
    assert client.post(V1, json={"features": row}).json()["version"] == 1


def test_broken_store_bounds_labels_and_logs(store, db_path, make_server, caplog):
    pm.publish(store, "flights", "sgd", seed=1)
    server = make_server()
    row = pm.sample_rows(1, 0)[0]
    assert server.client.post(V1, json={"features": row}).status_code == 200

    # The file under the open connections turns into garbage, as after a bad
    # disk write: every read of the store fails with SQLITE_NOTADB.
    for suffix in ("", "-wal", "-shm"):
        path = db_path.with_name(db_path.name + suffix)
        if path.exists():
            path.write_bytes(b"garbage!" * 4096)

    with caplog.at_level(logging.WARNING, logger="predictor"):
        responses = [
            server.client.post(f"/v1/models/made-up-{i}/versions/1/predict", json={"features": row})
            for i in range(30)
        ]
    for response in responses:
        assert response.status_code == 503, response.text
        assert "model store is unavailable" in response.json()["error"]
        assert str(db_path) not in response.text

    text = server.client.get("/metrics").text
    series = [line for line in text.splitlines() if line.startswith("streamfit_predictor_requests_total{")]
    assert not [line for line in series if "made-up" in line]
    assert server.metric("streamfit_predictor_requests_total", {"model": "_unknown", "status": "503"}) == 30
    warnings = [r for r in caplog.records if "made-up" in r.getMessage()]
    assert len(warnings) <= 1
    # The loaded version keeps serving.
    assert server.client.post(V1, json={"features": row}).status_code == 200


def deep_nesting(text: str) -> str:
    return text[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("change", [lambda text: text[:-5], deep_nesting], ids=["cut", "deep"])
def test_unparsable_metadata_is_503(store, db_path, make_server, change):
    pm.publish(store, "flights", "sgd", seed=1)
    edit_metadata(db_path, "flights", 1, change)
    server = make_server()
    row = pm.sample_rows(1, 0)[0]

    for _ in range(3):
        response = server.client.post(V1, json={"features": row})
        assert response.status_code == 503, response.text
        assert response.json()["model"] == "flights"
    # The failure is remembered: the broken version is read once, not per request.
    failed = [
        server.metric("streamfit_predictor_model_loads_total", {"result": result}) or 0
        for result in ("corrupt", "invalid")
    ]
    assert sum(failed) == 1


def test_nan_created_at_metadata_route(store, db_path, make_server):
    pm.publish(store, "flights", "sgd", seed=1)
    edit_metadata(
        db_path, "flights", 1, lambda text: json.dumps(dict(json.loads(text), created_at=float("nan")))
    )
    client = make_server().client

    response = client.get("/v2/models/flights")
    assert response.status_code == 200, response.text
    assert response.json()["parameters"]["created_at"] is None
    response = client.post(V1, json={"features": pm.sample_rows(1, 0)[0]})
    assert response.status_code == 200
    assert response.json()["version_age_seconds"] is None


@pytest.mark.parametrize(
    "kind, outputs, fragment",
    [
        ("sgd", {"label": "probabilities", "probabilities": "probabilities"}, "'label'"),
        ("sgd", {"label": "probabilities"}, "'label'"),
    ],
)
def test_output_roles_are_checked(store, make_server, kind, outputs, fragment):
    meta = dict(pm.onnx_model(kind, 1)[1], outputs=outputs)
    pm.publish(store, "flights", kind, seed=1, onnx=meta)
    client = make_server().client

    response = client.post(V1, json={"features": pm.sample_rows(2, 0)[0]})
    assert response.status_code == 503, response.text
    assert fragment in response.json()["error"]


def test_classifier_output_as_regression_value(store, make_server):
    meta = dict(pm.onnx_model("sgd", 1)[1], outputs={"value": "probabilities"})
    pm.publish(store, "flights", "sgd", seed=1, onnx=meta, task="regression",
               spec=pm.REGRESSOR_SPEC)
    client = make_server().client

    response = client.post(V1, json={"instances": pm.sample_rows(2, 0)})
    assert response.status_code == 503, response.text
    assert "'value'" in response.json()["error"]


def test_regressor_ignores_classifier_kinds(store, make_server):
    meta = pm.onnx_model("regressor", 1)[1]
    meta = dict(meta, outputs=dict(meta["outputs"], label=meta["outputs"]["value"]))
    pm.publish(store, "flights", "regressor", seed=1, onnx=meta)
    client = make_server().client

    rows = pm.sample_rows(2, 0)
    inputs = [
        tensor(name, [r[name] for r in rows], "BYTES" if name == "carrier" else "FP32")
        for name in rows[0]
    ]
    response = client.post(V2, json={"inputs": inputs})
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["value"]


def test_lone_surrogate_is_400_json(client):
    response = post_raw(client, V1, b'{"\\ud800": 1}')
    assert response.status_code == 400, response.text
    assert "unknown keys" in response.json()["error"]
    assert response.json()["field"] == "\ud800"

    long_key = "k" * 100_000
    response = client.post(V1, json={long_key: 1})
    assert response.status_code == 400
    assert len(response.content) < 4096
