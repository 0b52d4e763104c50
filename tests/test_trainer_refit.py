"""Trainer.refit against the embedded SQLite store, a real store on a file."""

import threading

import numpy as np
import onnxruntime as ort
import pytest

from modelstore import ONNX, STATE, open_store
from modelstore.errors import PublishRejected, VersionConflict
from trainer.refit import Batch, Trainer, merge_offsets
from trainer.spec import ModelSpec
from trainer.state import load_state

FEATURES = [{"name": "x"}, {"name": "y"}]
CLASSIFIER = {
    "estimator": "SGDClassifier",
    "params": {"loss": "log_loss"},
    "features": FEATURES,
    "labels": [0, 1],
}


@pytest.fixture
def store(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'm.db'}") as opened:
        yield opened


def make_batch(n, *, partition="t/0", start=0, seed=0, labels=(0, 1)):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, 2)).astype(np.float32)
    y = np.array([labels[int(v > 0)] for v in X[:, 0] + 0.3 * X[:, 1]])
    if isinstance(labels[0], str):
        y = y.astype(object)
    positions = [(partition, start + i) for i in range(n)]
    return Batch(X=X, y=y, positions=positions)


def test_refit_first_batch_publishes(store):
    store.create_model("m", CLASSIFIER)
    result = Trainer(store).refit("m", make_batch(50))

    assert result.learned == 50
    assert result.skipped == 0
    assert result.conflicts == 0
    assert result.version.version == 1
    meta = store.version("m").metadata
    assert meta["samples_learned"] == 50
    assert meta["offsets"] == {"t/0": 50}
    assert meta["task"] == "classification"
    assert meta["spec"] == ModelSpec.from_dict(CLASSIFIER).to_dict()
    assert meta["onnx"]["outputs"] == {"label": "label", "probabilities": "probabilities"}
    assert meta["onnx"]["classes"] == [0, 1]
    assert set(meta["libraries"]) >= {"scikit-learn", "skl2onnx", "onnx", "numpy"}
    # Nothing had learned before this batch, so nothing was scored.
    assert meta["metrics"]["n_scored"] == 0
    assert meta["metrics"]["label_counts"] == {
        "0": int((make_batch(50).y == 0).sum()),
        "1": int((make_batch(50).y == 1).sum()),
    }


def test_refit_scores_before_learning(store):
    store.create_model("m", CLASSIFIER)
    trainer = Trainer(store)
    trainer.refit("m", make_batch(200, seed=1))
    second = make_batch(100, start=200, seed=2)
    expected = trainer._learners.get(("m", store.head("m").latest_id)).learner.predict(second.X)
    trainer.refit("m", second)

    metrics = store.version("m").metadata["metrics"]
    assert metrics["n_scored"] == 100
    assert metrics["correct"] == int((expected == second.y).sum())
    assert metrics["accuracy"] == metrics["correct"] / 100
    majority = 0 if (make_batch(200, seed=1).y == 0).sum() >= 100 else 1
    assert metrics["baseline_correct"] == int((second.y == majority).sum())
    assert sum(metrics["label_counts"].values()) == 300
    assert metrics["accuracy"] > metrics["baseline_accuracy"]


def test_refit_single_class_batches(store):
    store.create_model("pets", dict(CLASSIFIER, labels=["cat", "dog"]))
    trainer = Trainer(store)
    X = np.random.RandomState(0).normal(size=(10, 2)).astype(np.float32)
    only_cats = Batch(X=X, y=np.array(["cat"] * 10, dtype=object),
                      positions=[("t/0", i) for i in range(10)])
    only_dogs = Batch(X=X, y=np.array(["dog"] * 10, dtype=object),
                      positions=[("t/0", 10 + i) for i in range(10)])
    trainer.refit("pets", only_cats)
    trainer.refit("pets", only_dogs)
    meta = store.version("pets").metadata
    assert meta["samples_learned"] == 20
    assert meta["onnx"]["classes"] == ["cat", "dog"]
    assert meta["metrics"]["label_counts"] == {"cat": 10, "dog": 10}
    assert meta["metrics"]["n_scored"] == 10


def test_refit_regressor_metrics(store):
    spec = {"estimator": "SGDRegressor", "params": {}, "features": FEATURES}
    store.create_model("r", spec)
    trainer = Trainer(store)
    for i in range(2):
        X = np.random.RandomState(i).normal(size=(50, 2)).astype(np.float32)
        y = (2.0 * X[:, 0] - X[:, 1]).astype(np.float64)
        trainer.refit("r", Batch(X=X, y=y, positions=[("t/0", 50 * i + j) for j in range(50)]))
    meta = store.version("r").metadata
    assert meta["task"] == "regression"
    assert meta["onnx"]["outputs"] == {"value": "value"}
    assert meta["metrics"]["n_scored"] == 50
    assert meta["metrics"]["mae"] == meta["metrics"]["sum_abs_error"] / 50
    assert meta["metrics"]["rmse"] > 0


def test_refit_skips_learned_rows(store):
    store.create_model("m", CLASSIFIER)
    trainer = Trainer(store)
    trainer.refit("m", make_batch(10, start=0))

    overlap = make_batch(10, start=5, seed=3)
    result = trainer.refit("m", overlap)
    assert result.skipped == 5
    assert result.learned == 5
    info = store.version("m")
    assert info.offsets == {"t/0": 15}
    assert info.samples_learned == 15


def test_refit_all_rows_learned_publishes_nothing(store):
    store.create_model("m", CLASSIFIER)
    trainer = Trainer(store)
    trainer.refit("m", make_batch(10))
    head = store.head("m")

    result = Trainer(store).refit("m", make_batch(10))
    assert result.version is None
    assert result.learned == 0
    assert result.skipped == 10
    assert store.head("m").latest_id == head.latest_id


def test_refit_offsets_merge_per_partition(store):
    store.create_model("m", CLASSIFIER)
    trainer = Trainer(store)
    trainer.refit("m", make_batch(10, partition="t/0"))
    trainer.refit("m", make_batch(4, partition="t/1", start=100))
    assert trainer.stored_offsets("m") == {"t/0": 10, "t/1": 104}


def test_merge_offsets_takes_max():
    merged = merge_offsets({"t/0": 10, "t/1": 5}, [("t/1", 3), ("t/1", 7), ("t/2", 0)])
    assert merged == {"t/0": 10, "t/1": 8, "t/2": 1}


def test_refit_string_labels_end_to_end(store):
    spec = dict(CLASSIFIER, labels=["spam", "ham"])
    store.create_model("mail", spec)
    trainer = Trainer(store)
    trainer.refit("mail", make_batch(100, labels=("ham", "spam")))

    info = store.version("mail")
    assert info.metadata["onnx"]["classes"] == ["ham", "spam"]
    assert info.metadata["metrics"]["label_counts"].keys() == {"spam", "ham"}
    session = ort.InferenceSession(store.artifact(info, ONNX), providers=["CPUExecutionProvider"])
    X = np.array([[3.0, 0.0], [-3.0, 0.0]], dtype=np.float32)
    label, probabilities = session.run(["label", "probabilities"], {"features": X})
    assert label.tolist() == ["spam", "ham"]
    assert probabilities[0, 1] > 0.5
    assert probabilities[1, 0] > 0.5


def test_refit_continues_from_stored_state(store):
    store.create_model("m", CLASSIFIER)
    batches = [make_batch(40, start=40 * i, seed=i) for i in range(3)]
    cached = Trainer(store)
    for batch in batches:
        cached.refit("m", batch)
    expected = load_state(store.artifact(store.version("m"), STATE), cached.spec("m"))

    store.create_model("m2", CLASSIFIER)
    Trainer(store).refit("m2", batches[0])
    # Fresh trainers have empty caches, so each refit loads the stored state.
    for batch in batches[1:]:
        Trainer(store).refit("m2", batch)
    resumed = load_state(store.artifact(store.version("m2"), STATE), cached.spec("m2"))

    assert resumed.samples_learned_ == 120
    assert np.array_equal(resumed.estimator_.coef_, expected.estimator_.coef_)
    assert np.array_equal(resumed.estimator_.intercept_, expected.estimator_.intercept_)
    assert np.array_equal(resumed.scaler_.mean_, expected.scaler_.mean_)
    assert np.array_equal(resumed.scaler_.var_, expected.scaler_.var_)


def test_refit_cache_bounded(store):
    for name in ("a", "b", "c"):
        store.create_model(name, CLASSIFIER)
    trainer = Trainer(store, cache_size=2)
    for name in ("a", "b", "c"):
        trainer.refit(name, make_batch(20))
    assert len(trainer._learners) == 2
    trainer.refit("a", make_batch(20, start=20, seed=5))
    assert store.version("a").samples_learned == 40


class PausingStore:
    """A real store whose publish waits until every writer has read the same head."""

    def __init__(self, store, barrier):
        self._store = store
        self._barrier = barrier

    def __getattr__(self, name):
        return getattr(self._store, name)

    def publish(self, expected, artifacts, metadata):
        if expected.latest == 0:
            self._barrier.wait(timeout=30)
        return self._store.publish(expected, artifacts, metadata)


def test_refit_conflict_rebases(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    with open_store(url) as first_store, open_store(url) as second_store:
        first_store.create_model("m", CLASSIFIER)
        barrier = threading.Barrier(2)
        trainers = [
            Trainer(PausingStore(first_store, barrier)),
            Trainer(PausingStore(second_store, barrier)),
        ]
        batches = [make_batch(30, partition="t/0"), make_batch(20, partition="t/1", seed=4)]
        results = [None, None]

        def run(i):
            results[i] = trainers[i].refit("m", batches[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert sorted(r.conflicts for r in results) == [0, 1]
        assert sorted(r.version.version for r in results) == [1, 2]
        final = first_store.version("m")
        assert final.version == 2
        assert final.samples_learned == 50
        assert final.offsets == {"t/0": 30, "t/1": 20}
        loser = next(r for r in results if r.conflicts == 1)
        assert loser.version.metadata["parent"] == 1


class InterferingStore:
    """A real store where another trainer publishes just before each of ours."""

    def __init__(self, store, rival):
        self._store = store
        self._rival = rival
        self.rival_offset = 1000

    def __getattr__(self, name):
        return getattr(self._store, name)

    def publish(self, expected, artifacts, metadata):
        self._rival.refit("m", make_batch(5, partition="r/0", start=self.rival_offset))
        self.rival_offset += 5
        return self._store.publish(expected, artifacts, metadata)


def test_refit_gives_up_after_max_conflicts(store):
    store.create_model("m", CLASSIFIER)
    trainer = Trainer(InterferingStore(store, Trainer(store)), max_conflict_attempts=2)
    with pytest.raises(VersionConflict, match=r"lost 2 times to other writers; give the batch back"):
        trainer.refit("m", make_batch(10))
    assert store.version("m").offsets == {"r/0": 1010}


def test_refit_runaway_weights_rejected(store):
    spec = {
        "estimator": "SGDRegressor",
        "params": {"eta0": 0.01},
        "scaler": None,
        "features": FEATURES,
    }
    store.create_model("r", spec)
    trainer = Trainer(store)
    rng = np.random.RandomState(0)
    X = (1e9 * (1 + rng.rand(50, 2))).astype(np.float32)
    positions = [("t/0", i) for i in range(50)]
    trainer.refit("r", Batch(X=X, y=X.sum(axis=1).astype(np.float64), positions=positions))
    head = store.head("r")
    cached = trainer._learners.get(("r", head.latest_id)).learner
    coef_before = cached.estimator_.coef_.copy()

    # Values near the float32 limit drive the weights past what float32 can hold.
    spread = np.linspace(1, 2, 40, dtype=np.float32).reshape(20, 2)
    huge = np.full((20, 2), 1e30, dtype=np.float32) * spread
    batch = Batch(X=huge, y=np.full(20, 1e9), positions=[("t/0", 50 + i) for i in range(20)])
    with pytest.raises(PublishRejected, match="beyond float32 range") as caught:
        trainer.refit("r", batch)

    assert caught.value.reason == "non_finite_parameters"
    assert store.head("r").latest_id == head.latest_id
    assert store.version("r").samples_learned == 50
    assert np.array_equal(cached.estimator_.coef_, coef_before)
    assert cached.samples_learned_ == 50


def test_refit_values_near_1e9_publish_finite_weights(store):
    # scikit-learn 1.9 clips each SGD gradient to 1e12, so values near 1e9
    # without a scaler give huge weights that stay within float32 range.
    spec = {
        "estimator": "SGDRegressor",
        "params": {"eta0": 0.01},
        "scaler": None,
        "features": FEATURES,
    }
    store.create_model("r", spec)
    trainer = Trainer(store)
    rng = np.random.RandomState(0)
    for i in range(3):
        X = (1e9 * (1 + rng.rand(50, 2))).astype(np.float32)
        positions = [("t/0", 50 * i + j) for j in range(50)]
        trainer.refit("r", Batch(X=X, y=X.sum(axis=1).astype(np.float64), positions=positions))
    learner = load_state(store.artifact(store.version("r"), STATE), trainer.spec("r"))
    coef = learner.estimator_.coef_
    assert np.isfinite(coef.astype(np.float32)).all()
    assert store.version("r").version == 3


def test_refit_undeclared_label_raises_before_publish(store):
    store.create_model("m", CLASSIFIER)
    batch = make_batch(4)
    batch.y = np.array([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"outside the declared labels \[0, 1\]"):
        Trainer(store).refit("m", batch)
    assert store.head("m").latest == 0


def test_batch_lengths_must_match():
    with pytest.raises(ValueError, match="batch has 2 rows in X, 1 labels and 2 positions"):
        Batch(X=np.zeros((2, 2)), y=np.zeros(1), positions=[("t/0", 0), ("t/0", 1)])


def test_refit_rewrites_cached_graph(store):
    store.create_model("m", CLASSIFIER)
    trainer = Trainer(store)
    first = trainer.refit("m", make_batch(50, seed=1))
    second = trainer.refit("m", make_batch(50, start=50, seed=2))
    assert first.version.metadata["onnx"]["export_method"] == "convert"
    assert second.version.metadata["onnx"]["export_method"] == "rewrite"

    # A fresh trainer has no cached graph and converts again, to the same bytes.
    store.create_model("m2", CLASSIFIER)
    fresh = Trainer(store)
    fresh.refit("m2", make_batch(50, seed=1))
    Trainer(store).refit("m2", make_batch(50, start=50, seed=2))
    rewritten = store.artifact(store.version("m"), ONNX)
    converted_info = store.version("m2")
    assert converted_info.metadata["onnx"]["export_method"] == "convert"
    assert store.artifact(converted_info, ONNX) == rewritten


def test_refit_records_pinned_opsets(store):
    store.create_model("m", dict(CLASSIFIER, onnx={"target_opset": 15, "ml_opset": 1}))
    meta = Trainer(store).refit("m", make_batch(40)).version.metadata["onnx"]
    assert meta["target_opset"] == {"ai.onnx": 15, "ai.onnx.ml": 1}
    assert meta["opset"]["ai.onnx"] <= 15
    assert meta["opset"]["ai.onnx.ml"] <= 1
    session = ort.InferenceSession(store.artifact(store.version("m"), ONNX),
                                   providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["label", "probabilities"]


def gated_batch(n, start, *, flip):
    batch = make_batch(n, start=start, seed=start)
    if flip:
        # The first 80 % of the batch teaches the opposite rule; the held-out tail does not.
        cut = int(n * 0.8)
        batch.y[:cut] = 1 - batch.y[:cut]
    return batch


def test_refit_metric_gate_rejects_regression(store):
    spec = dict(CLASSIFIER, params={"loss": "log_loss", "learning_rate": "constant", "eta0": 0.1},
                gate={"max_accuracy_drop": 0.1, "holdout_fraction": 0.2, "min_holdout_rows": 20})
    store.create_model("m", spec)
    trainer = Trainer(store)
    for i in range(3):
        trainer.refit("m", gated_batch(200, 200 * i, flip=False))
    passed = store.version("m").metadata["gate"]
    assert passed["metric"] == "accuracy"
    assert passed["holdout_rows"] == 40
    assert passed["candidate"] >= passed["current"] - 0.1
    head = store.head("m")

    with pytest.raises(PublishRejected, match=r"candidate has accuracy .* on 40 held-out rows of "
                       r"the batch, the current version .*; max_accuracy_drop is 0\.1") as caught:
        trainer.refit("m", gated_batch(200, 600, flip=True))
    assert caught.value.reason == "metric_regression"
    assert store.head("m").latest_id == head.latest_id


def test_refit_metric_gate_skips_small_batches(store):
    spec = dict(CLASSIFIER, gate={"max_accuracy_drop": 0.0, "min_holdout_rows": 50})
    store.create_model("m", spec)
    trainer = Trainer(store)
    trainer.refit("m", make_batch(100))
    result = trainer.refit("m", make_batch(100, start=100, seed=3))
    assert "gate" not in result.version.metadata


def test_refit_clustering(store):
    spec = {"estimator": "MiniBatchKMeans", "params": {"n_clusters": 2}, "features": FEATURES}
    store.create_model("k", spec)
    trainer = Trainer(store)
    rng = np.random.RandomState(0)
    for i in range(2):
        X = np.vstack([rng.normal(size=(20, 2)) + 5, rng.normal(size=(20, 2)) - 5]).astype(np.float32)
        batch = Batch(X=X, y=np.zeros(40), positions=[("t/0", 40 * i + j) for j in range(40)])
        trainer.refit("k", batch)
    meta = store.version("k").metadata
    assert meta["task"] == "clustering"
    assert meta["onnx"]["outputs"] == {"cluster": "cluster", "distances": "distances"}
    assert meta["metrics"]["n_scored"] == 40
    assert 0 < meta["metrics"]["mean_sq_distance"] < 10
    session = ort.InferenceSession(store.artifact(store.version("k"), ONNX),
                                   providers=["CPUExecutionProvider"])
    cluster, distances = session.run(None, {"features": np.array([[5, 5], [-5, -5]], np.float32)})
    assert cluster[0] != cluster[1]
    assert distances.shape == (2, 2)


def test_refit_kmeans_first_batch_too_small(store):
    spec = {"estimator": "MiniBatchKMeans", "params": {"n_clusters": 8}, "features": FEATURES}
    store.create_model("k", spec)
    batch = Batch(X=np.zeros((5, 2), np.float32), y=np.zeros(5), positions=[("t/0", i) for i in range(5)])
    with pytest.raises(PublishRejected, match=r"first batch, which has only 5 rows; send batches "
                       r"of at least 8 records") as caught:
        Trainer(store).refit("k", batch)
    assert caught.value.reason == "too_few_rows"
    assert store.head("k").latest == 0


def test_refit_negative_counts_rejected(store):
    spec = {"estimator": "MultinomialNB", "params": {}, "scaler": None, "features": FEATURES,
            "labels": [0, 1]}
    store.create_model("nb", spec)
    batch = make_batch(20)
    with pytest.raises(PublishRejected, match=r"MultinomialNB takes non-negative counts, but .* "
                       r"rows of this batch .* have negative values after scaling; use scaler "
                       r"MinMaxScaler") as caught:
        Trainer(store).refit("nb", batch)
    assert caught.value.reason == "negative_input"
    assert store.head("nb").latest == 0
    batch.X = np.abs(batch.X)
    assert Trainer(store).refit("nb", batch).version.version == 1
