"""One worker keeping 1,000 models learning from one topic, on the real broker and gocaves."""

from __future__ import annotations

import json
import uuid

import pytest

from modelstore import open_store
from worker_support import (
    SPEC_X,
    WorkerThread,
    committed_offsets,
    couchbase_url,
    create_topic,
    end_offsets,
    kafka_source,
    produce,
    record_x,
    wait_until,
)

MODELS = 1000


def count_for(index: int) -> int:
    # Uneven counts, so a record given to the wrong model cannot go unnoticed.
    return 3 + index % 7


@pytest.mark.slow
def test_thousand_models_interleaved(kafka_server, gocaves_server, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMFIT_COUCHBASE_USERNAME", gocaves_server.username)
    monkeypatch.setenv("STREAMFIT_COUCHBASE_PASSWORD", gocaves_server.password)
    store_url = couchbase_url(gocaves_server, "models")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(SPEC_X))
    topic = create_topic(kafka_server.bootstrap, 3, "thousand")
    names = [f"model-{i:04d}" for i in range(MODELS)]

    # Round robin over the models that still have records to send, so every
    # batch the worker reads contains records of many models.
    messages = []
    left = {name: count_for(i) for i, name in enumerate(names)}
    step = 0
    while left:
        for name in list(left):
            messages.append((name.encode(), record_x(step)))
            step += 1
            left[name] -= 1
            if not left[name]:
                del left[name]
    produce(kafka_server.bootstrap, topic, messages, linger_ms=5)
    group = f"thousand-{uuid.uuid4().hex[:8]}"

    # Models are created from the spec on first use, and fewer learners are
    # cached than there are models, so some are loaded back from the store.
    worker = WorkerThread(
        source=kafka_source(kafka_server.bootstrap, topic), store=store_url, group_id=group,
        model_spec=str(spec_path), learner_cache_size=200, batch_max_wait_ms=2000,
    ).start()
    ends = end_offsets(kafka_server.bootstrap, topic, 3)
    try:
        wait_until(lambda: committed_offsets(kafka_server.bootstrap, group) == ends,
                   "every partition is committed to its end", timeout=600,
                   seen=lambda: worker.metric("streamfit_worker_records_consumed_total"))
    finally:
        assert worker.stop() == 0

    assert worker.metric("streamfit_worker_records_consumed_total") == len(messages)
    wrong = {}
    with open_store(store_url) as store:
        assert len(store.list_models()) == MODELS
        for i, name in enumerate(names):
            learned = store.version(name).samples_learned
            counted = worker.metric("streamfit_worker_records_learned_total", model=name)
            if learned != count_for(i) or counted != count_for(i):
                wrong[name] = (count_for(i), learned, counted)
    assert wrong == {}, f"{len(wrong)} models have wrong counts (expected, stored, metric): {list(wrong.items())[:10]}"
