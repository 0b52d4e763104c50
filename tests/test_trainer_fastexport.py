"""Fast export through the Exporter: rewrite when only weights changed, convert otherwise."""

import numpy as np

from trainer.artifacts import CONVERT, REWRITE, Exporter
from trainer.export import convert
from trainer.learner import Learner
from trainer.spec import ModelSpec

FEATURES = [{"name": "x"}, {"name": "y"}]


def learner_for(estimator="SGDClassifier", **params):
    raw = {"estimator": estimator, "params": params, "features": FEATURES}
    if estimator != "MiniBatchKMeans":
        raw["labels"] = [0, 1]
    return Learner(ModelSpec.from_dict(raw))


def batch(seed):
    X = np.random.RandomState(seed).normal(size=(40, 2))
    return X, (X[:, 0] > 0).astype(int)


def test_exporter_rewrites_after_first_conversion():
    exporter = Exporter()
    learner = learner_for(loss="log_loss")
    methods = []
    for seed in range(3):
        X, y = batch(seed)
        learner.learn(X, y)
        exported = exporter.export("m", learner, X)
        methods.append(exported.method)
        assert exported.onnx_bytes == convert(learner).SerializeToString()
        assert exported.metadata["export_method"] == exported.method
    assert methods == [CONVERT, REWRITE, REWRITE]


def test_exporter_keys_templates_by_model():
    exporter = Exporter()
    first, second = learner_for(loss="hinge"), learner_for(loss="log_loss")
    X, y = batch(0)
    first.learn(X, y)
    second.learn(X, y)
    assert exporter.export("a", first, X).method == CONVERT
    # Another model, another spec: its own conversion, never a's graph.
    assert exporter.export("b", second, X).method == CONVERT
    assert exporter.export("a", first, X).method == REWRITE


def test_exporter_converts_when_structure_changes():
    exporter = Exporter()
    X, y = batch(0)
    exporter.export("m", learner_for(loss="hinge").learn(X, y), X)
    # Same model key, other spec (a new model under the same name): convert again.
    other = learner_for(loss="modified_huber").learn(X, y)
    exported = exporter.export("m", other, X)
    assert exported.method == CONVERT
    assert exported.metadata["outputs"] == {"label": "label", "probabilities": "probabilities"}


def test_exporter_falls_back_when_rewrite_fails_parity():
    exporter = Exporter()
    learner = learner_for(loss="log_loss")
    X, y = batch(0)
    exporter.export("m", learner.learn(X, y), X)
    template = exporter._templates.get("m").template
    stale = template.rewrite(learner)
    template.rewrite = lambda learner: stale  # a rewrite that misses the new weights

    X, y = batch(1)
    learner.learn(X, (X[:, 1] > 0).astype(int))
    exported = exporter.export("m", learner, X)
    assert exported.method == CONVERT
    assert exported.onnx_bytes != stale
    assert exporter._templates.get("m").template is not template


def test_exporter_always_converts_kmeans():
    exporter = Exporter()
    learner = learner_for("MiniBatchKMeans", n_clusters=2)
    for seed in range(2):
        X, _ = batch(seed)
        learner.learn(X)
        assert exporter.export("k", learner, X).method == CONVERT
