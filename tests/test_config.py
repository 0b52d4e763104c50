import re

import pytest

from modelstore.errors import ConfigError
from streamfit.cli import main
from streamfit.config import merge_settings

DEFAULTS = {"batch_max_records": 1000, "source": None, "exit_at_end": False, "kafka_options": {}}


def test_flags_win_over_env_and_file(tmp_path):
    config = tmp_path / "streamfit.toml"
    config.write_text("[worker]\nbatch_max_records = 500\nsource = 'file:a.jsonl'\n")
    environ = {"STREAMFIT_BATCH_MAX_RECORDS": "300"}

    merged = merge_settings("worker", DEFAULTS, {"batch_max_records": None}, environ, str(config))
    assert merged == {"batch_max_records": 300, "source": "file:a.jsonl"}

    merged = merge_settings("worker", DEFAULTS, {"batch_max_records": 200}, environ, str(config))
    assert merged["batch_max_records"] == 200


def test_env_values_converted_by_default_type():
    environ = {
        "STREAMFIT_EXIT_AT_END": "yes",
        "STREAMFIT_KAFKA_OPTIONS": '{"security_protocol": "SSL"}',
    }
    merged = merge_settings("worker", DEFAULTS, {}, environ)
    assert merged == {"exit_at_end": True, "kafka_options": {"security_protocol": "SSL"}}


@pytest.mark.parametrize(
    "name, value",
    [("STREAMFIT_BATCH_MAX_RECORDS", "lots"), ("STREAMFIT_KAFKA_OPTIONS", "[1]"),
     ("STREAMFIT_EXIT_AT_END", "maybe")],
)
def test_invalid_env_value_names_variable(name, value):
    with pytest.raises(ConfigError, match=re.escape(f"{name}={value!r}")):
        merge_settings("worker", DEFAULTS, {}, {name: value})


def test_file_value_not_blamed_on_env(tmp_path):
    config = tmp_path / "streamfit.toml"
    config.write_text("[worker]\nbatch_max_records = 'lots'\n")
    merged = merge_settings("worker", DEFAULTS, {}, {}, str(config))
    assert merged == {"batch_max_records": "lots"}


def test_unknown_table_rejected(tmp_path):
    config = tmp_path / "streamfit.toml"
    config.write_text("[workers]\nbatch_max_records = 5\n")
    with pytest.raises(ConfigError, match=r"unknown tables or keys \['workers'\]"):
        merge_settings("worker", DEFAULTS, {}, {}, str(config))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        merge_settings("worker", DEFAULTS, {}, {}, str(tmp_path / "nope.toml"))


def test_cli_reports_bad_setting(capsys, monkeypatch):
    monkeypatch.setenv("STREAMFIT_BATCH_MAX_RECORDS", "lots")
    assert main(["worker", "--source", "file:x.jsonl"]) == 2
    assert "STREAMFIT_BATCH_MAX_RECORDS='lots' is invalid" in capsys.readouterr().err
