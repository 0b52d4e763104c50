"""Start-up helpers of the worker process: the model spec, dead letters, signals."""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any, Callable

from modelstore.errors import ConfigError, SpecError
from trainer.spec import ModelSpec, load_spec_file
from worker.deadletter import DeadLetters
from worker.metrics import WorkerMetrics
from worker.settings import KafkaSourceConfig, WorkerSettings

log = logging.getLogger(__name__)


def load_model_spec(path: str) -> dict[str, Any]:
    """Read and validate the model spec (JSON, or TOML when named ``*.toml``) used to create models on first use."""
    try:
        return load_spec_file(path).to_dict()
    except SpecError as err:
        raise ConfigError(f"invalid model_spec {path!r}: {err}") from None


# Measured with tracemalloc on scikit-learn 1.9: a fitted SGD learner with a
# StandardScaler takes about 3 KiB plus 8 bytes per float64 parameter.
LEARNER_BASE_BYTES = 4096


def estimate_learner_bytes(spec: ModelSpec) -> int:
    """Estimate the memory of one cached learner of ``spec`` (an estimate, not a measurement).

    Counts the estimator's coefficients and intercepts, the scaler's mean,
    variance and scale per column, and the spec itself, which every cached
    version carries.
    """
    width = spec.schema.width
    classes = len(spec.labels.array()) if spec.is_classifier and spec.labels is not None else 1
    rows = classes if classes > 2 else 1
    parameters = rows * width + rows + 3 * width
    spec_bytes = 4 * len(json.dumps(spec.to_dict()))
    return LEARNER_BASE_BYTES + 8 * parameters + spec_bytes


def learner_cache_size(settings: WorkerSettings, create_spec: dict[str, Any] | None) -> int:
    """Return how many learners the trainer may cache: the count bound, lowered to fit the memory bound.

    The memory bound is applied through the size estimated for a learner of
    the model spec that creates models on first use; without one only the
    count bound applies.
    """
    # NOTE: models whose stored spec is wider than create_spec take more
    # memory than estimated. Bounding the cache by measured bytes needs a
    # byte-weighted cache inside trainer.refit.Trainer.
    if create_spec is None:
        return settings.learner_cache_size
    per_learner = estimate_learner_bytes(ModelSpec.from_dict(create_spec))
    return max(1, min(settings.learner_cache_size, settings.learner_cache_bytes // per_learner))


def open_dead_letters(settings: WorkerSettings, metrics: WorkerMetrics) -> DeadLetters | None:
    if settings.dead_letter_topic is None:
        return None
    source = settings.parsed_source()
    assert isinstance(source, KafkaSourceConfig)  # checked by WorkerSettings.validate
    return DeadLetters(
        settings.dead_letter_topic,
        bootstrap_servers=list(source.bootstrap_servers),
        consumer_options=settings.consumer_options(),
        max_record_bytes=settings.max_record_bytes,
        metrics=metrics,
        flush_timeout_ms=settings.commit_timeout_ms,
    )


def install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """Make SIGTERM and SIGINT set ``stop``; return a function that restores the previous handlers."""
    # Signal handlers can only be installed from the main thread; a worker
    # run in another thread (tests, embedding) is stopped through ``stop``.
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum, frame):
        log.info("Received %s; stopping after publishing buffered records", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
