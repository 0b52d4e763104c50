"""Training on after a rollback, with the real trainer, on both backends.

The worker trains from the latest version through ``Trainer.refit``. After a
rollback the latest version carries the rolled-back-to version's learner
state and the offsets of the version it replaced, so the trainer learns on
from the older model and still skips every record that was learned before.
"""

from __future__ import annotations

import uuid

import numpy as np
import onnxruntime as ort
import pytest

from modelstore import ONNX, STATE
from store_backends import couchbase_backend, sqlite_backend
from trainer.refit import Batch, Trainer
from trainer.spec import ModelSpec
from trainer.state import load_state

SPEC = {
    "estimator": "SGDClassifier",
    "params": {"loss": "log_loss", "random_state": 0},
    "features": [{"name": "x"}, {"name": "y"}],
    "labels": [0, 1],
}


@pytest.fixture(params=["sqlite", pytest.param("couchbase", marks=pytest.mark.couchbase)])
def store(request, tmp_path):
    if request.param == "sqlite":
        backend = sqlite_backend(tmp_path / "models.db")
    else:
        backend = couchbase_backend(request.getfixturevalue("gocaves_server"))
    store = backend.open(chunk_size_bytes=None)
    yield store
    store.close()


def make_batch(n, start, seed):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, 2)).astype(np.float32)
    y = (X[:, 0] + 0.3 * X[:, 1] > 0).astype(np.int64)
    return Batch(X=X, y=y, positions=[("t/0", start + i) for i in range(n)])


def predict(store, info, X):
    session = ort.InferenceSession(store.artifact(info, ONNX), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: X})


def test_refit_after_rollback(store):
    model = f"rb-{uuid.uuid4().hex[:8]}"
    store.create_model(model, SPEC)
    trainer = Trainer(store)
    for start, seed in ((0, 0), (50, 1), (100, 2)):
        trainer.refit(model, make_batch(50, start, seed))
    first = store.version(model, 1)

    back = store.rollback(model, 1)
    probe = make_batch(20, 0, 9).X
    for served, expected in zip(predict(store, back, probe), predict(store, first, probe)):
        np.testing.assert_array_equal(served, expected)

    # Records 100..199 arrive (again, as after a worker restart). Version 3
    # consumed 100..149, so only 150..199 are learned, on top of version 1.
    redelivered = make_batch(100, 100, 3)
    result = trainer.refit(model, redelivered)

    assert (result.learned, result.skipped) == (50, 50)
    info = result.version
    assert info.version == back.version + 1
    assert info.metadata["parent"] == back.version
    assert info.offsets == {"t/0": 200}
    assert info.samples_learned == first.samples_learned + 50

    spec = ModelSpec.from_dict(SPEC)
    expected = load_state(store.artifact(first, STATE), spec)
    expected.learn(redelivered.X[50:], redelivered.y[50:])
    learned = load_state(store.artifact(info, STATE), spec)
    np.testing.assert_allclose(learned.estimator_.coef_, expected.estimator_.coef_)
    np.testing.assert_allclose(learned.estimator_.intercept_, expected.estimator_.intercept_)
