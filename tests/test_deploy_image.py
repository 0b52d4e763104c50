"""deploy/Dockerfile, the slim predictor's dependency set and the init scripts, without a Docker engine."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deploy_support import DEPLOY, REPO_ROOT

DOCKERFILE = DEPLOY / "Dockerfile"
PREDICTOR_REQUIREMENTS = DEPLOY / "predictor-requirements.txt"
PROJECT_PACKAGES = {"streamfit", "worker", "trainer", "predictor", "modelstore"}
# What the slim image exists to leave out.
TRAINING_ONLY = {"scikit-learn", "scipy", "skl2onnx", "skops", "pandas"}


def stages() -> dict[str, list[str]]:
    """Map each build stage's name to its instruction lines (continuations joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM \S+ AS (\S+)$", line)
        if match:
            current = match.group(1)
            result[current] = []
        elif current is not None:
            result[current].append(line)
    return result


def requirement_lines(path) -> list[Requirement]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def test_final_stages_run_unprivileged():
    found = stages()
    for stage in ("predictor", "streamfit"):
        instructions = found[stage]
        users = [line.split()[1] for line in instructions if line.startswith("USER ")]
        assert users, f"stage {stage} sets no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) > 0, f"stage {stage} runs as {users[-1]}"
        assert any(line.startswith("HEALTHCHECK ") for line in instructions), f"stage {stage} has no health check"
        assert any(line.startswith("ENTRYPOINT ") for line in instructions)


def test_default_target_is_full_image():
    assert list(stages())[-1] == "streamfit"


def test_no_secrets_baked_in():
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith(("ENV ", "ARG ")):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|KEY", line, re.IGNORECASE), line


def test_pip_not_in_images():
    # Virtual environments are created without pip and filled by the build
    # stage's pip, so no runtime image can install packages.
    text = DOCKERFILE.read_text()
    venvs = re.findall(r"python -m venv (\S+(?: \S+)?)", text)

    assert venvs
    assert all("--without-pip" in venv for venv in venvs)


def test_copied_sources_exist_and_pass_dockerignore():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].split("/")[0] for line in ignore if line.startswith("!")}
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"COPY (?!--from)(.+) \S+$", line)
        if not match:
            continue
        for source in match.group(1).split():
            assert (REPO_ROOT / source).exists(), f"COPY of missing {source}"
            assert source in allowed or source.split("/")[0] in allowed or any(
                rule == f"!{source}" for rule in ignore
            ), f"{source} is excluded from the build context by Dockerfile.dockerignore"


def test_predictor_requirements_match_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(Requirement(r).name): Requirement(r) for r in project["dependencies"]}
    for requirement in requirement_lines(PREDICTOR_REQUIREMENTS):
        name = canonicalize_name(requirement.name)
        assert name in declared, f"{requirement.name} is not a dependency in pyproject.toml"
        assert requirement.specifier == declared[name].specifier, (
            f"{requirement.name}: {requirement.specifier} here, {declared[name].specifier} in pyproject.toml"
        )


def dependency_closure(requirements: list[Requirement]) -> set[str]:
    """Return the names of the installed distributions the requirements pull in, themselves included."""
    seen: set[str] = set()
    pending = [r.name for r in requirements]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in seen:
            continue
        seen.add(name)
        for line in md.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return seen


def test_predictor_runs_on_its_requirements():
    # Simulates the slim image in a fresh interpreter: every installed
    # module whose distributions are outside the predictor's set raises
    # ModuleNotFoundError, as it would there, and optional imports fall back.
    # Then every module the predictor image runs is imported.
    allowed = dependency_closure(requirement_lines(PREDICTOR_REQUIREMENTS))
    blocked = sorted(
        module
        for module, distributions in md.packages_distributions().items()
        if module not in PROJECT_PACKAGES and not {canonicalize_name(d) for d in distributions} & allowed
    )
    assert {"sklearn", "scipy", "skl2onnx"} <= set(blocked)
    code = """
import importlib, importlib.abc, json, pkgutil, sys
blocked = set(json.loads(sys.argv[1]))
attempted = set()

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in blocked:
            attempted.add(top)
            raise ModuleNotFoundError(f"No module named {top!r}", name=top)
        return None

sys.meta_path.insert(0, Absent())
import predictor, modelstore
names = ["streamfit.cli", "streamfit.config", "streamfit.logs"]
for package in (predictor, modelstore):
    names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps(sorted(attempted)))
"""
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(blocked)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )

    assert result.returncode == 0, (
        "the predictor fails to import without the packages the slim image leaves out:\n"
        + result.stderr[-3000:]
    )
    assert not {"sklearn", "skl2onnx", "scipy"} & set(json.loads(result.stdout))


def test_predictor_set_leaves_out_training_libraries():
    closure = dependency_closure(requirement_lines(PREDICTOR_REQUIREMENTS))

    assert not closure & {canonicalize_name(n) for n in TRAINING_ONLY}


@pytest.mark.parametrize("script", ["couchbase-init.sh", "kafka-init.sh"])
def test_init_script_syntax(script):
    result = subprocess.run(["bash", "-n", str(DEPLOY / script)], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", ["couchbase-init.sh", "kafka-init.sh"])
def test_init_script_shellcheck(script):
    result = subprocess.run(["shellcheck", str(DEPLOY / script)], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout


def test_couchbase_init_creates_store_collections():
    from modelstore import _keys

    script = (DEPLOY / "couchbase-init.sh").read_text()
    listed = re.search(r"^collections=\((.*)\)$", script, re.MULTILINE).group(1).split()

    assert sorted(listed) == sorted(_keys.COLLECTIONS)
    assert "data_reader[$bucket:$scope],data_writer[$bucket:$scope]" in script
