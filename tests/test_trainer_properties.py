"""One property suite run over every supported estimator configuration.

Each property is one test function parametrized over ``CONFIGS``. The
properties: ONNX parity on probe rows, exact resume, finite parameters,
unknown labels and a changed feature count rejected, inputs never mutated,
seeded runs repeatable, fast export equal to conversion, and the
named-input graph equal to the served one.
"""

import copy
import re

import numpy as np
import onnxruntime as ort
import pytest

from modelstore.errors import PublishRejected
from trainer.estimators import EXPORTED_ATTRIBUTES
from trainer.export import INPUT_NAME, convert, export_onnx
from trainer.fastexport import ExportTemplate
from trainer.gate import _learned_arrays, check_finite_parameters, check_publishable, probe_rows
from trainer.learner import Learner
from trainer.named_inputs import feeds, named_input_graph
from trainer.spec import ModelSpec
from trainer.state import dump_state, load_state

FEATURES = [
    {"name": "small"},
    {"name": "large"},
    {"name": "colour", "type": "categorical", "vocabulary": ["red", "green", "blue"],
     "unknown": "ignore"},
]
WIDTH = 5
SGD_CLASSIFIER_LOSSES = ["hinge", "log_loss", "modified_huber", "squared_hinge", "perceptron",
                         "squared_error", "huber", "epsilon_insensitive",
                         "squared_epsilon_insensitive"]

# name: (estimator, params, scaler, scaler_columns)
CONFIGS = {
    **{f"sgd_{loss}": ("SGDClassifier", {"loss": loss}, "StandardScaler", "all")
       for loss in SGD_CLASSIFIER_LOSSES},
    "sgd_log_loss_averaged": ("SGDClassifier", {"loss": "log_loss", "average": True},
                              "StandardScaler", "numeric"),
    "sgd_regressor": ("SGDRegressor", {}, "StandardScaler", "all"),
    "sgd_regressor_huber_averaged": ("SGDRegressor", {"loss": "huber", "average": 5},
                                     "MinMaxScaler", "numeric"),
    "sgd_regressor_epsilon": ("SGDRegressor", {"loss": "epsilon_insensitive"}, "MaxAbsScaler", "all"),
    "sgd_regressor_squared_epsilon": ("SGDRegressor", {"loss": "squared_epsilon_insensitive"},
                                      "StandardScaler", "all"),
    "perceptron": ("Perceptron", {}, "MaxAbsScaler", "all"),
    "passive_aggressive": ("PassiveAggressiveClassifier", {"C": 0.5}, None, "all"),
    "passive_aggressive_regressor": ("PassiveAggressiveRegressor",
                                     {"loss": "squared_epsilon_insensitive"}, "StandardScaler",
                                     "numeric"),
    "multinomial_nb": ("MultinomialNB", {}, "MinMaxScaler", "all"),
    "complement_nb": ("ComplementNB", {}, "MinMaxScaler", "numeric"),
    "bernoulli_nb": ("BernoulliNB", {}, "StandardScaler", "numeric"),
    "gaussian_nb": ("GaussianNB", {}, "StandardScaler", "all"),
    "mlp_classifier": ("MLPClassifier", {"hidden_layer_sizes": [6]}, "StandardScaler", "all"),
    "mlp_classifier_sgd": ("MLPClassifier", {"hidden_layer_sizes": [6, 4], "solver": "sgd",
                                             "activation": "tanh"}, "MinMaxScaler", "numeric"),
    "mlp_regressor": ("MLPRegressor", {"hidden_layer_sizes": [6]}, "StandardScaler", "all"),
    "minibatch_kmeans": ("MiniBatchKMeans", {"n_clusters": 3}, "StandardScaler", "all"),
}
CLASSIFIER_ESTIMATORS = {"SGDClassifier", "Perceptron", "PassiveAggressiveClassifier",
                         "MultinomialNB", "ComplementNB", "BernoulliNB", "GaussianNB",
                         "MLPClassifier"}
CLASSIFIERS = [name for name, config in CONFIGS.items() if config[0] in CLASSIFIER_ESTIMATORS]
# Graphs with arrays derived from the weights (sums of log variances,
# squared center norms) are converted every time instead of rewritten.
NOT_REWRITABLE = {"gaussian_nb", "minibatch_kmeans"}


def make_spec(config, labels=("cat", "dog", "bird")):
    estimator, params, scaler, columns = CONFIGS[config]
    raw = {"estimator": estimator, "params": copy.deepcopy(params), "scaler": scaler,
           "scaler_columns": columns, "features": FEATURES}
    if estimator in CLASSIFIER_ESTIMATORS:
        raw["labels"] = list(labels)
    return ModelSpec.from_dict(raw)


def make_records(n, seed):
    rng = np.random.RandomState(seed)
    colours = np.array(["red", "green", "blue", "purple"])[rng.randint(0, 4, n)]
    return [{"small": float(a), "large": float(b), "colour": str(c)}
            for a, b, c in zip(rng.normal(size=n), 500 + 100 * rng.normal(size=n), colours)]


def make_batch(spec, n=60, seed=0):
    records = make_records(n, seed)
    X = spec.schema.encode(records)
    if spec.info.non_negative_input:
        X = np.abs(X)
    signal = X[:, 0] + (X[:, 1] - 500) / 100 + X[:, 2]
    if spec.is_classifier:
        labels = np.array(spec.labels.labels, dtype=object)
        y = labels[np.digitize(signal, [-0.5, 0.5])[:] % len(labels)]
        return X, y.astype(np.int64) if spec.labels.kind == "int" else y
    if spec.is_clusterer:
        return X, None
    return X, 3.0 * signal + 1.0


def learned(spec, n_batches=3, seed=0):
    learner = Learner(spec)
    for i in range(n_batches):
        learner.learn(*make_batch(spec, seed=seed + i))
    return learner


def state_arrays(learner):
    arrays = dict(_learned_arrays(learner.estimator_))
    if learner.scaler_ is not None:
        arrays.update({f"scaler.{k}": v for k, v in _learned_arrays(learner.scaler_)})
    return arrays


def run_onnx(onnx_bytes, X):
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {INPUT_NAME: np.asarray(X, dtype=np.float32)})))


@pytest.mark.parametrize("labels", [(0, 1), ("cat", "dog", "bird")], ids=["binary", "multiclass"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_parity_on_probes(config, labels):
    spec = make_spec(config, labels)
    learner = learned(spec)
    X, _ = make_batch(spec, seed=9)
    onnx_bytes, meta = export_onnx(learner)
    check_publishable(learner, onnx_bytes, X)

    outputs = run_onnx(onnx_bytes, np.vstack([X, probe_rows(WIDTH)]))
    assert set(outputs) == set(meta["outputs"])
    ours = run_onnx(onnx_bytes, X)
    if spec.is_clusterer:
        np.testing.assert_allclose(ours["distances"], learner.distances(X), rtol=1e-4, atol=1e-4)
        assert ours["cluster"].tolist() == learner.predict(X).tolist()
    elif not spec.is_classifier:
        np.testing.assert_allclose(ours["value"][:, 0], learner.predict(X), rtol=1e-4, atol=1e-3)
    elif spec.has_probabilities:
        np.testing.assert_allclose(ours["probabilities"], learner.predict_proba(X), atol=1e-4)
        assert "scores" not in ours
    else:
        scores = learner.decision_function(X)
        if scores.ndim == 1:
            scores = np.column_stack([-scores, scores])
        np.testing.assert_allclose(ours["scores"], scores, rtol=1e-4, atol=1e-3)
        assert "probabilities" not in ours


@pytest.mark.parametrize("config", list(CONFIGS))
def test_exact_resume(config):
    spec = make_spec(config)
    straight = learned(spec, n_batches=4)

    resumed = learned(spec, n_batches=2)
    resumed = load_state(dump_state(resumed), spec)
    for seed in (2, 3):
        resumed.learn(*make_batch(spec, seed=seed))

    assert resumed.samples_learned_ == straight.samples_learned_
    expected, actual = state_arrays(straight), state_arrays(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert np.array_equal(actual[name], expected[name]), name
    X, _ = make_batch(spec, seed=7)
    assert np.array_equal(resumed.predict(X), straight.predict(X))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_finite_parameters(config):
    spec = make_spec(config)
    learner = learned(spec)
    check_finite_parameters(learner)

    broken = copy.deepcopy(learner)
    attribute = EXPORTED_ATTRIBUTES[spec.info.family][0]
    values = getattr(broken.estimator_, attribute)
    name = attribute
    if isinstance(values, list):
        values, name = values[0], f"{attribute}[0]"
    values.flat[0] = np.nan
    with pytest.raises(PublishRejected, match=rf"parameter {re.escape(name)} has 1 values that "
                       r"are NaN, infinite or beyond float32 range") as caught:
        check_finite_parameters(broken)
    assert caught.value.reason == "non_finite_parameters"


@pytest.mark.parametrize("config", CLASSIFIERS)
def test_unknown_label_rejected(config):
    spec = make_spec(config, labels=("cat", "dog"))
    X, _ = make_batch(spec)
    y = np.array(["cat", "bird"] * 30, dtype=object)
    learner = Learner(spec)
    with pytest.raises(ValueError, match=r"labels \['bird'\] outside the declared labels "
                       r"\['cat', 'dog'\]; reject those records"):
        learner.learn(X, y)
    assert not learner.is_fitted
    assert learner.samples_learned_ == 0


@pytest.mark.parametrize("config", CLASSIFIERS)
def test_single_class_batch_learns(config):
    spec = make_spec(config, labels=("cat", "dog"))
    X, _ = make_batch(spec)
    learner = Learner(spec).learn(X, np.array(["cat"] * len(X), dtype=object))
    assert learner.estimator_.classes_.tolist() == ["cat", "dog"]
    assert set(learner.predict(X).tolist()) <= {"cat", "dog"}
    check_publishable(learner, export_onnx(learner)[0], X)
    learner.learn(X, np.array(["dog"] * len(X), dtype=object))
    check_publishable(learner, export_onnx(learner)[0], X)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_feature_count_change_rejected(config):
    spec = make_spec(config)
    learner = learned(spec, n_batches=1)
    X, y = make_batch(spec)
    wider = np.hstack([X, np.zeros((len(X), 1))])
    with pytest.raises(ValueError, match=r"expects \(n, 5\) columns, got 6"):
        learner.learn(wider, y)
    with pytest.raises(ValueError, match=r"expects \(n, 5\) columns, got 4"):
        learner.predict(X[:, :4])
    assert learner.samples_learned_ == len(X)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_inputs_never_mutated(config):
    spec = make_spec(config)
    X, y = make_batch(spec)
    X_before = X.copy()
    y_before = None if y is None else y.copy()
    learner = Learner(spec).learn(X, y)
    learner.predict(X)
    check_publishable(learner, export_onnx(learner)[0], X)
    assert np.array_equal(X, X_before)
    if y is not None:
        assert np.array_equal(y, y_before)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_seeded_runs_repeatable(config):
    spec = make_spec(config)
    first, second = learned(spec), learned(spec)
    for name, values in state_arrays(first).items():
        assert np.array_equal(values, state_arrays(second)[name]), name
    assert export_onnx(first)[0] == export_onnx(second)[0]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fast_export_equals_conversion(config):
    spec = make_spec(config)
    learner = learned(spec, n_batches=1)
    template = ExportTemplate.build(learner)
    if config in NOT_REWRITABLE:
        assert template is None
        return
    assert template is not None
    for seed in (5, 6):
        learner.learn(*make_batch(spec, seed=seed))
        assert template.rewrite(learner) == convert(learner).SerializeToString()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_named_inputs_equal_encoded(config):
    spec = make_spec(config)
    learner = learned(spec)
    base = convert(learner)
    named = named_input_graph(base, spec.schema).SerializeToString()

    records = make_records(40, seed=11)  # includes "purple", outside the vocabulary
    served = run_onnx(base.SerializeToString(), spec.schema.encode(records))
    session = ort.InferenceSession(named, providers=["CPUExecutionProvider"])
    portable = dict(zip([o.name for o in session.get_outputs()],
                        session.run(None, feeds(spec.schema, records))))
    assert served.keys() == portable.keys()
    for name in served:
        assert np.array_equal(served[name], portable[name]), name
