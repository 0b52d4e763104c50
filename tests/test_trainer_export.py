"""ONNX export and the publish gate, checked with onnxruntime against scikit-learn."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from modelstore.errors import PublishRejected
from trainer.export import INPUT_NAME, TARGET_OPSET, export_onnx, library_versions
from trainer.gate import check_finite_parameters, check_onnx_parity, check_publishable, probe_rows
from trainer.learner import Learner
from trainer.spec import ModelSpec

X_LINE = np.array([[0, 0], [1, 1], [2, 2], [3, 3]], dtype=np.float32)
Y_LINE = [0, 0, 1, 1]
MARGIN_LOSSES = {
    "hinge": {"loss": "hinge"},
    "perceptron": {"loss": "perceptron", "learning_rate": "constant", "eta0": 1.0, "penalty": None},
    "passive_aggressive": {"loss": "hinge", "learning_rate": "pa1", "eta0": 1.0, "penalty": None},
    "squared_hinge": {"loss": "squared_hinge"},
}


def spec_for(params, labels=(0, 1), width=2, scaler="StandardScaler", estimator="SGDClassifier"):
    raw = {
        "estimator": estimator,
        "params": params,
        "scaler": scaler,
        "features": [{"name": f"f{i}"} for i in range(width)],
    }
    if estimator == "SGDClassifier":
        raw["labels"] = list(labels)
    return ModelSpec.from_dict(raw)


def run_onnx(onnx_bytes, X):
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {INPUT_NAME: np.asarray(X, dtype=np.float32)})))


@pytest.mark.parametrize("scaler", ["StandardScaler", None])
def test_export_log_loss_probabilities_match(scaler):
    learner = Learner(spec_for({"loss": "log_loss"}, scaler=scaler)).learn(X_LINE, Y_LINE)
    onnx_bytes, meta = export_onnx(learner)

    outputs = run_onnx(onnx_bytes, X_LINE)
    assert meta["outputs"] == {"label": "label", "probabilities": "probabilities"}
    assert set(outputs) == {"label", "probabilities"}
    np.testing.assert_allclose(outputs["probabilities"], learner.predict_proba(X_LINE), atol=1e-5)
    assert outputs["label"].tolist() == learner.predict(X_LINE).tolist()


def test_export_modified_huber_probabilities_match():
    X = np.random.RandomState(0).normal(size=(40, 2)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    learner = Learner(spec_for({"loss": "modified_huber"})).learn(X, y)
    outputs = run_onnx(export_onnx(learner)[0], X)
    np.testing.assert_allclose(outputs["probabilities"], learner.predict_proba(X), atol=1e-5)


@pytest.mark.parametrize("name", list(MARGIN_LOSSES))
def test_export_margin_loss_exposes_scores(name):
    learner = Learner(spec_for(MARGIN_LOSSES[name])).learn(X_LINE, Y_LINE)
    onnx_bytes, meta = export_onnx(learner)

    outputs = run_onnx(onnx_bytes, X_LINE)
    assert "probabilities" not in meta["outputs"]
    assert "probabilities" not in outputs
    assert meta["outputs"] == {"label": "label", "scores": "scores"}
    margin = learner.decision_function(X_LINE)
    np.testing.assert_allclose(outputs["scores"][:, 1], margin, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(outputs["scores"][:, 0], -margin, rtol=1e-5, atol=1e-4)
    assert outputs["label"].tolist() == learner.predict(X_LINE).tolist()


def test_export_multiclass_margin_scores():
    X = np.random.RandomState(2).normal(size=(90, 2)).astype(np.float32)
    y = np.array(["a", "b", "c"], dtype=object)[np.digitize(X[:, 0], [-0.5, 0.5])]
    learner = Learner(spec_for({"loss": "hinge"}, labels=("c", "b", "a"))).learn(X, y)
    onnx_bytes, meta = export_onnx(learner)
    outputs = run_onnx(onnx_bytes, X)
    assert meta["classes"] == ["a", "b", "c"]
    np.testing.assert_allclose(outputs["scores"], learner.decision_function(X), rtol=1e-5, atol=1e-4)
    assert outputs["label"].tolist() == learner.predict(X).tolist()


def test_export_string_labels():
    y = np.array(["ham", "ham", "spam", "spam"], dtype=object)
    learner = Learner(spec_for({"loss": "log_loss"}, labels=("spam", "ham"))).learn(X_LINE, y)
    onnx_bytes, meta = export_onnx(learner)
    outputs = run_onnx(onnx_bytes, X_LINE)
    assert meta["classes"] == ["ham", "spam"]
    assert outputs["label"].tolist() == ["ham", "ham", "spam", "spam"]
    np.testing.assert_allclose(outputs["probabilities"], learner.predict_proba(X_LINE), atol=1e-5)


def test_export_regressor_value():
    X = np.random.RandomState(0).normal(size=(50, 3)).astype(np.float32)
    y = X @ np.array([1.0, -2.0, 0.5]) + 3.0
    learner = Learner(spec_for({}, width=3, estimator="SGDRegressor")).learn(X, y)
    onnx_bytes, meta = export_onnx(learner)
    outputs = run_onnx(onnx_bytes, X)
    assert meta["outputs"] == {"value": "value"}
    assert "classes" not in meta
    assert outputs["value"].shape == (50, 1)
    np.testing.assert_allclose(outputs["value"][:, 0], learner.predict(X), rtol=1e-5, atol=1e-4)


def test_export_metadata():
    learner = Learner(spec_for({"loss": "log_loss"}, width=2)).learn(X_LINE, Y_LINE)
    onnx_bytes, meta = export_onnx(learner)
    proto = onnx.load_from_string(onnx_bytes)
    assert meta["input"] == "features"
    assert meta["width"] == 2
    assert [i.name for i in proto.graph.input] == ["features"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 2
    assert meta["opset"]["ai.onnx"] <= TARGET_OPSET[""]
    assert meta["opset"]["ai.onnx.ml"] <= TARGET_OPSET["ai.onnx.ml"]
    assert set(library_versions()) >= {"scikit-learn", "skl2onnx", "onnx", "numpy"}


def test_gate_accepts_good_model():
    X = np.random.RandomState(0).normal(size=(200, 4)).astype(np.float32) * 50 + 1000
    y = (X[:, 0] > 1000).astype(int)
    learner = Learner(spec_for({"loss": "log_loss"}, width=4)).learn(X, y)
    check_publishable(learner, export_onnx(learner)[0], X)


def test_gate_rejects_non_finite_weights():
    learner = Learner(spec_for({"loss": "hinge"})).learn(X_LINE, Y_LINE)
    learner.estimator_.coef_[0, 1] = np.nan
    with pytest.raises(PublishRejected, match="parameter coef_ has 1 values") as caught:
        check_finite_parameters(learner)
    assert caught.value.reason == "non_finite_parameters"


def test_gate_rejects_weights_beyond_float32():
    learner = Learner(spec_for({"loss": "hinge"})).learn(X_LINE, Y_LINE)
    learner.estimator_.intercept_[0] = 1e300
    with pytest.raises(PublishRejected, match="intercept_ .* beyond float32 range") as caught:
        check_finite_parameters(learner)
    assert caught.value.reason == "non_finite_parameters"


def test_gate_rejects_scaler_variance_nan():
    learner = Learner(spec_for({"loss": "hinge"})).learn(X_LINE, Y_LINE)
    learner.scaler_.var_[0] = np.inf
    with pytest.raises(PublishRejected, match="parameter var_"):
        check_finite_parameters(learner)


def test_gate_rejects_stale_onnx():
    # An export of an older state no longer agrees with the learner.
    rng = np.random.RandomState(0)
    X = rng.normal(size=(100, 2)).astype(np.float32)
    learner = Learner(spec_for({"loss": "log_loss"})).learn(X, (X[:, 0] > 0).astype(int))
    stale = export_onnx(learner)[0]
    learner.learn(X, (X[:, 1] > 0).astype(int))
    with pytest.raises(PublishRejected, match="ONNX output 'probabilities' differs") as caught:
        check_onnx_parity(learner, stale, X)
    assert caught.value.reason == "onnx_parity"


def test_gate_rejects_float32_cancellation():
    # Features far from zero with a tiny spread: float32 cannot subtract the mean exactly.
    X = (1e7 + np.random.RandomState(0).normal(size=(100, 2))).astype(np.float64)
    spec = spec_for({}, estimator="SGDRegressor")
    learner = Learner(spec).learn(X, X[:, 0] - 1e7)
    with pytest.raises(PublishRejected, match="onnx_parity") as caught:
        check_onnx_parity(learner, export_onnx(learner)[0], X.astype(np.float32))
    assert caught.value.reason == "onnx_parity"


def test_probe_rows_fixed():
    first, second = probe_rows(5), probe_rows(5)
    assert first.dtype == np.float32
    assert first.shape == (6, 5)
    assert np.array_equal(first, second)
    assert np.abs(first).max() == 1e3


@pytest.mark.parametrize("estimator, params", [
    ("Perceptron", {}),
    ("PassiveAggressiveClassifier", {}),
])
def test_export_linear_classifiers_without_probabilities(estimator, params):
    spec = ModelSpec.from_dict({"estimator": estimator, "params": params,
                                "features": [{"name": "f0"}, {"name": "f1"}], "labels": [0, 1]})
    learner = Learner(spec).learn(X_LINE, Y_LINE)
    onnx_bytes, meta = export_onnx(learner)
    outputs = run_onnx(onnx_bytes, X_LINE)
    assert meta["outputs"] == {"label": "label", "scores": "scores"}
    assert "probabilities" not in outputs
    with pytest.raises(AttributeError, match=f"predict_proba is not available for {estimator}"):
        learner.predict_proba(X_LINE)
    margin = learner.decision_function(X_LINE)
    np.testing.assert_allclose(outputs["scores"][:, 1], margin, rtol=1e-5, atol=1e-4)
    assert outputs["label"].tolist() == learner.predict(X_LINE).tolist()


@pytest.mark.parametrize("estimator, scaler", [
    ("MultinomialNB", "MinMaxScaler"), ("BernoulliNB", "StandardScaler"),
    ("GaussianNB", "StandardScaler"), ("MLPClassifier", "StandardScaler"),
])
def test_export_probability_models(estimator, scaler):
    spec = ModelSpec.from_dict({"estimator": estimator, "scaler": scaler,
                                "features": [{"name": "f0"}, {"name": "f1"}], "labels": [0, 1]})
    learner = Learner(spec).learn(X_LINE, Y_LINE)
    onnx_bytes, meta = export_onnx(learner)
    outputs = run_onnx(onnx_bytes, X_LINE)
    assert meta["outputs"] == {"label": "label", "probabilities": "probabilities"}
    np.testing.assert_allclose(outputs["probabilities"], learner.predict_proba(X_LINE), atol=1e-5)


def test_export_regressors_and_clusters():
    X = np.random.RandomState(0).normal(size=(50, 2)).astype(np.float32)
    mlp = ModelSpec.from_dict({"estimator": "MLPRegressor", "params": {"hidden_layer_sizes": [4]},
                               "features": [{"name": "f0"}, {"name": "f1"}]})
    learner = Learner(mlp).learn(X, X[:, 0])
    outputs = run_onnx(export_onnx(learner)[0], X)
    np.testing.assert_allclose(outputs["value"][:, 0], learner.predict(X), rtol=1e-4, atol=1e-4)

    kmeans = ModelSpec.from_dict({"estimator": "MiniBatchKMeans", "params": {"n_clusters": 3},
                                  "features": [{"name": "f0"}, {"name": "f1"}]})
    learner = Learner(kmeans).learn(X)
    onnx_bytes, meta = export_onnx(learner)
    outputs = run_onnx(onnx_bytes, X)
    assert meta["outputs"] == {"cluster": "cluster", "distances": "distances"}
    assert "classes" not in meta
    assert outputs["cluster"].tolist() == learner.predict(X).tolist()
    np.testing.assert_allclose(outputs["distances"], learner.distances(X), rtol=1e-4, atol=1e-4)


def test_export_opsets_pinned_by_spec():
    spec = ModelSpec.from_dict({"estimator": "SGDClassifier", "params": {"loss": "log_loss"},
                                "features": [{"name": "f0"}, {"name": "f1"}], "labels": [0, 1],
                                "onnx": {"target_opset": 13, "ml_opset": 1}})
    learner = Learner(spec).learn(X_LINE, Y_LINE)
    onnx_bytes, meta = export_onnx(learner)
    imports = {entry.domain or "ai.onnx": entry.version
               for entry in onnx.load_from_string(onnx_bytes).opset_import}
    assert imports["ai.onnx"] <= 13
    assert meta["opset"] == dict(sorted(imports.items()))
    assert meta["target_opset"] == {"ai.onnx": 13, "ai.onnx.ml": 1}


def test_export_equal_weights_equal_bytes():
    spec = spec_for({"loss": "hinge"})
    first = export_onnx(Learner(spec).learn(X_LINE, Y_LINE))[0]
    second = export_onnx(Learner(spec).learn(X_LINE, Y_LINE))[0]
    assert first == second
