"""Export a model with all its versions to a tar archive, and import it into any store.

The archive is a plain tar file (gzip-compressed when its name ends in
``.gz`` or ``.tgz``) with two kinds of members and nothing executable:

``streamfit-model.json``
    The manifest, first in the archive: ``format`` ("streamfit-model"),
    ``format_version`` (1), ``model``, ``exported_at`` (Unix seconds),
    ``source`` (the store URL, which never contains credentials),
    ``latest``, ``aliases`` and ``versions``. Each version has its
    ``metadata`` as stored and an ``artifacts`` object. Each artifact is
    either ``{"file": "artifacts/<version>/<kind>", "sha256", "size"}``, or
    ``{"reuse": {"version": N, "kind": K}}`` when it refers to the same
    stored bytes as an earlier version's artifact (a rollback's source).
``artifacts/<version>/<kind>``
    The artifact's bytes as ``store.artifact`` returns them (ONNX in binary,
    whatever format the source store used).

Import never extracts anything to disk. It reads only the members that
the manifest names, checks each against its size and sha256, and keeps
version numbers, aliases, history fields and shared artifacts. The
target store stores the ONNX artifact in its own ``onnx_format``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelstore.base import ModelStore, Reuse, VersionInfo
from modelstore.errors import ArtifactCorrupt, InvalidInputError, StoreError
from modelstore.names import validate_alias_name, validate_model_name

log = logging.getLogger(__name__)

FORMAT = "streamfit-model"
FORMAT_VERSION = 1
MANIFEST = "streamfit-model.json"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TransferResult:
    """What one export or import moved."""

    model: str
    versions: list[int]
    aliases: dict[str, int]
    artifact_bytes: int


def export_model(store: ModelStore, model: str, path: str | Path) -> TransferResult:
    """Write ``model`` with every version it has and its aliases to the archive at ``path``."""
    validate_model_name(model)
    head = store.head(model)
    versions = store.versions(model)
    owners: dict[tuple[str, str], tuple[int, str]] = {}
    files: list[tuple[str, VersionInfo, str]] = []
    entries = []
    for info in versions:
        artifacts = {}
        for kind, entry in info.metadata.get("artifacts", {}).items():
            stored = (entry.get("publish_id", info.publish_id), kind)
            if stored in owners:
                version, owner_kind = owners[stored]
                artifacts[kind] = {"reuse": {"version": version, "kind": owner_kind}}
                continue
            owners[stored] = (info.version, kind)
            name = f"artifacts/{info.version}/{kind}"
            artifacts[kind] = {"file": name, "sha256": entry["sha256"], "size": entry["size"]}
            files.append((name, info, kind))
        entries.append({"version": info.version, "metadata": dict(info.metadata), "artifacts": artifacts})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model,
        "exported_at": time.time(),
        "source": store.url,
        "latest": head.latest,
        "aliases": dict(head.aliases),
        "versions": entries,
    }

    total = 0
    path = Path(path)
    with tarfile.open(path, _write_mode(path)) as archive:
        _add(archive, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        for name, info, kind in files:
            # One artifact in memory at a time, verified by the store's read.
            data = store.artifact(info, kind)
            _add(archive, name, data)
            total += len(data)
    log.info("exported model %r (%d versions, %d artifact bytes) to %s", model, len(versions), total, path)
    return TransferResult(model, [info.version for info in versions], dict(head.aliases), total)


def import_model(store: ModelStore, path: str | Path, name: str | None = None) -> TransferResult:
    """Create a model in ``store`` from the archive at ``path``, as ``name`` or its exported name.

    Raises ModelExists when the target name is taken. If the import fails
    half-way, the partly imported model is deleted again, so a retry starts
    clean.
    """
    path = Path(path)
    try:
        archive = tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise InvalidInputError(f"archive {str(path)!r} not found") from None
    except tarfile.TarError as exc:
        raise InvalidInputError(f"{str(path)!r} is not a model archive (tar): {exc}") from None
    with archive:
        manifest = _read_manifest(archive, path)
        target = validate_model_name(name or manifest["model"])
        versions = sorted(manifest["versions"], key=lambda entry: entry["version"])
        first = versions[0]["metadata"]
        store.create_model(target, first["spec"])
        try:
            result = _import_versions(store, archive, path, target, manifest, versions)
        except BaseException:
            _remove_partial(store, target)
            raise
    log.info("imported model %r as %r (%d versions) from %s",
             manifest["model"], target, len(result.versions), path)
    return result


def _import_versions(store: ModelStore, archive: tarfile.TarFile, path: Path, target: str,
                     manifest: dict[str, Any], versions: list[dict[str, Any]]) -> TransferResult:
    imported: dict[int, VersionInfo] = {0: store.version(target, 0)}
    total = 0
    for entry in versions:
        number = entry["version"]
        if number == 0:
            continue
        artifacts: dict[str, bytes | Reuse] = {}
        for kind, source in entry["artifacts"].items():
            if "reuse" in source:
                owner = imported.get(source["reuse"].get("version"))
                if owner is None:
                    raise InvalidInputError(
                        f"archive {str(path)!r}: version {number} artifact {kind!r} reuses version "
                        f"{source['reuse'].get('version')!r}, which is not earlier in the archive"
                    )
                artifacts[kind] = Reuse(owner, source["reuse"].get("kind", kind))
            else:
                artifacts[kind] = _read_artifact(archive, path, number, kind, source)
                total += len(artifacts[kind])
        metadata = {**entry["metadata"], "model": target}
        imported[number] = store.import_version(store.head(target), metadata, artifacts)

    aliases = {}
    for alias, number in manifest.get("aliases", {}).items():
        validate_alias_name(alias)
        store.set_alias(target, alias, number)
        aliases[alias] = number
    return TransferResult(target, sorted(imported), aliases, total)


def _read_manifest(archive: tarfile.TarFile, path: Path) -> dict[str, Any]:
    data = _read_member(archive, path, MANIFEST, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise InvalidInputError(f"archive {str(path)!r}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InvalidInputError(f"archive {str(path)!r} is not a streamfit model archive (format "
                                f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InvalidInputError(
            f"archive {str(path)!r} has format version {manifest.get('format_version')!r}; this "
            f"streamfit reads version {FORMAT_VERSION}, so upgrade streamfit"
        )
    versions = manifest.get("versions")
    valid = isinstance(versions, list) and versions and all(
        isinstance(v, dict) and isinstance(v.get("version"), int) and isinstance(v.get("metadata"), dict)
        and isinstance(v["metadata"].get("spec"), dict) and isinstance(v.get("artifacts"), dict)
        for v in versions
    )
    if not valid or not isinstance(manifest.get("aliases", {}), dict):
        raise InvalidInputError(f"archive {str(path)!r}: the manifest's versions or aliases are invalid")
    return manifest


def _read_artifact(archive: tarfile.TarFile, path: Path, number: int, kind: str,
                   source: dict[str, Any]) -> bytes:
    size, sha256, name = source.get("size"), source.get("sha256"), source.get("file")
    if not isinstance(size, int) or not isinstance(sha256, str) or name != f"artifacts/{number}/{kind}":
        raise InvalidInputError(
            f"archive {str(path)!r}: version {number} artifact {kind!r} has an invalid entry: {source!r}"
        )
    data = _read_member(archive, path, name, size)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != size or digest != sha256:
        raise ArtifactCorrupt(
            f"archive {str(path)!r}: version {number} artifact {kind!r} fails its checksum: "
            f"{len(data)} bytes with sha256 {digest}, the manifest says {size} bytes with sha256 {sha256}"
        )
    return data


def _read_member(archive: tarfile.TarFile, path: Path, name: str, max_bytes: int) -> bytes:
    try:
        member = archive.getmember(name)
    except KeyError:
        raise InvalidInputError(f"archive {str(path)!r} has no member {name!r}") from None
    if not member.isfile():
        raise InvalidInputError(f"archive {str(path)!r}: member {name!r} is not a regular file")
    if member.size > max_bytes:
        raise InvalidInputError(
            f"archive {str(path)!r}: member {name!r} has {member.size} bytes, more than the "
            f"{max_bytes} the manifest allows"
        )
    return archive.extractfile(member).read()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def _write_mode(path: Path) -> str:
    return "w:gz" if path.name.endswith((".gz", ".tgz")) else "w"


def _remove_partial(store: ModelStore, target: str) -> None:
    try:
        store.delete_model(target)
    except StoreError as exc:
        log.warning("could not delete the partly imported model %r (%s); delete it before "
                    "importing again", target, exc)


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "TransferResult",
           "export_model", "import_model"]
