"""Compare the default flights spec with River on the same flights, in one run.

Both learners see the same labelled flights in scheduled departure order,
encoded by the default spec's FeatureSchema into the same 129 columns (5
numeric, one-hot carrier, origin and destination). Both are scored
test-then-train: each record is predicted before it is learned.

- River ``preprocessing.StandardScaler() | linear_model.LogisticRegression()``
  with River's defaults, learning one record at a time (``learn_one``) on the
  dense encoded row, so its scaler also scales the one-hot columns.
- River with one-hot columns left unscaled, a second reference
  (``--river-numeric-only``), because the default spec scales numeric
  columns only.
- streamfit's default spec (``trainer/specs/flights.json``), learning in
  batches of the spec's ``batch.max_records`` with the Learner the worker uses.

River is a benchmark dependency only: ``pip install 'streamfit[bench]'``.

Usage:
    .venv/bin/python benchmarks/flights_river.py
    .venv/bin/python benchmarks/flights_river.py --records 100000 --start 100000 --river-numeric-only
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flights_learning import encode, run  # noqa: E402
from streamfit.flights import read_flights  # noqa: E402
from trainer.spec import ModelSpec, builtin_spec  # noqa: E402


def run_river(X: np.ndarray, y: np.ndarray, columns: list[str], scaled: list[str]) -> dict:
    """Return River's test-then-train accuracy, learning one record at a time."""
    from river import compose, linear_model, metrics, preprocessing

    unscaled = [name for name in columns if name not in set(scaled)]
    if unscaled:
        model = (
            (compose.Select(*scaled) | preprocessing.StandardScaler())
            + compose.Select(*unscaled)
        ) | linear_model.LogisticRegression()
    else:
        model = preprocessing.StandardScaler() | linear_model.LogisticRegression()

    accuracy = metrics.Accuracy()
    started = time.perf_counter()
    for row, label in zip(X.tolist(), y.tolist()):
        x = dict(zip(columns, row))
        accuracy.update(label, model.predict_one(x))
        model.learn_one(x, label)
    return {"accuracy": accuracy.get(), "seconds": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000,
                        help="labelled flights, in time order (default 100000)")
    parser.add_argument("--start", type=int, default=0, help="skip this many labelled flights first")
    parser.add_argument("--river-numeric-only", action="store_true",
                        help="also run River with the one-hot columns unscaled")
    args = parser.parse_args()

    import river

    spec = ModelSpec.from_dict(builtin_spec("flights"))
    records = read_flights()[args.start : args.start + args.records]
    X, y = encode(spec, records)
    columns = spec.schema.column_names()
    numeric = [columns[i] for i in spec.scaled_columns]

    print(f"python {platform.python_version()}, river {river.__version__}, "
          f"{platform.machine()}, flights {args.start}-{args.start + len(y)} in time order")
    ours = run(spec, X, y, spec.batch_max_records or 1000)
    print(f"majority-class baseline (running):            {ours['baseline_accuracy']:.4f}")
    dense = run_river(X, y, columns, columns)
    print(f"River StandardScaler | LogisticRegression:    {dense['accuracy']:.4f}  "
          f"(one record at a time, {dense['seconds']} s)")
    if args.river_numeric_only:
        partial = run_river(X, y, columns, numeric)
        print(f"River, one-hot columns unscaled:              {partial['accuracy']:.4f}  "
              f"(one record at a time, {partial['seconds']} s)")
    print(f"streamfit default spec ({spec.estimator}):         {ours['accuracy']:.4f}  "
          f"(batches of {ours['batch_records']}, {ours['seconds']} s)")


if __name__ == "__main__":
    main()
