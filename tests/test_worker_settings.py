"""Worker settings validation and the file source's parsing of CSV and JSON lines."""

import json

import pytest

from modelstore.errors import ConfigError
from worker.settings import FileSourceConfig, KafkaSourceConfig, WorkerSettings, parse_source
from worker.sources import FileSource, parse_cell


def test_defaults_for_kafka_source():
    settings = WorkerSettings.from_mapping({"source": "kafka://127.0.0.1:9092/flights"})
    assert settings.group_id == "streamfit-worker"
    assert settings.batch_max_records is None
    assert settings.batch_size(None) == 1000
    assert settings.batch_max_wait_ms == 1000
    assert settings.max_record_bytes == 1024 * 1024
    assert settings.metrics_port == 9101
    assert settings.stops_at_end() is False


def test_file_source_stops_at_end_by_default(tmp_path):
    settings = WorkerSettings.from_mapping({"source": f"file:{tmp_path}/a.jsonl"})
    assert settings.stops_at_end() is True
    settings = WorkerSettings.from_mapping({"source": f"file:{tmp_path}/a.jsonl", "exit_at_end": False})
    assert settings.stops_at_end() is False


def test_parse_kafka_source():
    parsed = parse_source("kafka://10.0.0.1:9092,10.0.0.2:9093/flights,weather")
    assert parsed == KafkaSourceConfig(("10.0.0.1:9092", "10.0.0.2:9093"), ("flights", "weather"))


def test_parse_file_source():
    assert parse_source("file:data/f.csv") == FileSourceConfig("data/f.csv", "csv")
    assert parse_source("file:f.ndjson") == FileSourceConfig("f.ndjson", "jsonl")


@pytest.mark.parametrize(
    "source, match",
    [
        ("kafka://127.0.0.1:9092", "kafka://host:port"),
        ("kafka:///flights", "kafka://host:port"),
        ("kafka://broker/flights", "invalid broker 'broker'"),
        ("file:data.parquet", "must end in .csv"),
        ("http://x/y", "kafka://host:port/topic or file:PATH"),
    ],
)
def test_invalid_source_rejected(source, match):
    with pytest.raises(ConfigError, match=match):
        WorkerSettings.from_mapping({"source": source})


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("batch_max_records", 0, "invalid batch_max_records 0: expected an integer from 1"),
        ("batch_max_records", "10", "invalid batch_max_records '10'"),
        ("batch_max_wait_ms", -1, "invalid batch_max_wait_ms -1"),
        ("max_record_bytes", True, "invalid max_record_bytes True"),
        ("metrics_port", 70000, "invalid metrics_port 70000"),
        ("model", "a/b", "invalid setting model"),
        ("model_spec", "/no/such/spec.json", "no such file"),
        ("kafka_options", {"enable_auto_commit": True}, "kafka_options.enable_auto_commit cannot be set"),
        ("kafka_options", {"fetch_speed": 3}, "unknown kafka_options key 'fetch_speed'"),
        ("exit_at_end", "maybe", "invalid exit_at_end 'maybe'"),
        ("exit_at_end", 3, "invalid exit_at_end 3"),
    ],
)
def test_invalid_values_rejected(key, value, match):
    with pytest.raises(ConfigError, match=match):
        WorkerSettings.from_mapping({"source": "kafka://127.0.0.1:9092/t", key: value})


def test_unknown_key_rejected():
    with pytest.raises(ConfigError, match=r"unknown worker settings \['batch_size'\]"):
        WorkerSettings.from_mapping({"source": "kafka://127.0.0.1:9092/t", "batch_size": 5})


def test_missing_source_rejected():
    with pytest.raises(ConfigError, match="missing setting 'source'"):
        WorkerSettings.from_mapping({})


def test_dead_letter_rules():
    with pytest.raises(ConfigError, match="needs a Kafka source"):
        WorkerSettings.from_mapping({"source": "file:a.jsonl", "dead_letter_topic": "dlq"})
    with pytest.raises(ConfigError, match="also a source topic"):
        WorkerSettings.from_mapping({"source": "kafka://127.0.0.1:9092/t,dlq", "dead_letter_topic": "dlq"})


def test_security_options_accepted():
    settings = WorkerSettings.from_mapping({
        "source": "kafka://127.0.0.1:9092/t",
        "kafka_options": {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"},
    })
    assert settings.kafka_options["security_protocol"] == "SASL_SSL"


@pytest.mark.parametrize(
    "cell, expected",
    [("12", 12), ("-3", -3), ("1.5", 1.5), ("2e3", 2000.0), (".5", 0.5), ("UA", "UA"), ("1.2.3", "1.2.3")],
)
def test_parse_cell(cell, expected):
    value = parse_cell(cell)
    assert value == expected
    assert type(value) is type(expected)


def read_all(source):
    records = []
    while not source.at_end:
        records.extend(source.poll(0))
    source.close()
    return records


def test_jsonl_offsets_are_line_numbers(tmp_path):
    path = tmp_path / "flights.jsonl"
    path.write_bytes(b'{"a":1}\n\xff\xfe\n\n{"a":2}\r\n')
    source = FileSource(FileSourceConfig(str(path), "jsonl"))
    records = read_all(source)
    assert [r.partition for r in records] == ["file:flights.jsonl/0"] * 4
    assert [r.offset for r in records] == [0, 1, 2, 3]
    assert [r.value for r in records] == [b'{"a":1}', b"\xff\xfe", b"", b'{"a":2}']


def test_csv_rows_become_records(tmp_path):
    path = tmp_path / "flights.csv"
    path.write_text(
        "month,carrier,label,model\n"
        "1,UA,1,m1\n"
        "2,,0,m1\n"
        "3,AA\n"
        "nan,AA,1,m2\n"
        "4,AA,,m2\n"
    )
    source = FileSource(FileSourceConfig(str(path), "csv"))
    records = read_all(source)
    assert [r.offset for r in records] == [0, 1, 2, 3, 4]
    assert json.loads(records[0].value) == {"features": {"month": 1, "carrier": "UA"}, "label": 1, "model": "m1"}
    assert json.loads(records[1].value) == {"features": {"month": 2}, "label": 0, "model": "m1"}
    assert records[2].value is None
    assert records[2].rejection.reason == "wrong_width"
    assert b"NaN" in records[3].value
    assert "label" not in json.loads(records[4].value)


def test_csv_label_column_setting(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("x,delayed\n1,1\n")
    with pytest.raises(ConfigError, match="no column 'label'"):
        FileSource(FileSourceConfig(str(path), "csv"))
    source = FileSource(FileSourceConfig(str(path), "csv"), label_column="delayed")
    assert json.loads(read_all(source)[0].value) == {"features": {"x": 1}, "label": 1}


def test_csv_undecodable_cell_rejected(tmp_path):
    path = tmp_path / "f.csv"
    path.write_bytes(b"x,label\n\xff,1\n2,0\n")
    records = read_all(FileSource(FileSourceConfig(str(path), "csv")))
    assert records[0].rejection.reason == "not_utf8"
    assert json.loads(records[1].value) == {"features": {"x": 2}, "label": 0}


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot open source file"):
        FileSource(FileSourceConfig(str(tmp_path / "none.jsonl"), "jsonl"))


def kafka_settings(**values):
    return WorkerSettings.from_mapping({"source": "kafka://127.0.0.1:9092/t", **values})


def test_buffer_bound_below_batch_rejected():
    with pytest.raises(ConfigError, match="max_buffered_records 500 is below batch_max_records 1000"):
        kafka_settings(max_buffered_records=500, batch_max_records=1000)


def test_batch_size_order():
    # The worker's setting, else the model spec's batch.max_records, else 1000.
    assert kafka_settings().batch_size(50) == 50
    assert kafka_settings(batch_max_records=200).batch_size(50) == 200
    assert kafka_settings(batch_max_records=200).batch_size(None) == 200
    # A spec's batch larger than the buffer bound is cut to it, so it can fill.
    assert kafka_settings(max_buffered_records=500).batch_size(2000) == 500


def test_batch_size_from_environment(monkeypatch):
    from streamfit.cli import _load_settings

    monkeypatch.setenv("STREAMFIT_BATCH_MAX_RECORDS", "200")
    settings, _, _ = _load_settings("worker", WorkerSettings, ["--source", "file:x.jsonl"])
    assert settings.batch_max_records == 200

    monkeypatch.setenv("STREAMFIT_BATCH_MAX_RECORDS", "lots")
    with pytest.raises(ConfigError, match="STREAMFIT_BATCH_MAX_RECORDS='lots' is invalid: expected a whole number"):
        _load_settings("worker", WorkerSettings, ["--source", "file:x.jsonl"])


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("shutdown_timeout_ms", -1, "invalid shutdown_timeout_ms -1"),
        ("max_conflict_attempts", 0, "invalid max_conflict_attempts 0"),
        ("learner_cache_size", 0, "invalid learner_cache_size 0"),
        ("learner_cache_bytes", 1000, "invalid learner_cache_bytes 1000"),
    ],
)
def test_new_limits_validated(key, value, match):
    with pytest.raises(ConfigError, match=match):
        kafka_settings(**{key: value})


def test_secret_from_file_and_env(tmp_path, monkeypatch):
    secret = tmp_path / "password"
    secret.write_text("file-secret\n")
    monkeypatch.setenv("KAFKA_SSL_KEY_PASSWORD", "env-secret")
    settings = kafka_settings(kafka_options={
        "security_protocol": "SASL_SSL",
        "sasl_plain_password_file": str(secret),
        "ssl_password_env": "KAFKA_SSL_KEY_PASSWORD",
    })
    options = settings.consumer_options()
    assert options["sasl_plain_password"] == "file-secret"
    assert options["ssl_password"] == "env-secret"
    assert "sasl_plain_password_file" not in options
    assert options["security_protocol"] == "SASL_SSL"


def test_secret_never_in_repr(tmp_path):
    settings = kafka_settings(kafka_options={"sasl_plain_password": "literal-secret", "sasl_mechanism": "PLAIN"})
    assert "literal-secret" not in repr(settings)
    assert "literal-secret" not in str(settings)
    assert "'sasl_plain_password': '***'" in repr(settings)
    assert "'sasl_mechanism': 'PLAIN'" in repr(settings)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"sasl_plain_password_env": "STREAMFIT_TEST_NO_SUCH_VARIABLE"},
         "names the environment variable STREAMFIT_TEST_NO_SUCH_VARIABLE, which is not set"),
        ({"sasl_plain_password_file": "/no/such/secret"}, r"cannot read '/no/such/secret'"),
        ({"sasl_plain_password": "a", "sasl_plain_password_env": "X"}, "sets sasl_plain_password twice"),
        ({"bootstrap_servers_env": "X"}, "kafka_options.bootstrap_servers_env cannot be set"),
        ({"partition_assignment_strategy": ["fastest"]}, "invalid kafka_options.partition_assignment_strategy"),
        ({"partition_assignment_strategy": ["range", "cooperative-sticky"]}, "cannot mix cooperative-sticky"),
    ],
)
def test_invalid_kafka_options_rejected(options, match):
    with pytest.raises(ConfigError, match=match):
        kafka_settings(kafka_options=options)


def test_secret_error_hides_value(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty") as info:
        kafka_settings(kafka_options={"ssl_password_file": str(empty)})
    assert str(empty) in str(info.value)


def test_consumer_defaults_and_assignors():
    from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
    from kafka.coordinator.assignors.range import RangePartitionAssignor

    options = kafka_settings().consumer_options()
    assert options["partition_assignment_strategy"] == (CooperativeStickyAssignor,)
    assert options["max_partition_fetch_bytes"] == 16 * 1024
    options = kafka_settings(kafka_options={"partition_assignment_strategy": ["range"],
                                            "max_partition_fetch_bytes": 1024 * 1024}).consumer_options()
    assert options["partition_assignment_strategy"] == (RangePartitionAssignor,)
    assert options["max_partition_fetch_bytes"] == 1024 * 1024


def test_learner_cache_fits_memory_bound():
    from worker.startup import estimate_learner_bytes, learner_cache_size
    from trainer.spec import ModelSpec

    spec = {"estimator": "SGDClassifier", "params": {"loss": "log_loss"},
            "features": [{"name": f"f{i}"} for i in range(1000)], "labels": [0, 1]}
    per_learner = estimate_learner_bytes(ModelSpec.from_dict(spec))
    # 1000 float64 columns: 8 bytes each for the coefficients and the scaler's three statistics.
    assert per_learner > 32_000
    settings = kafka_settings(learner_cache_size=1000, learner_cache_bytes=64 * per_learner)
    assert learner_cache_size(settings, spec) == 64
    assert learner_cache_size(settings, None) == 1000
