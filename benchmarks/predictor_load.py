"""Throughput and latency of streamfit's predictor against `mlflow models serve`, on one model.

One scikit-learn pipeline (StandardScaler + SGDClassifier with log loss, 8
numeric features) is fitted once. MLflow serves it from `mlflow.sklearn.save_model`
(`mlflow models serve --env-manager local`, one uvicorn worker); streamfit
serves its skl2onnx export from a SQLite store (`streamfit predictor`, one
process). Both get the same rows from the same load generator: a closed loop
of N keep-alive HTTP/1.1 connections on asyncio streams, in this process,
warmed up before each measured run. Requests run against one server at a
time, single-row first, then 1,000 rows per request.

Needs the `bench` extra (mlflow). Run from the repository root:

    .venv/bin/python benchmarks/predictor_load.py --seconds 10 --concurrency 4

It prints a Markdown table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
FEATURES = [f"f{i}" for i in range(8)]
MODEL = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the model


def fit_pipeline(seed: int = 0):
    import pandas as pd
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(20_000, len(FEATURES))) * rng.uniform(1, 100, size=len(FEATURES))
    y = (X[:, 0] / 50 + X[:, 1] / 30 - X[:, 2] / 70 + rng.normal(size=len(X)) > 0).astype(np.int64)
    frame = pd.DataFrame(X.astype(np.float32), columns=FEATURES)
    pipeline = make_pipeline(StandardScaler(), SGDClassifier(loss="log_loss", random_state=seed))
    pipeline.fit(frame, y)
    return pipeline, frame


def save_mlflow(pipeline, frame, folder: Path) -> Path:
    import mlflow.sklearn
    from mlflow.models import infer_signature

    path = folder / "mlflow-model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        signature = infer_signature(frame.head(10), pipeline.predict(frame.head(10)))
        mlflow.sklearn.save_model(pipeline, str(path), signature=signature)
    return path


def publish_streamfit(pipeline, folder: Path) -> str:
    import onnx
    import skl2onnx
    import sklearn
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    from modelstore import open_store

    graph = to_onnx(
        pipeline,
        initial_types=[("features", FloatTensorType([None, len(FEATURES)]))],
        options={id(pipeline.steps[-1][1]): {"zipmap": False}},
    )
    spec = {
        "estimator": "SGDClassifier", "params": {"loss": "log_loss"}, "scaler": "StandardScaler",
        "features": [{"name": name} for name in FEATURES], "labels": [0, 1],
    }
    metadata = {
        "spec": spec, "task": "classification", "samples_learned": 20_000, "offsets": {}, "metrics": {},
        "onnx": {
            "input": "features", "width": len(FEATURES),
            "outputs": {"label": "label", "probabilities": "probabilities"},
            "opset": {op.domain or "ai.onnx": op.version for op in graph.opset_import},
        },
        "libraries": {"scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__,
                      "onnx": onnx.__version__, "numpy": np.__version__},
    }
    url = f"sqlite:///{folder / 'models.db'}"
    with open_store(url) as store:
        head = store.create_model(MODEL, spec)
        store.publish(head, {"onnx": graph.SerializeToString(), "state": b"unused"}, metadata)
    return url


# ---------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            # mlflow starts uvicorn as a child; the group is signalled.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def start(name: str, command: list[str], port: int, folder: Path) -> Server:
    log = folder / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFIT_")}
    # mlflow runs `uvicorn` from PATH, so the interpreter's bin folder goes first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    return Server(name, proc, port, log)


def wait_ready(server: Server, path: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{server.port}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} not ready within {timeout_s} s:\n{server.log.read_text()[-3000:]}")


# ---------------------------------------------------------------- payloads


def payloads(rows: np.ndarray) -> dict[str, tuple[str, bytes]]:
    """Return the path and body of each target for ``rows``."""
    as_lists = rows.tolist()
    columns = rows.T.tolist()
    v1 = {"features": as_lists[0]} if len(rows) == 1 else {"instances": as_lists}
    v2 = {"inputs": [
        {"name": name, "shape": [len(rows)], "datatype": "FP32", "data": column}
        for name, column in zip(FEATURES, columns)
    ]}
    mlflow = {"dataframe_split": {"columns": FEATURES, "data": as_lists}}
    return {
        "streamfit /v1 predict": (f"/v1/models/{MODEL}/predict", json.dumps(v1).encode()),
        "streamfit /v2 infer": (f"/v2/models/{MODEL}/infer", json.dumps(v2).encode()),
        "mlflow /invocations": ("/invocations", json.dumps(mlflow).encode()),
    }


def check_parity(ports: dict[str, int], rows: np.ndarray, expected: list[int]) -> None:
    for target, (path, body) in payloads(rows).items():
        port = ports[target.split()[0]]
        response = httpx.post(f"http://127.0.0.1:{port}{path}", content=body,
                              headers={"content-type": "application/json"}, timeout=60)
        response.raise_for_status()
        data = response.json()
        if "predictions" in data and isinstance(data["predictions"], list):
            labels = data["predictions"]
        else:
            labels = next(o["data"] for o in data["outputs"] if o["name"] == "label")
        mismatches = sum(int(a != b) for a, b in zip(labels, expected))
        if len(labels) != len(expected) or mismatches:
            raise RuntimeError(f"{target}: {mismatches} labels differ from scikit-learn's predict")


# ---------------------------------------------------------------- load generator


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readline()).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def connection(port: int, request: bytes, stop_at: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status = await read_response(reader)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def run_load(port: int, path: str, body: bytes, seconds: float, concurrency: int):
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(connection(port, request, stop_at, latencies, errors) for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def measure(port: int, path: str, body: bytes, seconds: float, concurrency: int, warmup_s: float) -> dict:
    asyncio.run(run_load(port, path, body, warmup_s, concurrency))
    latencies, errors, elapsed = asyncio.run(run_load(port, path, body, seconds, concurrency))
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": len(errors),
    }


# ---------------------------------------------------------------- main


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, Python {platform.python_version()}, {platform.system()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per target and payload")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run")
    parser.add_argument("--concurrency", type=int, default=4, help="keep-alive connections of the load generator")
    parser.add_argument("--intra-op-threads", type=int, default=1, help="onnxruntime threads of streamfit's session")
    args = parser.parse_args()

    import mlflow
    import onnxruntime
    import sklearn

    # Other processes on the machine take CPU from both servers alike; the
    # one-minute load average is printed so a reader can judge the run.
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="streamfit-bench-") as tmp:
        folder = Path(tmp)
        pipeline, frame = fit_pipeline()
        mlflow_path = save_mlflow(pipeline, frame, folder)
        store_url = publish_streamfit(pipeline, folder)

        ports = {"streamfit": free_port(), "mlflow": free_port()}
        servers = [
            start("streamfit", [sys.executable, "-m", "streamfit.cli", "predictor", "--store", store_url,
                                "--port", str(ports["streamfit"]), "--log-level", "WARNING",
                                "--intra-op-threads", str(args.intra_op_threads)], ports["streamfit"], folder),
            start("mlflow", [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(mlflow_path),
                             "-p", str(ports["mlflow"]), "-h", "127.0.0.1", "--env-manager", "local", "-w", "1"],
                  ports["mlflow"], folder),
        ]
        try:
            wait_ready(servers[0], "/v2/health/ready")
            wait_ready(servers[1], "/ping")
            rows = frame.to_numpy()[:1000]
            check_parity(ports, rows, pipeline.predict(frame.head(1000)).tolist())

            results = []
            for label, batch in (("1 row", rows[:1]), ("1,000 rows", rows)):
                for target, (path, body) in payloads(batch).items():
                    port = ports[target.split()[0]]
                    result = measure(port, path, body, args.seconds, args.concurrency, args.warmup)
                    results.append((label, target, result))
                    print(f"{label:>10} {target:24} {result['rps']:9.1f} req/s  p50 {result['p50_ms']:7.2f} ms  "
                          f"p99 {result['p99_ms']:7.2f} ms  errors {result['errors']}", flush=True)
        finally:
            for server in servers:
                server.stop()

    print()
    print(f"Machine: {machine()}; load average before the run {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"Versions: mlflow {mlflow.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"scikit-learn {sklearn.__version__}")
    print(f"Load: {args.concurrency} keep-alive connections, {args.warmup:g} s warm-up, "
          f"{args.seconds:g} s measured per row; streamfit intra_op_threads={args.intra_op_threads}")
    print()
    print("| rows per request | server and route | requests/s | p50 ms | p99 ms | errors |")
    print("|---|---|---:|---:|---:|---:|")
    for label, target, r in results:
        print(f"| {label} | {target} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
