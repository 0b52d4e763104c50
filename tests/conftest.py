"""Fixtures for tests that need a real Kafka broker or a Couchbase-compatible cluster.

Stable fixtures (other test modules rely on these names and attributes):

``kafka_server`` (session)
    A single-node Apache Kafka 4.x broker on 127.0.0.1. Attributes:
    ``bootstrap`` ("127.0.0.1:PORT"), ``pid``, ``log_path`` (None for an
    external broker), ``unsupported_version_lines()``. Topics are not
    auto-created: use ``kafka_topic``.
``kafka_topic`` (function)
    Factory ``kafka_topic(partitions=1) -> str`` that creates a topic with a
    unique name and waits until every partition has a leader. Topics are
    never deleted, because each test gets its own.
``kafka_broker_log`` (session)
    Path of the broker's log4j file, for tests that read it.
``gocaves_server`` (session)
    gocaves, Couchbase's mock cluster for SDK tests. Attributes: ``connstr``,
    ``username``, ``password``, ``bucket`` ("default"), ``pid``,
    ``pause()`` / ``resume()`` (SIGSTOP / SIGCONT, for outage tests).
``gocaves_pausable`` (session)
    The same server, for tests that pause it; skips when the cluster was
    started outside this run.

Servers start lazily, on the first test that requests them, under
``.work/servers/session-*/`` and stop at the end of the session. Tests that
use them get the ``kafka`` or ``couchbase`` marker automatically, so
``-m "not kafka"`` deselects them.

Environment:
``STREAMFIT_TEST_KAFKA_BOOTSTRAP``, ``STREAMFIT_TEST_COUCHBASE_CONNSTR``
    Use servers that are already running instead of starting them
    (``STREAMFIT_TEST_COUCHBASE_USERNAME`` / ``_PASSWORD`` override the
    credentials, default Administrator / password).
``CI``
    When "true" (or "1"), a missing java, mvn or go fails the tests that need
    it; otherwise those tests are skipped with the reason.

A session whose broker log contains an ``UnsupportedVersion`` line fails,
whatever the test results, because it means a client and the broker
disagreed on a protocol version.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVERS_WORK_ROOT = REPO_ROOT / ".work" / "servers"


def _load_servers_module():
    # tests/servers/servers.py also runs as a script, so it is loaded by path
    # rather than imported from a package. Registering it in sys.modules lets
    # `import streamfit_test_servers` return this same module object.
    name = "streamfit_test_servers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "servers" / "servers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


servers = _load_servers_module()

_started_kafka = pytest.StashKey[object]()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def _start_or_skip(start: Callable, workdir: Path):
    """Start a server; a missing tool skips its tests locally and fails them in CI."""
    try:
        return start(workdir)
    except servers.ToolMissingError as exc:
        reason = str(exc)
    if _in_ci():
        pytest.fail(f"CI=true and a test server cannot start: {reason}", pytrace=False)
    pytest.skip(f"test server not started: {reason}")


@pytest.fixture(scope="session")
def _servers_workdir() -> Path:
    # One folder per session, so concurrent pytest runs in the same tree
    # never share a broker's log directory.
    workdir = SERVERS_WORK_ROOT / f"session-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


@pytest.fixture(scope="session")
def kafka_server(request: pytest.FixtureRequest, _servers_workdir: Path) -> Iterator[object]:
    bootstrap = os.environ.get("STREAMFIT_TEST_KAFKA_BOOTSTRAP")
    if bootstrap:
        yield servers.ExternalKafkaServer(bootstrap)
        return

    server = _start_or_skip(servers.start_kafka, _servers_workdir / "kafka")
    request.config.stash[_started_kafka] = server
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kafka_broker_log(kafka_server) -> Path:
    if kafka_server.log_path is None:
        pytest.skip("the Kafka broker was started outside this test run, so its log cannot be read")
    return kafka_server.log_path


@pytest.fixture
def kafka_topic(kafka_server, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    from kafka import KafkaAdminClient

    admins = []

    def create(partitions: int = 1) -> str:
        if partitions < 1:
            raise ValueError(f"invalid partitions={partitions}; a topic needs at least 1 partition")
        if not admins:
            admins.append(KafkaAdminClient(bootstrap_servers=kafka_server.bootstrap, client_id="streamfit-tests"))
        # Topic names allow only [a-zA-Z0-9._-]. The test name makes a topic
        # easy to find in the broker log, and the suffix makes it unique.
        stem = re.sub(r"[^a-zA-Z0-9._-]+", "-", request.node.name)[:120]
        name = f"{stem}-{uuid.uuid4().hex[:8]}"
        admins[0].create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1}},
            wait_for_metadata=True,
        )
        return name

    yield create
    for admin in admins:
        admin.close()


@pytest.fixture(scope="session")
def gocaves_server(_servers_workdir: Path) -> Iterator[object]:
    connstr = os.environ.get("STREAMFIT_TEST_COUCHBASE_CONNSTR")
    if connstr:
        yield servers.ExternalCouchbaseServer(
            connstr,
            username=os.environ.get("STREAMFIT_TEST_COUCHBASE_USERNAME", "Administrator"),
            password=os.environ.get("STREAMFIT_TEST_COUCHBASE_PASSWORD", "password"),
        )
        return

    server = _start_or_skip(servers.start_gocaves, _servers_workdir / "gocaves")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gocaves_pausable(gocaves_server):
    if gocaves_server.pid is None:
        pytest.skip("the Couchbase cluster was started outside this test run, so it cannot be paused")
    return gocaves_server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "kafka_server" in fixtures:
            item.add_marker(pytest.mark.kafka)
        if "gocaves_server" in fixtures:
            item.add_marker(pytest.mark.couchbase)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    server = session.config.stash.get(_started_kafka, None)
    if server is None:
        return
    lines = server.unsupported_version_lines()
    if not lines:
        return

    header = f"the Kafka broker log {server.log_path} has {len(lines)} UnsupportedVersion line(s), so the run fails:"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        print(header, *lines[:50], sep="\n", file=sys.stderr)
    else:
        reporter.write_sep("=", "UnsupportedVersion in the Kafka broker log", red=True)
        reporter.write_line(header)
        for line in lines[:50]:
            reporter.write_line(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
