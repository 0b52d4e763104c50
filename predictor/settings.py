"""Settings of one predictor process, validated at start-up."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from modelstore.errors import ConfigError

CPU_MAX_PATH = Path("/sys/fs/cgroup/cpu.max")


def cpu_quota_cores(cpu_max_path: Path = CPU_MAX_PATH) -> int:
    """Return the number of cores this process may use, at least 1.

    The cgroup v2 CPU quota (``cpu.max``, "<quota> <period>" or "max <period>")
    is rounded up to whole cores and capped by the CPUs the process may run
    on. Without a quota file the CPU count is used.
    """
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max_path.read_text().split()[:2]
    except (OSError, ValueError):
        return max(1, cores)
    if quota == "max":
        return max(1, cores)
    try:
        limit = math.ceil(int(quota) / int(period))
    except (ValueError, ZeroDivisionError):
        return max(1, cores)
    return max(1, min(cores, limit))


@dataclass(frozen=True)
class PredictorSettings:
    """Options of the predictor service; each field's ``help`` is its flag's help text."""

    store: str = field(
        default="sqlite:///models.db",
        metadata={"help": "model store to serve from (sqlite:///models.db or couchbase://...)"},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address the HTTP server listens on"})
    port: int = field(default=8080, metadata={"help": "port the HTTP server listens on"})
    refresh_interval_ms: int = field(
        default=250,
        metadata={"help": "interval between reads of the heads of loaded models, in ms; a new "
                          "version is served at most this long after its publish, plus its load time"},
    )
    cache_max_models: int = field(
        default=256,
        metadata={"help": "maximum number of onnxruntime sessions kept (least recently used "
                          "are evicted); a pinned version counts as one session"},
    )
    max_body_bytes: int = field(
        default=4 * 1024 * 1024, metadata={"help": "maximum request body size in bytes (413 above)"}
    )
    max_batch_rows: int = field(
        default=10_000, metadata={"help": "maximum rows in one prediction request (413 above)"}
    )
    intra_op_threads: int = field(
        default_factory=cpu_quota_cores,
        metadata={"help": "onnxruntime threads inside one operator, per session; "
                          "defaults to the container's CPU quota"},
    )
    inter_op_threads: int = field(
        default=1,
        metadata={"help": "onnxruntime threads running operators in parallel; sessions run "
                          "in sequential execution mode, so 1 is enough"},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.store, str) or not self.store:
            raise ConfigError(f"store: expected a store URL, got {self.store!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host: expected a host name or address, got {self.host!r}")
        _check_int("port", self.port, 0, 65535)
        _check_int("refresh_interval_ms", self.refresh_interval_ms, 10, 3_600_000)
        _check_int("cache_max_models", self.cache_max_models, 1, 1_000_000)
        _check_int("max_body_bytes", self.max_body_bytes, 1024, 1024**3)
        _check_int("max_batch_rows", self.max_batch_rows, 1, 10_000_000)
        _check_int("intra_op_threads", self.intra_op_threads, 1, 1024)
        _check_int("inter_op_threads", self.inter_op_threads, 1, 1024)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "PredictorSettings":
        """Build settings from flags, environment variables or a TOML table.

        String values (from the command line or the environment) are converted
        to the option's type. Unknown keys are rejected.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if "workers" in unknown:
            raise ConfigError(
                "workers: the predictor runs exactly one process per container, because "
                "its metrics and sessions live in that process; run more containers "
                "(replicas) instead of setting workers"
            )
        if unknown:
            raise ConfigError(
                f"unknown predictor settings {unknown}; known settings are {sorted(known)}"
            )
        converted = {}
        for key, value in values.items():
            if known[key].type in ("int", int) and isinstance(value, str):
                try:
                    value = int(value.strip())
                except ValueError:
                    raise ConfigError(
                        f"{key}: expected an integer, got {value!r}"
                    ) from None
            converted[key] = value
        return cls(**converted)

    def public_dict(self) -> dict[str, Any]:
        """Return the settings for logging, with the store URL's password masked."""
        out = dataclasses.asdict(self)
        out["store"] = mask_url_password(self.store)
        return out


def mask_url_password(url: str) -> str:
    """Return ``url`` with any ``user:password@`` password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostport}{slash}{path}"


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name}: {value} is out of range; use {low} to {high}")
