"""Incremental learning for streamfit: model specs, learners, ONNX export, safe state, refit."""

from trainer.learner import Learner
from trainer.refit import Batch, RefitResult, Trainer
from trainer.spec import ModelSpec

__all__ = ["Batch", "Learner", "ModelSpec", "RefitResult", "Trainer"]
