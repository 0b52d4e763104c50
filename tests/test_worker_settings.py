"""Worker settings validation and the file source's parsing of CSV and JSON lines."""

import json

import pytest

from modelstore.errors import ConfigError
from worker.settings import FileSourceConfig, KafkaSourceConfig, WorkerSettings, parse_source
from worker.sources import FileSource, parse_cell


def test_defaults_for_kafka_source():
    settings = WorkerSettings.from_mapping({"source": "kafka://127.0.0.1:9092/flights"})
    assert settings.group_id == "streamfit-worker"
    assert settings.batch_max_records == 1000
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
