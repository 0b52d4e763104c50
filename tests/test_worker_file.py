"""The worker loop on a file source with a real SQLite store: learning, rejections, resume."""

import json
import sqlite3
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelstore import open_store
from worker.loop import run
from worker.settings import WorkerSettings

SPEC = {
    "estimator": "SGDClassifier",
    "params": {"loss": "log_loss"},
    "features": [
        {"name": "x"},
        {"name": "carrier", "type": "categorical", "vocabulary": ["AA", "UA"]},
    ],
    "labels": [0, 1],
}


def good(i):
    return {"model": "delays", "features": {"x": float(i), "carrier": "UA" if i % 2 else "AA"}, "label": i % 2}


# (line, rejection reason or None for a good record)
MIXED = [
    (json.dumps(good(0)).encode(), None),
    (b"\xff\xfe\x00garb", "not_utf8"),
    (json.dumps(good(1)).encode(), None),
    (b"[1,2,3]", "not_object"),
    (b'{"model":"delays","features":{"x":1.0,"carrier":"UA"}}', "missing_label"),
    (json.dumps(good(2)).encode(), None),
    (b'{"model":"delays","features":[1.0],"label":0}', "wrong_width"),
    (b'{"model":"delays","features":{"x":NaN,"carrier":"UA"},"label":0}', "non_finite"),
    (b'{"model":"delays","features":{"x":1.0,"carrier":"UA"},"label":5}', "unknown_label"),
    (b'{"model":"nobody","features":{"x":1.0,"carrier":"UA"},"label":0}', "unknown_model"),
    (json.dumps(good(3)).encode(), None),
    (b'{"model":"delays","features":{"x":1.0,"carrier":"UA","gate":"B7"},"label":1}', None),
]


@pytest.fixture
def store_url(tmp_path):
    url = f"sqlite:///{tmp_path}/models.db"
    with open_store(url) as store:
        store.create_model("delays", SPEC)
    return url


def settings_for(path, store_url, **extra):
    return WorkerSettings.from_mapping(
        {"source": f"file:{path}", "store": store_url, "metrics_port": 0, **extra}
    )


def rejected(registry, reason):
    return registry.get_sample_value("streamfit_worker_records_rejected_total", {"reason": reason}) or 0


def test_file_mixed_stream(tmp_path, store_url):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in MIXED) + b"\n")
    registry = CollectorRegistry()

    assert run(settings_for(path, store_url, batch_max_records=3), registry=registry) == 0

    n_good = sum(1 for _, reason in MIXED if reason is None)
    with open_store(store_url) as store:
        info = store.version("delays")
    assert info.samples_learned == n_good
    assert info.offsets == {"file:mixed.jsonl/0": len(MIXED)}
    for _, reason in MIXED:
        if reason is not None:
            assert rejected(registry, reason) == 1, reason
    assert registry.get_sample_value("streamfit_worker_records_consumed_total") == len(MIXED)
    assert registry.get_sample_value("streamfit_worker_records_learned_total", {"model": "delays"}) == n_good
    assert registry.get_sample_value("streamfit_worker_extra_features_total") == 1
    assert registry.get_sample_value("streamfit_worker_records_buffered") == 0


def test_file_rerun_learns_nothing_twice(tmp_path, store_url):
    path = tmp_path / "flights.jsonl"
    path.write_text("".join(json.dumps(good(i)) + "\n" for i in range(10)))
    assert run(settings_for(path, store_url, batch_max_records=4), registry=CollectorRegistry()) == 0
    with open_store(store_url) as store:
        first = store.version("delays")
    assert first.samples_learned == 10

    # A second run over the same file (a restart after a crash) skips every record.
    registry = CollectorRegistry()
    assert run(settings_for(path, store_url, batch_max_records=4), registry=registry) == 0
    with open_store(store_url) as store:
        second = store.version("delays")
    assert second.version == first.version
    assert second.samples_learned == 10
    assert registry.get_sample_value("streamfit_worker_records_skipped_total") == 10

    # Appended records are learned on the next run, the old ones still skipped.
    with path.open("a") as f:
        f.write("".join(json.dumps(good(i)) + "\n" for i in range(10, 13)))
    assert run(settings_for(path, store_url), registry=CollectorRegistry()) == 0
    with open_store(store_url) as store:
        assert store.version("delays").samples_learned == 13


def test_file_csv_with_forced_model(tmp_path, store_url):
    path = tmp_path / "flights.csv"
    path.write_text("x,carrier,label\n1.5,UA,1\n2,AA,0\n3,ZZ,1\n4,UA\n")
    registry = CollectorRegistry()
    assert run(settings_for(path, store_url, model="delays"), registry=registry) == 0
    with open_store(store_url) as store:
        assert store.version("delays").samples_learned == 2
    assert rejected(registry, "unknown_category") == 1
    assert rejected(registry, "wrong_width") == 1


TOML_SPEC = """\
estimator = "SGDClassifier"
labels = [0, 1]

[params]
loss = "log_loss"

[[features]]
name = "x"

[[features]]
name = "carrier"
type = "categorical"
vocabulary = ["AA", "UA"]
"""


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_file_creates_model_from_spec(tmp_path, store_url, suffix):
    spec_path = tmp_path / f"spec{suffix}"
    spec_path.write_text(json.dumps(SPEC) if suffix == ".json" else TOML_SPEC)
    path = tmp_path / "new.jsonl"
    rows = [{"features": {"x": i, "carrier": "AA"}, "label": i % 2} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = settings_for(path, store_url, model="fresh-model", model_spec=str(spec_path))
    assert run(settings, registry=CollectorRegistry()) == 0
    with open_store(store_url) as store:
        info = store.version("fresh-model")
    assert info.samples_learned == 5
    assert info.spec["labels"] == [0, 1]
    assert [f["name"] for f in info.spec["features"]] == ["x", "carrier"]


def test_store_busy_backs_off_then_publishes(tmp_path, store_url):
    path = tmp_path / "flights.jsonl"
    path.write_text("".join(json.dumps(good(i)) + "\n" for i in range(10)))
    db_path = store_url[len("sqlite:///"):]

    # Another process holding SQLite's write lock makes publishes fail with
    # StoreUnavailable once busy_timeout_ms has passed.
    locker = sqlite3.connect(db_path, timeout=5, check_same_thread=False)
    locker.execute("BEGIN IMMEDIATE")
    release = threading.Timer(1.5, locker.rollback)
    release.start()
    registry = CollectorRegistry()
    try:
        settings = settings_for(path, store_url + "?busy_timeout_ms=100", batch_max_records=5)
        assert run(settings, registry=registry) == 0
    finally:
        release.join()
        locker.close()

    assert registry.get_sample_value("streamfit_worker_store_retries_total") >= 1
    with open_store(store_url) as store:
        assert store.version("delays").samples_learned == 10


def test_broken_model_does_not_stop_others(tmp_path, store_url):
    with open_store(store_url) as store:
        store.create_model("broken", SPEC)
    # An invalid stored spec cannot be fixed by retrying.
    db = sqlite3.connect(store_url[len("sqlite:///"):])
    with db:
        (text,) = db.execute("SELECT metadata FROM versions WHERE model = 'broken'").fetchone()
        metadata = json.loads(text)
        metadata["spec"]["estimator"] = "NoSuchEstimator"
        db.execute("UPDATE versions SET metadata = ? WHERE model = 'broken'", (json.dumps(metadata),))
    db.close()

    path = tmp_path / "two.jsonl"
    lines = []
    for i in range(6):
        lines.append(json.dumps(good(i)))
        lines.append(json.dumps({**good(i), "model": "broken"}))
    path.write_text("\n".join(lines) + "\n")
    registry = CollectorRegistry()
    assert run(settings_for(path, store_url), registry=registry) == 0

    assert rejected(registry, "model_error") == 6
    with open_store(store_url) as store:
        assert store.version("delays").samples_learned == 6


def test_scores_and_drift_are_exported(tmp_path, caplog):
    # The label follows x for 4,000 records, then the opposite of x: the
    # test-then-train error rate jumps and the drift detector reports it.
    url = f"sqlite:///{tmp_path}/models.db"
    with open_store(url) as store:
        store.create_model("flip", {"estimator": "SGDClassifier", "params": {"loss": "log_loss"},
                                    "features": [{"name": "x"}], "labels": [0, 1]})
    rng = np.random.default_rng(7)
    xs = rng.normal(size=6000)
    lines = [json.dumps({"model": "flip", "features": {"x": float(x)}, "label": int((x > 0) == (i < 4000))})
             for i, x in enumerate(xs)]
    path = tmp_path / "flip.jsonl"
    path.write_text("\n".join(lines) + "\n")
    registry = CollectorRegistry()

    assert run(settings_for(path, url, batch_max_records=200), registry=registry) == 0

    with open_store(url) as store:
        metrics = store.version("flip").metadata["metrics"]
    sample = registry.get_sample_value
    # The first batch meets an unfitted model, so it is learned but not scored.
    assert sample("streamfit_worker_scored_records_total", {"model": "flip"}) == metrics["n_scored"] == 5800
    assert sample("streamfit_worker_scored_correct_total", {"model": "flip"}) == metrics["correct"]
    assert sample("streamfit_worker_scored_baseline_correct_total", {"model": "flip"}) == metrics["baseline_correct"]
    assert sample("streamfit_worker_drift_detections_total", {"model": "flip", "direction": "increase"}) >= 1
    assert any(r.getMessage().startswith("Drift detected for model flip") for r in caplog.records)


@pytest.mark.parametrize(("setting", "versions"), [(None, [4, 8, 10]), (5, [5, 10])])
def test_batch_size_from_spec_or_setting(tmp_path, setting, versions):
    # The spec sets batches of 4, and an explicit worker setting wins over it.
    url = f"sqlite:///{tmp_path}/models.db"
    with open_store(url) as store:
        store.create_model("delays", {**SPEC, "batch": {"max_records": 4}})
    path = tmp_path / "ten.jsonl"
    path.write_text("".join(json.dumps(good(i)) + "\n" for i in range(10)))
    extra = {} if setting is None else {"batch_max_records": setting}

    assert run(settings_for(path, url, batch_max_wait_ms=60_000, **extra), registry=CollectorRegistry()) == 0

    with open_store(url) as store:
        learned = [store.version("delays", v).samples_learned for v in range(1, store.head("delays").latest + 1)]
    assert learned == versions


@pytest.mark.parametrize(("scaler", "rejected_count"), [(None, 1), ("MaxAbsScaler", 1), ("MinMaxScaler", 0)])
def test_negative_count_rejected_alone(tmp_path, scaler, rejected_count):
    # One negative value among counts: only its record is rejected, unless
    # a MinMaxScaler maps every row of the batch into [0, 1] first.
    url = f"sqlite:///{tmp_path}/models.db"
    with open_store(url) as store:
        store.create_model("words", {"estimator": "MultinomialNB", "scaler": scaler,
                                     "features": [{"name": "a"}, {"name": "b"}], "labels": ["x", "y"]})
    rows = [{"model": "words", "features": {"a": i % 3, "b": (i + 1) % 4}, "label": "xy"[i % 2]} for i in range(9)]
    rows[4]["features"]["b"] = -2
    path = tmp_path / "counts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    registry = CollectorRegistry()

    assert run(settings_for(path, url, batch_max_records=9), registry=registry) == 0

    with open_store(url) as store:
        assert store.version("words").samples_learned == 9 - rejected_count
    assert (rejected(registry, "negative_input") or 0) == rejected_count


def test_clustering_learns_unlabelled_records(tmp_path):
    url = f"sqlite:///{tmp_path}/models.db"
    with open_store(url) as store:
        store.create_model("zones", {"estimator": "MiniBatchKMeans", "params": {"n_clusters": 2},
                                     "features": [{"name": "x"}, {"name": "y"}]})
    rng = np.random.default_rng(3)
    centers = [(-5.0, -5.0), (5.0, 5.0)]
    rows = [{"model": "zones", "features": dict(zip("xy", rng.normal(centers[i % 2], 0.5).tolist()))}
            for i in range(40)]
    path = tmp_path / "points.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    registry = CollectorRegistry()

    assert run(settings_for(path, url, batch_max_records=20), registry=registry) == 0

    with open_store(url) as store:
        assert store.version("zones").samples_learned == 40
    assert rejected(registry, "missing_label") == 0


def test_metrics_port_in_use_named(tmp_path, store_url, capsys):
    import socket

    from streamfit.cli import main

    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(good(0)) + "\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["worker", "--source", f"file:{path}", "--store", store_url,
                     "--metrics-host", "127.0.0.1", "--metrics-port", str(port)])
    assert code != 0
    err = capsys.readouterr().err
    assert f"invalid metrics address 127.0.0.1:{port}" in err
    assert "choose another metrics_port" in err
    assert "check metrics_host" in err
    assert "Traceback" not in err


def test_other_spec_for_existing_model_noted(tmp_path, store_url, caplog):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(good(0)) + "\n")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(SPEC))
    settings = settings_for(path, store_url, model="noted", model_spec=str(spec_path))
    for _ in range(2):
        path.write_text(path.read_text() + json.dumps(good(1)) + "\n")
        assert run(settings, registry=CollectorRegistry()) == 0
    assert not [r for r in caplog.records if "already exists with another spec" in r.getMessage()]

    spec_path.write_text(json.dumps({**SPEC, "params": {"loss": "hinge"}}))
    path.write_text(path.read_text() + json.dumps(good(2)) + "\n")
    assert run(settings, registry=CollectorRegistry()) == 0
    noted = [r for r in caplog.records if "already exists with another spec" in r.getMessage()]
    assert len(noted) == 1
    with open_store(store_url) as store:
        assert store.version("noted").spec["params"]["loss"] == "log_loss"
