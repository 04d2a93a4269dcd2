"""Shared by the tests: where MNIST is."""
import os


def mnist_dir():
    """Where the tests read MNIST: $SCRATCHNET_DATA, else ../shared/data/mnist beside the repo."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("SCRATCHNET_DATA") or os.path.normpath(os.path.join(here, "..", "..", "shared", "data", "mnist"))
