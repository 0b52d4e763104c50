"""Decoding of raw record bytes: every rejection reason, with no server involved."""

import json
from dataclasses import dataclass

import numpy as np
import pytest

from modelstore.errors import RecordRejected
from modelstore.schema import FeatureSchema, LabelSet
from worker.records import decode_record, encode_record, parse_value

# The five messages of one partition: good, undecodable bytes, truncated
# JSON, a JSON array, good.
BAD_BYTES_STREAM = [
    b'{"features":{"x":1.0},"label":0}',
    bytes.fromhex("fffe0067617262"),
    b'{"features":{"x":',
    b"[1,2,3]",
    b'{"features":{"x":2.0},"label":1}',
]


@dataclass
class Spec:
    schema: FeatureSchema
    labels: LabelSet | None
    is_classifier: bool = True
    is_clusterer: bool = False


@pytest.fixture
def classifier():
    schema = FeatureSchema.from_list([
        {"name": "x"},
        {"name": "carrier", "type": "categorical", "vocabulary": ["AA", "UA"]},
    ])
    return Spec(schema=schema, labels=LabelSet([0, 1]))


@pytest.fixture
def regressor():
    return Spec(schema=FeatureSchema.from_list([{"name": "x"}]), labels=None, is_classifier=False)


def reason_of(value, key=b"m", **kwargs):
    with pytest.raises(RecordRejected) as info:
        decode_record(value, key, **kwargs)
    return info.value.reason


def test_bad_bytes_stream_reasons():
    outcomes = []
    for value in BAD_BYTES_STREAM:
        try:
            decode_record(value, b"sensor")
            outcomes.append("ok")
        except RecordRejected as err:
            outcomes.append(err.reason)
    assert outcomes == ["ok", "not_utf8", "invalid_json", "not_object", "ok"]


def test_bad_bytes_stream_good_records():
    first = decode_record(BAD_BYTES_STREAM[0], b"sensor")
    last = decode_record(BAD_BYTES_STREAM[4], b"sensor")
    assert (first.model, first.features, first.label) == ("sensor", {"x": 1.0}, 0)
    assert (last.model, last.features, last.label) == ("sensor", {"x": 2.0}, 1)


@pytest.mark.parametrize(
    "value, reason",
    [
        (None, "empty"),
        (b"", "empty"),
        (b"{}", "empty"),
        (b"\xc3\x28", "not_utf8"),
        (b"{bad json}", "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
        (b'{"features":{"x":NaN},"label":0}', "non_finite"),
        (b'{"features":{"x":Infinity},"label":0}', "non_finite"),
        (b'{"features":{"x":-Infinity},"label":0}', "non_finite"),
        (b'{"features":{"x":1e400},"label":0}', "non_finite"),
        (b'{"features":{"x":' + b"1" * 5000 + b'},"label":0}', "non_finite"),
        (b'"text"', "not_object"),
        (b"42", "not_object"),
        (b"null", "not_object"),
        (b'{"label":0}', "missing_features"),
        (b'{"features":null,"label":0}', "missing_features"),
    ],
)
def test_decode_rejects(value, reason):
    assert reason_of(value) == reason


def test_too_large_rejected_before_parsing():
    value = json.dumps({"features": {"x": 1}, "label": 0, "pad": "a" * 100}).encode()
    assert reason_of(value, max_record_bytes=50) == "too_large"
    assert decode_record(value, b"m", max_record_bytes=len(value)).label == 0


def test_rejection_detail_names_problem():
    with pytest.raises(RecordRejected, match="byte 0 is b'\\\\xff'"):
        parse_value(bytes.fromhex("fffe0067617262"), 1024)
    with pytest.raises(RecordRejected, match="JSON array"):
        parse_value(b"[1,2,3]", 1024)


def test_model_from_field_key_or_setting():
    value = b'{"model":"from-field","features":[1],"label":0}'
    assert decode_record(value, b"from-key").model == "from-field"
    assert decode_record(b'{"features":[1],"label":0}', b"from-key").model == "from-key"
    assert decode_record(value, b"from-key", forced_model="forced").model == "forced"


@pytest.mark.parametrize(
    "value, key, reason",
    [
        (b'{"features":[1],"label":0}', None, "missing_model"),
        (b'{"features":[1],"label":0}', b"", "missing_model"),
        (b'{"features":[1],"label":0}', b"\xff\xfe", "invalid_model"),
        (b'{"features":[1],"label":0}', b"../etc/passwd", "invalid_model"),
        (b'{"model":"a:b","features":[1],"label":0}', b"ok", "invalid_model"),
        (b'{"model":7,"features":[1],"label":0}', b"ok", "invalid_model"),
    ],
)
def test_model_name_rejects(value, key, reason):
    assert reason_of(value, key=key) == reason


def encode_reason(value, spec):
    with pytest.raises(RecordRejected) as info:
        encode_record(decode_record(value, b"m"), spec)
    return info.value.reason


@pytest.mark.parametrize(
    "value, reason",
    [
        (b'{"features":{"x":"1.5","carrier":"AA"},"label":0}', "wrong_type"),
        (b'{"features":{"x":true,"carrier":"AA"},"label":0}', "wrong_type"),
        (b'{"features":"x=1","label":0}', "wrong_type"),
        (b'{"features":{"carrier":"AA"},"label":0}', "missing_feature"),
        (b'{"features":[1.0],"label":0}', "wrong_width"),
        (b'{"features":[1.0,"AA",3],"label":0}', "wrong_width"),
        (b'{"features":{"x":1,"carrier":"ZZ"},"label":0}', "unknown_category"),
        (b'{"features":{"x":1e39,"carrier":"AA"},"label":0}', "non_finite"),
        (b'{"features":{"x":1,"carrier":"AA"},"label":"0"}', "label_type"),
        (b'{"features":{"x":1,"carrier":"AA"},"label":true}', "label_type"),
        (b'{"features":{"x":1,"carrier":"AA"},"label":7}', "unknown_label"),
        (b'{"features":{"x":1,"carrier":"AA"}}', "missing_label"),
        (b'{"features":{"x":1,"carrier":"AA"},"label":null}', "missing_label"),
    ],
)
def test_encode_rejects(value, reason, classifier):
    assert encode_reason(value, classifier) == reason


def test_encode_object_and_list_agree(classifier):
    by_name = encode_record(
        decode_record(b'{"features":{"carrier":"UA","x":2.5},"label":1}', b"m"), classifier
    )
    by_order = encode_record(decode_record(b'{"features":[2.5,"UA"],"label":1}', b"m"), classifier)
    assert by_name.row.dtype == np.float32
    assert by_name.row.tolist() == [2.5, 0.0, 1.0]
    assert by_order.row.tolist() == by_name.row.tolist()
    assert by_name.label == 1


def test_encode_counts_extra_keys(classifier):
    encoded = encode_record(
        decode_record(b'{"features":{"x":1,"carrier":"AA","wind":3,"gate":"B"},"label":0}', b"m"),
        classifier,
    )
    assert sorted(encoded.extra_keys) == ["gate", "wind"]


def test_regressor_target_checked(regressor):
    encoded = encode_record(decode_record(b'{"features":{"x":1},"label":2.5}', b"m"), regressor)
    assert encoded.label == 2.5
    assert encode_reason(b'{"features":{"x":1},"label":"high"}', regressor) == "label_type"
    assert encode_reason(b'{"features":{"x":1},"label":1e39}', regressor) == "non_finite"
    assert encode_reason(b'{"features":{"x":1}}', regressor) == "missing_label"


def test_clusterer_needs_no_label():
    spec = Spec(schema=FeatureSchema.from_list([{"name": "x"}]), labels=None, is_classifier=False, is_clusterer=True)
    assert encode_record(decode_record(b'{"features":{"x":1}}', b"m"), spec).label is None
    # A label sent anyway is ignored, whatever its type.
    assert encode_record(decode_record(b'{"features":{"x":1},"label":"a"}', b"m"), spec).label is None
