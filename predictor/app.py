"""HTTP routes of the predictor: Open Inference Protocol V2, a simple JSON route, metrics.

Every response about a model names the model and, once a version was
resolved, the version and its age. The version segment of a path is a
version number (``versions/3``) or an alias of the model's head
(``versions/production``): aliases start with a letter, so the two never
collide, and OIP clients that only know ``versions/{v}`` reach aliases too.
Input errors are 4xx responses with an ``error`` message naming the field.
Only a fault of the predictor itself is a 500.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import re
import time
from typing import Any, AsyncIterator, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelstore import open_store
from modelstore.base import ModelStore
from modelstore.errors import StoreError
from modelstore.names import validate_alias_name, validate_model_name

from predictor import protocol, responses
from predictor import _http
from predictor._http import ErrorResponses, dumps, json_response, route_not_found
from predictor.loader import LoadedModel
from predictor.metrics import UNKNOWN_MODEL, PredictorMetrics
from predictor.openapi import openapi_document
from predictor.protocol import RequestError
from predictor.refresh import HeadWatcher
from predictor.sessions import NotServable, SessionCache
from predictor.settings import PredictorSettings, mask_url_password

logger = logging.getLogger(__name__)

_VERSION = re.compile(r"[0-9]{1,9}")
# Requests with bodies up to this size (about 100 rows) run on the event
# loop when their session is cached. Larger ones and first loads run on a
# worker thread.
INLINE_MAX_BODY_BYTES = 16 * 1024


def _package_version() -> str:
    try:
        return importlib.metadata.version("streamfit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class Predictor:
    """State of one predictor process: store, session cache, head watcher, stream, metrics.

    Nothing here opens the store, builds a session or connects to Kafka
    before ``start``, which the app's lifespan calls in the serving process.
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
        self.stream = None

    def start(self) -> None:
        self.store = self._given_store or open_store(self.settings.store)
        self.cache = SessionCache(self.store, self.settings, self.metrics)
        self.watcher = HeadWatcher(
            self.store, self.cache, self.settings.refresh_interval_ms, self.metrics
        )
        logger.info(
            "onnxruntime sessions use intra_op_threads=%d inter_op_threads=%d; "
            "refresh_interval_ms=%d, cache_max_models=%d, cache_max_pinned=%d, cache_max_bytes=%d",
            self.settings.intra_op_threads, self.settings.inter_op_threads,
            self.settings.refresh_interval_ms, self.settings.cache_max_models,
            self.settings.cache_max_pinned, self.settings.cache_max_bytes,
        )
        self.watcher.start()
        self._note_empty_store()
        if self.settings.source is not None:
            # Imported here, so an HTTP-only predictor never loads the Kafka client.
            from predictor.streaming import StreamPredictor

            self.stream = StreamPredictor(self.settings, self.cache, self.metrics, self.store)
            self.stream.start()

    def _note_empty_store(self) -> None:
        # A typo in a SQLite path creates a new, empty store, so an empty store is logged at start.
        try:
            empty = not self.store.list_models()
        except StoreError:
            return  # The head watcher reports an unreachable store.
        if empty:
            logger.warning(
                "the model store %s has no models yet; predict requests return 404 until a worker or "
                "`streamfit models create` adds one (check the store URL if models were expected)",
                mask_url_password(self.settings.store),
            )

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.store is not None and self._given_store is None:
            self.store.close()

    @property
    def ready(self) -> bool:
        store_ready = self.watcher is not None and self.watcher.ready.is_set()
        return store_ready and (self.stream is None or self.stream.alive)

    def resolve(self, name: str, selector: str | None) -> tuple[LoadedModel, str | None]:
        """Return the session for the latest version, a version number or an alias, and the alias."""
        if selector is None:
            return self.cache.latest(name), None
        if selector[:1].isalpha():
            alias = validate_alias_name(selector)
            return self.cache.aliased(name, alias), alias
        return self.cache.pinned(name, _parse_version(selector)), None

    def resolve_cached(self, name: str, selector: str | None) -> tuple[LoadedModel, str | None] | None:
        """Return the cached session and alias like ``resolve``, or None when it needs a load."""
        if selector is None:
            key: str | int | None = None
        elif selector[:1].isalpha():
            key = validate_alias_name(selector)
        else:
            key = _parse_version(selector)
        model = self.cache.cached(name, key)
        return None if model is None else (model, key if isinstance(key, str) else None)


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
            Route(path, getattr(routes, handler), methods=[method])
            for path, method, handler in ROUTES
        ],
        exception_handlers={HTTPException: routes.http_error},
        lifespan=lifespan,
    )
    app.state.predictor = predictor
    app.state.metrics = metrics
    return app


# Path, method and handler of every route; the OpenAPI document describes
# exactly these.
ROUTES = (
    ("/v2", "GET", "server_metadata"),
    ("/v2/health/live", "GET", "live"),
    ("/v2/health/ready", "GET", "ready"),
    ("/v2/models/{name}", "GET", "metadata"),
    ("/v2/models/{name}/versions/{version}", "GET", "metadata"),
    ("/v2/models/{name}/ready", "GET", "model_ready"),
    ("/v2/models/{name}/versions/{version}/ready", "GET", "model_ready"),
    ("/v2/models/{name}/infer", "POST", "infer"),
    ("/v2/models/{name}/versions/{version}/infer", "POST", "infer"),
    ("/v1/models/{name}/predict", "POST", "predict"),
    ("/v1/models/{name}/versions/{version}/predict", "POST", "predict"),
    ("/openapi.json", "GET", "openapi"),
    ("/metrics", "GET", "metrics"),
)


class _Routes:
    def __init__(self, predictor: Predictor):
        self.p = predictor
        self._errors = ErrorResponses()
        self._openapi = dumps(openapi_document(predictor.settings, _package_version()))
        self._server = responses.server_metadata(_package_version())

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(self._server)

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.p.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def openapi(self, request: Request) -> Response:
        return Response(self._openapi, media_type="application/json")

    async def metrics(self, request: Request) -> Response:
        if self.p.cache is not None:
            self.p.cache.update_gauges()
        return Response(generate_latest(self.p.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        # Starlette raises HTTPException for a path that no route serves
        # (404) and for a method that the route does not take (405).
        allowed = (exc.headers or {}).get("Allow")
        body = route_not_found(request.url.path, request.method, exc.status_code, allowed)
        self.p.metrics.requests.labels(model=UNKNOWN_MODEL, status=str(exc.status_code)).inc()
        return json_response(body, exc.status_code, exc.headers)

    async def metadata(self, request: Request) -> Response:
        def build_body(model: LoadedModel, alias: str | None, body: bytes) -> dict[str, Any]:
            head = self.p.cache.known_head(model.name)
            return responses.v2_metadata(model, head.aliases if head else {}, alias)

        return await self._model_request(request, build_body, read_body=False)

    async def model_ready(self, request: Request) -> Response:
        def build_body(model: LoadedModel, alias: str | None, body: bytes) -> dict[str, Any]:
            return {
                "name": model.name,
                "version": str(model.version),
                "ready": True,
                "version_age_seconds": responses.version_age(model),
            }

        return await self._model_request(request, build_body, read_body=False)

    async def infer(self, request: Request) -> Response:
        def build_body(model: LoadedModel, alias: str | None, body: bytes) -> dict[str, Any]:
            payload = protocol.parse_json(body)
            rows, requested = protocol.decode_v2(payload, model, self.p.settings.max_batch_rows)
            arrays = model.predict(rows)
            protocol.check_finite(arrays)
            self.p.metrics.rows_predicted.labels(model=model.name).inc(len(rows))
            request_id = payload.get("id")
            return responses.v2_response(model, arrays, requested, request_id, alias)

        return await self._model_request(request, build_body, route="v2_infer")

    async def predict(self, request: Request) -> Response:
        def build_body(model: LoadedModel, alias: str | None, body: bytes) -> dict[str, Any]:
            payload = protocol.parse_json(body)
            rows, ignored = protocol.decode_v1(payload, model, self.p.settings.max_batch_rows)
            arrays = model.predict(rows)
            protocol.check_finite(arrays)
            self.p.metrics.rows_predicted.labels(model=model.name).inc(len(rows))
            return responses.v1_response(model, arrays, ignored, alias)

        return await self._model_request(request, build_body, route="v1_predict")

    async def _model_request(
        self,
        request: Request,
        build_body: Callable[[LoadedModel, str | None, bytes], dict[str, Any]],
        read_body: bool = True,
        route: str | None = None,
    ) -> Response:
        started = time.perf_counter()
        name = request.path_params["name"]
        selector = request.path_params.get("version")
        resolved: list[LoadedModel] = []

        def work(body: bytes) -> bytes:
            # Runs on a worker thread: the store read of a first load, the
            # encoding and the inference all block.
            model, alias = self.p.resolve(name, selector)
            resolved.append(model)
            return dumps(build_body(model, alias, body))

        known = False
        try:
            validate_model_name(name)
            body = await _http.read_body(request, self.p.settings.max_body_bytes) if read_body else b""
            found = self.p.resolve_cached(name, selector) if len(body) <= INLINE_MAX_BODY_BYTES else None
            if found is not None:
                # A small request to a cached session takes well under a
                # millisecond, less than the hop to a worker thread, so it
                # runs on the event loop.
                resolved.append(found[0])
                content = dumps(build_body(found[0], found[1], body))
            else:
                content = await run_in_threadpool(work, body)
            response = Response(content, media_type="application/json")
        except Exception as exc:
            # A version that cannot be served is known to exist, unless the
            # store failed before confirming that.
            known = isinstance(exc, NotServable) and not exc.store_failed
            response = self._errors.response(exc, name, selector, resolved)

        # Only names of models found in the store become label values, so
        # made-up names cannot add series.
        label = name if resolved or known else UNKNOWN_MODEL
        self.p.metrics.requests.labels(model=label, status=str(response.status_code)).inc()
        if route is not None:
            self.p.metrics.request_duration.labels(route=route).observe(time.perf_counter() - started)
        return response


def _parse_version(raw: str) -> int:
    if not _VERSION.fullmatch(raw):
        raise RequestError(
            400, f"invalid version {raw[:20]!r} in the path: expected a version number such as 3 "
            "or an alias such as production",
            field="version",
        )
    return int(raw)
