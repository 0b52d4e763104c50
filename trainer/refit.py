"""Refit a stored model on one batch and publish the result as its next version.

``Trainer.refit`` is the only way the worker changes a model. One call:

1. reads the model's head and its latest version, and the learner of that
   version. The learner comes from an LRU cache keyed by model and publish
   id, or else from the stored skops state; version 0 starts from the spec;
2. drops the rows whose offset is below the version's stored next offset for
   their partition, because that version already learned them;
3. scores the remaining rows with the current version (test-then-train);
4. learns them on a copy of the learner, so a failure leaves the cached
   learner untouched; with a metric margin in the spec's gate, the copy is
   first checked on held-out rows of the batch (``trainer.holdout``);
5. checks finite parameters and ONNX parity, exports (rewriting the
   model's cached graph when only the weights changed), and publishes with
   a compare-and-swap on the head it read, with offsets merged by max.

When another writer published first, the store raises VersionConflict; the
trainer then reloads the winner and applies the batch again on top of it, at
most ``max_conflict_attempts`` times in total. PublishRejected propagates
with nothing published.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from modelstore.base import STATE, Head, ModelStore, VersionInfo
from modelstore.errors import VersionConflict
from trainer.artifacts import Exporter, version_payload
from trainer.cache import LRU
from trainer.holdout import learn_candidate
from trainer.learner import Learner
from trainer.drift import DriftEvent, resume_monitor
from trainer.metrics import metrics_for_spec, score_batch, scored_delta
from trainer.spec import ModelSpec
from trainer.state import load_state

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """Rows for one model, in consumption order.

    ``positions[i]`` is ``("topic/partition", offset)`` of row i. A
    clustering model ignores ``y``, which still needs one entry per row.
    ``rejected`` optionally counts, by reason, the records of this batch
    rejected before learning. The published version stores these counts.
    """

    X: np.ndarray
    y: np.ndarray
    positions: list[tuple[str, int]]
    rejected: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (len(self.X) == len(self.y) == len(self.positions)):
            raise ValueError(
                f"batch has {len(self.X)} rows in X, {len(self.y)} labels and "
                f"{len(self.positions)} positions; all three must be equal"
            )


@dataclass
class RefitResult:
    """Outcome of one refit; ``version`` is None when every row was already learned."""

    version: VersionInfo | None
    learned: int
    skipped: int
    conflicts: int
    # Changes of the error rate that this batch's scores showed, at most one per direction.
    drift: list[DriftEvent] = field(default_factory=list)
    # What this batch added to the cumulative test-then-train counts.
    scored: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Loaded:
    info: VersionInfo
    spec: ModelSpec
    learner: Learner


class Trainer:
    """Refits models of one store; safe to share between threads.

    ``cache_size`` bounds the number of learners kept in memory, one per
    model version recently used.
    """

    def __init__(
        self, store: ModelStore, *, max_conflict_attempts: int = 3, cache_size: int = 1000
    ):
        if max_conflict_attempts < 1:
            raise ValueError(
                f"max_conflict_attempts is {max_conflict_attempts}; it must be at least 1"
            )
        self.store = store
        self.max_conflict_attempts = max_conflict_attempts
        self._learners = LRU(cache_size)
        self._specs = LRU(cache_size)
        self._exporter = Exporter(cache_size)

    def spec(self, model: str) -> ModelSpec:
        """Return the model's spec, read once from its latest version.

        The trainer copies the spec unchanged into every version it publishes,
        so the cached spec stays valid for the whole chain.
        """
        spec = self._specs.get(model)
        if spec is None:
            spec = ModelSpec.from_dict(self.store.version(model).spec)
            self._specs.put(model, spec)
        return spec

    def stored_offsets(self, model: str) -> dict[str, int]:
        return self.store.version(model).offsets

    def refit(self, model: str, batch: Batch) -> RefitResult:
        conflicts = 0
        while True:
            head = self.store.head(model)
            loaded = self._load(model, head)
            try:
                result = self._apply(model, head, loaded, batch)
            except VersionConflict:
                conflicts += 1
                if conflicts >= self.max_conflict_attempts:
                    raise VersionConflict(
                        f"model {model!r}: publishing on version {head.latest} lost "
                        f"{conflicts} times to other writers; give the batch back and retry "
                        "later"
                    ) from None
                logger.warning(
                    "model %s: another writer published on top of version %s; "
                    "reapplying the batch on the new head (conflict %s of %s)",
                    model,
                    head.latest,
                    conflicts,
                    self.max_conflict_attempts,
                )
                continue
            result.conflicts = conflicts
            return result

    def _apply(self, model: str, head: Head, loaded: _Loaded, batch: Batch) -> RefitResult:
        info, spec = loaded.info, loaded.spec
        stored = info.offsets
        keep = np.array(
            [offset >= stored.get(partition, 0) for partition, offset in batch.positions],
            dtype=bool,
        )
        skipped = int((~keep).sum())
        if not keep.any():
            return RefitResult(version=None, learned=0, skipped=skipped, conflicts=0)

        X = np.asarray(batch.X)[keep]
        y = None if spec.is_clusterer else np.asarray(batch.y)[keep]

        # Test-then-train: score with the current version, then learn on a copy.
        learner = loaded.learner
        learner.validate(X, y)
        metrics = metrics_for_spec(spec, info.metadata.get("metrics"))
        errors = score_batch(metrics, learner, X, y)
        drift = resume_monitor(info.metadata.get("drift"), spec.task)
        drift_events = drift.update(errors) if errors is not None else []
        learner, gate_report = learn_candidate(learner, X, y)
        exported = self._exporter.export(model, learner, X)

        kept_positions = [p for p, k in zip(batch.positions, keep) if k]
        artifacts, metadata = version_payload(
            learner,
            exported,
            metrics.to_dict(),
            merge_offsets(stored, kept_positions),
            rejected=batch.rejected,
            gate_report=gate_report,
        )
        metadata["drift"] = drift.to_dict()
        version = self.store.publish(head, artifacts, metadata)
        self._learners.pop((model, head.latest_id))
        self._learners.put((model, version.publish_id), _Loaded(version, spec, learner))
        return RefitResult(
            version=version, learned=int(keep.sum()), skipped=skipped, conflicts=0, drift=drift_events,
            scored=scored_delta(info.metadata.get("metrics"), metadata["metrics"]),
        )

    def _load(self, model: str, head: Head) -> _Loaded:
        key = (model, head.latest_id)
        loaded = self._learners.get(key)
        if loaded is not None:
            return loaded

        info = self.store.version(model, head.latest)
        # Each version carries its spec, which is authoritative over the cached one.
        spec = ModelSpec.from_dict(info.spec)
        self._specs.put(model, spec)
        if STATE in info.metadata.get("artifacts", {}):
            learner = load_state(self.store.artifact(info, STATE), spec)
        else:
            learner = Learner(spec)
        loaded = _Loaded(info, spec, learner)
        self._learners.put(key, loaded)
        return loaded


def merge_offsets(stored: dict[str, int], positions: list[tuple[str, int]]) -> dict[str, int]:
    """Return ``stored`` advanced past ``positions``, each partition's next offset the max."""
    merged = dict(stored)
    for partition, offset in positions:
        merged[partition] = max(merged.get(partition, 0), offset + 1)
    return dict(sorted(merged.items()))
