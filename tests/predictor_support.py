"""Models and a live server for the predictor tests.

The tests build and publish ONNX models themselves, shaped like the
trainer's versions (input "features" float32 [None, width]; outputs "label"
and "probabilities" without ZipMap) with scikit-learn and skl2onnx, so the
predictor is tested on its own.
The predictor package itself never imports scikit-learn or skl2onnx.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import skl2onnx
import sklearn
import uvicorn
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import SGDClassifier, SGDRegressor
from sklearn.neural_network import MLPClassifier

from modelstore.base import ModelStore, VersionInfo
from modelstore.schema import FeatureSchema

FEATURES = [
    {"name": "month"},
    {"name": "distance"},
    {"name": "carrier", "type": "categorical", "vocabulary": ["AA", "DL", "UA"], "unknown": "ignore"},
]
CLASSIFIER_SPEC = {"estimator": "SGDClassifier", "params": {"loss": "log_loss"}, "scaler": None,
                   "features": FEATURES, "labels": [0, 1]}
HINGE_SPEC = {"estimator": "SGDClassifier", "params": {"loss": "hinge"}, "scaler": None,
              "features": FEATURES, "labels": ["early", "late", "on_time"]}
REGRESSOR_SPEC = {"estimator": "SGDRegressor", "params": {}, "scaler": None, "features": FEATURES}

SCHEMA = FeatureSchema.from_list(FEATURES)
REPO_ROOT = Path(__file__).resolve().parents[1]
CARRIERS = ["AA", "DL", "UA"]


def sample_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "month": int(rng.integers(1, 13)),
            "distance": float(rng.uniform(100, 3000)),
            "carrier": CARRIERS[int(rng.integers(0, 3))],
        }
        for _ in range(n)
    ]


def training_data(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rows = sample_rows(n, seed)
    X = SCHEMA.encode(rows)
    y = ((X[:, 0] > 6) ^ (X[:, 1] > 1500)).astype(np.int64)
    return X, y


def fit_estimator(kind: str, seed: int) -> Any:
    X, y = training_data(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "sgd":
            est = SGDClassifier(loss="log_loss", random_state=seed)
            est.partial_fit(X, y, classes=[0, 1])
        elif kind == "hinge":
            labels = np.array(["early", "late", "on_time"])[(X[:, 0].astype(int) % 3)]
            est = SGDClassifier(loss="hinge", random_state=seed)
            est.partial_fit(X, labels, classes=list(HINGE_SPEC["labels"]))
        elif kind == "regressor":
            est = SGDRegressor(random_state=seed)
            est.partial_fit(X, X[:, 1] * 2.0 + 1.0)
        elif kind == "mlp":
            # Large on purpose: building and warming its session takes long
            # enough that requests arrive while it loads.
            est = MLPClassifier(hidden_layer_sizes=(2048, 2048), max_iter=1, random_state=seed)
            est.fit(X[:20], y[:20])
        else:
            raise ValueError(f"unknown model kind {kind!r}")
    return est


@functools.lru_cache(maxsize=64)
def onnx_model(kind: str, seed: int) -> tuple[bytes, dict[str, Any], str]:
    """Return ONNX bytes, the metadata 'onnx' entry and the task of a fitted model."""
    est = fit_estimator(kind, seed)
    is_classifier = kind != "regressor"
    options = {id(est): {"zipmap": False}} if is_classifier else None
    model = to_onnx(
        est,
        initial_types=[("features", FloatTensorType([None, SCHEMA.width]))],
        options=options,
    )
    outputs = {"label": "label"} if is_classifier else {"value": "variable"}
    if is_classifier:
        outputs["scores" if kind == "hinge" else "probabilities"] = "probabilities"
    meta = {
        "input": "features",
        "width": SCHEMA.width,
        "outputs": outputs,
        "opset": {op.domain or "ai.onnx": op.version for op in model.opset_import},
    }
    return model.SerializeToString(), meta, "classification" if is_classifier else "regression"


def spec_for(kind: str) -> dict[str, Any]:
    return {"hinge": HINGE_SPEC, "regressor": REGRESSOR_SPEC}.get(kind, CLASSIFIER_SPEC)


def publish(
    store: ModelStore,
    name: str,
    kind: str = "sgd",
    seed: int = 0,
    onnx_bytes: bytes | None = None,
    **overrides: Any,
) -> VersionInfo:
    """Publish one version of ``name`` (created when absent), shaped like a trainer's.

    ``onnx_bytes`` replaces the artifact and ``overrides`` replace metadata keys,
    to publish broken versions.
    """
    if name not in store.list_models():
        store.create_model(name, spec_for(kind))
    return _publish_on(store, store.head(name), kind, seed, onnx_bytes, overrides)


def create_and_publish(store: ModelStore, name: str, kind: str = "sgd", seed: int = 0) -> VersionInfo:
    """Create ``name`` and publish its version 1, without listing the store's models first."""
    head = store.create_model(name, spec_for(kind))
    return _publish_on(store, head, kind, seed, None, {})


def _publish_on(
    store: ModelStore, head: Any, kind: str, seed: int, onnx_bytes: bytes | None, overrides: dict[str, Any]
) -> VersionInfo:
    data, meta, task = onnx_model(kind, seed)
    metadata = {
        "spec": spec_for(kind),
        "task": task,
        "samples_learned": 200,
        "offsets": {},
        "metrics": {},
        "onnx": meta,
        "libraries": {
            "scikit-learn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
        },
    }
    metadata.update(overrides)
    artifacts = {"onnx": data if onnx_bytes is None else onnx_bytes, "state": b"not used by the predictor"}
    return store.publish(head, artifacts, metadata)


def sklearn_predict(kind: str, seed: int, rows: list[dict[str, Any]]) -> np.ndarray:
    """Predictions of the scikit-learn estimator behind ``onnx_model(kind, seed)``."""
    est = fit_estimator(kind, seed)
    X = SCHEMA.encode(rows)
    return est.predict(X)


class LiveServer:
    """A predictor app served by uvicorn on a thread, on a free port of 127.0.0.1.

    Tests speak real HTTP to it through ``client`` (an httpx.Client). The
    thread belongs to the test: ``stop`` sets uvicorn's exit flag and joins it.
    """

    def __init__(self, app: Any):
        self.app = app
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, lifespan="on", access_log=False, log_config=None
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-predictor", daemon=True)
        self.client: httpx.Client | None = None

    def start(self, timeout_s: float = 30.0) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test predictor did not start; see the log above")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=30.0)
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.server.should_exit = True
        self.thread.join(30.0)
        assert not self.thread.is_alive(), "the test predictor did not stop within 30 s"

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.app.state.metrics.registry.get_sample_value(name, labels or {})


def corrupt_artifact(db_path: Any, info: VersionInfo, kind: str = "onnx") -> None:
    """Flip one byte of a stored artifact behind the store's back.

    The size stays the same, so only the sha256 check can notice. The SQLite
    store keeps artifacts in table ``artifacts`` keyed by (model, publish_id,
    kind, chunk).
    """
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            where = (info.model, info.publish_id, kind)
            row = conn.execute(
                "SELECT bytes FROM artifacts WHERE model = ? AND publish_id = ? AND kind = ? "
                "AND chunk = 0", where,
            ).fetchone()
            assert row is not None, f"no {kind} artifact for {info.model} version {info.version}"
            data = bytearray(row[0])
            data[len(data) // 2] ^= 0xFF
            conn.execute(
                "UPDATE artifacts SET bytes = ? WHERE model = ? AND publish_id = ? AND kind = ? "
                "AND chunk = 0", (bytes(data), *where),
            )
    finally:
        conn.close()


SERVE_SETTINGS = (
    "import json, sys\n"
    "from predictor.server import run\n"
    "from predictor.settings import PredictorSettings\n"
    "run(PredictorSettings(**json.loads(sys.argv[1])))\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PredictorProcess:
    """``predictor.server.run`` in its own process on a free port of 127.0.0.1.

    The process writes its log to ``log_path``; ``stop`` sends SIGTERM and
    waits, and kills it only if it does not exit within 20 s.
    """

    def __init__(self, log_path: Path, **settings: Any):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        settings = {"port": self.port, "intra_op_threads": 1, **settings}
        env = {k: v for k, v in os.environ.items() if k != "WEB_CONCURRENCY"}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVE_SETTINGS, json.dumps(settings)],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
            )

    def wait_ready(self, timeout_s: float = 60.0) -> "PredictorProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the predictor exited early:\n{self.log()}"
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the predictor was not ready within {timeout_s} s:\n{self.log()}")

    def rss_bytes(self) -> int:
        """Resident memory of the process, from /proc (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS line for process {self.proc.pid}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def scrape_value(url: str, name: str, labels: str = "") -> float | None:
    """Read one sample of a metric from the /metrics text of the server at ``url``."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return None
