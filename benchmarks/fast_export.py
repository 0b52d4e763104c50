"""Measure fast export (rewriting weights into a cached graph) against skl2onnx conversion.

For each spec, a learner learns flights in batches. After each batch the
script times a full skl2onnx conversion and a rewrite of the cached graph,
each alone and followed by the publish gate's parity check, and checks that
both give the same bytes. Times are medians over the batches.

Usage:
    .venv/bin/python benchmarks/fast_export.py
    .venv/bin/python benchmarks/fast_export.py --batches 200 --batch-records 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flights_learning import encode  # noqa: E402
from streamfit.flights import read_flights  # noqa: E402
from trainer.export import convert  # noqa: E402
from trainer.fastexport import ExportTemplate  # noqa: E402
from trainer.gate import check_onnx_parity  # noqa: E402
from trainer.learner import Learner  # noqa: E402
from trainer.spec import ModelSpec, builtin_spec  # noqa: E402


def specs() -> dict[str, ModelSpec]:
    flights = builtin_spec("flights")
    mlp = dict(flights, estimator="MLPClassifier",
               params={"hidden_layer_sizes": [64, 32], "random_state": 0})
    nb = dict(flights, estimator="MultinomialNB", params={}, scaler="MinMaxScaler")
    return {
        "flights default (SGDClassifier)": ModelSpec.from_dict(flights),
        "MultinomialNB, MinMaxScaler": ModelSpec.from_dict(nb),
        "MLPClassifier 64-32": ModelSpec.from_dict(mlp),
    }


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return (time.perf_counter() - started) * 1000.0, result


def measure(spec: ModelSpec, X, y, batches: int, batch_records: int) -> dict[str, float]:
    learner = Learner(spec)
    learner.learn(X[:batch_records], y[:batch_records])
    template = ExportTemplate.build(learner)
    if template is None:
        raise SystemExit(f"{spec.estimator}: no template; this structure is always converted")
    times: dict[str, list[float]] = {"convert": [], "rewrite": [], "convert+gate": [], "rewrite+gate": []}
    for i in range(1, batches + 1):
        start = i * batch_records
        X_batch, y_batch = X[start : start + batch_records], y[start : start + batch_records]
        learner.learn(X_batch, y_batch)

        converted_ms, proto = timed(lambda: convert(learner).SerializeToString())
        rewritten_ms, rewritten = timed(lambda: template.rewrite(learner))
        if proto != rewritten:
            raise SystemExit(f"{spec.estimator}: the rewrite differs from the conversion at batch {i}")
        gate_ms, _ = timed(lambda: check_onnx_parity(learner, rewritten, X_batch))
        times["convert"].append(converted_ms)
        times["rewrite"].append(rewritten_ms)
        times["convert+gate"].append(converted_ms + gate_ms)
        times["rewrite+gate"].append(rewritten_ms + gate_ms)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=100, help="batches per spec (default 100)")
    parser.add_argument("--batch-records", type=int, default=50, help="records per batch (default 50)")
    args = parser.parse_args()

    records = read_flights()[: (args.batches + 1) * args.batch_records]
    print(f"median milliseconds over {args.batches} batches of {args.batch_records} flights")
    print(f"{'spec':34} {'convert':>8} {'rewrite':>8} {'speed-up':>8} {'convert+gate':>13} "
          f"{'rewrite+gate':>13}")
    for name, spec in specs().items():
        X, y = encode(spec, records)
        result = measure(spec, X, y, args.batches, args.batch_records)
        print(f"{name:34} {result['convert']:8.2f} {result['rewrite']:8.2f} "
              f"{result['convert'] / result['rewrite']:7.1f}x {result['convert+gate']:13.2f} "
              f"{result['rewrite+gate']:13.2f}")


if __name__ == "__main__":
    main()
