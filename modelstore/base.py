"""The model store contract that every backend implements.

A model is a chain of immutable versions and one head that names the latest
version and the aliases. The invariants every backend keeps, and that
``tests/test_store_contract.py`` checks on each of them:

1. A version becomes visible only through a CAS-protected write of the head.
   Its artifacts and metadata are written before that write, under keys that
   contain the publish id, and are never changed afterwards.
2. Of two writers publishing on the same parent, exactly one wins; the other
   gets VersionConflict.
3. A crash at any step leaves the head on a complete, verified version.
4. A head write whose outcome is unknown is resolved by reading the head
   back and comparing publish ids, never by writing again blindly.
5. Artifacts larger than the backend's value limit are stored in chunks,
   each with its own checksum.

Version 0 exists from ``create_model`` on: it carries the spec and no
artifacts, so a worker starts a fresh learner from it.

Version numbers only grow. A rollback never moves the head back: it
publishes version N+1 whose artifacts are references to the chunks of the
chosen version k (nothing is copied) and whose offsets are those of version
N. So the predictor, which serves the latest version, switches to k's model
like to any new version, and the worker trains on from k's state without
learning again the records that versions k+1..N consumed. Those records are
dropped from the model, by the operator's choice. Aliases (``production``,
``candidate`` or any name) are labels on version numbers in the head,
moved by a CAS write of the head like a publish.

Retention keeps version 0, the last N versions and every aliased version,
and removes the others. It removes a version's chunks only when no kept
version refers to them, so a rollback version keeps its source's bytes.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

ONNX = "onnx"
STATE = "state"
ARTIFACT_KINDS = (ONNX, STATE)

# Formats of the ONNX artifact: the serialized protobuf, or the protobuf's
# JSON mapping beside a blob of tensor data (see modelstore._onnx_json).
ONNX_BINARY = "binary"
ONNX_JSON = "json"
ONNX_FORMATS = (ONNX_BINARY, ONNX_JSON)


@dataclass(frozen=True)
class Head:
    """The mutable pointer of one model: its latest version and aliases.

    ``cas`` is the backend's token for the compare-and-swap of the next
    publish, and it is opaque to callers. A head read from a store never has
    ``None`` or ``0`` there, and a publish on a head with either always
    raises VersionConflict.
    """

    model: str
    latest: int
    latest_id: str
    aliases: Mapping[str, int] = field(default_factory=dict)
    updated_at: float = 0.0
    cas: Any = None


@dataclass(frozen=True)
class VersionInfo:
    """One published version: its number, publish id and JSON metadata.

    ``metadata`` contains at least: ``model``, ``version``, ``parent`` (its
    version number, None for version 0), ``parent_id`` (its publish id),
    ``publish_id``, ``created_at`` (Unix seconds), ``spec``,
    ``samples_learned``, ``metrics``, ``offsets``
    (``{"topic/partition": next_offset}``, merged over the whole chain) and
    ``artifacts`` (``{kind: {"sha256", "size", "chunks": [{"sha256",
    "size"}, ...]}}``, sizes in bytes, chunks in order).
    """

    model: str
    version: int
    publish_id: str
    metadata: Mapping[str, Any]

    @property
    def offsets(self) -> dict[str, int]:
        return dict(self.metadata.get("offsets", {}))

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.metadata["spec"])

    @property
    def samples_learned(self) -> int:
        return int(self.metadata.get("samples_learned", 0))

    @property
    def source_version(self) -> int:
        """Number of the version whose artifacts this one serves: itself, unless it is a rollback."""
        return int(self.metadata.get("source_version", self.version))


@dataclass(frozen=True)
class Reuse:
    """An artifact of an existing version of the same model, referenced instead of copied.

    Passed to ``publish`` in place of bytes. The new version's metadata
    names the chunks of ``info``'s artifact, so no bytes are written, and
    retention keeps those chunks while any kept version refers to them.
    """

    info: VersionInfo
    kind: str


class ModelStore(abc.ABC):
    """Versioned model storage with a CAS-protected head per model."""

    url: str

    @abc.abstractmethod
    def create_model(self, model: str, spec: Mapping[str, Any]) -> Head:
        """Create ``model`` with version 0 holding ``spec``; raise ModelExists if present."""

    @abc.abstractmethod
    def head(self, model: str) -> Head:
        """Read the model's head; raise ModelNotFound if absent."""

    def heads(self, models: Iterable[str]) -> dict[str, Head]:
        """Read the heads of many models; a model that does not exist is left out.

        Backends override this with one bulk read. Raises InvalidModelName
        for an invalid name, before any store access.
        """
        from modelstore.errors import ModelNotFound
        from modelstore.names import validate_model_name

        names = [validate_model_name(model) for model in models]
        found = {}
        for name in names:
            try:
                found[name] = self.head(name)
            except ModelNotFound:
                continue
        return found

    @abc.abstractmethod
    def version(self, model: str, version: int | None = None) -> VersionInfo:
        """Read one version's metadata (the latest when ``version`` is None).

        Raises ModelNotFound or VersionNotFound.
        """

    @abc.abstractmethod
    def artifact(self, info: VersionInfo, kind: str) -> bytes:
        """Read one artifact of a version, verified against its sha256.

        Each chunk is checked against its own size and sha256, then the whole
        artifact against its own. Raises VersionNotFound when the version has
        no artifact of that kind (version 0 has none), and ArtifactCorrupt,
        naming the stored key, when a chunk is missing, differs or is not a
        binary document.
        """

    @abc.abstractmethod
    def publish(
        self,
        expected: Head,
        artifacts: Mapping[str, "bytes | Reuse"],
        metadata: Mapping[str, Any],
    ) -> VersionInfo:
        """Publish version ``expected.latest + 1`` on top of ``expected``.

        An artifact is bytes, or a Reuse of an artifact of an existing version.

        ``metadata`` must be strict JSON (no NaN or Infinity) and hold
        ``spec``. The store sets ``model``, ``version``, ``parent``,
        ``parent_id``, ``publish_id``, ``created_at`` and ``artifacts``,
        replacing any value the caller passed under those keys.

        Raises VersionConflict when the head is no longer ``expected``, and
        nothing of the attempt is visible then. Raises StoreUnavailable when
        the store timed out or is unavailable: nothing was published, unless the message
        says the outcome is unknown, and then the caller reloads the head
        before publishing again. Raises InvalidInputError for bad metadata,
        kinds or artifact types, and ArtifactTooLarge.
        """

    @abc.abstractmethod
    def list_models(self) -> list[str]:
        """Names of all models, sorted."""

    @abc.abstractmethod
    def versions(self, model: str) -> list[VersionInfo]:
        """Read every version the model still has (retention removes some), by ascending number.

        Raises ModelNotFound.
        """

    @abc.abstractmethod
    def set_alias(self, model: str, alias: str, version: int | None) -> Head:
        """Point ``alias`` at ``version``, or remove it when ``version`` is None, and return the new head.

        The change is one CAS write of the head, tried again on a conflict
        with another head write. Raises InvalidInputError for an invalid
        alias name, ModelNotFound, and VersionNotFound when the version
        does not exist (any more).
        """

    def promote(self, model: str, version: int, alias: str = "production") -> Head:
        """Point ``alias`` (``production`` by default) at ``version``; see ``set_alias``."""
        return self.set_alias(model, alias, version)

    @abc.abstractmethod
    def rollback(self, model: str, to_version: int | None = None) -> VersionInfo:
        """Publish version latest+1 that serves the artifacts of ``to_version``, and return it.

        The new version references the chunks of ``to_version``, so nothing
        is copied. It copies the metadata of ``to_version`` (spec, metrics,
        samples learned, ONNX description) except ``offsets``, which stay
        those of the latest version. So the records that the discarded
        versions learned are never learned again. It records ``rolled_back_from`` (the latest
        version number when it was published) and ``source_version``.
        ``to_version=None`` picks the version before the source of the
        latest one. Raises VersionNotFound, InvalidInputError (version 0 or
        the latest itself), and VersionConflict when other writers
        published throughout a few tries.
        """

    @abc.abstractmethod
    def apply_retention(self, model: str, keep_last: int) -> list[int]:
        """Remove every version except version 0, the last ``keep_last`` and the aliased ones.

        Returns the removed version numbers. Chunks that a kept version
        refers to (a rollback's source) stay. An interrupted run leaves
        every kept version complete, and the next run finishes its work.
        """

    @abc.abstractmethod
    def delete_model(self, model: str) -> None:
        """Remove the model, its head, every version and every artifact.

        The model is gone for readers from the first write on. An
        interrupted delete is finished by calling it again, or by
        ``create_model`` of the same name. Raises ModelNotFound.
        """

    @abc.abstractmethod
    def import_version(
        self,
        expected: Head,
        metadata: Mapping[str, Any],
        artifacts: Mapping[str, "bytes | Reuse"],
    ) -> VersionInfo:
        """Publish a version copied from another store, keeping its number and history fields.

        Like ``publish``, but the version number is ``metadata["version"]``
        (above ``expected.latest``, so gaps left by retention stay), and
        ``parent``, ``created_at`` and the rollback fields are kept. The
        publish id is new: ``parent_id`` names the imported parent when it
        exists here, and ``imported`` records the original publish id.
        """

    @abc.abstractmethod
    def put_predictions(self, model: str, predictions: Mapping[str, bytes], expiry_s: int) -> None:
        """Store prediction documents of ``model``, each a JSON object as bytes, under their keys.

        A document replaces the one stored under the same key, and is gone
        ``expiry_s`` seconds after it was written. Keys follow
        ``modelstore.predictions.check_key``. Raises InvalidModelName or
        InvalidInputError before any store access, StoreUnavailable when the
        store cannot be reached (nothing or part of the batch is written).
        """

    @abc.abstractmethod
    def prediction(self, model: str, key: str) -> dict[str, Any] | None:
        """Return the stored prediction of ``model`` under ``key``, or None when absent or expired."""

    def close(self) -> None:
        """Release the store's connections; a later call opens them again."""

    def __enter__(self) -> "ModelStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
