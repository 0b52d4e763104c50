"""Start a real Apache Kafka broker and gocaves on loopback for the streamfit tests.

This module uses only the standard library and imports nothing from the
project, so it also runs from a plain ``python3``. kafka-python is used for
the Kafka readiness check when it can be imported, which it can when the
project venv's python runs this module.

Python API (tests/conftest.py wraps it in fixtures; keep these names stable):

``start_kafka(workdir) -> KafkaServer``
    One combined KRaft node (broker and controller) on 127.0.0.1, from jars
    that Maven gathers once per machine with ``kafka-pom.xml``. Every start
    formats a fresh, empty log directory under ``workdir``. Topics are not
    auto-created (``auto.create.topics.enable=false``), so tests create each
    topic they use.

    ``KafkaServer`` attributes: ``bootstrap`` ("127.0.0.1:PORT"), ``pid``,
    ``log_path`` (log4j broker log), ``stdout_path`` (JVM stdout/stderr),
    ``workdir``, ``start_seconds``. Methods: ``stop()``,
    ``unsupported_version_lines()``, ``is_running()``, ``start_again()``
    (after ``stop()``: the same broker on the same ports and log
    directory, with its topics, records and committed offsets).

    ``start_kafka(workdir, sasl_users={"user": "password"})`` adds a
    SASL_PLAINTEXT listener with the PLAIN mechanism for those users; its
    address is ``sasl_bootstrap`` (None without ``sasl_users``).

``start_gocaves(workdir) -> GocavesServer``
    Couchbase's mock cluster for SDK tests, in ``--mock-only`` mode: two
    nodes, bucket ``default``, user ``Administrator`` / ``password``, all
    data in memory, every listener on 127.0.0.1. The binary is built from the
    Go module proxy once per machine.

    ``GocavesServer`` attributes: ``connstr`` ("couchbase://127.0.0.1:P1,..."),
    ``username``, ``password``, ``bucket``, ``pid``, ``log_path``, ``workdir``,
    ``start_seconds``. Methods: ``stop()``, ``pause()`` / ``resume()``
    (SIGSTOP / SIGCONT, to simulate an outage without losing the data that a
    restart would lose), ``is_running()``.

``ExternalKafkaServer`` and ``ExternalCouchbaseServer`` carry the same
connection attributes for servers that someone else started. Their
``log_path`` and ``pid`` are None, ``stop()`` does nothing, and ``pause()``
raises.

Errors: ``ToolMissingError`` (java, mvn or go is missing or too old; the
message names the tool and how to install it) and ``ServerStartError``.

Command line, for manual work::

    python tests/servers/servers.py up [--kafka] [--couchbase] [--workdir DIR]

prints one JSON line with the addresses and PIDs, then runs until SIGTERM or
SIGINT and stops what it started. Without ``--kafka`` or ``--couchbase`` it
starts both.

Jars and the gocaves binary are cached under
``${XDG_CACHE_HOME:-~/.cache}/streamfit-test-servers/``; delete that folder
to fetch and build them again.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
KAFKA_POM = HERE / "kafka-pom.xml"
KAFKA_LOG4J_CONFIG = HERE / "kafka-log4j2.properties"

KAFKA_HEAP_OPTIONS = ["-Xms256m", "-Xmx1g", "-XX:+UseG1GC"]
KAFKA_MIN_JAVA = 17
KAFKA_READY_TIMEOUT_S = 120.0

GOCAVES_MODULE = "github.com/couchbaselabs/gocaves"
# NOTE: v0.0.1-79 is the newest tag upstream, but the Go module proxy reached
# from here returns 403 "not available" for it and lists only v0.0.1-75.
GOCAVES_VERSION = "v0.0.1-75"
GOCAVES_READY_TIMEOUT_S = 60.0
# Upstream, these files make the mock listen on all interfaces. The build
# rewrites their listen address so that nothing is reachable beyond loopback.
GOCAVES_LISTEN_FILES = (
    "mock/mockimpl/servers/memdserver.go",
    "mock/mockimpl/servers/httpserver.go",
)

STOP_TIMEOUT_S = 30.0

INSTALL_HINTS = {
    "java": "install a Java 17 or newer runtime, e.g. `apt-get install openjdk-17-jre-headless`",
    "mvn": "install Apache Maven 3.6 or newer, e.g. `apt-get install maven`",
    "go": "install a Go toolchain, e.g. `apt-get install golang-go`, and put `go` on PATH",
}


class ToolMissingError(RuntimeError):
    """A command-line tool needed to start a server is missing or too old."""

    def __init__(self, tool: str, detail: str) -> None:
        super().__init__(f"{detail}; {INSTALL_HINTS[tool]}")
        self.tool = tool


class ServerStartError(RuntimeError):
    """A server failed to build, start or become ready."""


# ---------------------------------------------------------------- helpers


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamfit-test-servers"


def require_tool(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ToolMissingError(tool, f"`{tool}` was not found on PATH")
    return path


def require_java() -> str:
    java = require_tool("java")
    result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    # `java -version` writes to stderr, e.g. 'openjdk version "17.0.15" 2025-04-15'.
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr)
    if match is None:
        raise ToolMissingError("java", f"cannot read the Java version from `{java} -version`: {result.stderr.strip()!r}")
    major = int(match.group(1))
    if major == 1:  # Java 8 and older report "1.8.0_..."
        major = int(match.group(2) or 0)
    if major < KAFKA_MIN_JAVA:
        raise ToolMissingError("java", f"Kafka 4 needs Java {KAFKA_MIN_JAVA} or newer, but `{java}` is Java {major}")
    return java


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Other test sessions on the same machine may fetch or build at the same time.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def free_ports(count: int) -> list[int]:
    """Return distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def _run_checked(command: list[str], *, what: str, cwd: Path | None = None,
                 env: dict[str, str] | None = None, timeout_s: float = 900.0) -> str:
    try:
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise ServerStartError(f"{what} timed out after {timeout_s:.0f} s: {' '.join(command)}") from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-4000:]
        raise ServerStartError(f"{what} failed with exit code {result.returncode}: {' '.join(command)}\n{output}")
    return result.stdout


_running: set["_ManagedProcess"] = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_leftovers() -> None:
    # Covers a test session or CLI that dies before its own cleanup runs.
    with _running_lock:
        leftovers = list(_running)
    for server in leftovers:
        server.stop()


class _ManagedProcess:
    """A server process that this module started and alone may stop."""

    def __init__(self, process: subprocess.Popen, workdir: Path) -> None:
        self._process = process
        self.pid: int = process.pid
        self.workdir = workdir
        self.start_seconds: float | None = None
        with _running_lock:
            _running.add(self)

    def is_running(self) -> bool:
        return self._process.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send SIGTERM to this server's PID and wait, then SIGKILL it after ``timeout_s``.

        Returns the exit code. Calling it again, or after the process has
        exited, only returns the exit code.
        """
        # Popen.send_signal does nothing once the process is reaped, so a
        # recycled PID never receives a signal meant for this server.
        if self.is_running():
            self._process.send_signal(signal.SIGTERM)
            self._process.send_signal(signal.SIGCONT)  # a paused process handles SIGTERM only once resumed
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not exit %.0f s after SIGTERM; sending SIGKILL", self.pid, timeout_s)
                self._process.kill()
                self._process.wait(timeout=timeout_s)
            log.info("stopped %s (pid %d), exit code %s", type(self).__name__, self.pid, self._process.returncode)
        with _running_lock:
            _running.discard(self)
        return self._process.returncode


# ---------------------------------------------------------------- Kafka


def kafka_version() -> str:
    namespace = {"m": "http://maven.apache.org/POM/4.0.0"}
    element = ElementTree.parse(KAFKA_POM).find("m:properties/m:kafka.version", namespace)
    if element is None or not (element.text or "").strip():
        raise ServerStartError(f"{KAFKA_POM} has no <kafka.version> property")
    return element.text.strip()


def kafka_classpath() -> Path:
    """Return the folder of Kafka broker jars, running Maven first if it is not cached."""
    target = cache_root() / f"kafka-{kafka_version()}"
    marker = target / ".complete"
    pom_digest = hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()

    # The marker contains the pom's digest, so editing the pom (a log4j bump,
    # say) fetches again even when the Kafka version is unchanged.
    if marker.exists() and marker.read_text().strip() == pom_digest:
        return target

    mvn = require_tool("mvn")
    with _file_lock(cache_root() / f"kafka-{kafka_version()}.lock"):
        if marker.exists() and marker.read_text().strip() == pom_digest:
            return target
        staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=cache_root()))
        started = time.monotonic()
        try:
            _run_checked(
                [mvn, "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies", f"-DoutputDirectory={staging}"],
                what="Maven fetch of the Kafka broker jars",
                cwd=HERE,
            )
            if not any(staging.glob("kafka_2.13-*.jar")):
                raise ServerStartError(f"Maven finished but {staging} contains no kafka_2.13 jar")
            (staging / ".complete").write_text(pom_digest + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("fetched Kafka %s jars with Maven in %.1f s into %s", kafka_version(), time.monotonic() - started, target)
    return target


def new_cluster_id() -> str:
    """Return a KRaft cluster id: a random UUID in unpadded base64url."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # Kafka's own generator skips ids that start with '-', which command-line parsers take for an option.
        if not cluster_id.startswith("-"):
            return cluster_id


def kafka_properties(broker_port: int, controller_port: int, log_dir: Path,
                     sasl_port: int | None = None, sasl_users: dict[str, str] | None = None) -> str:
    listeners = f"PLAINTEXT://127.0.0.1:{broker_port}"
    protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    sasl = ""
    if sasl_port is not None:
        listeners += f",SASL_PLAINTEXT://127.0.0.1:{sasl_port}"
        protocols += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
        # Brokers talk to each other over PLAINTEXT, so the JAAS entry needs
        # only the client users (user_NAME="password").
        users = " ".join(f'user_{name}="{password}"' for name, password in (sasl_users or {}).items())
        sasl = (
            "sasl.enabled.mechanisms=PLAIN\n"
            "listener.name.sasl_plaintext.plain.sasl.jaas.config="
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};\n"
        )
    return f"""\
process.roles=broker,controller
node.id=1
listeners={listeners},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners={listeners}
listener.security.protocol.map={protocols}
{sasl}inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}
log.dirs={log_dir}

# A single node can hold one replica of anything.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Fewer internal partitions make the first group join and the first
# transaction fast. The defaults (50) are sized for production clusters.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4
num.partitions=1

# Tests join groups one after another, and the default 3 s delay only slows them.
group.initial.rebalance.delay.ms=0
# Tests create every topic they use, so a misspelt topic fails instead of
# silently appearing, as on a production cluster with auto-creation off.
auto.create.topics.enable=false

num.network.threads=2
num.io.threads=4
"""


class KafkaServer(_ManagedProcess):
    """A single-node Kafka broker started by ``start_kafka``."""

    def __init__(self, process: subprocess.Popen, workdir: Path, broker_port: int,
                 command: list[str] | None = None, sasl_port: int | None = None) -> None:
        super().__init__(process, workdir)
        self.bootstrap = f"127.0.0.1:{broker_port}"
        self.sasl_bootstrap = f"127.0.0.1:{sasl_port}" if sasl_port is not None else None
        self.log_path = workdir / "server.log"
        self.stdout_path = workdir / "kafka.out"
        self._command = command

    def start_again(self, ready_timeout_s: float = KAFKA_READY_TIMEOUT_S) -> None:
        """Start this broker again after ``stop()``, on the same ports and log directory.

        The storage is not formatted again, so topics, records and committed
        offsets survive, as after a broker restart in production.
        """
        if self.is_running():
            raise ServerStartError(f"Kafka broker (pid {self.pid}) is still running; stop() it first")
        if self._command is None:
            raise ServerStartError("this KafkaServer was not created by start_kafka, so it cannot be restarted")
        started = time.monotonic()
        with open(self.stdout_path, "ab") as stdout:
            self._process = subprocess.Popen(
                self._command, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=stdout,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pid = self._process.pid
        with _running_lock:
            _running.add(self)
        try:
            self.wait_until_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("Kafka broker restarted at %s (pid %d) in %.1f s", self.bootstrap, self.pid, time.monotonic() - started)

    def unsupported_version_lines(self) -> list[str]:
        """Return every broker log line that mentions UnsupportedVersion."""
        lines = []
        for path in (self.log_path, self.stdout_path):
            if path.exists():
                with open(path, errors="replace") as handle:
                    lines.extend(line.rstrip("\n") for line in handle if "UnsupportedVersion" in line)
        return lines

    def wait_until_ready(self, timeout_s: float = KAFKA_READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        last_error = "no attempt finished"
        while time.monotonic() < deadline:
            if not self.is_running():
                raise ServerStartError(
                    f"Kafka broker (pid {self.pid}) exited with code {self._process.returncode} during start-up; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}\n{_tail(self.stdout_path)}"
                )
            try:
                probe_kafka(self.bootstrap)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"; the last one is reported
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)
        raise ServerStartError(
            f"Kafka broker at {self.bootstrap} (pid {self.pid}) was not ready after {timeout_s:.0f} s "
            f"(last error: {last_error}); see {self.log_path}"
        )


def probe_kafka(bootstrap: str) -> None:
    """Raise unless the broker at ``bootstrap`` returns metadata for a list-topics call."""
    host, _, port = bootstrap.rpartition(":")
    socket.create_connection((host, int(port)), timeout=2.0).close()
    try:
        from kafka import KafkaAdminClient
    except ImportError:
        # Plain python3 without the project venv: an open port is the best check available.
        return
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="streamfit-test-servers-probe",
        request_timeout_ms=5000,
        bootstrap_timeout_ms=5000,
    )
    try:
        admin.list_topics()
    finally:
        admin.close()


def start_kafka(workdir: str | os.PathLike, *, ready_timeout_s: float = KAFKA_READY_TIMEOUT_S,
                sasl_users: dict[str, str] | None = None) -> KafkaServer:
    """Format fresh storage in ``workdir``, start a broker and wait until it serves metadata.

    ``sasl_users`` (name to password) adds a SASL_PLAINTEXT listener with the PLAIN mechanism.
    """
    java = require_java()
    classpath = kafka_classpath()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_dir = workdir / "data"
    if log_dir.exists():
        shutil.rmtree(log_dir)
    # The log4j appender appends, so a reused workdir must not keep lines
    # (an UnsupportedVersion, say) from an earlier broker.
    for name in ("server.log", "storage-format.log", "kafka.out"):
        (workdir / name).unlink(missing_ok=True)

    started = time.monotonic()
    ports = free_ports(3 if sasl_users else 2)
    broker_port, controller_port = ports[:2]
    sasl_port = ports[2] if sasl_users else None
    config_path = workdir / "server.properties"
    config_path.write_text(kafka_properties(broker_port, controller_port, log_dir, sasl_port, sasl_users))
    jvm = [
        java,
        f"-Dlog4j2.configurationFile={KAFKA_LOG4J_CONFIG}",
        f"-Dkafka.logs.dir={workdir}",
        "-cp", f"{classpath}/*",
    ]

    # --standalone makes this node the only voter of a new quorum, matching
    # controller.quorum.bootstrap.servers above.
    _run_checked(
        jvm[:1] + ["-Xmx256m", "-Dstreamfit.kafka.log.file=storage-format.log"] + jvm[1:]
        + ["kafka.tools.StorageTool", "format", "--standalone", "-t", new_cluster_id(), "-c", str(config_path)],
        what=f"formatting Kafka storage in {log_dir}",
        cwd=workdir,
        timeout_s=ready_timeout_s,
    )

    command = jvm[:1] + KAFKA_HEAP_OPTIONS + jvm[1:] + ["kafka.Kafka", str(config_path)]
    with open(workdir / "kafka.out", "wb") as stdout:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            # Its own session keeps a terminal's Ctrl-C from reaching the
            # broker directly, so shutdown always goes through stop().
            start_new_session=True,
        )
    server = KafkaServer(process, workdir, broker_port, command, sasl_port)
    try:
        server.wait_until_ready(ready_timeout_s - (time.monotonic() - started))
    except BaseException:
        server.stop()
        raise
    server.start_seconds = time.monotonic() - started
    log.info("Kafka broker ready at %s (pid %d) in %.1f s", server.bootstrap, server.pid, server.start_seconds)
    return server


class ExternalKafkaServer:
    """A Kafka broker started outside this module, known only by its address."""

    log_path = None
    stdout_path = None
    pid = None
    workdir = None
    start_seconds = None
    sasl_bootstrap = None

    def __init__(self, bootstrap: str) -> None:
        if not re.fullmatch(r"[^\s:,]+:\d{1,5}(,[^\s:,]+:\d{1,5})*", bootstrap):
            raise ValueError(f"invalid Kafka bootstrap {bootstrap!r}; expected HOST:PORT[,HOST:PORT...]")
        self.bootstrap = bootstrap

    def unsupported_version_lines(self) -> list[str]:
        return []

    def is_running(self) -> bool:
        return True

    def stop(self) -> None:
        """Do nothing, because the broker's lifecycle belongs to the process that started it."""


# ---------------------------------------------------------------- gocaves


def gocaves_binary() -> Path:
    """Return the gocaves executable, building it from the Go module proxy if it is not cached."""
    target = cache_root() / f"gocaves-{GOCAVES_VERSION}" / "gocaves"
    if target.exists():
        return target

    go = require_tool("go")
    with _file_lock(cache_root() / f"gocaves-{GOCAVES_VERSION}.lock"):
        if target.exists():
            return target
        started = time.monotonic()
        build_root = Path(tempfile.mkdtemp(prefix="gocaves-build.", dir=cache_root()))
        try:
            _build_gocaves(go, build_root, target)
        finally:
            shutil.rmtree(build_root, ignore_errors=True)
        log.info("built gocaves %s in %.1f s into %s", GOCAVES_VERSION, time.monotonic() - started, target)
    return target


def _build_gocaves(go: str, build_root: Path, target: Path) -> None:
    # `go install module@version` cannot build gocaves: its go.mod replaces
    # the nested `client` module with a relative path, and two generated
    # files (mock/data/gobindata.go, checksuite/checksuite.go) are not part
    # of the published module. So the module is copied and prepared by hand.
    env = dict(os.environ, CGO_ENABLED="0")
    output = _run_checked(
        [go, "mod", "download", "-json", f"{GOCAVES_MODULE}@{GOCAVES_VERSION}"],
        what=f"downloading {GOCAVES_MODULE}@{GOCAVES_VERSION} from the Go module proxy",
        cwd=build_root,
        env=env,
    )
    info = json.loads(output)
    if info.get("Error") or not info.get("Dir"):
        raise ServerStartError(f"go mod download of {GOCAVES_MODULE}@{GOCAVES_VERSION} failed: {info.get('Error')}")

    # The module cache is read-only, so the copy is made writable.
    source = build_root / "src"
    shutil.copytree(info["Dir"], source)
    for path in [source, *source.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)

    _run_checked(
        [go, "mod", "edit",
         f"-dropreplace={GOCAVES_MODULE}/client", f"-droprequire={GOCAVES_MODULE}/client"],
        what="dropping the gocaves client module from go.mod",
        cwd=source,
        env=env,
    )
    for relative in GOCAVES_LISTEN_FILES:
        path = source / relative
        text = path.read_text()
        if text.count('fmt.Sprintf(":%d"') != 1:
            raise ServerStartError(
                f"{relative} in gocaves {GOCAVES_VERSION} no longer has exactly one "
                f'fmt.Sprintf(":%d", ...) listen address; update GOCAVES_LISTEN_FILES'
            )
        path.write_text(text.replace('fmt.Sprintf(":%d"', 'fmt.Sprintf("127.0.0.1:%d"'))

    _run_checked([go, "run", "tools/prebuildstep.go"], what="generating gocaves sources", cwd=source, env=env)
    staged = target.with_name(target.name + f".tmp{os.getpid()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _run_checked(
        [go, "build", "-buildvcs=false", "-o", str(staged), "."],
        what="building gocaves",
        cwd=source,
        env=env,
    )
    os.replace(staged, target)


class GocavesServer(_ManagedProcess):
    """A gocaves mock cluster started by ``start_gocaves``."""

    username = "Administrator"
    password = "password"
    bucket = "default"

    def __init__(self, process: subprocess.Popen, workdir: Path, log_path: Path) -> None:
        super().__init__(process, workdir)
        self.log_path = log_path
        self.connstr = ""
        self._paused = False

    def pause(self) -> None:
        """Freeze the mock with SIGSTOP, so that clients time out until ``resume()``."""
        self._send(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._send(signal.SIGCONT)
        self._paused = False

    def _send(self, signum: int) -> None:
        if not self.is_running():
            raise ServerStartError(f"gocaves (pid {self.pid}) is not running; see {self.log_path}")
        self._process.send_signal(signum)

    def wait_for_connstr(self, timeout_s: float = GOCAVES_READY_TIMEOUT_S) -> str:
        # gocaves writes to a log file rather than a pipe, so it can never
        # block on a full pipe. The file is read until the JSON line with the
        # connection string appears.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("{") and '"connstr"' in line:
                    self.connstr = json.loads(line)["connstr"]
                    return self.connstr
            if not self.is_running():
                raise ServerStartError(
                    f"gocaves (pid {self.pid}) exited with code {self._process.returncode} before printing "
                    f"its connection string; last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.1)
        raise ServerStartError(
            f"gocaves (pid {self.pid}) printed no connection string within {timeout_s:.0f} s; see {self.log_path}"
        )


def start_gocaves(workdir: str | os.PathLike, *, ready_timeout_s: float = GOCAVES_READY_TIMEOUT_S) -> GocavesServer:
    """Start gocaves in mock-only mode and wait for its connection string."""
    binary = gocaves_binary()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "gocaves.log"

    # gocaves has no flag to choose ports in --mock-only mode (its
    # --listen-port is for the test-suite mode). So the OS picks them, and
    # the build has pinned every listener to 127.0.0.1.
    started = time.monotonic()
    with open(log_path, "wb") as output:
        process = subprocess.Popen(
            [str(binary), "--mock-only"],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = GocavesServer(process, workdir, log_path)
    try:
        server.wait_for_connstr(ready_timeout_s)
    except BaseException:
        server.stop()
        raise
    server.start_seconds = time.monotonic() - started
    log.info("gocaves ready at %s (pid %d) in %.1f s", server.connstr, server.pid, server.start_seconds)
    return server


class ExternalCouchbaseServer:
    """A Couchbase cluster (gocaves or a real server) started outside this module."""

    pid = None
    log_path = None
    workdir = None
    start_seconds = None

    def __init__(self, connstr: str, *, username: str = "Administrator", password: str = "password",
                 bucket: str = "default") -> None:
        if not connstr.startswith(("couchbase://", "couchbases://")):
            raise ValueError(f"invalid Couchbase connection string {connstr!r}; expected couchbase://HOST[:PORT][,...]")
        self.connstr = connstr
        self.username = username
        self.password = password
        self.bucket = bucket

    def is_running(self) -> bool:
        return True

    def stop(self) -> None:
        """Do nothing, because the cluster's lifecycle belongs to the process that started it."""

    def pause(self) -> None:
        raise RuntimeError(
            "cannot pause a Couchbase cluster that this test run did not start; "
            "unset STREAMFIT_TEST_COUCHBASE_CONNSTR to let the tests start gocaves"
        )

    resume = pause


# ---------------------------------------------------------------- command line


def _command_up(args: argparse.Namespace) -> int:
    want_kafka = args.kafka or not args.couchbase
    want_couchbase = args.couchbase or not args.kafka
    workdir = Path(args.workdir or REPO_ROOT / ".work" / "servers" / f"up-{os.getpid()}").resolve()

    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())

    servers: list[_ManagedProcess] = []
    try:
        summary: dict[str, object] = {"workdir": str(workdir)}
        if want_kafka:
            kafka = start_kafka(workdir / "kafka")
            servers.append(kafka)
            summary.update(kafka_bootstrap=kafka.bootstrap, kafka_pid=kafka.pid, kafka_log=str(kafka.log_path))
        if want_couchbase:
            gocaves = start_gocaves(workdir / "gocaves")
            servers.append(gocaves)
            summary.update(couchbase_connstr=gocaves.connstr, gocaves_pid=gocaves.pid, gocaves_log=str(gocaves.log_path))
        print(json.dumps(summary), flush=True)

        while not stop_requested.wait(1.0):
            for server in servers:
                if not server.is_running():
                    log.error("%s (pid %d) exited on its own; stopping the others", type(server).__name__, server.pid)
                    return 1
        return 0
    except (ToolMissingError, ServerStartError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        for server in reversed(servers):
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the streamfit test servers on 127.0.0.1.")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start servers, print their addresses as JSON, run until SIGTERM or SIGINT")
    up.add_argument("--kafka", action="store_true", help="start the Kafka broker (default: both servers)")
    up.add_argument("--couchbase", action="store_true", help="start gocaves (default: both servers)")
    up.add_argument("--workdir", help="folder for configs, logs and data (default: .work/servers/up-PID)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # kafka-python logs every connection of the readiness probe at INFO.
    logging.getLogger("kafka").setLevel(logging.WARNING)
    return _command_up(args)


if __name__ == "__main__":
    sys.exit(main())
