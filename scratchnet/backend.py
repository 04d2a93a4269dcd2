"""Where arrays live: NumPy on the CPU, CuPy on a CUDA GPU.

The device is chosen where data is placed (``to_device(x, device)``), from an
explicit argument or the environment variable ``SCRATCHNET_DEVICE``
(``cpu``, ``gpu`` or ``auto``; default ``auto`` = the GPU when CuPy and a CUDA
device are both present, the CPU otherwise). Asking for the GPU where either is
missing is an error that names what is missing; it never falls back silently.

Everything downstream asks ``get_array_module(x)`` and writes its maths once
against ``xp``.
"""
import os

import numpy as np

DEVICES = ("cpu", "gpu", "auto")


class DeviceError(RuntimeError):
    """The requested device cannot be used on this machine."""


def _cupy_or_reason():
    """(cupy module, None) when a CUDA device is usable, else (None, reason)."""
    try:
        import cupy
    except ImportError as e:
        return None, f"CuPy is not installed ({e}); install scratchnet[gpu]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing or broken
        return None, f"CuPy is installed but CUDA is not usable: {e}"
    if count == 0:
        return None, "CuPy is installed but no CUDA device is present"
    return cupy, None


def gpu_available():
    """(bool, reason): whether the GPU backend can run here, and why not."""
    cupy, reason = _cupy_or_reason()
    return cupy is not None, reason


def resolve_device(device=None):
    """'cpu' or 'gpu', from ``device`` or else ``$SCRATCHNET_DEVICE`` (default 'auto')."""
    if device is None:
        device = os.environ.get("SCRATCHNET_DEVICE", "auto")
    device = str(device).lower()
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return "cpu"
    cupy, reason = _cupy_or_reason()
    if device == "gpu" and cupy is None:
        raise DeviceError(f"the GPU was requested but cannot be used: {reason}")
    return "gpu" if cupy is not None else "cpu"


def xp_for(device=None):
    """The array module (numpy or cupy) of a device name."""
    if resolve_device(device) == "gpu":
        import cupy
        return cupy
    return np


def get_array_module(x):
    """numpy or cupy, whichever owns ``x``."""
    if type(x).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def to_device(x, device=None, dtype=None):
    """Place ``x`` on ``device`` (see ``resolve_device``), optionally casting it."""
    xp = xp_for(device)
    if xp is np:
        x = to_numpy(x)
        return x if dtype is None else x.astype(dtype, copy=False)
    return xp.asarray(x, dtype=dtype)


def to_numpy(x):
    """A NumPy copy (or view) of an array from either module."""
    if get_array_module(x) is not np:
        return x.get()
    return np.asarray(x)
