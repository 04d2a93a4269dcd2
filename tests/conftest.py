"""Shared fixtures: the array module under test, and the MNIST location."""
import os

import numpy as np
import pytest

from scratchnet.backend import gpu_available

_GPU_OK, _GPU_REASON = gpu_available()


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """Each backend-generic test runs on NumPy and, where a CUDA device is present, on CuPy."""
    if request.param == "numpy":
        return np
    if not _GPU_OK:
        pytest.skip(f"CuPy backend not testable here: {_GPU_REASON}")
    import cupy
    return cupy


def mnist_dir():
    """Where the tests read MNIST: $SCRATCHNET_DATA, else ../shared/data/mnist beside the repo."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("SCRATCHNET_DATA") or os.path.normpath(os.path.join(here, "..", "..", "shared", "data", "mnist"))
