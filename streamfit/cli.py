"""The ``streamfit`` command.

The flags of ``worker`` and ``predictor`` are generated from the fields of
their settings dataclasses, so a setting has one name everywhere: the flag
``--batch-max-records``, the variable ``STREAMFIT_BATCH_MAX_RECORDS`` and
the TOML key ``batch_max_records``.

Each command imports only its own part, so ``streamfit predictor`` never
loads scikit-learn.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Sequence

from modelstore.errors import StreamfitError

COMMANDS = {
    "worker": "consume labelled records and publish refitted model versions",
    "predictor": "serve predictions over HTTP (and from a Kafka topic) from the latest model versions",
    "produce": "send a JSON-lines or CSV file to a Kafka topic",
    "flights": "write the NYC flights 2013 data as labelled JSON lines",
    "models": "list, inspect, promote, roll back, export and import models in a store",
    "demo": "run the worker and the predictor on the flights data and print a report",
    "train": "learn a model from a CSV or JSON-lines file and publish its first version",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2

    command, rest = argv[0], argv[1:]
    handlers: dict[str, Callable[[list[str]], int]] = {
        "worker": _run_worker,
        "predictor": _run_predictor,
        "produce": _run_produce,
        "flights": _run_flights,
        "models": _run_models,
        "demo": _run_demo,
        "train": _run_train,
    }
    try:
        code = handlers[command](rest)
        # Flushed here, so that a closed pipe shows up below and not at exit.
        sys.stdout.flush()
        return code
    except StreamfitError as exc:
        print(f"streamfit {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of the output went away (as with `| head`). Python would
        # report the pipe again when it flushes stdout at exit, so stdout is
        # pointed at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamfit",
        description="Keep many small models learning from Kafka and serve them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


def _configure_logging(level: str, log_format: str | None = None) -> None:
    from streamfit.logs import configure_logging

    configure_logging(level, log_format)


def _settings_parser(command: str, settings_cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"streamfit {command}", description=COMMANDS[command])
    parser.add_argument("--config", help="TOML file with a [%s] table of settings" % command)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument(
        "--log-format", default=None, choices=("text", "json"),
        help="log lines as plain text or as JSON objects (default: STREAMFIT_LOG_FORMAT, else text)",
    )
    for field in dataclasses.fields(settings_cls):
        default = _field_default(field)
        if isinstance(default, dict):
            continue  # Nested options come from the TOML file or a JSON variable only.
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if isinstance(default, bool) or field.type in ("bool | None", "Optional[bool]"):
            parser.add_argument(
                flag, dest=field.name, default=None,
                action=argparse.BooleanOptionalAction, help=help_text,
            )
            continue
        if isinstance(default, (int, float)):
            kind = type(default)
        elif field.type in ("int | None", "Optional[int]"):
            kind = int
        else:
            kind = str
        if "default" not in help_text:
            help_text = f"{help_text} (default: {default!r})".lstrip()
        parser.add_argument(flag, dest=field.name, default=None, type=kind, help=help_text)
    return parser


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _load_settings(command: str, settings_cls: type, argv: list[str]) -> tuple[Any, str, str | None]:
    from streamfit.config import merge_settings

    parser = _settings_parser(command, settings_cls)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config")
    log_level = args.pop("log_level")
    log_format = args.pop("log_format")
    # A setting typed ``int | None`` passes int, so its environment variable is read as a number.
    defaults = {
        f.name: int if f.type in ("int | None", "Optional[int]") and _field_default(f) is None else _field_default(f)
        for f in dataclasses.fields(settings_cls)
    }
    merged = merge_settings(command, defaults, args, config_file=config_file)
    return settings_cls.from_mapping(merged), log_level, log_format


def _run_worker(argv: list[str]) -> int:
    from worker.settings import WorkerSettings

    settings, log_level, log_format = _load_settings("worker", WorkerSettings, argv)
    _configure_logging(log_level, log_format)
    from worker.loop import run

    return run(settings)


def _run_predictor(argv: list[str]) -> int:
    from predictor.settings import PredictorSettings

    settings, log_level, log_format = _load_settings("predictor", PredictorSettings, argv)
    _configure_logging(log_level, log_format)
    from predictor.server import run

    return run(settings)


def _run_produce(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamfit produce", description=COMMANDS["produce"])
    parser.add_argument("file", help="JSON-lines file (one record per line) or CSV file")
    parser.add_argument("--topic", required=True, help="topic to send to")
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092", help="host:port[,host:port]")
    parser.add_argument("--key-field", default="id",
                        help="record field used as the message key (default: id); '' sends no key")
    parser.add_argument("--limit", type=int, default=None, help="send at most this many records")
    parser.add_argument("--partitions", type=int, default=None,
                        help="create the topic with this many partitions if it does not exist")
    parser.add_argument("--replication-factor", type=int, default=1,
                        help="replication factor of a topic created with --partitions (default: 1)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    from streamfit.produce import produce_file

    sent = produce_file(
        args.file, args.topic, args.bootstrap_servers,
        key_field=args.key_field or None, limit=args.limit, partitions=args.partitions,
        replication_factor=args.replication_factor,
    )
    print(f"sent {sent} records to {args.topic}")
    return 0


def _run_flights(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamfit flights", description=COMMANDS["flights"])
    parser.add_argument("--out", required=True, help="JSON-lines file to write")
    parser.add_argument("--rows", type=int, default=None, help="keep the first ROWS flights in time order")
    args = parser.parse_args(argv)
    from pathlib import Path

    from streamfit.flights import read_flights, write_json_lines

    count = write_json_lines(read_flights(limit=args.rows), Path(args.out))
    print(f"wrote {count} flight records to {args.out}")
    return 0


def _run_models(argv: list[str]) -> int:
    from streamfit.models import main as models_main

    return models_main(argv)


def _run_demo(argv: list[str]) -> int:
    from streamfit.demo import main as demo_main

    return demo_main(argv)


def _run_train(argv: list[str]) -> int:
    from streamfit.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
