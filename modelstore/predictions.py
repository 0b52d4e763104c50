"""Stored predictions: the key of each prediction document and its checks.

The predictor's stream can keep each prediction in the store beside the
model, under the record's ``id`` when the record has one, else under its
source position ``topic/partition/offset``. A later prediction for the same
key replaces the earlier one, and each document expires after a set time.
"""

from __future__ import annotations

import json

from modelstore.errors import InvalidInputError

# Couchbase keys are at most 250 bytes; a model name and "::p::" take part.
MAX_KEY_BYTES = 128
DEFAULT_EXPIRY_S = 7 * 24 * 3600
MAX_EXPIRY_S = 30 * 24 * 3600


def prediction_key(record_id: object, topic: str, partition: int, offset: int) -> str:
    """Return the key of a record's prediction: its id when usable, else its source position."""
    if isinstance(record_id, (str, int)) and not isinstance(record_id, bool):
        key = str(record_id)
        if key and len(key.encode("utf-8")) <= MAX_KEY_BYTES and key.isprintable():
            return key
    return f"{topic}/{partition}/{offset}"


def check_key(key: object) -> str:
    """Return ``key`` if it can name a stored prediction, else raise InvalidInputError."""
    if not isinstance(key, str) or not key or not key.isprintable() or len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidInputError(
            f"invalid prediction key {str(key)[:80]!r}: use 1 to {MAX_KEY_BYTES} bytes of printable text"
        )
    return key


def check_expiry(expiry_s: object) -> int:
    """Return ``expiry_s`` if it is a valid lifetime in seconds, else raise InvalidInputError."""
    if isinstance(expiry_s, bool) or not isinstance(expiry_s, int) or not 1 <= expiry_s <= MAX_EXPIRY_S:
        raise InvalidInputError(
            f"invalid prediction expiry {expiry_s!r}: use whole seconds from 1 to {MAX_EXPIRY_S} (30 days)"
        )
    return expiry_s


def check_document(model: str, key: str, body: bytes) -> str:
    """Return a prediction document as text, or raise InvalidInputError unless it is a JSON object."""
    try:
        text = bytes(body).decode("utf-8")
        parsed = json.loads(text)
    except (TypeError, ValueError):
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidInputError(
            f"prediction {key!r} of model {model!r} is not a JSON object in UTF-8; "
            "store the prediction record's value as the predictor writes it"
        )
    return text
