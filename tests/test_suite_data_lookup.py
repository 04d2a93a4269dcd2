"""The test suite's own MNIST lookup (tests/conftest.py): the same folder the loader uses,
a visible line at the top of the report when the files are missing and how many tests skip
for it, and under SCRATCHNET_REQUIRE_DATA=1 a failed session instead of quiet skips.

Each case runs pytest in a subprocess on a small test project in a temporary folder that
uses this repository's conftest.py, with HOME pointing at a temporary home, so the real
environment and the real MNIST copy play no part.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from scratchnet import data as D

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Four tests: two marked, one through the fixture, one through a fixture built on it, one free.
PROJECT_TESTS = '''
import os
import pytest
from conftest import mnist_dir, needs_mnist


@needs_mnist
def test_marked():
    assert os.path.isfile(os.path.join(mnist_dir(), "t10k-labels-idx1-ubyte.gz"))


def test_fixture(mnist_folder):
    assert mnist_folder == mnist_dir()


@pytest.fixture
def built_on_it(mnist_folder):
    return mnist_folder


def test_indirect(built_on_it):
    assert built_on_it == mnist_dir()


def test_free():
    assert 1 + 1 == 2


def test_where(capsys):
    print("WHERE", mnist_dir())
'''


def run_pytest(tmp_path, env_changes=(), *args):
    """pytest on the small project, with a clean MNIST environment; returns (returncode, all output)."""
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(REPO, "tests", "conftest.py"), project / "tests" / "conftest.py")
    (project / "tests" / "test_project.py").write_text(PROJECT_TESTS)
    env = {k: v for k, v in os.environ.items() if k not in (D.ENV_VAR, "SCRATCHNET_REQUIRE_DATA")}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=REPO, **dict(env_changes))
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "tests", *args],
                            cwd=project, env=env, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def default_cache(tmp_path):
    return str(tmp_path / "home" / ".cache" / "scratchnet" / "mnist")


def fake_mnist(folder):
    """Empty files under the four names: the lookup checks presence, the tests here read nothing."""
    os.makedirs(folder, exist_ok=True)
    for name in D.FILES.values():
        open(os.path.join(folder, name), "wb").close()
    return str(folder)


def test_without_data_the_top_of_the_report_says_how_many_skip_and_why(tmp_path):
    status, out = run_pytest(tmp_path)
    assert status == 0, out
    lines = out.splitlines()
    first_result = next(i for i, line in enumerate(lines) if line.startswith("tests/test_project.py"))
    top = "\n".join(lines[:first_result])
    assert f"MNIST: NOT FOUND in {default_cache(tmp_path)} (from the default cache)" in top
    assert "MNIST NOT FOUND: 3 of 5 tests will skip. To run them, set SCRATCHNET_DATA" in top
    assert "python -c 'import scratchnet.data as d; d.find_mnist()'" in top
    assert re.search(r"\b3 skipped\b", out) and re.search(r"\b2 passed\b", out), out
    assert f"3 tests skipped: MNIST not found in {default_cache(tmp_path)}" in out   # once more at the end


def test_the_quiet_report_still_says_it(tmp_path):
    status, out = run_pytest(tmp_path, (), "-q")
    assert status == 0 and "MNIST NOT FOUND: 3 of 5 tests will skip" in out.splitlines()[0], out


def test_data_in_the_default_cache_is_found_as_the_loader_finds_it(tmp_path):
    fake_mnist(default_cache(tmp_path))
    status, out = run_pytest(tmp_path, (), "-s")
    assert status == 0, out
    assert f"MNIST: {default_cache(tmp_path)} (from the default cache)" in out
    assert f"WHERE {default_cache(tmp_path)}" in out
    assert "skipped" not in out and re.search(r"\b5 passed\b", out), out


def test_the_environment_variable_comes_first(tmp_path):
    fake_mnist(default_cache(tmp_path))
    env_folder = fake_mnist(tmp_path / "env-mnist")
    status, out = run_pytest(tmp_path, {D.ENV_VAR: env_folder}, "-s")
    assert status == 0 and f"MNIST: {env_folder} (from $SCRATCHNET_DATA)" in out and f"WHERE {env_folder}" in out


def test_required_data_that_is_missing_fails_the_session_in_one_line(tmp_path):
    status, out = run_pytest(tmp_path, {"SCRATCHNET_REQUIRE_DATA": "1"})
    assert status != 0
    errors = [line for line in out.splitlines() if "SCRATCHNET_REQUIRE_DATA" in line]
    assert len(errors) == 1, out
    assert errors[0].startswith("ERROR: SCRATCHNET_REQUIRE_DATA is set but MNIST not found in ")
    assert "3 tests need it" in errors[0] and "set SCRATCHNET_DATA" in errors[0]
    assert "passed" not in out and "Traceback" not in out


@pytest.mark.parametrize("value", ["0", ""])
def test_require_switched_off_skips(tmp_path, value):
    status, out = run_pytest(tmp_path, {"SCRATCHNET_REQUIRE_DATA": value})
    assert status == 0 and re.search(r"\b3 skipped\b", out), out


def test_required_data_that_is_present_runs(tmp_path):
    fake_mnist(default_cache(tmp_path))
    status, out = run_pytest(tmp_path, {"SCRATCHNET_REQUIRE_DATA": "1"})
    assert status == 0 and re.search(r"\b5 passed\b", out), out
