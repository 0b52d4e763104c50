"""Log output of streamfit processes: plain text for a terminal, JSON lines for a collector.

Code logs as usual, with ``logging.getLogger(__name__)`` and lazy ``%s``
arguments, and passes what a line is about through ``extra``::

    log.info("Published model %s version %d", model, version,
             extra={"model": model, "version": version})

The text format appends those values as ``key=value`` after the message.
The JSON format writes one object per line with ``time`` (UTC, ISO 8601),
``level``, ``logger`` and ``message``, then ``model``, ``version``,
``topic``, ``partition`` and ``offset`` when the record carries them, then
any other ``extra`` key. A ``partition`` given in streamfit's
``"topic/partition"`` form is split into ``topic`` and an integer
``partition``, so a log store can filter on either.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import Any, Mapping, TextIO

from modelstore.errors import ConfigError

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FIELDS = ("model", "version", "topic", "partition", "offset")
LOG_FORMAT_VARIABLE = "STREAMFIT_LOG_FORMAT"

# Attributes every LogRecord has; anything else on a record came from ``extra``.
# uvicorn adds ``color_message``, its message with terminal colour codes,
# which is not a field of the line.
_STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName", "color_message"}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Return the ``extra`` values of a record: the known fields first, in ``FIELDS`` order."""
    extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRIBUTES}
    partition = extra.get("partition")
    if isinstance(partition, str) and "/" in partition:
        topic, _, number = partition.rpartition("/")
        extra.setdefault("topic", topic)
        extra["partition"] = int(number) if number.isdigit() else number
    fields = {name: extra.pop(name) for name in FIELDS if name in extra}
    fields.update(sorted(extra.items()))
    return fields


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``, for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = record_fields(record)
        if not fields:
            return line
        # The traceback, if any, stays last, so the fields go on the first line.
        first, newline, rest = line.partition("\n")
        suffix = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return f"{first} {suffix}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str keeps a line for values JSON cannot encode (paths, enums).
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str = "INFO", log_format: str | None = None, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr by default) in ``log_format``, replacing other handlers.

    ``log_format`` None reads ``STREAMFIT_LOG_FORMAT`` and falls back to text.
    Raises ConfigError naming the value for an unknown level or format.
    """
    level_name = str(level).upper()
    if level_name not in LOG_LEVELS:
        raise ConfigError(f"invalid log level {level!r}: use one of {', '.join(LOG_LEVELS)}")
    chosen = log_format_setting(log_format)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    logging.basicConfig(level=level_name, handlers=[handler], force=True)


def log_format_setting(log_format: str | None, environ: Mapping[str, str] | None = None) -> str:
    """Return the validated log format: the argument, else ``STREAMFIT_LOG_FORMAT``, else ``text``."""
    environ = os.environ if environ is None else environ
    value = log_format if log_format is not None else environ.get(LOG_FORMAT_VARIABLE, "text")
    normalized = value.strip().lower()
    if normalized not in LOG_FORMATS:
        source = "--log-format" if log_format is not None else LOG_FORMAT_VARIABLE
        raise ConfigError(f"invalid {source} {value!r}: use 'text' or 'json'")
    return normalized


def _utc_iso(created: float) -> str:
    moment = dt.datetime.fromtimestamp(created, tz=dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or "=" in text or not text) else text
