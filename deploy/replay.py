"""Replay the NYC flights 2013 records into a Kafka topic at a steady rate, like a live feed.

This is the ``replay`` service of docker-compose.yml; the image carries it
as /opt/streamfit/share/replay.py. Records go out in scheduled departure
order. The message key names the model the record trains:
``--models per-carrier`` (the default) keys each record ``flights-<carrier>``,
so about 16 models spread over the topic's partitions and several workers
share the work; ``--models single`` keys every record ``flights``, which
keeps the one model in one partition.

Every option has a ``STREAMFIT_REPLAY_*`` variable, for example
``STREAMFIT_REPLAY_RATE=500``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterable, Iterator, Sequence

log = logging.getLogger("streamfit.replay")

PROGRESS_EVERY = 10_000


def parse_args(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> argparse.Namespace:
    env = os.environ if environ is None else environ

    def default(name: str, fallback: str) -> str:
        return env.get(f"STREAMFIT_REPLAY_{name.upper()}", fallback)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", default=default("bootstrap_servers", "kafka:9092"),
                        help="Kafka brokers, host:port[,host:port] (default: %(default)s)")
    parser.add_argument("--topic", default=default("topic", "flights"), help="topic to send to (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=float(default("rate", "200")),
                        help="records per second; 0 sends as fast as the broker accepts (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=int(default("rows", "0")),
                        help="send the first ROWS flights; 0 sends all 327,346 (default: %(default)s)")
    parser.add_argument("--models", choices=("per-carrier", "single"), default=default("models", "per-carrier"),
                        help="one model per carrier, or one model named 'flights' (default: %(default)s)")
    parser.add_argument("--loop", action=argparse.BooleanOptionalAction,
                        default=default("loop", "false").lower() in ("1", "true", "yes"),
                        help="start again from the first record after the last (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.rate < 0:
        parser.error(f"--rate {args.rate} is negative; give records per second, or 0 for no limit")
    if args.rows < 0:
        parser.error(f"--rows {args.rows} is negative; give a count, or 0 for all flights")
    return args


def model_key(record: dict, models: str) -> bytes:
    if models == "single":
        return b"flights"
    return f"flights-{record['features']['carrier']}".encode()


def paced(messages: Iterable[tuple[bytes, bytes]], rate: float, stop: threading.Event,
          clock=time.monotonic) -> Iterator[tuple[bytes, bytes]]:
    """Yield messages no faster than ``rate`` per second, on a fixed schedule so pauses do not drift."""
    start = clock()
    for i, message in enumerate(messages):
        if stop.is_set():
            return
        if rate > 0:
            delay = start + i / rate - clock()
            if delay > 0 and stop.wait(delay):
                return
        yield message


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    from kafka import KafkaProducer

    from streamfit.flights import read_flights

    records = read_flights(limit=args.rows or None)
    messages = [(model_key(r, args.models), json.dumps(r, separators=(",", ":")).encode()) for r in records]
    log.info("Replaying %d flights to topic %s at %s records/s", len(messages), args.topic, args.rate or "max")

    producer = KafkaProducer(bootstrap_servers=args.bootstrap_servers.split(","), acks="all", linger_ms=5)
    sent = 0
    try:
        while not stop.is_set():
            for key, value in paced(messages, args.rate, stop):
                producer.send(args.topic, key=key, value=value)
                sent += 1
                if sent % PROGRESS_EVERY == 0:
                    log.info("Sent %d records", sent)
            if not args.loop:
                break
    finally:
        producer.flush()
        producer.close()
    log.info("Replay stopped after %d records", sent)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return run(args, stop)


if __name__ == "__main__":
    sys.exit(main())
