"""Tools for the deployment tests, which run without a Docker engine.

- The Compose specification's JSON schema comes from the Go module
  ``github.com/compose-spec/compose-go/v2`` (file ``schema/compose-spec.json``),
  downloaded through the Go module proxy into the Go module cache.
- ``promtool`` is built from the Go module ``github.com/prometheus/prometheus``
  with ``go install`` and cached, like the gocaves binary, under
  ``${XDG_CACHE_HOME:-~/.cache}/streamfit-test-servers/``.
- The metric names the code exports are read from the worker's and the
  predictor's metric classes on fresh registries.

A missing ``go`` skips the tests that need it locally and fails them in CI,
as for the test servers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"

COMPOSE_SPEC_MODULE = "github.com/compose-spec/compose-go/v2"
# v2.17.0 needs Go 1.26.11; this is the newest release that Go 1.26.8 accepts.
COMPOSE_SPEC_VERSION = "v2.16.2"

PROMETHEUS_MODULE = "github.com/prometheus/prometheus"
# Prometheus 3.x tags its Go module v0.3MM.P for release 3.MM.P, so this
# promtool is the one of prom/prometheus:v3.16.0 in docker-compose.yml.
PROMETHEUS_MODULE_VERSION = "v0.316.0"
PROMTOOL_BUILD_TIMEOUT_S = 3600

_servers = sys.modules.get("streamfit_test_servers")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def require_go() -> str:
    """Return the path of ``go``; skip the test when it is missing, or fail it in CI."""
    try:
        return _servers.require_tool("go")
    except _servers.ToolMissingError as exc:
        if _in_ci():
            pytest.fail(f"CI=true and go is missing: {exc}", pytrace=False)
        pytest.skip(f"go is missing: {exc}")


def go_module_dir(module: str, version: str) -> Path:
    """Download a Go module into the module cache and return its folder."""
    go = require_go()
    result = subprocess.run(
        [go, "mod", "download", "-json", f"{module}@{version}"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "GOFLAGS": "-mod=mod"},
    )
    try:
        info = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(
            f"`go mod download {module}@{version}` failed with exit code {result.returncode}: "
            f"{result.stderr.strip()[-2000:]}"
        ) from None
    if "Dir" not in info:
        raise RuntimeError(f"`go mod download {module}@{version}` failed: {info.get('Error', info)}")
    return Path(info["Dir"])


def compose_schema() -> dict:
    path = go_module_dir(COMPOSE_SPEC_MODULE, COMPOSE_SPEC_VERSION) / "schema" / "compose-spec.json"
    return json.loads(path.read_text(encoding="utf-8"))


def promtool_binary() -> Path:
    """Return a cached promtool, building it with ``go install`` on first use (several minutes)."""
    target = _servers.cache_root() / f"promtool-{PROMETHEUS_MODULE_VERSION}" / "promtool"
    if target.is_file():
        return target
    go = require_go()
    with _file_lock(_servers.cache_root() / f"promtool-{PROMETHEUS_MODULE_VERSION}.lock"):
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="promtool-build.", dir=_servers.cache_root()))
        log_path = staging / "build.log"
        with log_path.open("w") as log:
            result = subprocess.run(
                [go, "install", f"{PROMETHEUS_MODULE}/cmd/promtool@{PROMETHEUS_MODULE_VERSION}"],
                stdout=log, stderr=subprocess.STDOUT, timeout=PROMTOOL_BUILD_TIMEOUT_S,
                env={**os.environ, "GOBIN": str(staging), "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"},
            )
        if result.returncode != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"building promtool {PROMETHEUS_MODULE_VERSION} failed:\n{tail}")
        (staging / "promtool").replace(target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Concurrent test sessions on one machine must not build promtool twice.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(promtool_binary()), *args], capture_output=True, text=True, timeout=120, cwd=DEPLOY / "prometheus"
    )


# ---------------------------------------------------------------- metric names


def exported_metric_names() -> set[str]:
    """Return every series name the worker and the predictor expose, suffixes included."""
    from prometheus_client import CollectorRegistry

    from predictor.metrics import PredictorMetrics
    from worker.metrics import WorkerMetrics

    names: set[str] = set()
    for metrics_class in (WorkerMetrics, PredictorMetrics):
        registry = CollectorRegistry()
        metrics_class(registry)
        for family in registry.collect():
            names |= _series_names(family.name, family.type)
    return names


def _series_names(name: str, kind: str) -> set[str]:
    # prometheus_client strips "_total" from counter family names and adds
    # the suffixes back on the exposed samples.
    if kind == "counter":
        return {f"{name}_total", f"{name}_created"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum", f"{name}_created"}
    if kind == "summary":
        return {name, f"{name}_count", f"{name}_sum", f"{name}_created"}
    if kind == "info":
        return {f"{name}_info"}
    return {name}


_METRIC_NAME = re.compile(r"\bstreamfit_[a-z0-9_]+\b")


def streamfit_metric_names(expr: str) -> set[str]:
    """Return the streamfit metric names an expression refers to.

    Label names and values never start with ``streamfit_`` in this project's
    queries, so every such identifier is a metric name.
    """
    return set(_METRIC_NAME.findall(expr))


# Grafana replaces these before the query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$model": ".*",
}


def as_promql(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    return expr
