"""Log output: plain text for a terminal, JSON lines with model, version, topic, partition and offset."""

import io
import json
import logging

import pytest

from modelstore.errors import ConfigError
from streamfit.logs import JsonFormatter, TextFormatter, configure_logging, log_format_setting


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def emit(formatter, message, *args, exc_info=None, **extra):
    record = logging.getLogger("worker.loop").makeRecord(
        "worker.loop", logging.WARNING, __file__, 1, message, args, exc_info, extra=extra
    )
    return formatter.format(record)


def test_json_line_has_fields():
    line = emit(JsonFormatter(), "Rejected record %s offset %d", "flights/2", 17,
                model="flights-UA", version=12, partition="flights/2", offset=17)
    entry = json.loads(line)

    assert entry["message"] == "Rejected record flights/2 offset 17"
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "worker.loop"
    assert entry["time"].endswith("Z")
    assert entry["model"] == "flights-UA"
    assert entry["version"] == 12
    assert entry["topic"] == "flights"
    assert entry["partition"] == 2
    assert entry["offset"] == 17
    assert list(entry)[4:9] == ["model", "version", "topic", "partition", "offset"]


def test_json_line_without_fields():
    entry = json.loads(emit(JsonFormatter(), "Worker started"))

    assert set(entry) == {"time", "level", "logger", "message"}


def test_json_keeps_explicit_topic_and_other_extra():
    entry = json.loads(emit(JsonFormatter(), "x", topic="other", partition="flights/0", reason="invalid_json"))

    assert entry["topic"] == "other"
    assert entry["partition"] == 0
    assert entry["reason"] == "invalid_json"


def test_json_line_with_exception_is_one_line():
    try:
        raise ValueError("bad value")
    except ValueError:
        import sys

        line = emit(JsonFormatter(), "Refit failed", exc_info=sys.exc_info(), model="m")

    assert "\n" not in line
    entry = json.loads(line)
    assert "ValueError: bad value" in entry["exception"]
    assert entry["model"] == "m"


def test_json_encodes_unusual_values():
    from pathlib import Path

    entry = json.loads(emit(JsonFormatter(), "x", path=Path("/tmp/a"), model="m"))

    assert entry["path"] == "/tmp/a"


def test_text_line_appends_fields():
    line = emit(TextFormatter(), "Published model %s", "flights-UA", model="flights-UA", version=3)

    assert line.endswith("WARNING worker.loop: Published model flights-UA model=flights-UA version=3")


def test_text_line_quotes_spaces_and_keeps_traceback_last():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        line = emit(TextFormatter(), "Failed", exc_info=sys.exc_info(), detail="two words")

    first, _, rest = line.partition("\n")
    assert first.endswith('Failed detail="two words"')
    assert rest.startswith("Traceback")
    assert rest.rstrip().endswith("RuntimeError: boom")


def test_configure_json_output(restore_logging):
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)

    logging.getLogger("predictor.loader").info("Swapped model %s", "m", extra={"model": "m", "version": 4})
    logging.getLogger("predictor.loader").debug("not shown")

    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["version"] == 4


def test_configure_reads_environment(restore_logging, monkeypatch):
    monkeypatch.setenv("STREAMFIT_LOG_FORMAT", "JSON")
    stream = io.StringIO()
    configure_logging("WARNING", stream=stream)

    logging.getLogger("x").warning("hello")

    assert json.loads(stream.getvalue())["message"] == "hello"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: configure_logging("LOUD", "text"), "invalid log level 'LOUD'"),
        (lambda: log_format_setting("xml", {}), "invalid --log-format 'xml': use 'text' or 'json'"),
        (lambda: log_format_setting(None, {"STREAMFIT_LOG_FORMAT": "yaml"}), "invalid STREAMFIT_LOG_FORMAT 'yaml'"),
    ],
)
def test_invalid_settings_rejected(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_default_format_is_text():
    assert log_format_setting(None, {}) == "text"


def test_uvicorn_color_message_not_a_field():
    # uvicorn passes its coloured copy of the message as extra color_message.
    line = emit(TextFormatter(), "Started server process [%d]", 7, color_message="Started \x1b[36m%d\x1b[0m")
    assert line.endswith("WARNING worker.loop: Started server process [7]")
    assert "color_message" not in emit(JsonFormatter(), "Started", color_message="x")
