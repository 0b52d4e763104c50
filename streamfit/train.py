"""``streamfit train``: learn an initial model offline from a file and publish it as version 1.

The usual first step of a model: learn from a small data set, publish, and
let the worker refine it online from the stream. The file is a JSON-lines
file of records (``{"features": {...}, "label": ...}``, as on the stream) or
a CSV file whose header names the features and the label column. Each batch
is scored before it is learned (test-then-train), exactly as the worker
does, and the summary reports that score.

A record that cannot be used is rejected with a reason, counted and
skipped; the first few are printed. The published version records no
stream offsets, because the file is not a stream partition.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np

from modelstore import open_store
from modelstore.errors import ConfigError, ModelNotFound, RecordRejected
from modelstore.names import validate_model_name
from modelstore.schema import check_target

DEFAULT_STORE = "sqlite:///models.db"
DEFAULT_BATCH_RECORDS = 1000
MAX_PRINTED_REJECTIONS = 5


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="streamfit train",
        description="Learn a model from a CSV or JSON-lines file and publish it as version 1.",
    )
    parser.add_argument("model", help="model name")
    parser.add_argument("--data", required=True, help="CSV file (with a header) or JSON-lines file")
    parser.add_argument("--spec", required=True, help="model spec file, .json or .toml")
    parser.add_argument("--store", default=os.environ.get("STREAMFIT_STORE", DEFAULT_STORE),
                        help=f"store URL (default: STREAMFIT_STORE or {DEFAULT_STORE})")
    parser.add_argument("--label-field", default="label",
                        help="CSV column or JSON field that contains the label (default: label)")
    parser.add_argument("--batch-records", type=int, default=None,
                        help="records per partial_fit call (default: the spec's batch.max_records, "
                        f"else {DEFAULT_BATCH_RECORDS})")
    parser.add_argument("--named-onnx", default=None,
                        help="also write the ONNX graph with one named input per feature to this file")
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    args = parser.parse_args(argv)

    from trainer.spec import load_spec_file

    model = validate_model_name(args.model)
    spec = load_spec_file(args.spec)
    batch_records = args.batch_records or spec.batch_max_records or DEFAULT_BATCH_RECORDS
    if batch_records < 1:
        raise ConfigError(f"--batch-records is {batch_records}; use a positive integer")
    data = Path(args.data)
    if not data.is_file():
        raise ConfigError(f"data file {str(data)!r} not found")

    progress = Progress(data.stat().st_size, enabled=not args.no_progress)
    result = train_file(spec, data, args.label_field, batch_records, progress)
    progress.close()
    if result.learner.samples_learned_ == 0:
        raise ConfigError(
            f"no usable record in {str(data)!r} ({_rejected_text(result.rejected)}); "
            "nothing was published"
        )

    with open_store(args.store) as store:
        info, named = publish_first_version(store, model, spec, result, data)
    if args.named_onnx:
        Path(args.named_onnx).write_bytes(named)
    print(_summary(model, info, result))
    return 0


class TrainResult:
    """The learner trained from a file, its test-then-train metrics and the rejections."""

    def __init__(self, learner, metrics, rejected: Counter, last_batch: np.ndarray):
        self.learner = learner
        self.metrics = metrics
        self.rejected = rejected
        self.last_batch = last_batch


def train_file(spec, path: Path, label_field: str, batch_records: int, progress: "Progress") -> TrainResult:
    """Learn every usable record of ``path`` in batches, scoring each batch first."""
    from trainer.learner import Learner
    from trainer.metrics import metrics_for_spec, score_batch

    learner = Learner(spec)
    metrics = metrics_for_spec(spec, None)
    rejected: Counter = Counter()
    rows: list[np.ndarray] = []
    labels: list[Any] = []
    last_batch = np.zeros((0, spec.schema.width), dtype=np.float32)

    def learn_pending() -> None:
        nonlocal last_batch
        X = np.vstack(rows).astype(np.float32)
        y = None if spec.is_clusterer else _label_array(labels, spec)
        score_batch(metrics, learner, X, y)
        learner.learn(X, y)
        last_batch = X
        rows.clear()
        labels.clear()

    with path.open("r", encoding="utf-8", newline="") as stream:
        for line, raw in _records(path, stream, label_field):
            try:
                row, label = _encode(spec, raw, label_field)
            except RecordRejected as exc:
                rejected[exc.reason] += 1
                if sum(rejected.values()) <= MAX_PRINTED_REJECTIONS:
                    progress.note(f"{path.name}:{line}: rejected ({exc.reason}): {exc.detail}")
                continue
            rows.append(row)
            labels.append(label)
            if len(rows) >= batch_records:
                learn_pending()
                progress.update(stream.tell(), learner.samples_learned_, metrics.to_dict())
        if rows:
            learn_pending()
    progress.update(progress.total, learner.samples_learned_, metrics.to_dict())
    return TrainResult(learner, metrics, rejected, last_batch)


def publish_first_version(store, model: str, spec, result: TrainResult, data: Path):
    """Create ``model`` if needed and publish the trained learner as its version 1.

    Returns the published VersionInfo and the named-input ONNX bytes.
    """
    import onnx

    from trainer.artifacts import Exporter, version_payload
    from trainer.named_inputs import named_input_graph

    try:
        head = store.head(model)
    except ModelNotFound:
        head = store.create_model(model, spec.to_dict())
    else:
        if head.latest != 0:
            raise ConfigError(
                f"model {model!r} already has version {head.latest}; train publishes only a "
                "model's first version, so use a new model name"
            )
        stored = store.version(model, 0).spec
        if stored != spec.to_dict():
            raise ConfigError(
                f"model {model!r} exists with another spec; use a new model name or the "
                "spec it was created with"
            )

    exported = Exporter(cache_size=1).export(model, result.learner, result.last_batch)
    artifacts, metadata = version_payload(
        result.learner, exported, result.metrics.to_dict(), {}, rejected=dict(result.rejected)
    )
    metadata["bootstrap"] = {"file": data.name, "records": result.learner.samples_learned_}
    info = store.publish(head, artifacts, metadata)
    named = exported.named_bytes
    if named is None:
        named = named_input_graph(onnx.load_from_string(exported.onnx_bytes), spec.schema)
        named = named.SerializeToString()
    return info, named


def _records(path: Path, stream: TextIO, label_field: str) -> Iterator[tuple[int, Any]]:
    """Yield (line number, raw record) pairs; a record that cannot be parsed is a RecordRejected."""
    if path.suffix.lower() == ".csv":
        # Reading through readline keeps stream.tell() usable for the progress bar.
        reader = csv.DictReader(iter(stream.readline, ""))
        if reader.fieldnames is None:
            return
        for row in reader:
            yield reader.line_num, _RawCsv(row)
        return
    for number, line in enumerate(iter(stream.readline, ""), start=1):
        if line.strip():
            yield number, line


class _RawCsv(dict):
    """One CSV row: every value is a string, typed by the schema when encoded."""


def _encode(spec, raw: Any, label_field: str) -> tuple[np.ndarray, Any]:
    if isinstance(raw, _RawCsv):
        features, label = _csv_features(spec, raw), raw.get(label_field)
        label = _csv_label(spec, label)
    else:
        obj = _json_object(raw)
        features = obj.get("features")
        if features is None:
            raise RecordRejected("missing_features", "the record has no 'features' field")
        label = obj.get(label_field)
    row = spec.schema.encode_one(features)
    if spec.is_clusterer:
        return row, None
    if spec.is_classifier:
        return row, spec.labels.check(label)
    return row, check_target(label)


def _json_object(line: str) -> dict:
    try:
        obj = json.loads(line, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise RecordRejected("invalid_json", f"the line is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RecordRejected("not_object", f"the line is a JSON {type(obj).__name__}, not an object")
    return obj


def _reject_constant(literal: str) -> Any:
    # json.loads accepts the literals NaN and Infinity by default, so they are rejected here.
    raise RecordRejected("non_finite", f"the JSON literal {literal} is not a finite number")


def _csv_features(spec, row: dict) -> dict[str, Any]:
    from modelstore.schema import CATEGORICAL

    features: dict[str, Any] = {}
    for feature in spec.schema.features:
        value = row.get(feature.name)
        if value is None or value == "":
            continue  # missing: the schema's missing-value policy applies
        if feature.kind == CATEGORICAL:
            features[feature.name] = value
            continue
        try:
            features[feature.name] = float(value)
        except ValueError:
            raise RecordRejected(
                "wrong_type", f"feature {feature.name!r} is numeric, got {value[:40]!r}"
            ) from None
    return features


def _csv_label(spec, value: str | None) -> Any:
    if value is None or value == "" or spec.is_clusterer:
        return None
    if spec.is_classifier and spec.labels.kind == "str":
        return value
    try:
        number = float(value)
    except ValueError:
        raise RecordRejected("label_type", f"label {value[:40]!r} is not a number") from None
    if spec.is_classifier:
        if not math.isfinite(number) or number != int(number):
            raise RecordRejected("label_type", f"label {value[:40]!r} is not an integer")
        return int(number)
    return number


def _label_array(labels: list[Any], spec) -> np.ndarray:
    if spec.is_classifier and spec.labels.kind == "str":
        return np.array(labels, dtype=object)
    return np.array(labels, dtype=np.int64 if spec.is_classifier else np.float64)


def _rejected_text(rejected: Counter) -> str:
    if not rejected:
        return "no record rejected"
    return "rejected: " + ", ".join(f"{reason} {count}" for reason, count in sorted(rejected.items()))


def _summary(model: str, info, result: TrainResult) -> str:
    metrics = result.metrics.to_dict()
    learned = result.learner.samples_learned_
    text = f"published model {model} version {info.version}: {learned} records learned, "
    text += _rejected_text(result.rejected)
    if metrics.get("accuracy") is not None:
        text += (f"; test-then-train accuracy {metrics['accuracy']:.4f} "
                 f"(majority baseline {metrics['baseline_accuracy']:.4f})")
    elif metrics.get("mae") is not None:
        text += f"; test-then-train MAE {metrics['mae']:.6g}, RMSE {metrics['rmse']:.6g}"
    elif metrics.get("mean_sq_distance") is not None:
        text += f"; test-then-train mean squared distance {metrics['mean_sq_distance']:.6g}"
    return text


class Progress:
    """A plain progress bar on stderr, by bytes of the input file read.

    On a terminal it redraws one line at most every 0.2 s. Elsewhere it
    prints one line per tenth of the file, so that logs stay short.
    """

    WIDTH = 30

    def __init__(self, total: int, *, enabled: bool = True, stream: TextIO | None = None):
        self.total = max(total, 1)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self._last_draw = 0.0
        self._last_tenth = -1
        self._drawn = False

    def update(self, done: int, records: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        fraction = min(done / self.total, 1.0)
        line = self._line(fraction, records, metrics)
        if self.interactive:
            now = time.monotonic()
            if now - self._last_draw < 0.2 and fraction < 1.0:
                return
            self._last_draw = now
            self.stream.write("\r" + line)
            self._drawn = True
        else:
            tenth = int(fraction * 10)
            if tenth == self._last_tenth:
                return
            self._last_tenth = tenth
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """Print a message on its own line, keeping the bar intact."""
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, fraction: float, records: int, metrics: dict[str, Any]) -> str:
        filled = int(round(fraction * self.WIDTH))
        bar = "#" * filled + "." * (self.WIDTH - filled)
        line = f"training [{bar}] {fraction:4.0%} {records:,} records"
        for key in ("accuracy", "mae", "mean_sq_distance"):
            if metrics.get(key) is not None:
                line += f", {key} {metrics[key]:.4g}"
                break
        return line
