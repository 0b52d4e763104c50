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
import socket
from types import FrameType

import uvicorn

from modelstore import open_store
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

    # The store and the address are checked before the server starts, so a
    # wrong store URL or a port in use is one clear error, not a traceback.
    store = open_store(settings.store)
    try:
        listener = bind_listener(settings.host, settings.port)
    except BaseException:
        store.close()
        raise
    config = uvicorn.Config(
        create_app(settings, store=store),
        host=settings.host,
        port=settings.port,
        workers=1,
        lifespan="on",
        # One line per request at INFO is what the metrics are for.
        access_log=False,
        log_config=None,
    )
    try:
        _Server(config).run(sockets=[listener])
    finally:
        listener.close()
        store.close()
    return 0


def bind_listener(host: str, port: int) -> socket.socket:
    """Return a socket bound to ``host``:``port``; raise ConfigError when the address cannot be used."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"invalid host {host!r}: {exc.strerror}; use an address such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as exc:
        listener.close()
        raise ConfigError(
            f"invalid address {host}:{port}: {exc.strerror or exc}; choose another --port "
            "(or --host), or stop the process that uses it"
        ) from None
    listener.set_inheritable(False)
    return listener
