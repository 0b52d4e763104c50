"""Settings of the predictor: defaults, validation messages, CPU quota."""

from __future__ import annotations

import pytest

from modelstore.errors import ConfigError
from predictor.settings import PredictorSettings, cpu_quota_cores, mask_url_password


def test_defaults():
    settings = PredictorSettings()
    assert settings.refresh_interval_ms == 250
    assert settings.inter_op_threads == 1
    assert settings.intra_op_threads == cpu_quota_cores()
    assert settings.intra_op_threads >= 1


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("port", 70000, "port: 70000 is out of range"),
        ("refresh_interval_ms", 0, "refresh_interval_ms: 0 is out of range"),
        ("cache_max_models", "many", "cache_max_models: expected an integer, got 'many'"),
        ("max_body_bytes", 10, "max_body_bytes: 10 is out of range"),
        ("intra_op_threads", 0, "intra_op_threads: 0 is out of range"),
        ("inter_op_threads", True, "inter_op_threads: expected an integer, got True"),
        ("store", "", "store: expected a store URL"),
    ],
)
def test_invalid_values_are_named(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        PredictorSettings.from_mapping({key: value})


def test_from_mapping_converts_strings():
    settings = PredictorSettings.from_mapping(
        {"port": "9000", "refresh_interval_ms": " 100 ", "store": "sqlite:///x.db"}
    )
    assert settings.port == 9000
    assert settings.refresh_interval_ms == 100


def test_unknown_keys_rejected():
    with pytest.raises(ConfigError, match=r"unknown predictor settings \['refresh_ms'\]"):
        PredictorSettings.from_mapping({"refresh_ms": 5})
    with pytest.raises(ConfigError, match="one process per container"):
        PredictorSettings.from_mapping({"workers": 4})


@pytest.mark.parametrize(
    "content, expected",
    [
        ("max 100000\n", None),
        ("150000 100000\n", 2),
        ("50000 100000\n", 1),
        ("100000000 100000\n", None),
        ("garbage", None),
    ],
)
def test_cpu_quota_from_cgroup_file(tmp_path, content, expected):
    path = tmp_path / "cpu.max"
    path.write_text(content)
    unlimited = cpu_quota_cores(tmp_path / "absent")
    quota = cpu_quota_cores(path)
    assert quota == (min(expected, unlimited) if expected else unlimited)


def test_public_dict_masks_password():
    settings = PredictorSettings(store="couchbase://app:s3cret@db.internal/models?scope=x")
    assert "s3cret" not in str(settings.public_dict())
    assert mask_url_password("couchbase://app:s3cret@h/b") == "couchbase://app:***@h/b"
    assert mask_url_password("sqlite:///models.db") == "sqlite:///models.db"


SOURCE = "kafka://127.0.0.1:9092/features"


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"source": SOURCE}, "needs output_topic"),
        ({"output_topic": "out"}, "output_topic='out' needs a source"),
        ({"stream_dead_letter_topic": "dead"}, "needs a source"),
        ({"source": "kafka://127.0.0.1:9092", "output_topic": "out"}, "expected kafka://host:port"),
        ({"source": "http://127.0.0.1:9092/t", "output_topic": "out"}, "expected kafka://host:port"),
        ({"source": "kafka://localhost/t", "output_topic": "out"}, "'localhost' is not host:port"),
        ({"source": "kafka://127.0.0.1:9092/bad topic", "output_topic": "out"}, "not a Kafka topic name"),
        ({"source": SOURCE, "output_topic": "features"}, "also a source topic"),
        ({"source": SOURCE, "output_topic": "out", "stream_dead_letter_topic": "out"}, "both 'out'"),
        ({"source": SOURCE, "output_topic": "out", "stream_model": "bad:name"}, "stream_model: invalid model name"),
        ({"cache_max_bytes": 1000}, "cache_max_bytes: 1000 is out of range"),
        ({"load_wait_ms": 0}, "load_wait_ms: 0 is out of range"),
    ],
)
def test_stream_and_cache_settings_checked(values, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        PredictorSettings.from_mapping(values)


def test_source_credentials_never_echoed():
    with pytest.raises(ConfigError) as error:
        PredictorSettings(source="kafka://user:s3cret@127.0.0.1:9092/t", output_topic="out")
    assert "s3cret" not in str(error.value)
    assert "user information" in str(error.value)


def test_stream_settings_from_strings():
    settings = PredictorSettings.from_mapping({
        "source": "kafka://127.0.0.1:9092,127.0.0.1:9093/a,b", "output_topic": "predictions",
        "stream_batch_records": "50",
    })
    assert settings.stream_batch_records == 50
    assert settings.stream_group_id == "streamfit-predictor"
