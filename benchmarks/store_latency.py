"""Measure publish and load latency of the model store per artifact size, on SQLite and gocaves.

For each backend and each size, the script publishes a version whose ONNX
artifact is that many random bytes, so no compression helps. It then loads
the version back (``version()`` and a verified ``artifact()`` read) and
reports the medians over the repeats. In the same run it measures a peer
that moves the same bytes without the store's protocol:

- SQLite: the same bytes written to a plain file with ``fsync``, and read back.
- Couchbase: the same chunks written with raw SDK upserts (binary
  transcoder), and read back with raw gets.

The ratio is store time / peer time. gocaves is started with the project's
test-server script (tests/servers/servers.py), on 127.0.0.1 only.

Usage:
    .venv/bin/python benchmarks/store_latency.py
    .venv/bin/python benchmarks/store_latency.py --sizes 1KB 1MB --repeats 5
    .venv/bin/python benchmarks/store_latency.py --couchbase couchbase://127.0.0.1:11210
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from modelstore import ONNX, STATE, ModelStore  # noqa: E402
from modelstore.couchbase import CouchbaseStore  # noqa: E402
from modelstore.sqlite import SQLiteStore  # noqa: E402

SIZES = {"1KB": 1024, "1MB": 1024**2, "20MB": 20 * 1024**2, "60MB": 60 * 1024**2}
SPEC = {"estimator": "SGDRegressor", "params": {}, "features": [{"name": "x"}]}
CHUNK_BYTES = 20 * 1024 * 1024


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def measure_store(store: ModelStore, data: bytes, repeats: int) -> tuple[list[float], list[float]]:
    model = f"bench-{uuid.uuid4().hex[:8]}"
    store.create_model(model, SPEC)
    publish, load = [], []
    for _ in range(repeats):
        head = store.head(model)
        publish.append(timed(lambda: store.publish(head, {ONNX: data, STATE: b"state"}, {"spec": SPEC})))

        def read() -> None:
            info = store.version(model)
            assert store.artifact(info, ONNX) == data

        load.append(timed(read))
    store.delete_model(model)
    return publish, load


def measure_file(folder: Path, data: bytes, repeats: int) -> tuple[list[float], list[float]]:
    write, read = [], []
    for index in range(repeats):
        path = folder / f"peer-{index}.bin"

        def write_file() -> None:
            with open(path, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())

        write.append(timed(write_file))
        read.append(timed(lambda: path.read_bytes()))
        path.unlink()
    return write, read


def measure_raw_couchbase(collection, data: bytes, repeats: int) -> tuple[list[float], list[float]]:
    from couchbase.options import GetOptions, UpsertOptions
    from couchbase.transcoder import RawBinaryTranscoder

    binary = RawBinaryTranscoder()
    timeout = timedelta(seconds=120)
    chunks = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
    write, read = [], []
    for _ in range(repeats):
        keys = [f"bench-raw-{uuid.uuid4().hex}::{i}" for i in range(len(chunks))]

        def upsert() -> None:
            for key, chunk in zip(keys, chunks):
                collection.upsert(key, chunk, UpsertOptions(transcoder=binary, timeout=timeout))

        def get() -> None:
            assert b"".join(
                collection.get(key, GetOptions(transcoder=binary, timeout=timeout)).value for key in keys
            ) == data

        write.append(timed(upsert))
        read.append(timed(get))
        for key in keys:
            collection.remove(key)
    return write, read


def start_gocaves(workdir: Path):
    spec = importlib.util.spec_from_file_location("streamfit_test_servers", REPO_ROOT / "tests" / "servers" / "servers.py")
    servers = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = servers
    spec.loader.exec_module(servers)
    return servers.start_gocaves(workdir)


def raw_collection(connstr: str, username: str, password: str, bucket: str, scope: str):
    from couchbase.auth import PasswordAuthenticator
    from couchbase.cluster import Cluster
    from couchbase.options import ClusterOptions

    cluster = Cluster(connstr, ClusterOptions(PasswordAuthenticator(username, password)))
    cluster.wait_until_ready(timedelta(seconds=30))
    return cluster, cluster.bucket(bucket).scope(scope).collection("artifacts")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                       if l.startswith("MemTotal")).split()[1])
        memory = f", {kib / 1024**2:.0f} GiB memory"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){memory}, {platform.system()}, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=None,
                        help="publishes per size (default: 7 up to 1MB, 5 for 20MB, 3 for 60MB)")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "couchbase"], choices=["sqlite", "couchbase"])
    parser.add_argument("--couchbase", default=None,
                        help="connection string of a running cluster (default: start gocaves)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="streamfit-bench-") as folder:
        folder = Path(folder)
        server, cluster = None, None
        stores: dict[str, tuple[ModelStore, Callable]] = {}
        if "sqlite" in args.backends:
            stores["sqlite"] = (SQLiteStore(folder / "models.db"),
                                lambda data, n: measure_file(folder, data, n))
        if "couchbase" in args.backends:
            connstr, username, password = args.couchbase, "Administrator", "password"
            if connstr is None:
                server = start_gocaves(folder / "gocaves")
                connstr, username, password = server.connstr, server.username, server.password
            scope = f"bench-{uuid.uuid4().hex[:6]}"
            store = CouchbaseStore.from_url(
                f"{connstr}/default?scope={scope}&artifact_timeout_ms=120000",
                environ={"STREAMFIT_COUCHBASE_USERNAME": username, "STREAMFIT_COUCHBASE_PASSWORD": password},
            )
            cluster, collection = raw_collection(connstr, username, password, "default", scope)
            stores["couchbase"] = (store, lambda data, n: measure_raw_couchbase(collection, data, n))
        try:
            for name, (store, peer) in stores.items():
                for label in args.sizes:
                    size = SIZES[label]
                    repeats = args.repeats or (7 if size <= SIZES["1MB"] else 5 if size <= SIZES["20MB"] else 3)
                    data = os.urandom(size)
                    publish, load = measure_store(store, data, repeats)
                    write, read = peer(data, repeats)
                    rows.append((name, label, repeats, median_ms(publish), median_ms(write),
                                 median_ms(load), median_ms(read)))
                    print(f"{name} {label}: publish {median_ms(publish):.1f} ms, load {median_ms(load):.1f} ms",
                          file=sys.stderr, flush=True)
        finally:
            for store, _ in stores.values():
                store.close()
            if cluster is not None:
                cluster.close()
            if server is not None:
                server.stop()

    peers = {"sqlite": "file write+fsync / read", "couchbase": "raw SDK upsert / get"}
    print(f"\nMachine: {machine()}")
    print(f"Command: {' '.join(['.venv/bin/python', 'benchmarks/store_latency.py', *sys.argv[1:]])}\n")
    print("| backend | size | repeats | publish median (ms) | peer write median (ms) | publish / peer "
          "| load median (ms) | peer read median (ms) | load / peer | peer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, label, repeats, publish, write, load, read in rows:
        print(f"| {name} | {label} | {repeats} | {publish:.1f} | {write:.1f} | {publish / write:.1f} "
              f"| {load:.1f} | {read:.1f} | {load / read:.1f} | {peers[name]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
