"""Import order of the native wheels, and the predictor's import boundary."""

import subprocess
import sys

import pytest

ML = "import onnx, onnxruntime, skl2onnx, sklearn"
STORE = "import couchbase"


@pytest.mark.parametrize("code", [f"{ML}; {STORE}", f"{STORE}; {ML}"])
def test_native_wheels_import_in_either_order(code):
    # A native abort at import would crash-loop a container with no Python
    # traceback, so both orders are checked in fresh interpreters.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_store_and_schema_do_not_import_sklearn():
    code = (
        "import sys, modelstore, modelstore.schema, modelstore.sqlite, modelstore.couchbase;"
        "print(sorted(m for m in ('sklearn', 'skl2onnx', 'worker', 'trainer', 'predictor') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
