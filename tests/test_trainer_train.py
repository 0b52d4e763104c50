"""``streamfit train``: bootstrap a model from a file and publish its first version."""

import io
import json

import numpy as np
import onnxruntime as ort
import pytest

from modelstore import ONNX, STATE, open_store
from streamfit.cli import main
from streamfit.train import Progress
from trainer.named_inputs import feeds
from trainer.spec import ModelSpec
from trainer.state import load_state

SPEC = {
    "estimator": "SGDClassifier",
    "params": {"loss": "log_loss"},
    "features": [{"name": "x"}, {"name": "colour", "type": "categorical",
                                 "vocabulary": ["red", "blue"], "unknown": "reject"}],
    "labels": ["no", "yes"],
    "batch": {"max_records": 25},
}


def write_records(path, n=120, seed=0):
    rng = np.random.RandomState(seed)
    lines = []
    for x in rng.normal(size=n):
        colour = "red" if x > 0 else "blue"
        lines.append(json.dumps({"features": {"x": float(x), "colour": colour},
                                 "label": "yes" if x > 0 else "no"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def files(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC), encoding="utf-8")
    return tmp_path, spec, f"sqlite:///{tmp_path / 'models.db'}"


def test_train_json_lines_publishes_version_one(files, capsys):
    tmp_path, spec, store_url = files
    data = tmp_path / "data.jsonl"
    write_records(data)
    with data.open("a", encoding="utf-8") as f:
        f.write('{"features": {"x": NaN, "colour": "red"}, "label": "yes"}\n')
        f.write('{"features": {"x": 1.0, "colour": "green"}, "label": "yes"}\n')
        f.write('{"features": {"x": 1.0, "colour": "red"}, "label": "maybe"}\n')
        f.write("not json\n")

    code = main(["train", "m", "--data", str(data), "--spec", str(spec), "--store", store_url])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.startswith("published model m version 1: 120 records learned, rejected: ")
    assert "invalid_json 1, non_finite 1, unknown_category 1, unknown_label 1" in out
    assert "test-then-train accuracy" in out
    assert "data.jsonl:121: rejected (non_finite)" in err
    assert "training [" in err
    assert "100%" in err

    with open_store(store_url) as store:
        info = store.version("m")
        assert info.version == 1
        assert info.samples_learned == 120
        assert info.offsets == {}
        assert info.metadata["bootstrap"] == {"file": "data.jsonl", "records": 120}
        assert info.metadata["metrics"]["n_scored"] == 95  # the first batch of 25 is not scored
        assert info.metadata["rejected"]["unknown_label"] == 1
        learner = load_state(store.artifact(info, STATE), ModelSpec.from_dict(info.spec))
        session = ort.InferenceSession(store.artifact(info, ONNX), providers=["CPUExecutionProvider"])
    X = np.array([[2.0, 1.0, 0.0], [-2.0, 0.0, 1.0]], dtype=np.float32)
    assert session.run(["label"], {"features": X})[0].tolist() == ["yes", "no"]
    assert learner.predict(X).tolist() == ["yes", "no"]


def test_train_csv_and_named_onnx(files, capsys):
    tmp_path, spec, store_url = files
    data = tmp_path / "data.csv"
    rows = ["x,colour,label"] + [f"{x},{'red' if x > 0 else 'blue'},{'yes' if x > 0 else 'no'}"
                                 for x in np.random.RandomState(1).normal(size=60)]
    rows.append("abc,red,yes")
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    named = tmp_path / "named.onnx"

    code = main(["train", "m", "--data", str(data), "--spec", str(spec), "--store", store_url,
                 "--named-onnx", str(named), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "60 records learned, rejected: wrong_type 1" in out
    assert "training [" not in err

    session = ort.InferenceSession(named.read_bytes(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "colour"]
    records = [{"x": 2.0, "colour": "red"}, {"x": -2.0, "colour": "blue"}]
    labels = session.run(["label"], feeds(ModelSpec.from_dict(SPEC).schema, records))[0]
    assert labels.tolist() == ["yes", "no"]


def test_train_refuses_model_with_versions(files, capsys):
    tmp_path, spec, store_url = files
    data = tmp_path / "data.jsonl"
    write_records(data, n=30)
    assert main(["train", "m", "--data", str(data), "--spec", str(spec), "--store", store_url,
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "m", "--data", str(data), "--spec", str(spec), "--store", store_url,
                 "--no-progress"]) == 2
    assert "model 'm' already has version 1; train publishes only a model's first version" in (
        capsys.readouterr().err)


def test_train_errors_name_the_fix(files, capsys):
    tmp_path, spec, store_url = files
    assert main(["train", "m", "--data", str(tmp_path / "none.jsonl"), "--spec", str(spec),
                 "--store", store_url]) == 2
    assert "data file" in capsys.readouterr().err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("[1, 2]\n", encoding="utf-8")
    assert main(["train", "m", "--data", str(empty), "--spec", str(spec), "--store", store_url,
                 "--no-progress"]) == 2
    assert "no usable record in" in capsys.readouterr().err

    bad_spec = tmp_path / "bad.toml"
    bad_spec.write_text('estimator = "MultinomialNB"\nlabels = [0, 1]\n[[features]]\nname = "x"\n',
                        encoding="utf-8")
    assert main(["train", "m", "--data", str(empty), "--spec", str(bad_spec),
                 "--store", store_url]) == 2
    assert "use 'MinMaxScaler'" in capsys.readouterr().err


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_plain_text():
    logged = io.StringIO()
    progress = Progress(1000, stream=logged)
    for done in range(0, 1001, 50):
        progress.update(done, done, {"accuracy": 0.5})
    lines = logged.getvalue().splitlines()
    assert len(lines) == 11  # one per tenth of the file
    assert lines[-1] == "training [##############################] 100% 1,000 records, accuracy 0.5"

    terminal = FakeTerminal()
    bar = Progress(10, stream=terminal)
    bar.update(10, 3, {})
    bar.close()
    assert terminal.getvalue() == "\rtraining [##############################] 100% 3 records\n"
