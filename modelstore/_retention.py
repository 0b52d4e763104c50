"""Backend-independent rules of retention and rollback: what to keep, what to remove, which target."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from modelstore import _artifacts
from modelstore.base import VersionInfo
from modelstore.errors import InvalidInputError, StoreError, VersionNotFound

if TYPE_CHECKING:
    from modelstore.base import ModelStore

log = logging.getLogger(__name__)


def check_keep(name: str, keep: object, minimum: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < minimum:
        meaning = " (0 keeps every version)" if minimum == 0 else ""
        raise InvalidInputError(f"invalid {name} {keep!r}: expected an integer >= {minimum}{meaning}")
    return keep


def version_not_found(model: str, number: int, latest: int) -> VersionNotFound:
    if number > latest:
        return VersionNotFound(f"version {number} of model {model!r} not found; the latest is {latest}")
    return VersionNotFound(
        f"version {number} of model {model!r} not found: retention removed it; the latest is {latest}. "
        "List the remaining versions with `streamfit models history`"
    )


def rollback_target(latest: VersionInfo, to_version: int | None) -> int:
    """Return the version a rollback of ``latest`` goes to.

    Without ``to_version`` it is the version just below the one whose
    artifacts the latest serves, so repeated rollbacks step further back.
    """
    model = latest.model
    target = latest.source_version - 1 if to_version is None else to_version
    if to_version is None and target < 1:
        raise InvalidInputError(
            f"model {model!r} has no trained version before version {latest.source_version} to "
            "roll back to; publish one first or name the target version"
        )
    if target == 0:
        raise InvalidInputError(
            f"cannot roll back model {model!r} to version 0: it carries only the spec and no "
            "trained model; name a published version"
        )
    if target == latest.version:
        raise InvalidInputError(
            f"cannot roll back model {model!r} to version {target}: it is already the latest"
        )
    if target > latest.version:
        raise VersionNotFound(
            f"version {target} of model {model!r} not found; the latest is {latest.version}"
        )
    return target


@dataclass(frozen=True)
class RetentionPlan:
    """The versions one retention run removes, and the stored parts no kept version refers to."""

    remove: list[VersionInfo]
    parts: list[tuple[str, str, int]]


def plan(live: Iterable[VersionInfo], aliases: Mapping[str, int], keep_last: int) -> RetentionPlan:
    """Choose what to remove: everything but version 0, the last ``keep_last`` and aliased versions.

    A part (publish id, kind, number of chunks) is removed only when no kept
    version refers to it, so the source of a rollback keeps its chunks.
    """
    ordered = sorted(live, key=lambda info: info.version)
    keep_numbers = {0, *aliases.values(), *(info.version for info in ordered[-keep_last:])}
    kept = [info for info in ordered if info.version in keep_numbers]
    removed = [info for info in ordered if info.version not in keep_numbers]
    referenced = set().union(*(_artifacts.storage_refs(info) for info in kept)) if kept else set()
    referenced_ids = {(publish_id, kind) for publish_id, kind, _ in referenced}
    parts = sorted({
        ref for info in removed for ref in _artifacts.storage_refs(info)
        if (ref[0], ref[1]) not in referenced_ids
    })
    return RetentionPlan(removed, parts)


def apply_after_publish(store: "ModelStore", info: VersionInfo) -> None:
    """Run the store's automatic retention after a publish, if ``keep_versions`` is set.

    It runs every ``max(1, keep_versions // 4)`` versions, so a model keeps
    at most about 1.25 times ``keep_versions`` versions plus its aliased ones.
    A failure never turns the published version into an error.
    """
    keep = getattr(store, "keep_versions", 0)
    if not keep or info.version % max(1, keep // 4):
        return
    try:
        removed = store.apply_retention(info.model, keep)
    except StoreError as exc:
        log.warning(
            "model %r version %d is published, but retention failed (%s); the next run retries",
            info.model, info.version, exc,
        )
        return
    if removed:
        log.info("model %r: retention removed %d versions (%d to %d)",
                 info.model, len(removed), min(removed), max(removed))
