"""Bodies, errors and limits of the predictor's HTTP responses."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from modelstore.errors import InvalidInputError, ModelNotFound, StoreError, VersionNotFound
from modelstore.names import MAX_NAME_LENGTH

from predictor.loader import LoadedModel
from predictor.protocol import RequestError
from predictor.sessions import NotServable

logger = logging.getLogger("predictor.app")

STORE_WARNING_INTERVAL_S = 60.0
MAX_ERROR_CHARS = 1000
# Seconds a client should wait before retrying a 503.
RETRY_AFTER_S = 1
# The model name of a path under /v2/models/ or /v1/models/, for the
# errors of paths that match no route.
MODEL_PATH = re.compile(r"^/v[12]/models/([^/]+)")


class ErrorResponses:
    """Maps exceptions of a model request to JSON error responses; rate-limits store warnings."""

    def __init__(self) -> None:
        self._store_warned_at = float("-inf")

    def response(
        self, exc: Exception, name: str, version: str | None, resolved: list[LoadedModel]
    ) -> Response:
        # The path parts are echoed back cut to size, since they may be invalid.
        body: dict[str, Any] = {"error": str(exc), "model": name[:MAX_NAME_LENGTH]}
        if resolved:
            body["version"] = resolved[0].version
        elif version is not None:
            body["version"] = version[:MAX_NAME_LENGTH]
        headers = {}

        if isinstance(exc, RequestError):
            status = exc.status
            if exc.field is not None:
                # An unknown key of the body is named as the field.
                body["field"] = exc.field[:MAX_NAME_LENGTH]
            if exc.reason is not None:
                body["reason"] = exc.reason
        elif isinstance(exc, InvalidInputError):
            status = 400
        elif isinstance(exc, ModelNotFound):
            status = 404
            body["error"] = f"model {name!r} not found in the model store"
        elif isinstance(exc, VersionNotFound):
            status = 404
        elif isinstance(exc, NotServable):
            # The public message leaves out the store's message; the session
            # cache has logged the full one.
            status = 503
            body["error"] = exc.public
            if exc.retriable:
                headers["Retry-After"] = str(RETRY_AFTER_S)
        elif isinstance(exc, StoreError):
            # The store's message names internal hosts and paths, so the
            # client gets a summary and the log gets the message.
            status = 503
            headers["Retry-After"] = str(RETRY_AFTER_S)
            body["error"] = f"the model store is unavailable ({type(exc).__name__}); retry later"
            now = time.monotonic()
            if now - self._store_warned_at >= STORE_WARNING_INTERVAL_S:
                self._store_warned_at = now
                logger.warning("request for model %s failed: %s (logged once a minute)", name, exc)
        else:
            logger.exception("request for model %s failed", name)
            status = 500
            body["error"] = f"internal error of the predictor: {type(exc).__name__}"
        return json_response(body, status, headers)


def json_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # Messages quote the offending value, which may be megabytes long.
    error = body.get("error")
    if isinstance(error, str) and len(error) > MAX_ERROR_CHARS:
        body["error"] = error[:MAX_ERROR_CHARS] + "... (message cut)"
    return Response(dumps(body), status_code=status, media_type="application/json", headers=headers)


def route_not_found(path: str, method: str, status: int, allowed: str | None) -> dict[str, Any]:
    """Build the body of a 404 or 405 for a path that no route serves."""
    if status == 405:
        message = f"method {method} is not allowed on {path[:200]!r}; allowed: {allowed}"
    else:
        message = (
            f"no route {path[:200]!r}; the routes are listed in the OpenAPI document at /openapi.json"
        )
    body: dict[str, Any] = {"error": message}
    match = MODEL_PATH.match(path)
    if match:
        body["model"] = match.group(1)[:MAX_NAME_LENGTH]
    return body


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"invalid Content-Length header {declared[:20]!r}")
        if int(declared) > limit:
            raise RequestError(
                413, f"the body has {int(declared)} bytes; the maximum is {limit} (max_body_bytes)"
            )

    # A chunked body has no Content-Length, so the limit is also enforced
    # while reading.
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(
                413, f"the body exceeds the maximum of {limit} bytes (max_body_bytes)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def dumps(body: dict[str, Any]) -> bytes:
    # ensure_ascii (the default) escapes a lone surrogate such as \ud800,
    # which a JSON string may carry and UTF-8 cannot encode.
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
