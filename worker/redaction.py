"""Masking of secrets in every log record of the process.

kafka-python 3.0 logs each request at DEBUG level, and its SASL
authenticate request carries the password: with ``--log-level DEBUG`` the
password would reach the log. The worker therefore registers its secret
values here, and a log record factory replaces them with ``***`` in every
record's message, whatever logger or handler it goes to.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable

MASK = "***"

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()
_installed = False


def redact_in_logs(values: Iterable[str]) -> None:
    """Mask ``values`` in all log records created from now on, for the life of the process."""
    global _secrets, _installed
    forms = set()
    for value in values:
        if not value:
            continue
        forms.add(value)
        # Requests are logged as bytes reprs, where non-ASCII characters
        # and quotes appear escaped.
        forms.add(repr(value.encode("utf-8"))[2:-1])
    with _lock:
        # Longer forms first, so that a secret containing another is masked whole.
        _secrets = tuple(sorted(set(_secrets) | forms, key=len, reverse=True))
        if not _installed:
            logging.setLogRecordFactory(_redacting_factory(logging.getLogRecordFactory()))
            _installed = True


def _redacting_factory(previous):
    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        secrets = _secrets
        if not secrets:
            return record
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is reported by the handler, as without redaction
            return record
        if any(secret in message for secret in secrets):
            for secret in secrets:
                message = message.replace(secret, MASK)
            record.msg = message
            record.args = None
        return record

    return factory
