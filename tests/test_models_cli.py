"""``streamfit models``: every action, its table and JSON output, and its errors."""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import pytest

from modelstore import ONNX, STATE, open_store
from store_backends import COUCHBASE_SCOPE
from streamfit.cli import main

SPEC_FILE = str(Path(__file__).resolve().parents[1] / "trainer" / "specs" / "flights.json")


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'models.db'}"


def run(capsys, *argv):
    """Run ``streamfit models ARGV`` and return (exit code, stdout, stderr)."""
    code = main(["models", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def publish_versions(url, model, count):
    with open_store(url) as store:
        for number in range(1, count + 1):
            head = store.head(model)
            spec = store.version(model).spec
            store.publish(head, {ONNX: os.urandom(3000 + number), STATE: os.urandom(50)}, {
                "spec": spec, "samples_learned": 100 * number, "offsets": {"flights/0": 100 * number},
                "metrics": {"accuracy": 0.5 + number / 100},
            })


@pytest.fixture
def flights(capsys, sqlite_url):
    code, out, err = run(capsys, "--store", sqlite_url, "create", "flights", "--spec", SPEC_FILE)
    assert code == 0, err
    assert out == "created model flights (version 0)\n"
    publish_versions(sqlite_url, "flights", 3)
    return sqlite_url


def test_list_and_show(capsys, flights):
    code, out, _ = run(capsys, "list", "--store", flights)

    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["MODEL", "LATEST", "ALIASES", "SAMPLES_LEARNED", "METRIC", "UPDATED"]
    assert row.split()[:5] == ["flights", "3", "300", "accuracy", "0.5300"]

    code, out, _ = run(capsys, "--store", flights, "show", "flights", "--version", "2")
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines()[1:] if len(line.split(None, 1)) == 2)
    assert fields["version"] == "2"
    assert fields["parent"] == "1"
    assert fields["samples_learned"] == "200"
    assert fields["offsets"] == '{"flights/0": 200}'
    assert "3002 bytes sha256 " in out

    meta = run_json(capsys, "--store", flights, "show", "flights")
    assert meta["version"] == 3
    assert meta["artifacts"][ONNX]["size"] == 3003


def test_history_lineage_and_aliases(capsys, flights):
    assert run(capsys, "--store", flights, "promote", "flights", "2")[1] == \
        "model flights: alias production -> version 2\n"
    assert run(capsys, "--store", flights, "alias", "flights", "candidate", "3")[0] == 0
    code, out, _ = run(capsys, "--store", flights, "rollback", "flights", "--to", "1")
    assert code == 0
    assert out.startswith("model flights: version 4 now serves the model of version 1 (rolled back from version 3)")

    history = run_json(capsys, "--store", flights, "history", "flights")
    assert [row["version"] for row in history] == [0, 1, 2, 3, 4]
    assert history[2]["aliases"] == "production"
    assert history[3]["aliases"] == "candidate"
    assert history[4]["lineage"] == "rollback of 3 to 1"
    assert history[4]["samples_learned"] == 100

    code, out, _ = run(capsys, "--store", flights, "history", "flights")
    assert out.splitlines()[0].split() == [
        "VERSION", "PARENT", "CREATED", "SAMPLES_LEARNED", "METRIC", "ONNX_BYTES", "ALIASES", "LINEAGE"]
    assert out.splitlines()[5].split()[-5:] == ["rollback", "of", "3", "to", "1"]

    shown = run_json(capsys, "--store", flights, "show", "flights", "--alias", "production")
    assert shown["version"] == 2
    assert run(capsys, "--store", flights, "alias", "flights", "candidate", "--remove")[0] == 0
    assert run_json(capsys, "--store", flights, "promote", "flights", "3", "--alias", "candidate")[
        "previous"] is None


def test_prune(capsys, flights):
    run(capsys, "--store", flights, "promote", "flights", "1")

    result = run_json(capsys, "--store", flights, "prune", "flights", "--keep", "1")

    assert result == {"model": "flights", "removed": [2], "kept": [0, 1, 3]}
    code, out, _ = run(capsys, "--store", flights, "prune", "flights", "--keep", "1")
    assert out == "model flights: removed 0 versions; kept 0-1, 3\n"


def test_export_import_between_sqlite_stores(capsys, flights, tmp_path):
    run(capsys, "--store", flights, "promote", "flights", "2")
    run(capsys, "--store", flights, "rollback", "flights", "--to", "1")
    archive = tmp_path / "flights.tar.gz"

    exported = run_json(capsys, "--store", flights, "export", "flights", "--out", str(archive))
    target = f"sqlite:///{tmp_path / 'other.db'}"
    imported = run_json(capsys, "--store", target, "import", str(archive), "--as", "copy")

    assert exported["versions"] == imported["versions"] == [0, 1, 2, 3, 4]
    assert imported["aliases"] == {"production": 2}
    # The rollback's bytes are version 1's, stored once in the archive.
    with tarfile.open(archive) as opened:
        names = opened.getnames()
    assert names[0] == "streamfit-model.json"
    assert "artifacts/4/onnx" not in names
    with open_store(flights) as source, open_store(target) as copy:
        for original in source.versions("flights"):
            moved = copy.version("copy", original.version)
            for key in ("parent", "samples_learned", "offsets", "metrics", "spec", "created_at"):
                if original.version:
                    assert moved.metadata[key] == original.metadata[key], key
            for kind in original.metadata["artifacts"]:
                assert copy.artifact(moved, kind) == source.artifact(original, kind)
        assert copy.version("copy", 4).source_version == 1

    code, _, err = run(capsys, "--store", target, "import", str(archive), "--as", "copy")
    assert code == 2
    assert "model 'copy' already exists" in err


@pytest.mark.couchbase
def test_export_sqlite_import_couchbase(capsys, flights, tmp_path, gocaves_server, monkeypatch):
    monkeypatch.setenv("STREAMFIT_COUCHBASE_USERNAME", gocaves_server.username)
    monkeypatch.setenv("STREAMFIT_COUCHBASE_PASSWORD", gocaves_server.password)
    couchbase_url = f"{gocaves_server.connstr}/{gocaves_server.bucket}?scope={COUCHBASE_SCOPE}&onnx_format=json"
    name = f"laptop-{uuid.uuid4().hex[:8]}"
    run(capsys, "--store", flights, "promote", "flights", "3")
    archive = tmp_path / "flights.tar"

    assert run(capsys, "--store", flights, "export", "flights", "--out", str(archive))[0] == 0
    code, out, err = run(capsys, "--store", couchbase_url, "import", str(archive), "--as", name)

    assert code == 0, err
    assert out == f"imported model {name}: versions 0-3, aliases production=3, from {archive}\n"
    history = run_json(capsys, "--store", couchbase_url, "history", name)
    assert [row["version"] for row in history] == [0, 1, 2, 3]
    with open_store(flights) as source, open_store(couchbase_url) as target:
        for number in (1, 2, 3):
            assert target.artifact(target.version(name, number), ONNX) == \
                source.artifact(source.version("flights", number), ONNX)
        assert target.head(name).aliases == {"production": 3}

    # And back again, from Couchbase to a new SQLite file.
    back = tmp_path / "back.tar"
    assert run(capsys, "--store", couchbase_url, "export", name, "--out", str(back))[0] == 0
    assert run_json(capsys, "--store", f"sqlite:///{tmp_path / 'back.db'}", "import", str(back))[
        "versions"] == [0, 1, 2, 3]
    assert run(capsys, "--store", couchbase_url, "delete", name, "--yes")[0] == 0


def test_import_rejects_tampered_archive(capsys, flights, tmp_path):
    archive = tmp_path / "flights.tar"
    run(capsys, "--store", flights, "export", "flights", "--out", str(archive))
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(archive) as source, tarfile.open(tampered, "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name == "artifacts/2/onnx":
                data = bytes(reversed(data))
            target.addfile(member, io.BytesIO(data))

    code, _, err = run(capsys, "--store", flights, "import", str(tampered), "--as", "tampered")

    assert code == 2
    assert "version 2 artifact 'onnx' fails its checksum" in err
    # The half-imported model is removed, so the import can be tried again.
    assert "tampered" not in run_json(capsys, "--store", flights, "list")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "../etc"], "invalid model name '../etc'"),
        (["show", "flights", "--version", "9"], "version 9 of model 'flights' not found; the latest is 3"),
        (["show", "nope"], "model 'nope' not found"),
        (["show", "flights", "--alias", "production"], "model 'flights' has no alias 'production'"),
        (["rollback", "flights", "--to", "0"], "cannot roll back model 'flights' to version 0"),
        (["promote", "flights", "2", "--alias", "9x"], "invalid alias name '9x'"),
        (["prune", "flights", "--keep", "0"], "invalid keep_last 0"),
        (["delete", "flights"], "add --yes to confirm"),
        (["import", "missing.tar"], "archive 'missing.tar' not found"),
    ],
)
def test_errors(capsys, flights, argv, message):
    code, out, err = run(capsys, "--store", flights, *argv)

    assert code == 2
    assert out == ""
    assert err.startswith("streamfit models: error: ")
    assert message in err


def test_delete(capsys, flights):
    code, out, _ = run(capsys, "--store", flights, "delete", "flights", "--yes")

    assert code == 0
    assert out == "deleted model flights\n"
    assert run_json(capsys, "--store", flights, "list") == []


TOML_SPEC = """\
estimator = "SGDClassifier"
labels = [0, 1]

[params]
loss = "log_loss"

[[features]]
name = "x"
"""


def test_create_from_toml_spec(capsys, sqlite_url, tmp_path):
    spec = tmp_path / "sensor.toml"
    spec.write_text(TOML_SPEC)
    code, out, err = run(capsys, "--store", sqlite_url, "create", "sensor", "--spec", str(spec))
    assert code == 0, err
    with open_store(sqlite_url) as store:
        stored = store.version("sensor").spec
    assert stored["estimator"] == "SGDClassifier"
    assert stored["params"]["loss"] == "log_loss"

    broken = tmp_path / "broken.toml"
    broken.write_text("estimator = ")
    code, _, err = run(capsys, "--store", sqlite_url, "create", "other", "--spec", str(broken))
    assert code != 0
    assert f"spec file {str(broken)!r} is not valid TOML" in err


def test_output_into_closed_pipe_exits_quietly(flights, tmp_path):
    # `streamfit models history | head -1`: the reader leaves after one line.
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "streamfit.cli", "models", "--store", flights, "history", "flights"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    process.stdout.close()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0
    assert b"Traceback" not in err
    assert b"BrokenPipeError" not in err
