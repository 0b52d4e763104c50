"""The model store contract, run over every backend: SQLite and Couchbase (on gocaves).

Each test uses its own model names, so tests never see each other's data even
when they share a Couchbase scope.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from modelstore import ONNX, STATE, Head, VersionInfo
from modelstore.errors import (
    ArtifactCorrupt,
    InvalidInputError,
    InvalidModelName,
    ModelExists,
    ModelNotFound,
    VersionConflict,
    VersionNotFound,
)
from store_backends import (
    CHILD_DEADLINE_S,
    SMALL_CHUNK_BYTES,
    couchbase_backend,
    retry_unavailable,
    run_in_child,
    sqlite_backend,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC = {"estimator": "SGDClassifier", "params": {}, "features": [{"name": "x"}], "labels": [0, 1]}


@pytest.fixture(params=["sqlite", pytest.param("couchbase", marks=pytest.mark.couchbase)])
def backend(request, tmp_path):
    if request.param == "sqlite":
        return sqlite_backend(tmp_path / "models.db")
    return couchbase_backend(request.getfixturevalue("gocaves_server"))


@pytest.fixture
def store(backend):
    store = backend.open()
    yield store
    store.close()


@pytest.fixture
def model(request):
    return f"m-{uuid.uuid4().hex[:12]}"


def publish_next(store, model, artifacts=None, **fields):
    head = store.head(model)
    metadata = {"spec": SPEC, "samples_learned": head.latest + 1, **fields}
    if artifacts is None:
        artifacts = {ONNX: os.urandom(3 * SMALL_CHUNK_BYTES + 17), STATE: os.urandom(100)}
    return store.publish(head, artifacts, metadata)


def assert_version_complete(store, info):
    """Every artifact of ``info`` reads back and matches the sha256 recorded at publish."""
    for kind, entry in info.metadata["artifacts"].items():
        data = store.artifact(info, kind)
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["size"]


# ---------------------------------------------------------------- create and read


def test_create_model_starts_at_version_zero(store, model):
    head = store.create_model(model, SPEC)

    assert head.model == model
    assert head.latest == 0
    assert head.cas not in (None, 0)
    assert store.head(model) == head

    info = store.version(model, 0)
    assert info.version == 0
    assert info.publish_id == head.latest_id
    assert info.spec == SPEC
    assert info.samples_learned == 0
    assert info.offsets == {}
    assert info.metadata["parent"] is None
    assert info.metadata["artifacts"] == {}
    assert store.version(model) == info
    assert model in store.list_models()


def test_create_model_twice_raises(store, model):
    store.create_model(model, SPEC)

    with pytest.raises(ModelExists, match=model):
        store.create_model(model, {"other": "spec"})
    assert store.version(model, 0).spec == SPEC


def test_list_models_sorted(store):
    names = [f"m-{uuid.uuid4().hex[:8]}-{suffix}" for suffix in ("b", "a", "c")]
    for name in names:
        store.create_model(name, SPEC)

    listed = store.list_models()
    assert listed == sorted(listed)
    assert set(names) <= set(listed)


def test_spec_must_be_json(store, model):
    with pytest.raises(InvalidInputError, match="finite"):
        store.create_model(model, {"alpha": float("nan")})
    with pytest.raises(ModelNotFound):
        store.head(model)


# ---------------------------------------------------------------- publish


def test_publish_chain(store, model):
    store.create_model(model, SPEC)
    published = [store.version(model, 0)]
    artifacts_by_version = {}

    for number in (1, 2, 3):
        artifacts = {ONNX: os.urandom(2 * SMALL_CHUNK_BYTES + number), STATE: os.urandom(50 * number)}
        offsets = {"flights/0": 100 * number, "flights/1": 7 * number}
        info = publish_next(store, model, artifacts, offsets=offsets)
        artifacts_by_version[number] = artifacts

        assert info.version == number
        assert info.metadata["parent"] == number - 1
        assert info.metadata["parent_id"] == published[-1].publish_id
        assert info.publish_id != published[-1].publish_id
        assert info.offsets == offsets
        assert info.samples_learned == number
        assert info.metadata["created_at"] >= published[-1].metadata["created_at"]
        for kind, data in artifacts.items():
            entry = info.metadata["artifacts"][kind]
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            assert entry["size"] == len(data)
        head = store.head(model)
        assert (head.latest, head.latest_id) == (number, info.publish_id)
        published.append(info)

    # Older versions stay readable, byte for byte, after newer ones land.
    for number in (1, 2, 3):
        info = store.version(model, number)
        assert info == published[number]
        for kind, data in artifacts_by_version[number].items():
            assert store.artifact(info, kind) == data
    assert store.version(model) == published[3]
    assert store.version(model, None) == published[3]


def test_publish_overrides_store_fields(store, model):
    head = store.create_model(model, SPEC)

    info = store.publish(head, {}, {"spec": SPEC, "version": 99, "publish_id": "mine", "artifacts": {"x": 1}})

    assert info.version == 1
    assert info.publish_id != "mine"
    assert info.metadata["artifacts"] == {}
    assert store.version(model, 1).metadata["version"] == 1


@pytest.mark.parametrize(
    ("artifacts", "metadata", "message"),
    [
        ({}, {"samples_learned": 1}, "spec"),
        ({}, {"spec": SPEC, "metrics": {"mae": float("inf")}}, "finite"),
        ({ONNX: "not bytes"}, {"spec": SPEC}, "expected bytes"),
        ({"../onnx": b"x"}, {"spec": SPEC}, "invalid artifact kind"),
    ],
)
def test_publish_rejects_bad_input(store, model, artifacts, metadata, message):
    head = store.create_model(model, SPEC)

    with pytest.raises(InvalidInputError, match=message):
        store.publish(head, artifacts, metadata)
    assert store.head(model) == head


def test_two_writers_on_same_parent(backend, model):
    first, second = backend.open(), backend.open()
    try:
        head = first.create_model(model, SPEC)
        assert second.head(model) == head

        winner = first.publish(head, {ONNX: b"first"}, {"spec": SPEC})
        with pytest.raises(VersionConflict, match=model):
            second.publish(head, {ONNX: b"second"}, {"spec": SPEC})

        assert second.head(model).latest_id == winner.publish_id
        assert second.artifact(second.version(model), ONNX) == b"first"
        with pytest.raises(VersionNotFound):
            second.version(model, 2)
    finally:
        first.close()
        second.close()


def test_racing_writers_exactly_one_wins(backend, model):
    writers = 4
    stores = [backend.open() for _ in range(writers)]
    try:
        head = stores[0].create_model(model, SPEC)
        barrier = threading.Barrier(writers)
        outcomes = [None] * writers

        def write(index):
            barrier.wait()
            try:
                outcomes[index] = stores[index].publish(head, {ONNX: f"writer {index}".encode()}, {"spec": SPEC})
            except VersionConflict as exc:
                outcomes[index] = exc

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(CHILD_DEADLINE_S)

        winners = [o for o in outcomes if isinstance(o, VersionInfo)]
        losers = [o for o in outcomes if isinstance(o, VersionConflict)]
        assert len(winners) == 1
        assert len(losers) == writers - 1
        latest = stores[0].version(model)
        assert latest.publish_id == winners[0].publish_id
        assert stores[0].artifact(latest, ONNX) == f"writer {outcomes.index(winners[0])}".encode()
    finally:
        for store in stores:
            store.close()


def test_head_never_goes_backwards(store, model):
    store.create_model(model, SPEC)
    old = store.head(model)
    for _ in range(3):
        publish_next(store, model)
    latest = store.head(model)

    with pytest.raises(VersionConflict):
        store.publish(old, {}, {"spec": SPEC})
    assert store.head(model) == latest
    assert store.head(model).latest == 3


@pytest.mark.parametrize("fail_fast", [True, False], ids=["with-precheck", "cas-write-only"])
def test_publish_rejects_foreign_cas(store, model, monkeypatch, fail_fast):
    head = store.create_model(model, SPEC)
    other = store.create_model(f"{model}-other", SPEC)
    if not fail_fast:
        # Without the early head read, only the CAS-protected head write
        # prevents a lost update.
        monkeypatch.setattr(store, "_check_head", lambda *args: None)

    bad_heads = [
        Head(model, head.latest, head.latest_id, head.aliases, head.updated_at, None),
        Head(model, head.latest, head.latest_id, head.aliases, head.updated_at, 0),
        Head(model, head.latest, head.latest_id, head.aliases, head.updated_at, other.cas),
    ]
    for bad in bad_heads:
        with pytest.raises(VersionConflict):
            store.publish(bad, {ONNX: b"bad"}, {"spec": SPEC})
    assert store.head(model) == head

    stale = head
    publish_next(store, model)
    with pytest.raises(VersionConflict):
        store.publish(stale, {ONNX: b"stale"}, {"spec": SPEC})
    assert store.head(model).latest == 1


def test_publish_on_missing_model(store, model):
    fake = Head(model, 0, uuid.uuid4().hex, {}, 0.0, 12345)

    with pytest.raises((ModelNotFound, VersionConflict)):
        store.publish(fake, {}, {"spec": SPEC})
    with pytest.raises(ModelNotFound):
        store.head(model)


# ---------------------------------------------------------------- artifacts


@pytest.mark.parametrize("size", [0, 1, SMALL_CHUNK_BYTES - 1, SMALL_CHUNK_BYTES, 5 * SMALL_CHUNK_BYTES + 3])
def test_artifact_round_trip(store, model, size):
    store.create_model(model, SPEC)
    data = os.urandom(size)

    info = publish_next(store, model, {ONNX: data, STATE: bytearray(data[::-1])})

    expected_chunks = max(1, -(-size // SMALL_CHUNK_BYTES))
    assert len(info.metadata["artifacts"][ONNX]["chunks"]) == expected_chunks
    assert store.artifact(info, ONNX) == data
    assert store.artifact(store.version(model, 1), STATE) == data[::-1]


def test_artifact_over_value_limit(backend, model):
    # 21 MiB of random bytes: incompressible, so no client-side compression
    # can sneak it under Couchbase's 20 MiB value limit.
    store = backend.open(chunk_size_bytes=None)
    try:
        store.create_model(model, SPEC)
        data = os.urandom(21 * 1024 * 1024)

        info = publish_next(store, model, {ONNX: data})

        chunks = info.metadata["artifacts"][ONNX]["chunks"]
        assert [c["size"] for c in chunks] == [20 * 1024 * 1024, 1024 * 1024]
        assert store.artifact(store.version(model), ONNX) == data
    finally:
        store.close()


def test_missing_artifact_kind(store, model):
    store.create_model(model, SPEC)

    with pytest.raises(VersionNotFound, match="onnx"):
        store.artifact(store.version(model), ONNX)


def test_corrupt_chunk_detected(backend, store, model):
    store.create_model(model, SPEC)
    info = publish_next(store, model)
    good = store.artifact(info, ONNX)

    backend.corrupt_chunk(info, ONNX, 1, good[SMALL_CHUNK_BYTES:2 * SMALL_CHUNK_BYTES][::-1])

    with pytest.raises(ArtifactCorrupt, match=rf"{info.publish_id}::onnx::1"):
        store.artifact(info, ONNX)
    assert store.artifact(info, STATE) is not None


def test_truncated_chunk_detected(backend, store, model):
    store.create_model(model, SPEC)
    info = publish_next(store, model)

    backend.corrupt_chunk(info, ONNX, 0, b"short")

    with pytest.raises(ArtifactCorrupt, match="::onnx::0"):
        store.artifact(info, ONNX)


def test_missing_chunk_detected(backend, store, model):
    store.create_model(model, SPEC)
    info = publish_next(store, model)

    backend.delete_chunk(info, ONNX, 2)

    with pytest.raises(ArtifactCorrupt, match="::onnx::2"):
        store.artifact(info, ONNX)


# ---------------------------------------------------------------- crashes


@pytest.mark.parametrize("step", ["_write_artifacts", "_write_metadata", "_write_head"])
def test_crash_after_write_step(store, model, step):
    store.create_model(model, SPEC)
    before = publish_next(store, model)
    crash_code = 17

    def crash_after_step():
        # The child really dies here: no exception handler, rollback or
        # cleanup of the store runs, as with a kill or a power loss.
        original = getattr(store, step)

        def step_then_die(*args, **kwargs):
            original(*args, **kwargs)
            os._exit(crash_code)

        setattr(store, step, step_then_die)
        publish_next(store, model, {ONNX: os.urandom(4 * SMALL_CHUNK_BYTES), STATE: b"crashed"})

    assert run_in_child(crash_after_step) == crash_code

    head = store.head(model)
    if step != "_write_head":
        assert head.latest_id == before.publish_id
    # After the head write the new version may be visible (Couchbase) or
    # rolled back with its transaction (SQLite), and either way it is complete.
    assert head.latest in (1, 2)
    current = store.version(model)
    assert current.publish_id == head.latest_id
    assert_version_complete(store, current)
    assert_version_complete(store, store.version(model, 1))

    after = publish_next(store, model)
    assert after.version == head.latest + 1
    assert_version_complete(store, after)


# ---------------------------------------------------------------- names and missing things

BAD_NAMES = ["../x", "a/b", "a:b", "a\x00", "x" * 200, "", " a", "_a", "a b", None, 5]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_invalid_model_name_before_store_access(backend, store, monkeypatch, name):
    backend.forbid_access(store, monkeypatch)
    head = Head(name, 0, "0" * 32, {}, 0.0, 1)
    info = VersionInfo(name, 1, "0" * 32, {"spec": SPEC, "artifacts": {}})
    calls = [
        lambda: store.create_model(name, SPEC),
        lambda: store.head(name),
        lambda: store.version(name),
        lambda: store.version(name, 0),
        lambda: store.publish(head, {ONNX: b"x"}, {"spec": SPEC}),
        lambda: store.artifact(info, ONNX),
    ]
    for call in calls:
        with pytest.raises(InvalidModelName, match="invalid model name"):
            call()


def test_missing_model(store, model):
    with pytest.raises(ModelNotFound, match=model):
        store.head(model)
    with pytest.raises(ModelNotFound, match=model):
        store.version(model)
    with pytest.raises(ModelNotFound, match=model):
        store.version(model, 0)
    assert model not in store.list_models()


def test_missing_version(store, model):
    store.create_model(model, SPEC)
    publish_next(store, model)

    with pytest.raises(VersionNotFound, match=rf"version 2 of model '{model}'"):
        store.version(model, 2)
    with pytest.raises(InvalidInputError, match="-1"):
        store.version(model, -1)
    with pytest.raises(InvalidInputError, match="'1'"):
        store.version(model, "1")


def test_second_store_sees_published_version(backend, store, model):
    store.create_model(model, SPEC)
    info = publish_next(store, model)

    other = backend.open()
    try:
        assert other.head(model) == store.head(model)
        assert other.version(model) == info
        assert other.artifact(info, ONNX) == store.artifact(info, ONNX)
    finally:
        other.close()


# ---------------------------------------------------------------- processes


def test_forked_readers_survive_sigkill(store, model):
    store.create_model(model, SPEC)
    info = publish_next(store, model)
    read_rounds = 100
    children = []
    ready_read, ready_write = os.pipe()

    for index in range(4):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(ready_read)
                assert retry_unavailable(lambda: store.head(model)).latest_id == info.publish_id
                for _ in range(read_rounds):
                    assert store.head(model).latest_id == info.publish_id
                assert store.artifact(store.version(model), ONNX) == store.artifact(info, ONNX)
                os.write(ready_write, bytes([index]))
                if index < 2:
                    # Keep reading until the parent kills this child mid-read.
                    while True:
                        store.head(model)
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    os.close(ready_write)
    statuses = {}

    try:
        reported = set()
        deadline = time.monotonic() + CHILD_DEADLINE_S
        while len(reported) < 4 and time.monotonic() < deadline:
            readable, _, _ = select.select([ready_read], [], [], 0.5)
            if readable:
                data = os.read(ready_read, 16)
                if not data:
                    break
                reported.update(data)
        assert reported == {0, 1, 2, 3}, "a child failed or hung before finishing its reads"

        os.kill(children[0], signal.SIGKILL)
        os.kill(children[1], signal.SIGKILL)
        deadline = time.monotonic() + CHILD_DEADLINE_S
        while len(statuses) < 4 and time.monotonic() < deadline:
            for pid in children:
                if pid not in statuses:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        statuses[pid] = os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        assert [statuses.get(pid) for pid in children] == [-signal.SIGKILL, -signal.SIGKILL, 0, 0]
    finally:
        os.close(ready_read)
        # Only children not yet reaped are killed: a reaped PID may already
        # belong to another process.
        for pid in children:
            if pid not in statuses:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)

    assert store.head(model).latest_id == info.publish_id
    after = publish_next(store, model)
    assert store.version(model) == after
    assert_version_complete(store, after)


FORK_AND_EXIT = """
import os, sys
from modelstore import open_store
from modelstore.errors import StoreUnavailable

store = open_store(sys.argv[1])
store.create_model(sys.argv[2], {"features": []})
pid = os.fork()
if pid == 0:
    # Leaves through the interpreter's normal shutdown, which destroys every
    # object the child inherited. A first request that times out is tried
    # again, as store_backends.retry_unavailable explains.
    for attempt in range(3):
        try:
            assert store.head(sys.argv[2]).latest == 0
            break
        except StoreUnavailable:
            if attempt == 2:
                raise
    sys.exit(0)
_, status = os.waitpid(pid, 0)
print("child exit code", os.waitstatus_to_exitcode(status))
store.close()
"""


def test_forked_child_exits_normally(backend, model):
    # A session of its own lets the test stop the child's child as well if
    # either hangs.
    process = subprocess.Popen(
        [sys.executable, "-c", FORK_AND_EXIT, backend.url, model],
        env={**os.environ, **backend.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=CHILD_DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"the forked process did not exit within {CHILD_DEADLINE_S} s")

    assert process.returncode == 0, stderr
    assert "child exit code 0" in stdout


# ---------------------------------------------------------------- stored predictions


def test_predictions_stored_and_replaced(store, model):
    first = b'{"model":"m","version":1,"outputs":{"label":[1]}}'
    second = b'{"model":"m","version":2,"outputs":{"label":[0]}}'
    store.put_predictions(model, {"order-7": first, "t/0/12": first}, expiry_s=3600)
    assert store.prediction(model, "order-7")["version"] == 1
    assert store.prediction(model, "t/0/12")["outputs"] == {"label": [1]}
    assert store.prediction(model, "absent") is None

    store.put_predictions(model, {"order-7": second}, expiry_s=3600)
    assert store.prediction(model, "order-7")["version"] == 2
    # Predictions of another model are separate.
    assert store.prediction(model + "x", "order-7") is None


@pytest.mark.parametrize(
    "predictions, expiry_s, message",
    [
        ({"k": b"[1,2]"}, 60, "is not a JSON object"),
        ({"k": b"\xff"}, 60, "is not a JSON object"),
        ({"": b"{}"}, 60, "invalid prediction key ''"),
        ({"a\nb": b"{}"}, 60, "invalid prediction key"),
        ({"k" * 200: b"{}"}, 60, "use 1 to 128 bytes"),
        ({"k": b"{}"}, 0, "invalid prediction expiry 0"),
        ({"k": b"{}"}, 31 * 24 * 3600, "from 1 to 2592000"),
    ],
)
def test_invalid_predictions_rejected(store, model, predictions, expiry_s, message):
    with pytest.raises(InvalidInputError, match=message):
        store.put_predictions(model, predictions, expiry_s=expiry_s)


def test_predictions_expire(store, model):
    store.put_predictions(model, {"k": b'{"version":1}'}, expiry_s=1)
    assert store.prediction(model, "k") == {"version": 1}
    deadline = time.monotonic() + 30
    while store.prediction(model, "k") is not None:
        assert time.monotonic() < deadline, "the prediction did not expire within 30 s of its 1 s expiry"
        time.sleep(0.2)
