"""Cache of what the worker needs per model: its spec and its stored next offsets."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from modelstore.base import ModelStore
from modelstore.errors import ModelExists, ModelNotFound, RecordRejected, StreamfitError

log = logging.getLogger(__name__)

# Bounds the memory a stream of records naming random models can take.
MAX_MISSING_ENTRIES = 10_000


@dataclass
class ModelEntry:
    """A model's spec and the next offset per partition that its latest version learned."""

    spec: Any
    offsets: dict[str, int]


class ModelCatalog:
    """Looks up models through the trainer and creates missing ones from a spec.

    ``trainer`` is a ``trainer.refit.Trainer`` (``spec`` and ``stored_offsets``).
    A model that does not exist is remembered for ``missing_ttl_s`` seconds,
    so a flood of records naming it does not read the store for each record.
    """

    def __init__(
        self,
        store: ModelStore,
        trainer: Any,
        *,
        create_spec: Mapping[str, Any] | None = None,
        missing_ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._store = store
        self._trainer = trainer
        self._create_spec = create_spec
        self._missing_ttl_s = missing_ttl_s
        self._clock = clock
        self._entries: dict[str, ModelEntry] = {}
        self._missing: dict[str, float] = {}
        self._broken: dict[str, str] = {}
        self._spec_noted: set[str] = set()

    def lookup(self, model: str) -> ModelEntry:
        """Return the model's entry; raise RecordRejected('unknown_model') if it does not exist.

        Store errors (StoreUnavailable and the like) propagate to the caller.
        """
        entry = self._entries.get(model)
        if entry is not None:
            return entry
        missing_until = self._missing.get(model)
        if missing_until is not None and self._clock() < missing_until:
            broken = self._broken.get(model)
            if broken is not None:
                raise RecordRejected("model_error", f"model {model!r} cannot be used: {broken}")
            raise self._unknown(model)

        try:
            entry = self._load(model)
            self._note_other_spec(model, entry.spec)
        except ModelNotFound:
            if self._create_spec is None:
                self._remember_missing(model)
                raise self._unknown(model) from None
            self._create(model)
            entry = self._load(model)
        except StreamfitError as err:
            if err.retriable:
                raise
            # A stored spec or version that cannot be read fails the same way
            # on every retry, so the model's records are rejected for a while.
            log.error("Model %s cannot be used: %r; its records are rejected as model_error", model, err)
            self._remember_missing(model)
            self._broken[model] = str(err)
            raise RecordRejected("model_error", f"model {model!r} cannot be used: {err}") from None
        self._missing.pop(model, None)
        self._broken.pop(model, None)
        self._entries[model] = entry
        return entry

    def update_offsets(self, model: str, offsets: Mapping[str, int]) -> None:
        """Replace a model's cached offsets with those of a version this worker published."""
        entry = self._entries.get(model)
        if entry is not None:
            entry.offsets = dict(offsets)

    def forget(self, model: str) -> None:
        self._entries.pop(model, None)

    def invalidate(self) -> None:
        """Forget every cached entry; called when partitions move, because another
        worker may have published versions of these models meanwhile."""
        self._entries.clear()
        self._missing.clear()
        self._broken.clear()

    def _load(self, model: str) -> ModelEntry:
        spec = self._trainer.spec(model)
        offsets = self._trainer.stored_offsets(model)
        return ModelEntry(spec=spec, offsets=dict(offsets))

    def _create(self, model: str) -> None:
        try:
            self._store.create_model(model, dict(self._create_spec or {}))
        except ModelExists:
            # Another worker created it between our read and our insert.
            return
        log.info("Created model %s from the configured model spec", model)

    def _note_other_spec(self, model: str, spec: Any) -> None:
        """Log once per model when the configured spec differs from the stored one, which stays in use."""
        if self._create_spec is None or model in self._spec_noted:
            return
        self._spec_noted.add(model)
        stored = spec.to_dict() if hasattr(spec, "to_dict") else spec
        if stored != dict(self._create_spec):
            log.warning(
                "Model %s already exists with another spec, which it keeps: the model spec "
                "setting only creates missing models. Create a new model to use the new spec",
                model, extra={"model": model},
            )

    def _remember_missing(self, model: str) -> None:
        if len(self._missing) >= MAX_MISSING_ENTRIES:
            self._missing.clear()
            self._broken.clear()
        self._missing[model] = self._clock() + self._missing_ttl_s

    @staticmethod
    def _unknown(model: str) -> RecordRejected:
        return RecordRejected(
            "unknown_model",
            f"model {model!r} does not exist in the store; create it first or start "
            "the worker with a model spec to create models on first use",
        )
