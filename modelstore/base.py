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
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping

ONNX = "onnx"
STATE = "state"
ARTIFACT_KINDS = (ONNX, STATE)


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


class ModelStore(abc.ABC):
    """Versioned model storage with a CAS-protected head per model."""

    url: str

    @abc.abstractmethod
    def create_model(self, model: str, spec: Mapping[str, Any]) -> Head:
        """Create ``model`` with version 0 holding ``spec``; raise ModelExists if present."""

    @abc.abstractmethod
    def head(self, model: str) -> Head:
        """Read the model's head; raise ModelNotFound if absent."""

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
        artifacts: Mapping[str, bytes],
        metadata: Mapping[str, Any],
    ) -> VersionInfo:
        """Publish version ``expected.latest + 1`` on top of ``expected``.

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

    def close(self) -> None:
        """Release the store's connections; a later call opens them again."""

    def __enter__(self) -> "ModelStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
