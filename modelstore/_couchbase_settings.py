"""Settings of the Couchbase store: parsed from its URL, with credentials from the environment."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import parse_qsl

from modelstore import _chunks
from modelstore.base import ONNX_BINARY, ONNX_FORMATS
from modelstore.errors import ConfigError

USERNAME_ENV = "STREAMFIT_COUCHBASE_USERNAME"
PASSWORD_ENV = "STREAMFIT_COUCHBASE_PASSWORD"
PASSWORD_FILE_ENV = "STREAMFIT_COUCHBASE_PASSWORD_FILE"

DEFAULT_BUCKET = "default"
DEFAULT_SCOPE = "streamfit"

# Couchbase Server rejects a value over 20 MiB (gocaves enforces the same
# limit), so this is also the largest chunk the store writes.
MAX_VALUE_BYTES = 20 * 1024 * 1024

# Couchbase bucket, scope and collection names: letters, digits, '_', '-' and
# '%', and '.' in bucket names. A scope name may not start with '_' or '%'.
_BUCKET = re.compile(r"[A-Za-z0-9_.%-]{1,100}")
_SCOPE = re.compile(r"[A-Za-z0-9-][A-Za-z0-9_%-]{0,250}")
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:[0-9]{1,5})?")

_INT_OPTIONS = {
    "kv_timeout_ms": 2500,
    "artifact_timeout_ms": 30000,
    "connect_timeout_ms": 10000,
    "chunk_size_bytes": _chunks.DEFAULT_CHUNK_SIZE_BYTES,
    "orphan_expiry_s": 24 * 3600,
    "max_artifact_bytes": 0,
    "keep_versions": 0,
}
_BOOL_OPTIONS = {"create_collections": True}
_STR_OPTIONS = ("scope", "ca_cert", "onnx_format")


@dataclass(frozen=True)
class CouchbaseSettings:
    """Address, bucket, scope and client options of the cluster, without the password."""

    scheme: str
    hosts: str
    bucket: str = DEFAULT_BUCKET
    scope: str = DEFAULT_SCOPE
    # NOTE: the tests reach gocaves over couchbase:// only, so couchbases://
    # and ca_cert are passed to the SDK as documented but never run here.
    ca_cert: str | None = None
    kv_timeout_ms: int = _INT_OPTIONS["kv_timeout_ms"]
    # Chunks are up to 20 MiB: their reads and writes get a longer timeout
    # than small documents (gocaves takes about 2 s to return 20 MiB).
    artifact_timeout_ms: int = _INT_OPTIONS["artifact_timeout_ms"]
    connect_timeout_ms: int = _INT_OPTIONS["connect_timeout_ms"]
    chunk_size_bytes: int = _INT_OPTIONS["chunk_size_bytes"]
    # Artifacts and metadata of a publish carry this expiry until its head
    # write succeeds, which bounds what a crashed or losing writer leaves.
    orphan_expiry_s: int = _INT_OPTIONS["orphan_expiry_s"]
    create_collections: bool = True
    # 0 keeps the store's default (1 GiB).
    max_artifact_bytes: int = 0
    # Automatic retention after a publish; 0 keeps every version.
    keep_versions: int = 0
    onnx_format: str = ONNX_BINARY

    @property
    def connstr(self) -> str:
        return f"{self.scheme}://{self.hosts}"

    @property
    def url(self) -> str:
        return f"{self.connstr}/{self.bucket}?scope={self.scope}"

    @classmethod
    def from_url(cls, url: str) -> "CouchbaseSettings":
        """Parse ``couchbase[s]://host[:port][,host[:port]...][/bucket][?option=value&...]``.

        Options: ``scope`` (default streamfit), ``ca_cert`` (a PEM file, couchbases://
        only), ``kv_timeout_ms``, ``artifact_timeout_ms`` (for artifact chunks),
        ``connect_timeout_ms``, ``chunk_size_bytes`` (at most 20 MiB),
        ``orphan_expiry_s``, ``create_collections`` (true or false),
        ``max_artifact_bytes``, ``keep_versions`` and ``onnx_format``
        (binary or json).
        """
        redacted_url = _redact(url).partition("?")[0]
        scheme, sep, rest = url.partition("://")
        if scheme not in ("couchbase", "couchbases") or not sep:
            raise ConfigError(
                f"invalid Couchbase store URL {redacted_url!r}: expected "
                "couchbase://host/bucket?scope=streamfit or couchbases://..."
            )
        location, _, query = rest.partition("?")
        if "@" in location:
            raise ConfigError(
                f"invalid Couchbase store URL {redacted_url!r}: it must not contain a user name "
                f"or password; set {USERNAME_ENV} and {PASSWORD_ENV} (or {PASSWORD_FILE_ENV})"
            )
        hosts, _, bucket = location.partition("/")
        if not hosts or not all(_HOST.fullmatch(host) for host in hosts.split(",")):
            raise ConfigError(
                f"invalid Couchbase store URL {redacted_url!r}: hosts {hosts!r} must be "
                "host[:port] entries separated by commas"
            )
        bucket = bucket.rstrip("/") or DEFAULT_BUCKET
        if not _BUCKET.fullmatch(bucket):
            raise ConfigError(
                f"invalid Couchbase bucket name {bucket!r}: use letters, digits, '_', '.', '-' or '%'"
            )

        values: dict[str, object] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            values[key] = _parse_option(key, value)
        settings = cls(scheme=scheme, hosts=hosts, bucket=bucket, **values)
        settings.check()
        return settings

    def check(self) -> None:
        """Check each option and the rules between them, raising ConfigError that names the option."""
        if not _SCOPE.fullmatch(self.scope):
            raise ConfigError(
                f"invalid Couchbase scope {self.scope!r}: use letters, digits, '_', '-' or '%', "
                "not starting with '_' or '%'"
            )
        if self.ca_cert is not None:
            if self.scheme != "couchbases":
                raise ConfigError(
                    f"invalid Couchbase store URL: ca_cert={self.ca_cert!r} needs TLS; "
                    "use couchbases:// instead of couchbase://"
                )
            if not Path(self.ca_cert).is_file():
                raise ConfigError(f"invalid Couchbase option ca_cert: file {self.ca_cert!r} not found")
        if not 1 <= self.chunk_size_bytes <= MAX_VALUE_BYTES:
            raise ConfigError(
                f"invalid Couchbase option chunk_size_bytes={self.chunk_size_bytes}: expected "
                f"1 to {MAX_VALUE_BYTES}, the server's value limit"
            )
        for name in ("kv_timeout_ms", "artifact_timeout_ms", "connect_timeout_ms", "orphan_expiry_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"invalid Couchbase option {name}={getattr(self, name)}: expected >= 1")
        for name in ("max_artifact_bytes", "keep_versions"):
            if getattr(self, name) < 0:
                raise ConfigError(f"invalid Couchbase option {name}={getattr(self, name)}: expected >= 0")
        if self.onnx_format not in ONNX_FORMATS:
            raise ConfigError(
                f"invalid Couchbase option onnx_format={self.onnx_format!r}: expected "
                f"{' or '.join(ONNX_FORMATS)}"
            )


def _parse_option(key: str, value: str) -> object:
    # Messages name the option but never echo the whole query, which could
    # carry a secret passed by mistake under an unknown option.
    if key in _STR_OPTIONS:
        return value
    if key in _INT_OPTIONS:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(
                f"invalid Couchbase store URL option {key}={value!r}: expected an integer"
            ) from None
    if key in _BOOL_OPTIONS:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(
                f"invalid Couchbase store URL option {key}={value!r}: expected true or false"
            )
        return value.lower() in ("true", "1")
    known = sorted([*_STR_OPTIONS, *_INT_OPTIONS, *_BOOL_OPTIONS])
    raise ConfigError(
        f"invalid Couchbase store URL option {key!r}: unknown option; known options: {', '.join(known)}"
    )


def _redact(url: str) -> str:
    # A URL that carries credentials is echoed without them, so the error
    # message can be logged. Everything up to the last '@' before the query
    # goes, because a password may itself contain '/' or '@'.
    location = url.partition("?")[0]
    if "@" not in location:
        return url
    scheme = url.partition("://")[0]
    return f"{scheme}://***@{url[location.rindex('@') + 1:]}"


def credentials(environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """Read the user name and password from the environment, raising ConfigError that names what is missing."""
    username = environ.get(USERNAME_ENV, "")
    if not username:
        raise ConfigError(f"missing Couchbase user name: set {USERNAME_ENV}")
    password = environ.get(PASSWORD_ENV)
    password_file = environ.get(PASSWORD_FILE_ENV)
    if password is not None and password_file:
        raise ConfigError(f"set only one of {PASSWORD_ENV} and {PASSWORD_FILE_ENV}, not both")
    if password_file:
        try:
            # A trailing newline is never part of the secret (editors and
            # `echo` add one), so it is stripped.
            password = Path(password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot read the Couchbase password file {password_file!r} named by "
                f"{PASSWORD_FILE_ENV}: {exc.strerror}"
            ) from None
    if not password:
        raise ConfigError(f"missing Couchbase password: set {PASSWORD_ENV} or {PASSWORD_FILE_ENV}")
    return username, password
