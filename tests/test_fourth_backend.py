"""docs/conformance.md's worked example: a fourth backend (the Python array API standard, on
array_api_strict) passes the shipped suite, both ways the doc shows."""

import subprocess
import sys
from pathlib import Path

import pytest

from refreekv.testing import ConformanceSuite, Target

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from docs.examples.array_api_backend import ArrayAPIBackend  # noqa: E402


class TestArrayAPIBackend(ConformanceSuite):
    @pytest.fixture(scope="class")
    def refreekv_target(self):
        return Target(ArrayAPIBackend(), ("float32", "float64"))


def test_plugin_command_line_runs_the_suite_on_it():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs", "refreekv.testing.suite",
           "--refreekv-backend=docs.examples.array_api_backend:ArrayAPIBackend", "--refreekv-dtypes=float32",
           "--hypothesis-profile=ci", "-k", "plan_matches_reference or errors"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "2 passed" in out.stdout


@pytest.mark.parametrize("options,said", [
    (["--refreekv-backend=no_such_module:Backend"], "--refreekv-backend=no_such_module:Backend: backend: received"),
    (["--refreekv-backend=numpy", "--refreekv-dtypes=float8"], "--refreekv-dtypes=float8: received 'float8'"),
    (["--refreekv-dtypes="], "--refreekv-dtypes=: received no dtype"),
])
def test_plugin_refuses_bad_options_once_before_any_test(options, said):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs", "refreekv.testing.suite", *options]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 4, out.stdout[-2000:] + out.stderr[-2000:]  # pytest's usage error
    assert said in out.stderr and out.stderr.count("ERROR:") == 1, out.stderr[-2000:]
    assert "passed" not in out.stdout and "failed" not in out.stdout
