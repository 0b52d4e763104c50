"""A predictor that serves a model switches to a rolled-back version, over real HTTP.

The predictor runs as its own process (``predictor.server.run``) on a free
port of 127.0.0.1, reading the same store as the test. The test rolls the
model back while a client sends predictions, and measures the delay from
the rollback's return to the first response from the new version. The bound is
generous for a shared machine; the measured delay is printed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from modelstore import ONNX
from store_backends import couchbase_backend, sqlite_backend

import predictor_support as pm

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE = (
    "import sys\n"
    "from predictor.server import run\n"
    "from predictor.settings import PredictorSettings\n"
    "run(PredictorSettings(store=sys.argv[1], port=int(sys.argv[2]), intra_op_threads=1))\n"
)
START_WITHIN_S = 60.0
SERVED_WITHIN_S = 15.0


@pytest.fixture(params=["sqlite", pytest.param("couchbase", marks=pytest.mark.couchbase)])
def backend(request, tmp_path):
    if request.param == "sqlite":
        return sqlite_backend(tmp_path / "models.db")
    return couchbase_backend(request.getfixturevalue("gocaves_server"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def predictor(backend, tmp_path):
    log_path = tmp_path / "predictor.log"
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, backend.url, str(port)], cwd=REPO_ROOT,
            stdout=log, stderr=subprocess.STDOUT,
            env={**{k: v for k, v in os.environ.items() if k != "WEB_CONCURRENCY"}, **backend.environ},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_WITHIN_S
        while True:
            assert proc.poll() is None, f"the predictor exited early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"the predictor was not ready:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_for_version(client, model, rows, version, timeout_s):
    """Send predictions until one comes from ``version``; return (its time, its body) or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.post(f"/v1/models/{model}/predict", json={"instances": rows})
        assert response.status_code == 200, response.text
        body = response.json()
        if body["version"] == version:
            return time.monotonic(), body
        time.sleep(0.005)
    return None


def onnx_outputs(store, info, rows):
    session = ort.InferenceSession(store.artifact(info, ONNX), providers=["CPUExecutionProvider"])
    return session.run(["label", "probabilities"], {"features": pm.SCHEMA.encode(rows)})


@pytest.mark.slow
def test_predictor_switches_to_rollback(backend, predictor):
    model = f"served-{uuid.uuid4().hex[:8]}"
    store = backend.open(chunk_size_bytes=None)
    try:
        first = pm.publish(store, model, "sgd", seed=1)
        second = pm.publish(store, model, "sgd", seed=2)
        rows = pm.sample_rows(32, seed=3)
        labels, probabilities = onnx_outputs(store, first, rows)
        assert not np.allclose(probabilities, onnx_outputs(store, second, rows)[1])

        with httpx.Client(base_url=predictor, timeout=30.0) as client:
            assert wait_for_version(client, model, rows, second.version, SERVED_WITHIN_S) is not None

            back = store.rollback(model, first.version)
            rolled_back_at = time.monotonic()
            seen = wait_for_version(client, model, rows, back.version, SERVED_WITHIN_S)

        assert seen is not None, f"version {back.version} was not served within {SERVED_WITHIN_S} s"
        seen_at, body = seen
        print(f"\n{backend.name}: rollback served {seen_at - rolled_back_at:.3f} s after it was published")
        assert body["predictions"] == labels.tolist()
        np.testing.assert_allclose(body["probabilities"], probabilities, rtol=1e-6)
    finally:
        store.close()
