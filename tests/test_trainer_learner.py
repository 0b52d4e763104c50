"""Learner and saved state: one property suite run over every supported configuration."""

import io
import json
import warnings
import zipfile

import numpy as np
import pytest
import skops.io as sio
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression

from modelstore.errors import ArtifactCorrupt, RecordRejected
from modelstore.schema import LabelSet
from trainer.learner import Learner
from trainer.spec import ModelSpec
from trainer.state import dump_state, load_state

FEATURES = [{"name": "a"}, {"name": "b"}, {"name": "c"}]

# Every estimator and loss family the trainer supports, with and without averaging.
CONFIGS = {
    "log_loss": ("SGDClassifier", {"loss": "log_loss"}),
    "log_loss_averaged": ("SGDClassifier", {"loss": "log_loss", "average": True}),
    "modified_huber": ("SGDClassifier", {"loss": "modified_huber"}),
    "hinge": ("SGDClassifier", {"loss": "hinge"}),
    "perceptron": ("SGDClassifier", {"loss": "perceptron", "learning_rate": "constant", "eta0": 1.0,
                                     "penalty": None}),
    "squared_hinge": ("SGDClassifier", {"loss": "squared_hinge"}),
    "passive_aggressive": ("SGDClassifier", {"loss": "hinge", "learning_rate": "pa1", "eta0": 1.0,
                                             "penalty": None}),
    "squared_error": ("SGDRegressor", {}),
    "huber_averaged": ("SGDRegressor", {"loss": "huber", "epsilon": 1.0, "eta0": 0.1, "average": 5}),
}
CLASSIFIERS = [name for name, (estimator, _) in CONFIGS.items() if estimator == "SGDClassifier"]


def make_spec(config, labels=("no", "yes"), scaler="StandardScaler"):
    estimator, params = CONFIGS[config]
    raw = {"estimator": estimator, "params": dict(params), "scaler": scaler, "features": FEATURES}
    if estimator == "SGDClassifier":
        raw["labels"] = list(labels)
    return ModelSpec.from_dict(raw)


def make_batch(spec, n=60, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, 3)).astype(np.float32)
    signal = X[:, 0] + 0.5 * X[:, 1]
    if spec.is_classifier:
        labels = spec.labels.labels
        return X, np.array([labels[int(s > 0)] for s in signal], dtype=object)
    return X, (3.0 * signal + 1.0).astype(np.float64)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_learner_learns_batches(config):
    spec = make_spec(config)
    learner = Learner(spec)
    assert not learner.is_fitted
    for seed in range(10):
        learner.learn(*make_batch(spec, seed=seed))
    assert learner.is_fitted
    assert learner.samples_learned_ == 600

    X, y = make_batch(spec, seed=10)
    predicted = learner.predict(X)
    if spec.is_classifier:
        assert set(predicted.tolist()) <= {"no", "yes"}
        assert (predicted == y).mean() > 0.7
    else:
        # Better than always predicting the mean, the trivial regressor.
        assert np.abs(predicted - y).mean() < 0.5 * np.abs(y - y.mean()).mean()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_learner_keeps_input_unchanged(config):
    spec = make_spec(config)
    X, y = make_batch(spec)
    X_before, y_before = X.copy(), y.copy()
    learner = Learner(spec).learn(X, y)
    learner.predict(X)
    assert np.array_equal(X, X_before)
    assert np.array_equal(y, y_before)


@pytest.mark.parametrize("config", CLASSIFIERS)
def test_learner_single_class_batch(config):
    spec = make_spec(config, labels=("cat", "dog"))
    X = np.random.RandomState(1).normal(size=(20, 3)).astype(np.float32)
    learner = Learner(spec).learn(X, np.array(["cat"] * 20, dtype=object))
    assert learner.estimator_.classes_.tolist() == ["cat", "dog"]
    learner.learn(X, np.array(["dog"] * 20, dtype=object))
    assert learner.samples_learned_ == 40
    assert set(learner.predict(X).tolist()) <= {"cat", "dog"}


@pytest.mark.parametrize("config", CLASSIFIERS)
def test_learner_probabilities_only_for_probability_losses(config):
    spec = make_spec(config)
    learner = Learner(spec).learn(*make_batch(spec))
    X, _ = make_batch(spec, seed=3)
    assert learner.decision_function(X).shape == (60,)
    if CONFIGS[config][1]["loss"] in ("log_loss", "modified_huber"):
        proba = learner.predict_proba(X)
        assert proba.shape == (60, 2)
        assert np.allclose(proba.sum(axis=1), 1.0)
    else:
        with pytest.raises(AttributeError, match=r"predict_proba is not available for SGDClassifier\(loss="):
            learner.predict_proba(X)


def test_learner_string_labels_keep_declared_set():
    spec = make_spec("log_loss", labels=("spam", "ham"))
    learner = Learner(spec).learn(*make_batch(spec))
    # scikit-learn sorts classes_; the declared order is kept in the spec.
    assert learner.estimator_.classes_.tolist() == ["ham", "spam"]
    assert spec.labels.labels == ("spam", "ham")


def test_learner_rejects_label_of_other_type():
    spec = make_spec("log_loss", labels=(0, 1))
    X = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"label '1' is a str; this model's labels are ints"):
        Learner(spec).learn(X, ["1", 1])


def test_labelset_rejects_text_for_int_labels():
    labels = LabelSet([0, 1])
    assert labels.check(1) == 1
    with pytest.raises(RecordRejected, match="label '1' is a str") as caught:
        labels.check("1")
    assert caught.value.reason == "label_type"


def test_learner_rejects_undeclared_label():
    spec = make_spec("hinge", labels=("cat", "dog"))
    with pytest.raises(ValueError, match=r"labels \['bird'\] outside the declared labels"):
        Learner(spec).learn(np.zeros((2, 3)), np.array(["cat", "bird"], dtype=object))


def test_learner_rejects_wrong_width():
    spec = make_spec("log_loss")
    with pytest.raises(ValueError, match=r"X has shape \(4, 2\); this model's schema expects \(n, 3\)"):
        Learner(spec).learn(np.zeros((4, 2)), ["no"] * 4)


def test_learner_rejects_non_finite_rows():
    spec = make_spec("squared_error")
    X = np.zeros((3, 3))
    X[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"X contains NaN or infinity in rows \[1\]"):
        Learner(spec).learn(X, [1.0, 2.0, 3.0])


def test_learner_predict_before_learning():
    with pytest.raises(NotFittedError, match="has not learned any batch yet"):
        Learner(make_spec("log_loss")).predict(np.zeros((1, 3)))


@pytest.mark.parametrize("scaler", ["StandardScaler", "MinMaxScaler", "MaxAbsScaler"])
def test_learner_constant_feature_keeps_scaler_finite(scaler):
    spec = make_spec("log_loss", scaler=scaler)
    learner = Learner(spec)
    rng = np.random.RandomState(0)
    for batch in range(5):
        X = rng.normal(size=(30, 3))
        X[:, 1] = 0.0  # never varies in these batches
        X[:, 2] = 1.0 + rng.uniform(size=30) * 1e-12  # differs only by rounding
        learner.learn(X, np.where(X[:, 0] > 0, "yes", "no").astype(object))
        for name in ("mean_", "var_", "scale_", "min_", "max_abs_"):
            if hasattr(learner.scaler_, name):
                assert np.isfinite(getattr(learner.scaler_, name)).all(), (batch, name)
    X[:, 1] = 1.0  # the flag switches on
    learner.learn(X, np.where(X[:, 0] > 0, "yes", "no").astype(object))
    assert np.isfinite(learner.scaler_.scale_).all()
    assert np.isfinite(learner.estimator_.coef_).all()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_state_resume_is_exact(config):
    spec = make_spec(config)
    batches = [make_batch(spec, seed=seed) for seed in range(3)]

    straight = Learner(spec)
    for X, y in batches:
        straight.learn(X, y)

    resumed = Learner(spec).learn(*batches[0])
    resumed = load_state(dump_state(resumed), spec)
    for X, y in batches[1:]:
        resumed.learn(X, y)

    assert resumed.samples_learned_ == straight.samples_learned_
    assert np.array_equal(resumed.estimator_.coef_, straight.estimator_.coef_)
    assert np.array_equal(resumed.estimator_.intercept_, straight.estimator_.intercept_)
    for name in ("mean_", "var_", "scale_", "n_samples_seen_"):
        assert np.array_equal(getattr(resumed.scaler_, name), getattr(straight.scaler_, name)), name


def test_state_without_scaler():
    spec = make_spec("squared_error", scaler=None)
    learner = Learner(spec).learn(*make_batch(spec))
    restored = load_state(dump_state(learner), spec)
    assert restored.scaler_ is None
    assert np.array_equal(restored.estimator_.coef_, learner.estimator_.coef_)


def test_state_rejects_untrusted_type():
    spec = make_spec("log_loss")
    data = sio.dumps({"format": 1, "scaler": None, "estimator": Learner, "samples_learned": 0})
    with pytest.raises(ArtifactCorrupt, match=r"untrusted types \['trainer.learner.Learner'\]"):
        load_state(data, spec)


def test_state_rejects_type_that_skops_trusts_by_default():
    # skops trusts every scikit-learn estimator by default; the trainer's list is narrower.
    data = sio.dumps({"format": 1, "scaler": None, "estimator": LogisticRegression(),
                      "samples_learned": 0})
    with pytest.raises(ArtifactCorrupt, match=r"_logistic.LogisticRegression"):
        load_state(data, make_spec("log_loss"))


def test_state_rejects_other_estimator():
    spec = make_spec("log_loss")
    regressor_spec = make_spec("squared_error")
    data = dump_state(Learner(regressor_spec).learn(*make_batch(regressor_spec)))
    with pytest.raises(ArtifactCorrupt, match="contains SGDRegressor, the spec declares SGDClassifier"):
        load_state(data, spec)


def test_state_rejects_other_classes():
    spec = make_spec("log_loss", labels=("no", "yes"))
    other = make_spec("log_loss", labels=("a", "b"))
    X, _ = make_batch(other)
    data = dump_state(Learner(other).learn(X, np.array(["a", "b"] * 30, dtype=object)))
    with pytest.raises(ArtifactCorrupt, match=r"classes \['a', 'b'\], the spec declares labels"):
        load_state(data, spec)


def test_state_rejects_garbage():
    with pytest.raises(ArtifactCorrupt, match="not a skops file"):
        load_state(b"\x80\x04not a zip", make_spec("log_loss"))


def test_state_declares_only_trusted_types():
    spec = make_spec("log_loss_averaged")
    data = dump_state(Learner(spec).learn(*make_batch(spec)))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert "schema.json" in archive.namelist()
        assert "pickle" not in json.dumps(json.loads(archive.read("schema.json"))).lower()


@pytest.mark.parametrize("estimator, sgd_params", [
    ("PassiveAggressiveClassifier", {"C": 0.5, "loss": "squared_hinge"}),
    ("PassiveAggressiveRegressor", {"C": 0.5, "loss": "epsilon_insensitive", "epsilon": 0.2}),
])
def test_passive_aggressive_matches_deprecated_class(estimator, sgd_params):
    # scikit-learn 1.8 deprecates these classes and 1.10 removes them.
    linear_model = pytest.importorskip("sklearn.linear_model")
    deprecated_class = getattr(linear_model, estimator, None)
    if deprecated_class is None:
        pytest.skip(f"scikit-learn no longer has {estimator}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        deprecated = deprecated_class(random_state=0, **sgd_params)
    raw = {"estimator": estimator, "params": sgd_params, "scaler": None, "features": FEATURES}
    if estimator.endswith("Classifier"):
        raw["labels"] = [0, 1]
    learner = Learner(ModelSpec.from_dict(raw))
    rng = np.random.RandomState(0)
    for _ in range(4):
        X = rng.normal(size=(30, 3))
        if estimator.endswith("Classifier"):
            y = (X[:, 0] > 0).astype(int)
            deprecated.partial_fit(X, y, classes=[0, 1])
        else:
            y = 2.0 * X[:, 0]
            deprecated.partial_fit(X, y)
        learner.learn(X, y)
    assert np.array_equal(learner.estimator_.coef_, deprecated.coef_)
    assert np.array_equal(learner.estimator_.intercept_, deprecated.intercept_)


def test_state_keeps_mlp_loss_history_bounded():
    raw = {"estimator": "MLPRegressor", "params": {"hidden_layer_sizes": [3]}, "features": FEATURES}
    spec = ModelSpec.from_dict(raw)
    learner = Learner(spec)
    for seed in range(5):
        X = np.random.RandomState(seed).normal(size=(20, 3))
        learner.learn(X, X[:, 0])
    assert len(learner.estimator_.loss_curve_) == 5
    restored = load_state(dump_state(learner), spec)
    assert restored.estimator_.loss_curve_ == learner.estimator_.loss_curve_[-1:]
    assert len(learner.estimator_.loss_curve_) == 5  # the live learner keeps its history


def test_state_rejects_scaler_of_other_width():
    spec = make_spec("log_loss")
    numeric_only = ModelSpec.from_dict(dict(spec.to_dict(), scaler_columns="all",
                                            features=FEATURES[:2]))
    data = dump_state(Learner(numeric_only).learn(np.zeros((4, 2)), ["no", "yes"] * 2))
    with pytest.raises(ArtifactCorrupt, match=r"scaler of 2 columns, the spec scales 3"):
        load_state(data, spec)
