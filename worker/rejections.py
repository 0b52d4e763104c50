"""Rejected records: counted by reason and model, logged at a bounded rate, sent to dead letters."""

from __future__ import annotations

import logging
from typing import Any

from modelstore.errors import RecordRejected
from worker.metrics import WorkerMetrics
from worker.records import short_detail

log = logging.getLogger(__name__)


class Rejections:
    """Counts, logs and dead-letters rejected records.

    ``model`` is given only for a model that exists in the store, so the
    per-model series stay bounded by the number of real models.
    """

    def __init__(self, metrics: WorkerMetrics, dead_letters: Any = None):
        self._metrics = metrics
        self._dead_letters = dead_letters
        self._logged: dict[str, int] = {}

    def reject(
        self,
        partition: str,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        rejection: RecordRejected,
        model: str | None = None,
        log_it: bool = True,
    ) -> None:
        self._metrics.records_rejected.labels(rejection.reason).inc()
        if model is not None:
            self._metrics.model_records_rejected.labels(model).inc()
        if log_it:
            self._log(partition, offset, rejection)
        if self._dead_letters is not None:
            self._dead_letters.send(
                key=key,
                value=value,
                partition=partition,
                offset=offset,
                reason=rejection.reason,
                detail=rejection.detail,
            )

    def _log(self, partition: str, offset: int, rejection: RecordRejected) -> None:
        # The first 10 rejections of each reason, then every 1000th.
        count = self._logged.get(rejection.reason, 0) + 1
        self._logged[rejection.reason] = count
        if count <= 10 or count % 1000 == 0:
            # The tenth line announces that later ones are thinned out, so a
            # quiet log is not read as "no more rejections".
            more = "; from now on every 1000th of them is logged" if count == 10 else ""
            log.warning(
                "Rejected record %s offset %d: %s: %s (%d rejected for %s so far%s)",
                partition, offset, rejection.reason, short_detail(rejection.detail),
                count, rejection.reason, more,
                extra={"partition": partition, "offset": offset, "reason": rejection.reason},
            )
