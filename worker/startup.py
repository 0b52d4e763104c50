"""Start-up helpers of the worker process: the model spec, dead letters, signals."""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any, Callable

from modelstore.errors import ConfigError, SpecError
from trainer.spec import ModelSpec
from worker.deadletter import DeadLetters
from worker.metrics import WorkerMetrics
from worker.settings import KafkaSourceConfig, WorkerSettings

log = logging.getLogger(__name__)


def load_model_spec(path: str) -> dict[str, Any]:
    """Read and validate the JSON model spec used to create models on first use."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"invalid model_spec {path!r}: cannot read it as JSON ({err})") from None
    try:
        return ModelSpec.from_dict(raw).to_dict()
    except SpecError as err:
        raise ConfigError(f"invalid model_spec {path!r}: {err}") from None


def open_dead_letters(settings: WorkerSettings, metrics: WorkerMetrics) -> DeadLetters | None:
    if settings.dead_letter_topic is None:
        return None
    source = settings.parsed_source()
    assert isinstance(source, KafkaSourceConfig)  # checked by WorkerSettings.validate
    return DeadLetters(
        settings.dead_letter_topic,
        bootstrap_servers=list(source.bootstrap_servers),
        kafka_options=settings.kafka_options,
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
