import math

import numpy as np
import pytest

from modelstore.errors import InvalidModelName, RecordRejected, SpecError
from modelstore.names import validate_model_name
from modelstore.schema import FeatureSchema, LabelSet, check_target

FEATURES = [
    {"name": "x"},
    {"name": "carrier", "type": "categorical", "vocabulary": ["AA", "UA"]},
    {"name": "y", "missing": 0.5},
]


@pytest.fixture
def schema():
    return FeatureSchema.from_list(FEATURES)


def test_encode_uses_schema_order(schema):
    rows = schema.encode([
        {"y": 3, "carrier": "UA", "x": 1.5},
        {"x": 2, "carrier": "AA", "y": -1},
    ])
    assert rows.dtype == np.float32
    assert rows.tolist() == [[1.5, 0, 1, 3], [2, 1, 0, -1]]


def test_encode_list_in_schema_order(schema):
    assert schema.encode_one([4, "AA", 1]).tolist() == [4, 1, 0, 1]


def test_encode_list_wrong_width(schema):
    with pytest.raises(RecordRejected, match="has 2 values, the schema has 3") as info:
        schema.encode_one([1, "AA"])
    assert info.value.reason == "wrong_width"


def test_missing_numeric_is_imputed(schema):
    assert schema.encode_one({"x": 1, "carrier": "AA"}).tolist() == [1, 1, 0, 0.5]


def test_missing_required_feature_rejected(schema):
    with pytest.raises(RecordRejected, match="'x' is missing") as info:
        schema.encode_one({"carrier": "AA", "y": 1})
    assert info.value.reason == "missing_feature"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e308, 10**400])
def test_non_finite_rejected(schema, value):
    with pytest.raises(RecordRejected) as info:
        schema.encode_one({"x": value, "carrier": "AA", "y": 1})
    assert info.value.reason == "non_finite"


@pytest.mark.parametrize("value", ["1.5", True, {"a": 1}, [1]])
def test_numeric_wrong_type_rejected(schema, value):
    with pytest.raises(RecordRejected) as info:
        schema.encode_one({"x": value, "carrier": "AA", "y": 1})
    assert info.value.reason == "wrong_type"


def test_unknown_category_rejected(schema):
    with pytest.raises(RecordRejected, match="no category 'DL'") as info:
        schema.encode_one({"x": 1, "carrier": "DL", "y": 1})
    assert info.value.reason == "unknown_category"


def test_unknown_category_ignored():
    schema = FeatureSchema.from_list(
        [{"name": "c", "type": "categorical", "vocabulary": ["a"], "unknown": "ignore"}]
    )
    assert schema.encode_one({"c": "zzz"}).tolist() == [0]


def test_extra_keys_listed(schema):
    assert schema.extra_keys({"x": 1, "f11": 2, "carrier": "AA"}) == ["f11"]


def test_schema_round_trip(schema):
    again = FeatureSchema.from_list(schema.to_list())
    assert again.to_list() == schema.to_list()
    assert again.column_names() == ["x", "carrier=AA", "carrier=UA", "y"]


@pytest.mark.parametrize(
    "features, message",
    [
        ([], "at least one feature"),
        ([{"name": "a"}, {"name": "a"}], r"\['a'\] appear more than once"),
        ([{"name": "a", "type": "text"}], "'text' is not a feature type"),
        ([{"name": "a", "type": "categorical"}], "needs a non-empty list of strings"),
        ([{"name": "a", "missing": "mean"}], "use 'reject' or a finite number"),
        ([{"name": "a", "colour": 1}], r"unknown keys \['colour'\]"),
    ],
)
def test_schema_errors(features, message):
    with pytest.raises(SpecError, match=message):
        FeatureSchema.from_list(features)


def test_labels_checked_by_type():
    labels = LabelSet([0, 1])
    assert labels.check(1) == 1
    for bad, reason in [("1", "label_type"), (True, "label_type"), (2, "unknown_label"),
                        (None, "missing_label"), (1.0, "label_type")]:
        with pytest.raises(RecordRejected) as info:
            labels.check(bad)
        assert info.value.reason == reason, bad


def test_string_labels():
    labels = LabelSet(["cat", "dog"])
    assert labels.check("dog") == "dog"
    with pytest.raises(RecordRejected, match="'bird' is not one of"):
        labels.check("bird")


@pytest.mark.parametrize(
    "labels, message",
    [([1], "at least 2 labels"), ([1, "1"], "mixes integers and strings"),
     ([0, 0], "lists a label twice"), ([0.5, 1.5], "neither an integer nor a string")],
)
def test_label_set_errors(labels, message):
    with pytest.raises(SpecError, match=message):
        LabelSet(labels)


def test_regression_target():
    assert check_target(2) == 2.0
    for bad in (math.inf, 10**400):
        with pytest.raises(RecordRejected) as info:
            check_target(bad)
        assert info.value.reason == "non_finite"


@pytest.mark.parametrize("name", ["../x", "a/b", "a:b", "a\x00", "", " a", "a" * 129, 5])
def test_invalid_model_names(name):
    with pytest.raises(InvalidModelName):
        validate_model_name(name)


def test_valid_model_name():
    assert validate_model_name("flights-2013.v1_a") == "flights-2013.v1_a"
