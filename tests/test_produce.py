import json
import uuid

import pytest
from kafka import KafkaConsumer

from modelstore.errors import ConfigError
from streamfit.produce import create_topic, produce_file


def test_produce_creates_topic_and_sends_lines(kafka_server, tmp_path):
    topic = "produce-" + uuid.uuid4().hex[:8]
    data = tmp_path / "records.jsonl"
    lines = [json.dumps({"id": i, "features": {"x": i}, "label": i % 2}) for i in range(5)]
    data.write_text("\n".join(lines + ["{not json"]) + "\n")

    assert produce_file(str(data), topic, kafka_server.bootstrap, partitions=2) == 6
    assert create_topic(kafka_server.bootstrap, topic, 2) is False

    consumer = KafkaConsumer(
        topic, bootstrap_servers=kafka_server.bootstrap, auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
    )
    received = {message.value: message.key for message in consumer}
    consumer.close()
    assert received[lines[3].encode()] == b"3"
    assert received[b"{not json"] is None  # a bad line is still sent, without a key
    assert len(received) == 6


def test_produce_to_missing_topic_names_fix(kafka_server, tmp_path):
    data = tmp_path / "records.jsonl"
    data.write_text('{"features": {"x": 1}, "label": 0}\n')
    with pytest.raises(ConfigError, match="not found on .* create it, for example with --partitions"):
        produce_file(str(data), "missing-" + uuid.uuid4().hex[:8], kafka_server.bootstrap)
