"""Model spec validation: every invalid spec fails with a message naming field, value and fix."""

import copy

import pytest

from modelstore.errors import SpecError
from trainer.spec import ModelSpec, builtin_spec

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
                       r"use one of SGDClassifier, SGDRegressor"):
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
    with pytest.raises(SpecError, match="early_stopping should be False with partial_fit"):
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
    with pytest.raises(SpecError, match=r"scaler: 'MinMaxScaler' is not supported; "
                       r"use 'StandardScaler' or null"):
        ModelSpec.from_dict(classifier(scaler="MinMaxScaler"))


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
                       r"estimator, params, scaler, features, labels"):
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
