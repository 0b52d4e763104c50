"""docker-compose.yml: the Compose specification schema and the stack's wiring, without a Docker engine."""

from __future__ import annotations

import base64
import copy
import dataclasses
import os
import re
import subprocess

import jsonschema
import pytest
import yaml

from deploy_support import DEPLOY, REPO_ROOT, PROMETHEUS_MODULE_VERSION, compose_schema
from modelstore._couchbase_settings import CouchbaseSettings
from predictor.settings import PredictorSettings
from worker.settings import WorkerSettings, parse_source

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator():
    schema = compose_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def example_env() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / "example.env").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def interpolate(value, env: dict[str, str]):
    """Apply Compose's ${NAME}, ${NAME:-default} and ${NAME:?message} to a string, as `docker compose` would."""
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        raise KeyError(f"{name} is required by docker-compose.yml ({arg}) but deploy/example.env does not set it")

    return _VARIABLE.sub(replace, value)


def service_env(compose: dict, service: str) -> dict[str, str]:
    env = example_env()
    return {k: str(interpolate(v, env)) for k, v in compose["services"][service]["environment"].items()}


def test_compose_matches_specification_schema(compose, validator):
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: c["services"]["worker"].update(restarts="always"),
        lambda c: c["services"]["kafka"].update(ports="9092:9092"),
        lambda c: c["services"]["worker"]["depends_on"]["kafka-init"].update(condition="service_done"),
    ],
)
def test_schema_rejects_broken_compose(compose, validator, damage):
    # The schema check must be able to fail: each damaged copy is invalid.
    broken = copy.deepcopy(compose)
    damage(broken)

    assert list(validator.iter_errors(broken))


def test_stack_has_every_service(compose):
    expected = {
        "kafka", "kafka-init", "couchbase", "couchbase-init", "worker", "predictor",
        "replay", "prometheus", "grafana",
    }
    assert set(compose["services"]) == expected


def test_dependencies_exist_and_jobs_finish(compose):
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        items = depends.items() if isinstance(depends, dict) else ((d, {}) for d in depends)
        for dependency, rule in items:
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            if rule.get("condition") == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", f"{dependency} is a job and must not restart"
            if rule.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no health check"


def test_worker_scales(compose):
    worker = compose["services"]["worker"]
    # A fixed container name or host port would make `--scale worker=N` fail.
    assert "container_name" not in worker
    assert "ports" not in worker


def test_host_ports_bind_loopback_only(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_mounted_files_exist(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"


def test_passwords_come_from_env_file(compose):
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if "PASSWORD" in key:
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), (
                    f"{name}.{key} must be a required variable from .env, got {value!r}"
                )


def test_required_variables_set_in_example_env(compose):
    required = set()
    for match in _VARIABLE.finditer(COMPOSE_FILE.read_text(encoding="utf-8")):
        if match.group("op") == ":?":
            required.add(match.group("name"))
    missing = required - set(example_env())

    assert required
    assert not missing, f"deploy/example.env lacks {sorted(missing)}"


def test_env_file_ignored_by_git():
    result = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO_ROOT)

    assert result.returncode == 0


# Read outside the settings classes: the store's credentials and the log format.
OTHER_VARIABLES = {"STREAMFIT_COUCHBASE_USERNAME", "STREAMFIT_COUCHBASE_PASSWORD", "STREAMFIT_LOG_FORMAT"}


def _known_variables(settings_class) -> set[str]:
    return {f"STREAMFIT_{f.name.upper()}" for f in dataclasses.fields(settings_class)} | OTHER_VARIABLES


def settings_from_env(settings_class, command: str, env: dict[str, str], monkeypatch):
    """Build settings from environment variables through the `streamfit worker|predictor` code path."""
    from streamfit import cli

    for name in [n for n in os.environ if n.startswith("STREAMFIT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return cli._load_settings(command, settings_class, [])[0]


@pytest.mark.parametrize("service, settings_class", [("worker", WorkerSettings), ("predictor", PredictorSettings)])
def test_service_variables_are_settings(compose, service, settings_class):
    # A misspelled STREAMFIT_ variable would be ignored silently.
    unknown = set(compose["services"][service]["environment"]) - _known_variables(settings_class)

    assert not unknown


def test_worker_settings_valid(compose, monkeypatch):
    env = service_env(compose, "worker")
    spec = env["STREAMFIT_MODEL_SPEC"]
    # The spec path exists in the image only, so the same file of the checkout replaces it.
    env["STREAMFIT_MODEL_SPEC"] = str(REPO_ROOT / "trainer" / "specs" / "flights.json")

    settings = settings_from_env(WorkerSettings, "worker", env, monkeypatch)

    assert parse_source(settings.source).topics == ("flights",)
    assert settings.dead_letter_topic == "flights-dead-letters"
    assert CouchbaseSettings.from_url(settings.store).scope == "streamfit"
    # The image's virtual environment uses the Python of the Dockerfile's base image.
    assert spec == "/opt/streamfit/lib/python3.11/site-packages/trainer/specs/flights.json"
    assert "ARG PYTHON_IMAGE=python:3.11-" in (DEPLOY / "Dockerfile").read_text()


def test_predictor_settings_valid(compose, monkeypatch):
    settings = settings_from_env(PredictorSettings, "predictor", service_env(compose, "predictor"), monkeypatch)

    assert settings.host == "0.0.0.0"
    assert settings.port == 8080
    assert CouchbaseSettings.from_url(settings.store).bucket == "streamfit"


def test_images_built_from_dockerfile_targets(compose):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE))
    for name in ("worker", "predictor", "replay"):
        build = compose["services"][name]["build"]
        assert build["dockerfile"] == "deploy/Dockerfile"
        assert build["target"] in stages, f"{name} builds unknown target {build['target']}"
    assert compose["services"]["predictor"]["build"]["target"] == "predictor"


def test_kafka_image_matches_tested_broker(compose):
    import streamfit_test_servers as servers

    for name in ("kafka", "kafka-init"):
        assert compose["services"][name]["image"] == f"apache/kafka:{servers.kafka_version()}"


def test_kafka_cluster_id_valid(compose):
    cluster_id = interpolate(compose["services"]["kafka"]["environment"]["CLUSTER_ID"], {})

    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
    assert not cluster_id.startswith("-")


def test_prometheus_image_matches_promtool(compose):
    minor = int(PROMETHEUS_MODULE_VERSION.split(".")[1]) - 300
    patch = PROMETHEUS_MODULE_VERSION.split(".")[2]

    assert compose["services"]["prometheus"]["image"] == f"prom/prometheus:v3.{minor}.{patch}"


def test_prometheus_mounts_config_and_rules(compose):
    volumes = compose["services"]["prometheus"]["volumes"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())

    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    for rule_file in config["rule_files"]:
        assert f"./deploy/prometheus/{rule_file.rsplit('/', 1)[1]}:{rule_file}:ro" in volumes


def test_prometheus_scrapes_service_ports(compose):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: (sd["names"], sd["port"])
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
    }
    worker_port = int(service_env(compose, "worker")["STREAMFIT_METRICS_PORT"])
    predictor_port = int(service_env(compose, "predictor")["STREAMFIT_PORT"])

    assert targets["streamfit-worker"] == (["worker"], worker_port)
    assert targets["streamfit-predictor"] == (["predictor"], predictor_port)


def test_grafana_provisioning_mounted(compose):
    volumes = compose["services"]["grafana"]["volumes"]
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "streamfit.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]

    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    assert f"./deploy/grafana/dashboards:{dashboards_path}:ro" in volumes
