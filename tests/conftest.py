"""Shared by the tests: where MNIST is, the array module under test, the small MNIST networks."""
import os

import numpy as np
import pytest

from scratchnet.backend import gpu_available

# ===== MNIST =====
#
# MNIST is looked up exactly as the loader looks it up (``find_mnist_dir``:
# $SCRATCHNET_DATA, else ~/.cache/scratchnet/mnist). Tests that read the real
# files carry the ``mnist`` marker (``needs_mnist``) or use the ``mnist_folder``
# fixture; without the files they skip, and the report says so at its top and
# at its end. With SCRATCHNET_REQUIRE_DATA=1 (set by CI) missing files stop the
# session at collection instead: a CI run must never pass by skipping them.

from scratchnet.data import FILES, find_mnist_dir  # noqa: E402  (kept beside its use)

MNIST = find_mnist_dir()          # what the loader sees: the folder, how it was chosen, what is missing
REQUIRE_ENV = "SCRATCHNET_REQUIRE_DATA"
_SKIPPED = pytest.StashKey[int]()   # how many collected tests skip for want of MNIST

needs_mnist = pytest.mark.mnist
"""Mark a test (or ``pytestmark = needs_mnist`` a module) that reads the real MNIST files."""


def committed_run(folder, json_name):
    """(the committed JSON of a study run under experiments/results/FOLDER, the README's text)."""
    import json
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with open(os.path.join(root, "experiments", "results", folder, json_name)) as f:
        run = json.load(f)
    with open(os.path.join(root, "README.md")) as f:
        return run, f.read()


def mnist_dir():
    """The folder the loader reads MNIST from (whether or not the files are there)."""
    return MNIST.folder


def mnist_required():
    """True when $SCRATCHNET_REQUIRE_DATA asks for missing MNIST to be an error, not a skip."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "no", "false")


def _missing_line():
    partly = len(MNIST.missing) < len(FILES)
    return (f"MNIST not found in {MNIST.folder} (from {MNIST.source}"
            + (f"; missing {', '.join(MNIST.missing)})" if partly else ")"))


def _how_to_fix():
    return (f"set SCRATCHNET_DATA to a folder holding the four MNIST files, or download them into "
            f"{MNIST.folder} with: python -c 'import scratchnet.data as d; d.find_mnist()'")


@pytest.fixture(scope="session")
def mnist_folder():
    """The MNIST folder. A test that uses it is marked ``mnist`` at collection, so it is counted and
    skipped (or, under SCRATCHNET_REQUIRE_DATA=1, fails the session) like any marked test."""
    if not MNIST.present:
        pytest.skip(_missing_line())
    return MNIST.folder



# ===== the array module under test =====

@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """Each backend-generic test runs on NumPy and, where a CUDA device is present, on CuPy."""
    if request.param == "numpy":
        return np
    ok, reason = gpu_available()
    if not ok:
        pytest.skip(f"CuPy backend not testable here: {reason}")
    import cupy
    return cupy


# ===== the small networks trained on MNIST (tests/mnist_models.py) =====

@pytest.fixture(scope="session")
def mnist(mnist_folder):
    """The real MNIST arrays, read once per run."""
    from scratchnet.data import load_mnist
    return load_mnist(mnist_folder, download=False, progress=False)


@pytest.fixture(scope="session")
def model_T1(mnist):
    """The small MLP trained at T = 1."""
    from mnist_models import train
    return train(mnist, 1.0, epochs=5, lr=1e-3)


@pytest.fixture(scope="session")
def model_hot(mnist):
    """Trained at T = 100 (Adam copes with the 1/T in the gradient), deployed at T = 1:
    logits about 100 times too large, float32 softmax saturated."""
    from mnist_models import T_HIGH, train
    return train(mnist, T_HIGH, epochs=10, lr=3e-3)


def pytest_configure(config):
    config.addinivalue_line("markers", f"mnist: reads the real MNIST files (skips where they are missing; "
                                       f"{REQUIRE_ENV}=1 makes that an error)")


def pytest_report_header(config):
    if MNIST.present:
        return f"MNIST: {MNIST.folder} (from {MNIST.source})"
    return f"MNIST: NOT FOUND in {MNIST.folder} (from {MNIST.source}); the tests that need it will skip"


def _needs_mnist(item):
    return item.get_closest_marker("mnist") is not None


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if "mnist_folder" in getattr(item, "fixturenames", ()) and not _needs_mnist(item):
            item.add_marker(needs_mnist)
    if MNIST.present:
        return
    n = sum(_needs_mnist(item) for item in items)
    if n and mnist_required():
        raise pytest.UsageError(f"{REQUIRE_ENV} is set but {_missing_line()}, and {n} tests need it. "
                                f"To fix: {_how_to_fix()}.")
    config.stash[_SKIPPED] = n
    skip = pytest.mark.skip(reason=_missing_line())
    for item in items:
        if _needs_mnist(item):
            item.add_marker(skip)


def pytest_report_collectionfinish(config, start_path, items):
    n = config.stash.get(_SKIPPED, 0)
    if n:
        return f"MNIST NOT FOUND: {n} of {len(items)} tests will skip. To run them, {_how_to_fix()}."
    return []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.stash.get(_SKIPPED, 0)
    if n:
        terminalreporter.write_line(f"{n} tests skipped: {_missing_line()}", yellow=True)
