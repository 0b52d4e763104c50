"""Loading of model versions for the session cache, with a memory of versions that failed.

A version whose stored bytes cannot be served (corrupt, invalid, failing
its warm-up) is remembered, up to MAX_FAILED_VERSIONS of them, so it is not
read again. A version that failed because the store was down is tried
again on the next request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

from modelstore.base import ModelStore
from modelstore.errors import StoreError, StreamfitError, VersionNotFound

from predictor.loader import LoadedModel, LoadFailed, load_version
from predictor.metrics import PredictorMetrics
from predictor.settings import PredictorSettings

logger = logging.getLogger(__name__)

# Number of versions, from the head down, that one load tries before it
# gives up, so a model whose newest versions are broken still serves.
MAX_FALLBACK_VERSIONS = 5
# Bound of the memory of versions that failed for good (one entry each).
MAX_FAILED_VERSIONS = 10_000
# Loads that fail because the store is down are logged at most this often,
# because during an outage every model name a client sends fails its load.
UNAVAILABLE_LOG_INTERVAL_S = 60.0


class NotServable(StreamfitError):
    """No loadable version can serve the request; the message gives the reason.

    ``public`` is the message for clients, without the store's internal
    hosts and paths. ``store_failed`` is set when the store failed to
    respond, so the model may not even exist.
    """

    def __init__(
        self, message: str, retriable: bool, public: str | None = None, store_failed: bool = False
    ):
        super().__init__(message)
        self.retriable = retriable
        self.public = message if public is None else public
        self.store_failed = store_failed


class VersionLoader:
    """Loader of single versions, or of the newest servable one, with a memory of lasting failures."""

    def __init__(
        self,
        store: ModelStore,
        settings: PredictorSettings,
        metrics: PredictorMetrics,
        load: Callable[..., LoadedModel] = load_version,
    ):
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._load = load
        self._lock = threading.Lock()
        # Message and public message of each version that failed for good.
        self._failed: OrderedDict[tuple[str, int], tuple[str, str]] = OrderedDict()
        self._unavailable_logged_at = float("-inf")
        self._unavailable_suppressed = 0

    def newest(self, name: str, latest: int, floor: int) -> LoadedModel:
        """Load the newest version in (floor, latest] that loads, trying at most a few."""
        lowest = max(floor + 1, 1, latest - MAX_FALLBACK_VERSIONS + 1)
        if latest < lowest:
            raise NotServable(
                f"model {name!r} has no published version yet (its latest is version "
                f"{latest}, which carries only the spec); publish a trained version first",
                retriable=True,
            )
        reasons, public_reasons = [], []
        for version in range(latest, lowest - 1, -1):
            try:
                return self.one(name, version)
            except NotServable as exc:
                if exc.retriable:
                    raise
                reasons.append(str(exc))
                public_reasons.append(exc.public)
            except VersionNotFound as exc:
                # Retention may have removed an older version.
                if version == latest:
                    raise
                reasons.append(str(exc))
                public_reasons.append(f"version {version} no longer exists")
        prefix = f"model {name!r}: no version from {latest} down to {lowest} can be served: "
        raise NotServable(
            prefix + "; ".join(reasons), retriable=False, public=prefix + "; ".join(public_reasons)
        )

    def one(self, name: str, version: int) -> LoadedModel:
        with self._lock:
            failure = self._failed.get((name, version))
        if failure is not None:
            raise NotServable(failure[0], retriable=False, public=failure[1])
        try:
            model = self._load(self._store, name, version, self._settings)
        except LoadFailed as exc:
            self._record_failure(name, version, exc)
            raise NotServable(
                str(exc), retriable=exc.retriable, public=exc.public, store_failed=exc.retriable
            ) from None
        except StoreError:
            raise
        except Exception as exc:
            # Stored content that the loader does not expect, such as deeply
            # nested metadata, must not fail every request with a 500 or be
            # read again for each one.
            logger.exception("model %s version %d: unexpected error while loading", name, version)
            failed = LoadFailed(
                "invalid", f"model {name!r} version {version}: unexpected error while loading: "
                f"{type(exc).__name__}: {exc}",
                public=f"model {name!r} version {version}: the version cannot be loaded "
                f"({type(exc).__name__}); the predictor log has the details",
            )
            self._record_failure(name, version, failed)
            raise NotServable(str(failed), retriable=False, public=failed.public) from None
        self._metrics.model_loads.labels(result="ok").inc()
        return model

    def _record_failure(self, name: str, version: int, exc: LoadFailed) -> None:
        self._metrics.model_loads.labels(result=exc.result).inc()
        if exc.retriable:
            # A store outage is retried on the next request or refresh. A
            # client can name any number of models while the store is down,
            # so the warnings are rate-limited instead of kept per version.
            self._log_unavailable(exc)
            return
        with self._lock:
            self._failed[(name, version)] = (str(exc), exc.public)
            while len(self._failed) > MAX_FAILED_VERSIONS:
                self._failed.popitem(last=False)
        logger.error("%s; this version is never served (load result %s)", exc, exc.result)

    def _log_unavailable(self, exc: LoadFailed) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._unavailable_logged_at < UNAVAILABLE_LOG_INTERVAL_S:
                self._unavailable_suppressed += 1
                return
            self._unavailable_logged_at = now
            suppressed, self._unavailable_suppressed = self._unavailable_suppressed, 0
        logger.warning(
            "%s; the version will be loaded again later (%d similar failures not logged "
            "in the last %.0f s)", exc, suppressed, UNAVAILABLE_LOG_INTERVAL_S,
        )
