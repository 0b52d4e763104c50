"""Model spec validation: every invalid spec fails with a message naming field, value and fix."""

import copy
import json

import pytest

from modelstore.errors import SpecError
from trainer.spec import ModelSpec, builtin_spec, load_spec_file

FEATURES = [{"name": "x"}, {"name": "colour", "type": "categorical", "vocabulary": ["red", "blue"]}]


def classifier(**changes):
    raw = {
        "estimator": "SGDClassifier",
        "params": {"loss": "log_loss"},
        "features": copy.deepcopy(FEATURES),
        "labels": [0, 1],
    }
    raw.update(changes)
    return raw


def regressor(**changes):
    raw = {"estimator": "SGDRegressor", "params": {}, "features": copy.deepcopy(FEATURES)}
    raw.update(changes)
    return raw


def test_spec_classifier_valid():
    spec = ModelSpec.from_dict(classifier())
    assert spec.is_classifier
    assert spec.task == "classification"
    assert spec.scaler == "StandardScaler"
    assert spec.schema.width == 3
    assert spec.labels.labels == (0, 1)
    assert spec.has_probabilities


def test_spec_regressor_valid():
    spec = ModelSpec.from_dict(regressor(scaler=None))
    assert not spec.is_classifier
    assert spec.task == "regression"
    assert spec.scaler is None
    assert spec.labels is None


def test_spec_round_trip():
    spec = ModelSpec.from_dict(classifier(labels=["spam", "ham"]))
    again = ModelSpec.from_dict(spec.to_dict())
    assert again.to_dict() == spec.to_dict()
    assert again.labels.labels == ("spam", "ham")


def test_spec_default_random_state():
    spec = ModelSpec.from_dict(classifier())
    assert spec.params["random_state"] == 0
    assert spec.make_estimator().random_state == 0


def test_spec_unknown_estimator():
    with pytest.raises(SpecError, match=r"estimator: 'RandomForestClassifier' is not supported; "
                       r"use one of SGDClassifier, SGDRegressor, Perceptron, "
                       r"PassiveAggressiveClassifier, .*MiniBatchKMeans"):
        ModelSpec.from_dict(classifier(estimator="RandomForestClassifier"))


def test_spec_unknown_param():
    with pytest.raises(SpecError, match=r"params\.learning_rat: SGDClassifier has no parameter "
                       r"'learning_rat'; allowed parameters are .*learning_rate"):
        ModelSpec.from_dict(classifier(params={"learning_rat": "constant"}))


def test_spec_invalid_param_value():
    with pytest.raises(SpecError, match=r"params: invalid SGDClassifier parameters: "
                       r"The 'loss' parameter .* Got 'logistic' instead"):
        ModelSpec.from_dict(classifier(params={"loss": "logistic"}))


def test_spec_negative_alpha():
    with pytest.raises(SpecError, match=r"The 'alpha' parameter .* Got -1\.0 instead"):
        ModelSpec.from_dict(classifier(params={"alpha": -1.0}))


def test_spec_cross_param_rule():
    # scikit-learn's own partial_fit rule, checked when the spec is validated.
    with pytest.raises(SpecError, match=r"params: invalid SGDClassifier parameters: "
                       r"alpha must be > 0 since learning_rate is 'optimal'"):
        ModelSpec.from_dict(classifier(params={"alpha": 0.0}))


def test_spec_early_stopping_rejected():
    with pytest.raises(SpecError, match=r"params\.early_stopping: true needs a validation split"):
        ModelSpec.from_dict(classifier(params={"early_stopping": True}))


def test_spec_class_weight_rejected():
    with pytest.raises(SpecError, match=r"params\.class_weight: 'balanced' is not supported"):
        ModelSpec.from_dict(classifier(params={"class_weight": "balanced"}))


def test_spec_random_state_null_rejected():
    with pytest.raises(SpecError, match=r"params\.random_state: None .* use an integer seed"):
        ModelSpec.from_dict(classifier(params={"random_state": None}))


def test_spec_non_finite_param():
    with pytest.raises(SpecError, match=r"params\.alpha: nan is not a finite number"):
        ModelSpec.from_dict(classifier(params={"alpha": float("nan")}))


def test_spec_unknown_scaler():
    with pytest.raises(SpecError, match=r"scaler: 'RobustScaler' is not supported; "
                       r"use 'StandardScaler', 'MinMaxScaler', 'MaxAbsScaler' or null"):
        ModelSpec.from_dict(classifier(scaler="RobustScaler"))


def test_spec_classifier_needs_labels():
    raw = classifier()
    del raw["labels"]
    with pytest.raises(SpecError, match=r"labels: missing; SGDClassifier is a classifier"):
        ModelSpec.from_dict(raw)


def test_spec_regressor_rejects_labels():
    with pytest.raises(SpecError, match=r"labels: \[0, 1\] given for SGDRegressor, which is "
                       r"a regressor; remove labels"):
        ModelSpec.from_dict(regressor(labels=[0, 1]))


def test_spec_mixed_label_types():
    with pytest.raises(SpecError, match="mixes integers and strings"):
        ModelSpec.from_dict(classifier(labels=[1, "1"]))


def test_spec_unknown_top_level_key():
    with pytest.raises(SpecError, match=r"spec: unknown keys \['label'\]; allowed keys are "
                       r"estimator, params, scaler, scaler_columns, features, labels, batch, gate, onnx"):
        ModelSpec.from_dict(classifier(label=[0, 1]))


def test_spec_not_an_object():
    with pytest.raises(SpecError, match="spec: expected a JSON object"):
        ModelSpec.from_dict([1, 2])


def test_spec_bad_feature():
    with pytest.raises(SpecError, match=r"features\[1\]\.vocabulary"):
        ModelSpec.from_dict(classifier(features=[{"name": "x"}, {"name": "c", "type": "categorical"}]))


def test_spec_params_not_an_object():
    with pytest.raises(SpecError, match=r"params: expected an object of SGDRegressor parameters"):
        ModelSpec.from_dict(regressor(params=["alpha", 1.0]))


def test_builtin_flights_spec():
    spec = ModelSpec.from_dict(builtin_spec("flights"))
    assert spec.schema.names == (
        "month", "weekday", "sched_dep_hour", "sched_arr_hour", "distance",
        "carrier", "origin", "dest",
    )
    assert spec.labels.labels == (0, 1)
    assert spec.params["loss"] == "log_loss"
    assert len(spec.schema.features[5].vocabulary) == 16
    assert spec.schema.features[6].vocabulary == ("EWR", "JFK", "LGA")
    assert len(spec.schema.features[7].vocabulary) == 105


def test_builtin_spec_unknown():
    with pytest.raises(SpecError, match=r"no built-in spec 'trains'; available specs are flights"):
        builtin_spec("trains")


def spec_for(estimator, **changes):
    raw = {"estimator": estimator, "features": copy.deepcopy(FEATURES)}
    raw.update(changes)
    return raw


@pytest.mark.parametrize("estimator, task", [
    ("SGDClassifier", "classification"), ("SGDRegressor", "regression"),
    ("Perceptron", "classification"), ("PassiveAggressiveClassifier", "classification"),
    ("PassiveAggressiveRegressor", "regression"), ("MultinomialNB", "classification"),
    ("ComplementNB", "classification"), ("BernoulliNB", "classification"),
    ("GaussianNB", "classification"), ("MLPClassifier", "classification"),
    ("MLPRegressor", "regression"), ("MiniBatchKMeans", "clustering"),
])
def test_spec_every_estimator_valid(estimator, task):
    raw = spec_for(estimator, scaler="MinMaxScaler")
    if task == "classification":
        raw["labels"] = ["a", "b"]
    spec = ModelSpec.from_dict(raw)
    assert spec.task == task
    assert ModelSpec.from_dict(spec.to_dict()).to_dict() == spec.to_dict()


@pytest.mark.parametrize("estimator", ["MultinomialNB", "ComplementNB"])
def test_spec_standard_scaler_before_count_model(estimator):
    raw = spec_for(estimator, scaler="StandardScaler", labels=[0, 1])
    with pytest.raises(SpecError, match=rf"scaler: 'StandardScaler' centers each feature on its "
                       rf"mean, so about half of the scaled values are negative, and {estimator} "
                       r"takes counts and rejects negative input; use 'MinMaxScaler'"):
        ModelSpec.from_dict(raw)


def test_spec_min_max_scaler_before_multinomial_nb():
    spec = ModelSpec.from_dict(spec_for("MultinomialNB", scaler="MinMaxScaler", labels=[0, 1]))
    assert spec.has_probabilities
    assert spec.info.non_negative_input


def test_spec_classifier_without_labels_names_estimator():
    with pytest.raises(SpecError, match=r"labels: missing; MLPClassifier is a classifier"):
        ModelSpec.from_dict(spec_for("MLPClassifier"))


def test_spec_clustering_rejects_labels():
    with pytest.raises(SpecError, match=r"labels: \[0, 1\] given for MiniBatchKMeans, which is "
                       r"a clustering model; remove labels"):
        ModelSpec.from_dict(spec_for("MiniBatchKMeans", labels=[0, 1]))


def test_spec_probabilities_by_estimator():
    def has_probabilities(estimator, **params):
        return ModelSpec.from_dict(spec_for(estimator, params=params, labels=[0, 1])).has_probabilities

    assert has_probabilities("SGDClassifier", loss="log_loss")
    assert has_probabilities("SGDClassifier", loss="modified_huber")
    assert not has_probabilities("SGDClassifier", loss="hinge")
    assert not has_probabilities("Perceptron")
    assert not has_probabilities("PassiveAggressiveClassifier")
    assert has_probabilities("GaussianNB")
    assert has_probabilities("BernoulliNB")
    assert has_probabilities("MLPClassifier")


def test_spec_passive_aggressive_takes_its_own_params():
    spec = ModelSpec.from_dict(spec_for("PassiveAggressiveClassifier",
                                        params={"C": 0.5, "loss": "squared_hinge"}, labels=[0, 1]))
    estimator = spec.make_estimator()
    assert type(estimator).__name__ == "SGDClassifier"
    assert (estimator.learning_rate, estimator.eta0, estimator.penalty) == ("pa2", 0.5, None)
    with pytest.raises(SpecError, match=r"params\.eta0: PassiveAggressiveClassifier has no "
                       r"parameter 'eta0'; allowed parameters are C, average"):
        ModelSpec.from_dict(spec_for("PassiveAggressiveClassifier", params={"eta0": 1.0},
                                     labels=[0, 1]))


def test_spec_mlp_lbfgs_rejected():
    with pytest.raises(SpecError, match=r"params\.solver: 'lbfgs' has no partial_fit in "
                       r"MLPRegressor; use 'adam' or 'sgd'"):
        ModelSpec.from_dict(spec_for("MLPRegressor", params={"solver": "lbfgs"}))


def test_spec_mlp_hidden_layers_list():
    spec = ModelSpec.from_dict(spec_for("MLPRegressor", params={"hidden_layer_sizes": [8, 4]}))
    assert spec.make_estimator().hidden_layer_sizes == [8, 4]
    with pytest.raises(SpecError, match=r"params\.hidden_layer_sizes: \[8, 'x'\] contains 'x'"):
        ModelSpec.from_dict(spec_for("MLPRegressor", params={"hidden_layer_sizes": [8, "x"]}))


def test_spec_naive_bayes_alpha_zero_rejected():
    with pytest.raises(SpecError, match=r"params\.alpha: 0 gives a log probability of -infinity"):
        ModelSpec.from_dict(spec_for("BernoulliNB", params={"alpha": 0}, labels=[0, 1]))


def test_spec_priors_one_per_label():
    with pytest.raises(SpecError, match=r"params\.priors: \[1\.0\] must list one prior per "
                       r"label \(2\)"):
        ModelSpec.from_dict(spec_for("GaussianNB", params={"priors": [1.0]}, labels=[0, 1]))
    with pytest.raises(SpecError, match=r"params\.priors: \[0\.5, 0\.6\] sums to"):
        ModelSpec.from_dict(spec_for("GaussianNB", params={"priors": [0.5, 0.6]}, labels=[0, 1]))


def test_spec_kmeans_init_array_rejected():
    with pytest.raises(SpecError, match=r"params\.init: 'greedy' is not supported"):
        ModelSpec.from_dict(spec_for("MiniBatchKMeans", params={"init": "greedy"}))


def test_spec_scaler_columns():
    spec = ModelSpec.from_dict(classifier(scaler_columns="numeric"))
    assert spec.scaled_columns == (0,)
    assert ModelSpec.from_dict(classifier()).scaled_columns == (0, 1, 2)
    assert ModelSpec.from_dict(classifier(scaler=None)).scaled_columns == ()
    with pytest.raises(SpecError, match=r"scaler_columns: 'some' is invalid; use 'all'"):
        ModelSpec.from_dict(classifier(scaler_columns="some"))
    only_categories = [FEATURES[1]]
    with pytest.raises(SpecError, match=r"scaler_columns: 'numeric' but the schema has no "
                       r"numeric feature"):
        ModelSpec.from_dict(classifier(features=only_categories, scaler_columns="numeric"))


def test_spec_batch_settings():
    assert ModelSpec.from_dict(classifier(batch={"max_records": 50})).batch_max_records == 50
    with pytest.raises(SpecError, match=r"batch\.max_records: 0 is invalid; use a positive integer"):
        ModelSpec.from_dict(classifier(batch={"max_records": 0}))
    with pytest.raises(SpecError, match=r"batch: expected \{\"max_records\": N\}"):
        ModelSpec.from_dict(classifier(batch={"size": 50}))


def test_spec_gate_settings():
    spec = ModelSpec.from_dict(classifier(gate={"max_accuracy_drop": 0.02}))
    assert spec.gate.max_accuracy_drop == 0.02
    assert spec.gate.holdout_fraction == 0.2
    assert ModelSpec.from_dict(spec.to_dict()).gate == spec.gate
    with pytest.raises(SpecError, match=r"gate\.max_accuracy_drop: SGDRegressor is a regression "
                       r"model and is gated on its error; use gate\.max_error_increase"):
        ModelSpec.from_dict(regressor(gate={"max_accuracy_drop": 0.02}))
    with pytest.raises(SpecError, match=r"gate\.holdout_fraction: 1\.0 is invalid; use a number "
                       r"in \(0, 1\)"):
        ModelSpec.from_dict(classifier(gate={"max_accuracy_drop": 0.02, "holdout_fraction": 1.0}))
    with pytest.raises(SpecError, match=r"gate: unknown keys \['margin'\]"):
        ModelSpec.from_dict(classifier(gate={"margin": 0.02}))


def test_spec_opsets_pinned():
    spec = ModelSpec.from_dict(classifier(onnx={"target_opset": 15, "ml_opset": 1}))
    assert spec.onnx.opsets() == {"": 15, "ai.onnx.ml": 1}
    assert spec.to_dict()["onnx"] == {"target_opset": 15, "ml_opset": 1, "named_inputs": False}
    assert ModelSpec.from_dict(classifier()).onnx.target_opset == 18
    with pytest.raises(SpecError, match=r"onnx\.target_opset: 99 is not supported; use an integer "
                       r"from 13 to 22"):
        ModelSpec.from_dict(classifier(onnx={"target_opset": 99}))
    with pytest.raises(SpecError, match=r"onnx\.ml_opset: 0 is not supported"):
        ModelSpec.from_dict(classifier(onnx={"ml_opset": 0}))


def test_spec_named_inputs_feature_named_like_output():
    features = [{"name": "label"}]
    with pytest.raises(SpecError, match=r"features\[0\]\.name: 'label' is an output name"):
        ModelSpec.from_dict(classifier(features=features, onnx={"named_inputs": True}))


def test_spec_named_inputs_needs_store_kind():
    from modelstore.base import ARTIFACT_KINDS
    from trainer.spec import NAMED_ONNX

    raw = classifier(onnx={"named_inputs": True})
    if NAMED_ONNX in ARTIFACT_KINDS:
        assert ModelSpec.from_dict(raw).onnx.named_inputs
    else:
        with pytest.raises(SpecError, match=r"onnx\.named_inputs: true, but this store accepts "
                           r"only the artifact kinds onnx, state and not 'onnx_named'"):
            ModelSpec.from_dict(raw)


TOML_SPEC = """
estimator = "SGDClassifier"
scaler = "none"
labels = ["spam", "ham"]

[params]
loss = "log_loss"
alpha = 0.001

[batch]
max_records = 50

[[features]]
name = "x"

[[features]]
name = "colour"
type = "categorical"
vocabulary = ["red", "blue"]
unknown = "ignore"
"""


def test_spec_file_toml(tmp_path):
    path = tmp_path / "spam.toml"
    path.write_text(TOML_SPEC, encoding="utf-8")
    spec = load_spec_file(path)
    assert spec.scaler is None
    assert spec.params["alpha"] == 0.001
    assert spec.labels.labels == ("spam", "ham")
    assert spec.batch_max_records == 50
    assert spec.schema.features[1].unknown == "ignore"


def test_spec_file_json_equals_toml(tmp_path):
    toml_path = tmp_path / "spam.toml"
    toml_path.write_text(TOML_SPEC, encoding="utf-8")
    json_path = tmp_path / "spam.json"
    json_path.write_text(json.dumps(load_spec_file(toml_path).to_dict()), encoding="utf-8")
    assert load_spec_file(json_path).to_dict() == load_spec_file(toml_path).to_dict()


def test_spec_file_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("estimator = \n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"spec file '.*broken\.toml' is not valid TOML"):
        load_spec_file(broken)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{", encoding="utf-8")
    with pytest.raises(SpecError, match=r"spec file '.*bad\.json' is not valid JSON"):
        load_spec_file(bad_json)
    with pytest.raises(SpecError, match=r"spec file '.*missing\.json' cannot be read"):
        load_spec_file(tmp_path / "missing.json")
    invalid = tmp_path / "invalid.toml"
    invalid.write_text('estimator = "Forest"\n[[features]]\nname = "x"\n', encoding="utf-8")
    with pytest.raises(SpecError, match=r"spec file '.*invalid\.toml': estimator: 'Forest' is "
                       r"not supported"):
        load_spec_file(invalid)
