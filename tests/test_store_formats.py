"""ONNX formats (binary and JSON) and models over 50 MB, on both backends, with real estimators."""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
import warnings

import numpy as np
import onnxruntime as ort
import pytest
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.neural_network import MLPClassifier

from modelstore import ONNX, STATE, _keys
from modelstore.errors import ArtifactCorrupt, ArtifactTooLarge
from store_backends import COUCHBASE_SCOPE, couchbase_backend, sqlite_backend

SPEC = {"estimator": "MLPClassifier", "params": {}, "features": [], "labels": [0, 1]}
LARGE_MIN_BYTES = 50 * 1000 * 1000


@pytest.fixture(params=["sqlite", pytest.param("couchbase", marks=pytest.mark.couchbase)])
def backend(request, tmp_path):
    if request.param == "sqlite":
        return sqlite_backend(tmp_path / "models.db")
    return couchbase_backend(request.getfixturevalue("gocaves_server"))


@pytest.fixture
def model():
    return f"f-{uuid.uuid4().hex[:12]}"


def export_mlp(features: int, hidden: tuple[int, ...], seed: int = 0) -> bytes:
    """Fit an MLP briefly on random rows and return its ONNX export."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(32, features)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    estimator = MLPClassifier(hidden_layer_sizes=hidden, solver="sgd", momentum=0.0, max_iter=1,
                              batch_size=32, random_state=seed)
    with warnings.catch_warnings():
        # One iteration never converges, and that is the point.
        warnings.simplefilter("ignore")
        estimator.fit(X, y)
    onnx_model = to_onnx(estimator, initial_types=[("features", FloatTensorType([None, features]))],
                         options={id(estimator): {"zipmap": False}})
    return onnx_model.SerializeToString()


def predictions(onnx_bytes: bytes, rows: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"features": rows})


def assert_same_predictions(loaded: bytes, original: bytes, features: int) -> None:
    rows = np.random.default_rng(1).normal(size=(64, features)).astype(np.float32)
    for got, expected in zip(predictions(loaded, rows), predictions(original, rows)):
        np.testing.assert_array_equal(got, expected)


def publish(store, model, onnx_bytes, features):
    spec = {**SPEC, "features": [{"name": f"f{i}"} for i in range(features)]}
    if model not in store.list_models():
        store.create_model(model, spec)
    return store.publish(store.head(model), {ONNX: onnx_bytes, STATE: b"state"}, {"spec": spec})


@pytest.fixture(scope="module")
def small_mlp():
    return export_mlp(20, (64,))


def test_json_format_round_trip(backend, model, small_mlp):
    store = backend.open(onnx_format="json")
    try:
        info = publish(store, model, small_mlp, 20)

        entry = info.metadata["artifacts"][ONNX]
        assert entry["format"] == "json"
        assert set(entry["parts"]) == {"onnx_json", "onnx_data"}
        # The 20 x 64 float weights live beside the JSON.
        assert entry["parts"]["onnx_data"]["size"] >= 20 * 64 * 4
        loaded = store.artifact(store.version(model), ONNX)
        assert loaded == small_mlp
        assert_same_predictions(loaded, small_mlp, 20)
        assert store.artifact(info, STATE) == b"state"
    finally:
        store.close()


def test_binary_and_json_agree(backend, model, small_mlp):
    binary, as_json = backend.open(), backend.open(onnx_format="json")
    try:
        from_binary = publish(binary, f"{model}-binary", small_mlp, 20)
        from_json = publish(as_json, f"{model}-json", small_mlp, 20)

        assert "format" not in from_binary.metadata["artifacts"][ONNX]
        assert from_json.metadata["artifacts"][ONNX]["sha256"] == from_binary.metadata["artifacts"][ONNX]["sha256"]
        assert binary.artifact(from_json, ONNX) == as_json.artifact(from_binary, ONNX) == small_mlp
    finally:
        binary.close()
        as_json.close()


def test_json_document_readable_by_other_tools(backend, model, small_mlp, tmp_path):
    # The default chunk size, so the JSON part is one document (or row).
    store = backend.open(onnx_format="json", chunk_size_bytes=None)
    try:
        info = publish(store, model, small_mlp, 20)
        assert len(info.metadata["artifacts"][ONNX]["parts"]["onnx_json"]["chunks"]) == 1
        key = _keys.chunk(model, info.publish_id, "onnx_json", 0)

        if backend.name == "sqlite":
            # SQLite's own JSON functions read the stored graph.
            conn = sqlite3.connect(tmp_path / "models.db")
            try:
                row = conn.execute(
                    "SELECT json_extract(bytes, '$.graph.input[0].name'), "
                    "json_extract(bytes, '$.graph.initializer[0].dataLocation') "
                    "FROM artifacts WHERE publish_id = ? AND kind = 'onnx_json'", (info.publish_id,),
                ).fetchone()
            finally:
                conn.close()
            assert row == ("features", "EXTERNAL")
        else:
            # A plain SDK read with the default JSON transcoder returns the graph.
            from couchbase.auth import PasswordAuthenticator
            from couchbase.cluster import Cluster
            from couchbase.options import ClusterOptions
            from datetime import timedelta

            server = store.settings
            cluster = Cluster(server.connstr, ClusterOptions(PasswordAuthenticator(
                backend.environ["STREAMFIT_COUCHBASE_USERNAME"], backend.environ["STREAMFIT_COUCHBASE_PASSWORD"])))
            try:
                cluster.wait_until_ready(timedelta(seconds=20))
                document = cluster.bucket(server.bucket).scope(COUCHBASE_SCOPE).collection(
                    _keys.ARTIFACTS).get(key).content_as[dict]
            finally:
                cluster.close()
            assert document["graph"]["input"][0]["name"] == "features"
            assert document["graph"]["initializer"][0]["dataLocation"] == "EXTERNAL"
    finally:
        store.close()


def test_json_format_falls_back_to_binary(backend, model, caplog):
    store = backend.open(onnx_format="json")
    try:
        with caplog.at_level(logging.WARNING, logger="modelstore._artifacts"):
            info = publish(store, model, b"\x08not an onnx model", 1)

        assert "format" not in info.metadata["artifacts"][ONNX]
        assert store.artifact(info, ONNX) == b"\x08not an onnx model"
        assert "storing the ONNX artifact in binary instead of JSON" in caplog.text
    finally:
        store.close()


def test_json_part_tampered(backend, model, small_mlp):
    store = backend.open(onnx_format="json")
    try:
        info = publish(store, model, small_mlp, 20)
        document = json.loads(store._read_part(info, _part(info, "onnx_json")))
        document["graph"]["name"] = "tampered"

        backend.corrupt_chunk(info, "onnx_json", 0, json.dumps(document).encode())

        with pytest.raises(ArtifactCorrupt, match=rf"model '{model}' version 1"):
            store.artifact(info, ONNX)
    finally:
        store.close()


def test_rollback_of_json_version(backend, model, small_mlp):
    store = backend.open(onnx_format="json")
    try:
        first = publish(store, model, small_mlp, 20)
        publish(store, model, export_mlp(20, (64,), seed=5), 20)

        back = store.rollback(model, first.version)

        assert back.metadata["artifacts"][ONNX]["format"] == "json"
        assert store.artifact(back, ONNX) == small_mlp
    finally:
        store.close()


def _part(info, kind):
    from modelstore import _artifacts

    return next(part for part in _artifacts.parts(info, ONNX) if part.kind == kind)


# ---------------------------------------------------------------- over 50 MB


@pytest.fixture(scope="module")
def large_mlp():
    # Two hidden layers of 3,200 units on 1,000 features: about 13.4 million
    # float32 weights, so the export is about 54 MB, over two chunks of 20 MiB.
    data = export_mlp(1000, (3200, 3200))
    assert len(data) > LARGE_MIN_BYTES
    return data


@pytest.mark.slow
@pytest.mark.parametrize("onnx_format", ["binary", "json"])
def test_large_model_round_trip(backend, model, large_mlp, onnx_format):
    # The default chunk size, 20 MiB: the value limit of Couchbase Server.
    options = {"artifact_timeout_ms": 120000} if backend.name == "couchbase" else {}
    store = backend.open(chunk_size_bytes=None, onnx_format=onnx_format, **options)
    try:
        info = publish(store, model, large_mlp, 1000)

        entry = info.metadata["artifacts"][ONNX]
        parts = [entry] if onnx_format == "binary" else [entry["parts"]["onnx_data"]]
        assert all(chunk["size"] <= 20 * 1024 * 1024 for part in parts for chunk in part["chunks"])
        assert len(parts[0]["chunks"]) == 3
        loaded = store.artifact(store.version(model), ONNX)
        assert loaded == large_mlp
        assert_same_predictions(loaded, large_mlp, 1000)
    finally:
        store.close()


@pytest.mark.slow
def test_large_model_over_configured_maximum(backend, model, large_mlp):
    store = backend.open(max_artifact_bytes=20 * 1024 * 1024)
    try:
        spec = {**SPEC, "features": [{"name": "x"}]}
        head = store.create_model(model, spec)

        with pytest.raises(ArtifactTooLarge, match=rf"'onnx' of model '{model}' version 1 has "
                           rf"{len(large_mlp)} bytes, the maximum is 20971520"):
            store.publish(head, {ONNX: large_mlp}, {"spec": spec})
        assert store.head(model) == head
    finally:
        store.close()
