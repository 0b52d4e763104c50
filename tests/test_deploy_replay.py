"""The flights replay producer of the compose stack, against the real Kafka broker."""

from __future__ import annotations

import importlib.util
import json
import threading

import pytest

from deploy_support import DEPLOY


def load_replay():
    spec = importlib.util.spec_from_file_location("streamfit_replay", DEPLOY / "replay.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


replay = load_replay()


def test_options_from_environment():
    args = replay.parse_args([], {"STREAMFIT_REPLAY_RATE": "50", "STREAMFIT_REPLAY_MODELS": "single",
                                  "STREAMFIT_REPLAY_LOOP": "true", "STREAMFIT_REPLAY_TOPIC": "t"})

    assert args.rate == 50.0
    assert args.models == "single"
    assert args.loop is True
    assert args.topic == "t"
    assert args.bootstrap_servers == "kafka:9092"


def test_flags_override_environment():
    args = replay.parse_args(["--rate", "5", "--no-loop"], {"STREAMFIT_REPLAY_RATE": "50", "STREAMFIT_REPLAY_LOOP": "1"})

    assert args.rate == 5.0
    assert args.loop is False


@pytest.mark.parametrize("argv, message", [(["--rate", "-1"], "--rate -1.0 is negative"),
                                           (["--rows", "-3"], "--rows -3 is negative")])
def test_invalid_options_rejected(argv, message, capsys):
    with pytest.raises(SystemExit):
        replay.parse_args(argv, {})

    assert message in capsys.readouterr().err


def test_model_key():
    record = {"features": {"carrier": "UA"}}

    assert replay.model_key(record, "per-carrier") == b"flights-UA"
    assert replay.model_key(record, "single") == b"flights"


def test_paced_keeps_order_and_stops():
    stop = threading.Event()
    messages = [(b"k", str(i).encode()) for i in range(10)]
    seen = []
    for message in replay.paced(messages, 0, stop):
        seen.append(message)
        if len(seen) == 4:
            stop.set()

    assert seen == messages[:4]


def test_paced_follows_schedule():
    # A clock that advances only when paced waits shows the schedule: the
    # i-th message is due i / rate seconds after the start.
    now = [100.0]
    waits = []

    class Stop(threading.Event):
        def wait(self, timeout=None):
            waits.append(round(timeout, 6))
            now[0] += timeout
            return False

    out = list(replay.paced([(b"k", b"v")] * 4, 2.0, Stop(), clock=lambda: now[0]))

    assert len(out) == 4
    assert waits == [0.5, 0.5, 0.5]


@pytest.mark.slow
def test_replay_into_kafka(kafka_server, kafka_topic):
    from kafka import KafkaConsumer

    from streamfit.flights import read_flights

    topic = kafka_topic(partitions=3)
    args = replay.parse_args(["--bootstrap-servers", kafka_server.bootstrap, "--topic", topic,
                              "--rate", "0", "--rows", "60"], {})

    assert replay.run(args, threading.Event()) == 0

    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_server.bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=10_000, enable_auto_commit=False)
    try:
        messages = [m for _, m in zip(range(60), consumer)]
    finally:
        consumer.close()
    expected = read_flights(limit=60)
    by_id = {record["id"]: record for record in expected}

    assert len(messages) == 60
    for message in messages:
        record = json.loads(message.value)
        assert record == by_id[record["id"]]
        assert message.key == f"flights-{record['features']['carrier']}".encode()
    # Kafka keeps one key in one partition, so each model's records stay in order.
    for key in {m.key for m in messages}:
        times = [json.loads(m.value)["event_time"] for m in messages if m.key == key]
        assert times == sorted(times)
