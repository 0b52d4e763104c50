"""Splitting artifacts into chunks and verifying them against their sha256."""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

from modelstore.errors import ArtifactCorrupt

# Couchbase Server rejects values over 20 MiB. The SQLite backend uses the same
# size, so both stores lay out a version the same way.
DEFAULT_CHUNK_SIZE_BYTES = 20 * 1024 * 1024


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(data: bytes, chunk_size_bytes: int) -> list[bytes]:
    """Split ``data`` into chunks of at most ``chunk_size_bytes``. Empty data gives one empty chunk."""
    if not data:
        return [b""]
    return [data[i : i + chunk_size_bytes] for i in range(0, len(data), chunk_size_bytes)]


def describe(chunks: list[bytes]) -> dict[str, Any]:
    """Build the metadata entry of one artifact: sha256 and size of the whole and of each chunk."""
    entries = [{"sha256": sha256_hex(chunk), "size": len(chunk)} for chunk in chunks]
    if len(chunks) == 1:
        # One chunk is the whole artifact, so its digest is the whole's.
        whole = entries[0]["sha256"]
    else:
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
        whole = digest.hexdigest()
    return {
        "sha256": whole,
        "size": sum(len(chunk) for chunk in chunks),
        "chunks": entries,
    }


def expected_chunks(entry: Mapping[str, Any], where: str) -> list[Mapping[str, Any]]:
    """Return the chunk list of an artifact's metadata entry, or raise ArtifactCorrupt."""
    chunks = entry.get("chunks") if isinstance(entry, Mapping) else None
    if not isinstance(chunks, list) or not chunks:
        raise ArtifactCorrupt(f"artifact metadata of {where} has no chunk list: {entry!r}")
    return chunks


def verify_chunk(data: bytes, expected: Mapping[str, Any], where: str) -> None:
    """Raise ArtifactCorrupt naming ``where`` unless ``data`` matches ``expected`` size and sha256."""
    if len(data) != expected.get("size"):
        raise ArtifactCorrupt(
            f"chunk {where} is corrupt: {len(data)} bytes stored, "
            f"{expected.get('size')} expected"
        )
    digest = sha256_hex(data)
    if digest != expected.get("sha256"):
        raise ArtifactCorrupt(
            f"chunk {where} is corrupt: sha256 {digest} stored, {expected.get('sha256')} expected"
        )


def join_verified(parts: Iterable[bytes], entry: Mapping[str, Any], where: str) -> bytes:
    """Join verified chunks and check the whole artifact's size and sha256."""
    parts = list(parts)
    chunks = entry.get("chunks")
    if (len(parts) == 1 and isinstance(chunks, list) and len(chunks) == 1
            and chunks[0].get("sha256") == entry.get("sha256") and chunks[0].get("size") == entry.get("size")):
        # The caller verified the only chunk against this same size and
        # sha256, so hashing it again would prove nothing new.
        return parts[0]
    data = b"".join(parts)
    if len(data) != entry.get("size") or sha256_hex(data) != entry.get("sha256"):
        raise ArtifactCorrupt(
            f"artifact {where} is corrupt: the joined chunks do not match the "
            f"recorded size {entry.get('size')} and sha256 {entry.get('sha256')}"
        )
    return data
