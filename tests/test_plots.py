"""History pictures: series from version metadata, and the PNG written from a real SQLite store."""

import struct

import numpy as np
import pytest

from modelstore import ONNX, STATE, open_store
from modelstore.errors import InvalidInputError
from streamfit.plots import model_history, plot_history, plot_model
from trainer.refit import Batch, Trainer

CLASSIFIER = {
    "estimator": "SGDClassifier",
    "params": {"loss": "log_loss"},
    "features": [{"name": "x"}, {"name": "y"}],
    "labels": [0, 1],
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def store(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'm.db'}") as opened:
        yield opened


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


def publish(store, model, metrics, samples, drift=None):
    metadata = {"spec": CLASSIFIER, "task": "classification", "samples_learned": samples, "metrics": metrics}
    if drift is not None:
        metadata["drift"] = drift
    store.publish(store.head(model), {ONNX: b"onnx", STATE: b"state"}, metadata)


def classification_metrics(n_scored, correct, baseline_correct):
    return {"n_scored": n_scored, "correct": correct, "accuracy": correct / n_scored if n_scored else None,
            "baseline_correct": baseline_correct,
            "baseline_accuracy": baseline_correct / n_scored if n_scored else None}


def test_history_from_metadata(store):
    store.create_model("m", CLASSIFIER)
    publish(store, "m", classification_metrics(0, 0, 0), 100)
    publish(store, "m", classification_metrics(100, 80, 70), 200, drift={"detections": {"increase": 0}})
    publish(store, "m", classification_metrics(200, 130, 140), 300, drift={"detections": {"increase": 1}})
    store.rollback("m", 2)

    history = model_history("m", store.versions("m"))

    assert history.versions == [1, 2, 3, 4]
    assert history.samples_learned == [100, 200, 300, 200]
    assert history.cumulative == [None, 0.8, 0.65, 0.8]
    assert history.baseline == [None, 0.7, 0.7, 0.7]
    # Accuracy over the rows scored since the previous version: 50 of 100.
    assert history.interval == [None, 0.8, 0.5, None]
    assert history.drift_versions == [3]
    assert history.rollback_versions == [4]


def test_history_skips_version_zero(store):
    store.create_model("m", CLASSIFIER)

    history = model_history("m", store.versions("m"))

    assert history.versions == []
    with pytest.raises(InvalidInputError, match="model 'm' has no published version with weights yet"):
        plot_history(history, store.url)


def test_plot_written_from_trained_model(store, tmp_path):
    store.create_model("m", CLASSIFIER)
    trainer = Trainer(store)
    rng = np.random.RandomState(0)
    for i in range(6):
        X = rng.normal(size=(200, 2)).astype(np.float32)
        y = (X[:, 0] > 0).astype(int)
        trainer.refit("m", Batch(X=X, y=y, positions=[("t/0", 200 * i + j) for j in range(200)]))

    out = plot_model(store, "m", tmp_path / "pictures" / "m.png")

    width, height = png_size(out)
    assert (width, height) == (990, 660)
    assert out.stat().st_size > 10_000
    history = model_history("m", store.versions("m"))
    assert history.samples_learned[-1] == 1200
    assert history.cumulative[-1] > 0.8


def test_regressor_history_uses_mae(store):
    spec = {"estimator": "SGDRegressor", "params": {}, "features": [{"name": "x"}]}
    store.create_model("r", spec)
    for n, abs_error in ((0, 0.0), (100, 50.0), (200, 80.0)):
        metrics = {"n_scored": n, "sum_abs_error": abs_error, "sum_sq_error": 0.0,
                   "mae": abs_error / n if n else None, "rmse": None}
        store.publish(store.head("r"), {ONNX: b"o", STATE: b"s"},
                      {"spec": spec, "task": "regression", "samples_learned": n + 100, "metrics": metrics})

    history = model_history("r", store.versions("r"))

    assert history.metric == "mae"
    assert history.cumulative == [None, 0.5, 0.4]
    assert history.interval == [None, 0.5, 0.3]
