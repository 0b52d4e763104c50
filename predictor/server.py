"""Run the predictor with uvicorn, in exactly one process.

One process per container is a rule, not a default:

- Prometheus metrics live in the process that counts them. With several
  worker processes a scrape would reach one of them at random and see only
  its share of the requests.
- onnxruntime sessions and their thread pools must be created in the process
  that uses them. A session built before a fork is not safe to use after it.

Scale out with more containers (replicas) behind a load balancer, each
scraped on its own. ``run`` passes the app object to one uvicorn Server,
which cannot fork workers, and rejects WEB_CONCURRENCY above 1, because
uvicorn reads that variable as its worker count.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

import uvicorn

from modelstore.errors import ConfigError

from predictor.app import create_app
from predictor.settings import PredictorSettings, cpu_quota_cores

logger = logging.getLogger(__name__)


def check_single_process(environ: os._Environ | dict[str, str] = os.environ) -> None:
    """Raise ConfigError when the environment requests several server processes."""
    workers = environ.get("WEB_CONCURRENCY", "").strip()
    if workers and workers != "1":
        raise ConfigError(
            f"WEB_CONCURRENCY={workers!r}: the predictor runs one process per container, "
            "because its metrics and onnxruntime sessions belong to that process; unset "
            "WEB_CONCURRENCY and run more containers instead"
        )


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn 0.29+ raises a captured signal again after its graceful
        # shutdown, so SIGTERM would end the process as killed (-15). A
        # graceful stop on SIGTERM exits 0, like the worker.
        # NOTE: _captured_signals is private to uvicorn (checked on 0.55).
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()


def run(settings: PredictorSettings) -> int:
    """Serve until SIGINT or SIGTERM; return 0 after a graceful stop."""
    check_single_process()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("predictor starting with settings %s", settings.public_dict())
    logger.info(
        "onnxruntime threads per session: intra_op_threads=%d inter_op_threads=%d "
        "(CPU quota of this container: %d cores)",
        settings.intra_op_threads, settings.inter_op_threads, cpu_quota_cores(),
    )

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        workers=1,
        lifespan="on",
        # One line per request at INFO is what the metrics are for.
        access_log=False,
        log_config=None,
    )
    _Server(config).run()
    return 0
