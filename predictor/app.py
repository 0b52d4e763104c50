"""HTTP routes of the predictor: Open Inference Protocol V2, a simple JSON route, metrics.

Every response about a model names the model and, once a version was
resolved, the version. Input errors are 4xx responses with an ``error``
message naming the field. Only a fault of the predictor itself is a 500.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from typing import Any, AsyncIterator, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelstore import open_store
from modelstore.base import ModelStore
from modelstore.errors import InvalidInputError, ModelNotFound, StoreError, VersionNotFound
from modelstore.names import MAX_NAME_LENGTH, validate_model_name

from predictor import protocol
from predictor.loader import LoadedModel
from predictor.metrics import UNKNOWN_MODEL, PredictorMetrics
from predictor.protocol import RequestError
from predictor.refresh import HeadWatcher
from predictor.sessions import NotServable, SessionCache
from predictor.settings import PredictorSettings

logger = logging.getLogger(__name__)

_VERSION = re.compile(r"[0-9]{1,9}")
STORE_WARNING_INTERVAL_S = 60.0
MAX_ERROR_CHARS = 1000


class Predictor:
    """State of one predictor process: store, session cache, head watcher, metrics.

    Nothing here opens the store or builds a session before ``start``, which
    the app's lifespan calls in the serving process.
    """

    def __init__(
        self,
        settings: PredictorSettings,
        metrics: PredictorMetrics,
        store: ModelStore | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self._given_store = store
        self.store: ModelStore | None = None
        self.cache: SessionCache | None = None
        self.watcher: HeadWatcher | None = None

    def start(self) -> None:
        self.store = self._given_store or open_store(self.settings.store)
        self.cache = SessionCache(self.store, self.settings, self.metrics)
        self.watcher = HeadWatcher(self.store, self.cache, self.settings.refresh_interval_ms)
        logger.info(
            "onnxruntime sessions use intra_op_threads=%d inter_op_threads=%d; "
            "refresh_interval_ms=%d, cache_max_models=%d",
            self.settings.intra_op_threads, self.settings.inter_op_threads,
            self.settings.refresh_interval_ms, self.settings.cache_max_models,
        )
        self.watcher.start()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.store is not None and self._given_store is None:
            self.store.close()

    @property
    def ready(self) -> bool:
        return self.watcher is not None and self.watcher.ready.is_set()

    def resolve(self, name: str, version: str | None) -> LoadedModel:
        if version is None:
            return self.cache.latest(name)
        return self.cache.pinned(name, _parse_version(version))


def create_app(
    settings: PredictorSettings,
    *,
    store: ModelStore | None = None,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """Build the ASGI app; the store opens and the watcher starts in its lifespan.

    ``store`` is used instead of opening ``settings.store`` (the caller
    keeps ownership); ``registry`` defaults to a fresh CollectorRegistry.
    """
    metrics = PredictorMetrics(registry if registry is not None else CollectorRegistry())
    predictor = Predictor(settings, metrics, store)
    routes = _Routes(predictor)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(predictor.start)
        try:
            yield
        finally:
            await run_in_threadpool(predictor.stop)

    app = Starlette(
        routes=[
            Route("/v2/health/live", routes.live, methods=["GET"]),
            Route("/v2/health/ready", routes.ready, methods=["GET"]),
            Route("/v2/models/{name}", routes.metadata, methods=["GET"]),
            Route("/v2/models/{name}/versions/{version}", routes.metadata, methods=["GET"]),
            Route("/v2/models/{name}/ready", routes.model_ready, methods=["GET"]),
            Route("/v2/models/{name}/versions/{version}/ready", routes.model_ready, methods=["GET"]),
            Route("/v2/models/{name}/infer", routes.infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", routes.infer, methods=["POST"]),
            Route("/v1/models/{name}/predict", routes.predict, methods=["POST"]),
            Route("/v1/models/{name}/versions/{version}/predict", routes.predict, methods=["POST"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.predictor = predictor
    app.state.metrics = metrics
    return app


class _Routes:
    def __init__(self, predictor: Predictor):
        self.p = predictor
        self._store_warned_at = float("-inf")

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.p.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        if self.p.cache is not None:
            self.p.cache.update_gauges()
        return Response(generate_latest(self.p.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def metadata(self, request: Request) -> Response:
        def build_body(model: LoadedModel, body: bytes) -> dict[str, Any]:
            return protocol.v2_metadata(model)

        return await self._model_request(request, build_body, read_body=False)

    async def model_ready(self, request: Request) -> Response:
        def build_body(model: LoadedModel, body: bytes) -> dict[str, Any]:
            return {"name": model.name, "version": str(model.version), "ready": True}

        return await self._model_request(request, build_body, read_body=False)

    async def infer(self, request: Request) -> Response:
        def build_body(model: LoadedModel, body: bytes) -> dict[str, Any]:
            payload = protocol.parse_json(body)
            rows, requested = protocol.decode_v2(payload, model, self.p.settings.max_batch_rows)
            arrays = model.predict(rows)
            protocol.check_finite(arrays)
            self.p.metrics.rows_predicted.labels(model=model.name).inc(len(rows))
            request_id = payload.get("id")
            return protocol.v2_response(model, arrays, requested, request_id)

        return await self._model_request(request, build_body, route="v2_infer")

    async def predict(self, request: Request) -> Response:
        def build_body(model: LoadedModel, body: bytes) -> dict[str, Any]:
            payload = protocol.parse_json(body)
            rows, ignored = protocol.decode_v1(payload, model, self.p.settings.max_batch_rows)
            arrays = model.predict(rows)
            protocol.check_finite(arrays)
            self.p.metrics.rows_predicted.labels(model=model.name).inc(len(rows))
            return protocol.v1_response(model, arrays, ignored)

        return await self._model_request(request, build_body, route="v1_predict")

    async def _model_request(
        self,
        request: Request,
        build_body: Callable[[LoadedModel, bytes], dict[str, Any]],
        read_body: bool = True,
        route: str | None = None,
    ) -> Response:
        started = time.perf_counter()
        name = request.path_params["name"]
        version = request.path_params.get("version")
        resolved: list[LoadedModel] = []

        def work(body: bytes) -> bytes:
            # Runs on a worker thread: the store read of a first load, the
            # encoding and the inference all block.
            model = self.p.resolve(name, version)
            resolved.append(model)
            return _dumps(build_body(model, body))

        known = False
        try:
            validate_model_name(name)
            body = await _read_body(request, self.p.settings.max_body_bytes) if read_body else b""
            response = Response(await run_in_threadpool(work, body), media_type="application/json")
        except Exception as exc:
            # A version that cannot be served is known to exist, unless the
            # store failed before confirming that.
            known = isinstance(exc, NotServable) and not exc.store_failed
            response = self._error(exc, name, version, resolved)

        # Only names of models found in the store become label values, so
        # made-up names cannot add series.
        label = name if resolved or known else UNKNOWN_MODEL
        self.p.metrics.requests.labels(model=label, status=str(response.status_code)).inc()
        if route is not None:
            self.p.metrics.request_duration.labels(route=route).observe(time.perf_counter() - started)
        return response

    def _error(
        self, exc: Exception, name: str, version: str | None, resolved: list[LoadedModel]
    ) -> Response:
        # The path parts are echoed back cut to size, since they may be invalid.
        body: dict[str, Any] = {"error": str(exc), "model": name[:MAX_NAME_LENGTH]}
        if resolved:
            body["version"] = resolved[0].version
        elif version is not None:
            body["version"] = version[:20]

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
        elif isinstance(exc, StoreError):
            # The store's message names internal hosts and paths, so the
            # client gets a summary and the log gets the message.
            status = 503
            body["error"] = f"the model store is unavailable ({type(exc).__name__}); retry later"
            now = time.monotonic()
            if now - self._store_warned_at >= STORE_WARNING_INTERVAL_S:
                self._store_warned_at = now
                logger.warning("request for model %s failed: %s (logged once a minute)", name, exc)
        else:
            logger.exception("request for model %s failed", name)
            status = 500
            body["error"] = f"internal error of the predictor: {type(exc).__name__}"
        # Messages quote the offending value, which may be megabytes long.
        if len(body["error"]) > MAX_ERROR_CHARS:
            body["error"] = body["error"][:MAX_ERROR_CHARS] + "... (message cut)"
        # _dumps escapes to ASCII, because a JSON string may carry a lone
        # surrogate (the escape \ud800), which has no UTF-8 encoding.
        return Response(_dumps(body), status_code=status, media_type="application/json")


def _parse_version(raw: str) -> int:
    if not _VERSION.fullmatch(raw):
        raise RequestError(
            400, f"invalid version {raw[:20]!r} in the path: expected a version number such as 3",
            field="version",
        )
    return int(raw)


async def _read_body(request: Request, limit: int) -> bytes:
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


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
