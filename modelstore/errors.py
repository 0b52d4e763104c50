"""Every error streamfit raises on purpose, in one hierarchy.

Each class says whether the failed operation may succeed when tried again
(``retriable``). The worker chooses between retrying, rejecting a record and
stopping from that flag, not from lists of exception types.
"""


class StreamfitError(Exception):
    """Base class of streamfit's own errors."""

    retriable = False


class InvalidInputError(StreamfitError, ValueError):
    """A value given by a user or a client is invalid; the message names the fix."""


class InvalidModelName(InvalidInputError):
    """A model name that could reach a store key is not allowed."""


class SpecError(InvalidInputError):
    """A model spec is invalid; the message names the field, the value and the fix."""


class ConfigError(InvalidInputError):
    """A setting of a streamfit process is invalid."""


class RecordRejected(StreamfitError):
    """A record cannot be learned or scored.

    ``reason`` is a short stable code used as a metric label and a dead-letter
    header (for example ``invalid_json``); ``detail`` is the readable message.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StoreError(StreamfitError):
    """A model store operation failed."""


class StoreUnavailable(StoreError):
    """The store did not answer in time or refused the connection."""

    retriable = True


class ModelNotFound(StoreError, LookupError):
    """No model of that name exists in the store."""


class ModelExists(StoreError):
    """A model of that name already exists."""


class VersionNotFound(StoreError, LookupError):
    """The model exists but the requested version or alias does not."""


class VersionConflict(StoreError):
    """Another writer moved the model's head since the caller read it.

    The caller reloads the head and re-applies its batch on the winner, or
    gives the batch back. Trying the same publish again cannot succeed.
    """

    retriable = True


class ArtifactCorrupt(StoreError):
    """A stored artifact is missing, fails its checksum or has the wrong format."""


class ArtifactTooLarge(StoreError):
    """An artifact exceeds the configured maximum size."""


class PublishRejected(StreamfitError):
    """A new version failed a publish check (non-finite parameters, ONNX parity)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
