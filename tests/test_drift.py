"""Drift detectors over test-then-train error streams: detection, quiet, resume from JSON."""

import json

import numpy as np
import pytest

from modelstore.errors import InvalidInputError
from trainer.drift import (
    ADWIN,
    DECREASE,
    INCREASE,
    DriftMonitor,
    PageHinkley,
    error_values,
    resume_monitor,
)

BATCH = 500


def feed(monitor, stream, batch=BATCH):
    events = []
    for start in range(0, len(stream), batch):
        events += monitor.update(stream[start:start + batch])
    return events


def bernoulli(rng, p, n):
    return (rng.random(n) < p).astype(np.float64)


@pytest.mark.parametrize("seed", range(5))
def test_adwin_fires_on_error_rate_rise(seed):
    rng = np.random.default_rng(seed)
    change_at = 8000
    stream = np.concatenate([bernoulli(rng, 0.25, change_at), bernoulli(rng, 0.45, 8000)])
    monitor = DriftMonitor.for_task("classification")

    events = feed(monitor, stream)

    assert events, "no drift detected after the error rate rose from 0.25 to 0.45"
    first = events[0]
    assert first.direction == INCREASE
    assert first.position > change_at, f"detected at {first.position}, before the change at {change_at}"
    assert first.position < change_at + 2000, f"detected {first.position - change_at} rows after the change"
    assert monitor.detections_[INCREASE] == len(events)


@pytest.mark.parametrize("seed", range(5))
def test_adwin_quiet_on_stationary_stream(seed):
    rng = np.random.default_rng(100 + seed)
    monitor = DriftMonitor.for_task("classification")

    events = feed(monitor, bernoulli(rng, 0.25, 30_000))

    assert events == []
    assert monitor.detections == 0
    assert monitor.n_seen_ == 30_000


def test_adwin_reports_error_rate_fall():
    rng = np.random.default_rng(7)
    stream = np.concatenate([bernoulli(rng, 0.5, 5000), bernoulli(rng, 0.2, 5000)])
    monitor = DriftMonitor(ADWIN())

    events = feed(monitor, stream)

    assert [e.direction for e in events][:1] == [DECREASE]
    assert monitor.detections_[INCREASE] == 0


def test_adwin_window_matches_last_values():
    # The window is always the newest `width_` values, so its sum and sum of
    # squared deviations must equal those computed directly.
    rng = np.random.default_rng(3)
    stream = np.concatenate([bernoulli(rng, 0.1, 3000), bernoulli(rng, 0.6, 3000)])
    detector = ADWIN()
    for value in stream:
        detector.update(value)

    window = stream[len(stream) - detector.width_:]
    assert detector.width_ < len(stream), "the change should have shrunk the window"
    assert detector.width_ == sum(len(row) * 2**i for i, row in enumerate(detector.rows_))
    assert detector.total_ == pytest.approx(window.sum())
    assert detector.variance_ == pytest.approx(((window - window.mean()) ** 2).sum(), rel=1e-9)
    assert all(len(row) <= detector.max_buckets for row in detector.rows_)


@pytest.mark.parametrize("seed", range(3))
def test_page_hinkley_fires_on_regression_error_rise(seed):
    rng = np.random.default_rng(seed)
    change_at = 6000
    errors = np.abs(np.concatenate([rng.normal(0, 2.0, change_at), rng.normal(0, 3.0, 6000)]))
    monitor = DriftMonitor.for_task("regression")

    events = feed(monitor, errors)

    assert events, "no drift detected after the error scale rose by half"
    assert events[0].direction == INCREASE
    assert change_at < events[0].position < change_at + 1000


@pytest.mark.parametrize("scale", [0.01, 1.0, 1000.0])
def test_page_hinkley_quiet_in_any_units(scale):
    # With scale="std" the default thresholds hold whatever the error's units.
    rng = np.random.default_rng(11)
    monitor = DriftMonitor.for_task("regression")

    events = feed(monitor, np.abs(rng.normal(0, scale, 30_000)))

    assert events == []


def test_page_hinkley_absolute_scale():
    detector = PageHinkley(delta=0.005, threshold=5.0, direction="both")
    found = [detector.update(x) for x in [0.0] * 100 + [1.0] * 50]

    assert INCREASE in found
    assert found.index(INCREASE) > 100


def test_state_survives_json_roundtrip_mid_stream():
    # A refit on another worker resumes the monitor from the version's JSON
    # metadata; the events must be those of one uninterrupted run.
    rng = np.random.default_rng(5)
    stream = np.concatenate([bernoulli(rng, 0.2, 7000), bernoulli(rng, 0.5, 7000)])
    whole = DriftMonitor.for_task("classification")
    whole_events = feed(whole, stream)

    resumed = DriftMonitor.for_task("classification")
    events = []
    for start in range(0, len(stream), BATCH):
        events += resumed.update(stream[start:start + BATCH])
        resumed = DriftMonitor.from_dict(json.loads(json.dumps(resumed.to_dict())))

    assert events == whole_events
    assert resumed.to_dict() == whole.to_dict()


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_state_is_strict_json(task):
    monitor = DriftMonitor.for_task(task)
    monitor.update(np.array([0.0, 1.0, float("nan"), float("inf"), 1.0]))

    text = json.dumps(monitor.to_dict(), allow_nan=False)

    assert json.loads(text)["n_seen"] == 3
    assert json.loads(text)["n_ignored"] == 2


def test_one_event_per_direction_per_batch():
    rng = np.random.default_rng(1)
    stream = np.concatenate([bernoulli(rng, 0.05, 4000), bernoulli(rng, 0.9, 4000)])
    monitor = DriftMonitor(ADWIN(clock=8))

    events = monitor.update(stream)

    assert [e.direction for e in events] == [INCREASE]
    assert monitor.detections_[INCREASE] == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(format=99), "format 99 is not supported"),
        (lambda d: d.update(detector="ddm"), "unknown drift detector 'ddm'"),
        (lambda d: d["params"].update(delta=2.0), r"invalid delta 2.0: expected a number in \(0.0, 1.0\)"),
        (lambda d: d["params"].update(window=10), "invalid adwin parameters"),
        (lambda d: d["state"].update(width=3), "does not match its buckets"),
        (lambda d: d["state"].update(total=None), "'total' must be a finite number"),
        (lambda d: d.update(n_seen=-1), "invalid n_seen -1"),
        (lambda d: d.update(detections={"up": 1}), "'detections' must map"),
        (lambda d: d.update(last_detection={"direction": "sideways", "position": 1}), "last_detection"),
    ],
)
def test_invalid_state_rejected(change, message):
    monitor = DriftMonitor.for_task("classification")
    monitor.update(np.zeros(100))
    data = json.loads(json.dumps(monitor.to_dict()))
    change(data)

    with pytest.raises(InvalidInputError, match=message):
        DriftMonitor.from_dict(data)


def test_resume_starts_fresh_on_invalid_state(caplog):
    monitor = resume_monitor({"format": 1, "detector": "adwin"}, "classification")

    assert monitor.n_seen_ == 0
    assert isinstance(monitor.detector, ADWIN)
    assert "drift detection starts again" in caplog.text


def test_resume_without_state_uses_task_default():
    assert isinstance(resume_monitor(None, "regression").detector, PageHinkley)
    assert isinstance(resume_monitor(None, "clustering").detector, PageHinkley)
    assert isinstance(resume_monitor(None, "classification").detector, ADWIN)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ADWIN(delta=0), "invalid delta 0"),
        (lambda: ADWIN(clock=0), "invalid clock 0"),
        (lambda: PageHinkley(direction="up"), "invalid Page-Hinkley direction 'up'"),
        (lambda: PageHinkley(scale="log"), "invalid Page-Hinkley scale 'log'"),
        (lambda: PageHinkley(threshold=float("inf")), "invalid threshold inf"),
        (lambda: DriftMonitor.for_task("ranking"), "invalid task 'ranking'"),
    ],
)
def test_invalid_settings_rejected(make, message):
    with pytest.raises(InvalidInputError, match=message):
        make()


def test_error_values_by_task():
    classes = error_values(np.array([0, 1, 1]), np.array([0, 0, 1]), "classification")
    labels = error_values(np.array(["a", "b"], dtype=object), np.array(["a", "a"], dtype=object), "classification")
    absolute = error_values(np.array([1.0, 2.0]), np.array([1.5, 0.0]), "regression")

    assert classes.tolist() == [0.0, 1.0, 0.0]
    assert labels.tolist() == [0.0, 1.0]
    assert absolute.tolist() == [0.5, 2.0]
    with pytest.raises(InvalidInputError, match="y_true has 2 rows but y_pred has 1"):
        error_values(np.array([1, 2]), np.array([1]), "classification")


def test_trainer_records_drift_in_metadata(tmp_path):
    # A concept flip after 20 batches: the label follows the other feature.
    from modelstore import open_store
    from trainer.refit import Batch, Trainer

    spec = {"estimator": "SGDClassifier", "params": {"loss": "log_loss"},
            "features": [{"name": "x"}, {"name": "y"}], "labels": [0, 1]}
    rng = np.random.default_rng(0)
    events = []
    with open_store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        store.create_model("m", spec)
        trainer = Trainer(store)
        for i in range(30):
            X = rng.normal(size=(200, 2)).astype(np.float32)
            y = (X[:, 0] > 0).astype(int) if i < 20 else (X[:, 1] > 0).astype(int)
            result = trainer.refit("m", Batch(X=X, y=y, positions=[("t/0", 200 * i + j) for j in range(200)]))
            events += [(result.version.version, e.direction) for e in result.drift]
        drift = store.version("m").metadata["drift"]

    # Early versions may report a fall of the error rate while the model
    # learns; the first rise comes with the first batch of the new concept.
    increases = [version for version, direction in events if direction == INCREASE]
    assert increases[:1] == [21], events
    assert drift["detections"][INCREASE] >= 1
    assert drift["n_seen"] == 29 * 200
    assert DriftMonitor.from_dict(drift).detections == len(events)
