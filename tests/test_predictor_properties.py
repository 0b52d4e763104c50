"""Property-based tests: generated requests never get a 5xx from the predictor.

Hypothesis generates paths, methods and bodies, from arbitrary bytes to
near-valid Open Inference Protocol tensors, and sends them over real HTTP
to a predictor serving a classifier, a regressor and a margin classifier
from a real SQLite store. Every response must be a 2xx, or a 4xx with a
JSON ``error``.
"""

from __future__ import annotations

from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from modelstore import open_store
from modelstore.errors import RecordRejected
from predictor import protocol
from predictor.app import create_app
from predictor.loader import LoadedModel
from predictor.protocol import RequestError
from predictor.settings import PredictorSettings

import predictor_support as pm
from predictor_support import LiveServer

EXAMPLES = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
MODELS = ["flights", "delay", "status"]
FEATURE_NAMES = [f["name"] for f in pm.FEATURES]
DATATYPES = ["BYTES", "FP16", "FP32", "FP64", "INT8", "INT32", "INT64", "UINT8", "UINT64", "BOOL"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('properties') / 'models.db'}")
    pm.publish(store, "flights", "sgd", seed=1)
    pm.publish(store, "flights", "sgd", seed=2)
    store.set_alias("flights", "production", 1)
    pm.publish(store, "delay", "regressor", seed=2)
    pm.publish(store, "status", "hinge", seed=2)
    settings_ = PredictorSettings(
        store=store.url, refresh_interval_ms=100, intra_op_threads=1,
        max_body_bytes=64 * 1024, max_batch_rows=50,
    )
    server = LiveServer(create_app(settings_, registry=CollectorRegistry())).start()
    yield server
    server.stop()
    store.close()


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(pm.CARRIERS),
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
segments = st.one_of(
    st.sampled_from(MODELS + ["absent", "bad:name", "..", "%00"]),
    st.text(min_size=1, max_size=40),
)
selectors = st.one_of(
    st.none(),
    st.sampled_from(["1", "2", "9", "0", "production", "canary", "1x", "-1", "99999999999"]),
    st.text(min_size=1, max_size=30),
)


def model_path(name: str, selector: str | None, route: str) -> str:
    path = f"/{'v2' if route == 'infer' else 'v1'}/models/{quote(name, safe='')}"
    if selector is not None:
        path += f"/versions/{quote(selector, safe='')}"
    return f"{path}/{route}"


tensors = st.fixed_dictionaries(
    {
        "name": st.one_of(st.sampled_from(FEATURE_NAMES), json_values),
        "datatype": st.one_of(st.sampled_from(DATATYPES), json_values),
        "shape": st.one_of(st.lists(st.integers(min_value=-2, max_value=60), max_size=3), json_values),
        "data": st.one_of(st.lists(scalars, max_size=8), st.lists(st.lists(scalars, max_size=2), max_size=4), json_values),
    },
    optional={"parameters": json_values},
)
v2_bodies = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(tensors, max_size=5), json_values)},
    optional={
        "id": json_values,
        "outputs": st.one_of(st.lists(st.fixed_dictionaries({"name": json_values}), max_size=3), json_values),
        "parameters": json_values,
    },
)
rows = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(FEATURE_NAMES), st.text(max_size=8)), scalars, max_size=5),
    st.lists(scalars, max_size=4),
    json_values,
)
v1_bodies = st.one_of(
    st.fixed_dictionaries({"features": rows}),
    st.fixed_dictionaries({"instances": st.one_of(st.lists(rows, max_size=6), json_values)}),
    st.dictionaries(st.text(max_size=10), json_values, max_size=3),
)


def check(response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body["error"], str) and body["error"]


@EXAMPLES
@given(name=segments, selector=selectors, body=v2_bodies)
def test_v2_infer_never_5xx(server, name, selector, body):
    check(server.client.post(model_path(name, selector, "infer"), json=body))


@EXAMPLES
@given(name=st.sampled_from(MODELS), selector=selectors, body=v1_bodies)
def test_v1_predict_never_5xx(server, name, selector, body):
    check(server.client.post(model_path(name, selector, "predict"), json=body))


@EXAMPLES
@given(
    route=st.sampled_from(["infer", "predict"]),
    raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
)
def test_raw_bodies_never_5xx(server, route, raw):
    response = server.client.post(
        model_path("flights", None, route), content=raw, headers={"content-type": "application/json"}
    )
    check(response)


@EXAMPLES
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    parts=st.lists(segments, min_size=0, max_size=5),
    prefix=st.sampled_from(["", "v2", "v2/models", "v1/models", "v2/health"]),
)
def test_any_path_never_5xx(server, method, parts, prefix):
    path = "/" + "/".join([prefix, *(quote(p, safe="") for p in parts)]).lstrip("/")
    response = server.client.request(method, path, content=b"{}" if method != "GET" else None)
    assert response.status_code < 500, f"{method} {path}: {response.status_code} {response.text[:300]}"


def schema_only_model() -> LoadedModel:
    return LoadedModel(
        name="flights", version=1, publish_id="p", created_at=None, task="classification",
        schema=pm.SCHEMA, classes=(0, 1), input_name="features", outputs={"label": "label"},
        session=None, load_seconds=0.0,
    )


def reference_encode(rows: list) -> tuple[np.ndarray | None, str | None]:
    """Encode row by row with the schema alone: the array, or the first rejection reason."""
    out = []
    for row in rows:
        try:
            out.append(pm.SCHEMA.encode_one(row))
        except RecordRejected as exc:
            return None, exc.reason
    return np.stack(out), None


feature_values = st.one_of(
    scalars, st.just(1e39), st.just(True), st.sampled_from(pm.CARRIERS + ["ZZ"]),
    st.floats(min_value=-1e6, max_value=1e6),
)
object_rows = st.dictionaries(
    st.sampled_from(FEATURE_NAMES + ["extra"]), feature_values, min_size=0, max_size=4
)
list_rows = st.lists(feature_values, min_size=2, max_size=4)


@EXAMPLES
@given(rows=st.lists(st.one_of(object_rows, list_rows), min_size=1, max_size=6))
def test_v1_encoding_matches_schema(rows):
    expected, reason = reference_encode(rows)
    model = schema_only_model()
    if reason is not None:
        with pytest.raises(RequestError) as error:
            protocol.decode_v1({"instances": rows}, model, max_rows=100)
        assert error.value.reason == reason
        return
    encoded, _ = protocol.decode_v1({"instances": rows}, model, max_rows=100)
    np.testing.assert_array_equal(encoded, expected)


@EXAMPLES
@given(rows=st.lists(object_rows, min_size=1, max_size=6))
def test_v2_encoding_matches_schema(rows):
    # Tensors carry every feature, so a row without one sends null.
    columns = {name: [row.get(name) for row in rows] for name in FEATURE_NAMES}
    inputs = [
        {"name": name, "shape": [len(rows)], "datatype": "BYTES" if name == "carrier" else "FP64", "data": data}
        for name, data in columns.items()
    ]
    expected, reason = reference_encode([{n: c[r] for n, c in columns.items()} for r in range(len(rows))])
    model = schema_only_model()
    if reason is not None:
        with pytest.raises(RequestError) as error:
            protocol.decode_v2({"inputs": inputs}, model, max_rows=100)
        assert error.value.reason == reason
        return
    encoded, _ = protocol.decode_v2({"inputs": inputs}, model, max_rows=100)
    np.testing.assert_array_equal(encoded, expected)
