"""Handling of finished refits: bookkeeping of published versions, retries and rejections.

A published version finishes its records: their offsets may be committed.
A store outage puts the batch back for a retry after a back-off, and a batch
that lost every publish attempt to other writers of its model is retried
after a short delay. A batch that can never be published (a publish check
failed, the model was deleted or cannot be used) is rejected record by
record, so it does not stall the other models and the partitions' commits.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from modelstore.errors import (
    ModelNotFound,
    PublishRejected,
    RecordRejected,
    StreamfitError,
    VersionConflict,
)
from worker.backoff import StoreHealth
from worker.batcher import BufferedRecord
from worker.catalog import ModelCatalog
from worker.metrics import WorkerMetrics
from worker.refits import RefitJob
from worker.rejections import Rejections
from worker.state import WorkState

log = logging.getLogger(__name__)

# A batch that lost every publish attempt to other writers waits this long
# (doubling per further loss, at most MAX_CONFLICT_DELAY_S) before it is
# tried again, so that the writers stop colliding.
CONFLICT_DELAY_S = 0.2
MAX_CONFLICT_DELAY_S = 5.0


class RefitOutcomes:
    """Applies finished refit jobs to the worker's state, metrics and catalog."""

    def __init__(
        self,
        state: WorkState,
        catalog: ModelCatalog,
        metrics: WorkerMetrics,
        rejections: Rejections,
        store: StoreHealth,
        committer: Any,
        max_conflict_attempts: int,
        clock: Callable[[], float],
    ):
        self._state = state
        self._catalog = catalog
        self._metrics = metrics
        self._rejections = rejections
        self._store = store
        self._committer = committer
        self._max_conflict_attempts = max_conflict_attempts
        self._clock = clock
        self._conflicts_in_row: dict[str, int] = {}

    def apply(self, job: RefitJob, owned: list[BufferedRecord]) -> None:
        """Apply a finished refit: count it, finish or retry its records, or reject them."""
        err = job.error
        if err is None:
            self._published(job, owned)
        elif isinstance(err, VersionConflict):
            self._conflicted(job, owned)
        elif isinstance(err, PublishRejected):
            self._store.ok()
            self._publish_rejected(job.model, owned, err)
        elif isinstance(err, ModelNotFound):
            self._store.ok()
            self._catalog.forget(job.model)
            deleted = RecordRejected("unknown_model", f"model {job.model!r} was deleted from the store")
            self._reject_batch(job.model, owned, deleted)
        elif isinstance(err, StreamfitError) and err.retriable:
            self._state.batcher.put_back(job.model, owned)
            self._state.give_back_rejections(job.model, job.batch.rejected)
            self._store.failed(err, f"refitting model {job.model}")
        elif isinstance(err, StreamfitError):
            self._store.ok()
            self._model_failed(job.model, owned, err)
        else:
            raise err

    def _published(self, job: RefitJob, owned: list[BufferedRecord]) -> None:
        model, result = job.model, job.result
        self._store.ok()
        self._conflicts_in_row.pop(model, None)
        self._state.tracker.done(item.position for item in owned)
        started = self._state.first_taken.pop(model, job.started)
        self._metrics.publish_duration.observe(self._clock() - started)
        self._metrics.records_learned.labels(model).inc(result.learned)
        self._metrics.records_skipped.inc(result.skipped)
        self._metrics.publish_conflicts.inc(result.conflicts)
        if result.skipped:
            self._committer.published()
        if result.version is None:
            return
        self._metrics.latest_version.labels(model).set(result.version.version)
        self._metrics.last_publish.labels(model).set_to_current_time()
        self._count_scores(model, result)
        self._catalog.update_offsets(model, result.version.offsets)
        self._committer.published()
        log.info(
            "Published model %s version %d: %d records learned, %d already learned, %d conflicts",
            model, result.version.version, result.learned, result.skipped, result.conflicts,
        )

    def _count_scores(self, model: str, result: Any) -> None:
        scored = result.scored
        self._metrics.scored_records.labels(model).inc(scored.get("n_scored", 0))
        if "correct" in scored:
            self._metrics.scored_correct.labels(model).inc(scored["correct"])
            self._metrics.scored_baseline_correct.labels(model).inc(scored.get("baseline_correct", 0))
        if "sum_abs_error" in scored:
            self._metrics.scored_absolute_error.labels(model).inc(scored["sum_abs_error"])
        for event in result.drift:
            self._metrics.drift_detections.labels(model, event.direction).inc()
            log.warning(
                "Drift detected for model %s version %d: the test-then-train error rate %s "
                "(%d records scored so far)",
                model, result.version.version, "rose" if event.direction == "increase" else "fell",
                event.position, extra={"model": model, "version": result.version.version},
            )

    def _conflicted(self, job: RefitJob, owned: list[BufferedRecord]) -> None:
        # Every attempt lost to another writer of the same model. The store
        # responded, so this is no outage, and only this model's batch waits.
        self._store.ok()
        losses = self._conflicts_in_row.get(job.model, 0) + 1
        self._conflicts_in_row[job.model] = losses
        delay = min(MAX_CONFLICT_DELAY_S, CONFLICT_DELAY_S * 2 ** min(losses - 1, 10))
        self._metrics.publish_conflicts.inc(self._max_conflict_attempts)
        self._state.batcher.put_back(job.model, owned, delay_s=delay)
        self._state.give_back_rejections(job.model, job.batch.rejected)
        log.warning(
            "Model %s: %d publish attempts lost to other writers (%s); its %d records are "
            "retried in %.1f s",
            job.model, self._max_conflict_attempts, job.error, len(owned), delay,
        )

    def _publish_rejected(self, model: str, items: list[BufferedRecord], err: PublishRejected) -> None:
        # The head stays on the last good version. Holding the batch would
        # fail the same check again and stall every model on these partitions.
        self._metrics.publish_rejected.labels(err.reason).inc()
        if items:
            log.error(
                "Version of model %s not published (%s: %s); %d records of %s offsets %d-%d are "
                "dropped as rejected",
                model, err.reason, err.detail, len(items), items[0].position[0],
                items[0].position[1], items[-1].position[1],
            )
        self._reject_batch(model, items, RecordRejected(err.reason, err.detail))

    def _model_failed(self, model: str, items: list[BufferedRecord], err: StreamfitError) -> None:
        # A model whose stored state or spec cannot be used fails the same way
        # on every retry. Rejecting its batch keeps the other models and the
        # partitions' commits moving.
        self._catalog.forget(model)
        if items:
            log.error(
                "Refit of model %s failed and cannot succeed on retry (%r); %d records of %s "
                "offsets %d-%d are rejected as model_error",
                model, err, len(items), items[0].position[0], items[0].position[1],
                items[-1].position[1],
            )
        rejection = RecordRejected("model_error", f"model {model!r} cannot be refit: {err}")
        self._reject_batch(model, items, rejection)

    def _reject_batch(self, model: str, items: list[BufferedRecord], rejection: RecordRejected) -> None:
        self._state.first_taken.pop(model, None)
        self._state.tracker.done(item.position for item in items)
        for item in items:
            source = item.source
            self._rejections.reject(
                item.position[0], item.position[1],
                source.key if source is not None else None,
                source.value if source is not None else None,
                rejection, model, log_it=False,
            )
