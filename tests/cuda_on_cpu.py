"""Run kernels/gpu.py without a GPU, so CI checks the CUDA kernels' logic.

kernels/gpu.py uses only four things from CuPy: ``RawModule``, ``ndarray``,
``empty`` and ``ascontiguousarray``. ``make_fake_cupy`` supplies them on NumPy
arrays. Its ``RawModule`` compiles the CUDA source with g++, where
``cuda_cpu_shim.h`` defines ``__global__``, ``blockIdx`` and friends; calling a
kernel then runs every thread of the launch grid, one after the other. This is
faithful for kernels that share no memory and never synchronise, which is true
of all of ours: each thread writes only its own output elements.

So the index arithmetic of kernels/cuda/*.cu, the argument order and launch
shape in kernels/gpu.py, and the wrappers' checks all run in CI. What is left
untested without a GPU is the CUDA toolchain itself; test_cuda_sources.py
compiles the same files with nvcc for that.
"""
import ctypes
import importlib.util
import os
import subprocess
import sys
import types

import numpy as np

SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_cpu_shim.h")


def compile_on_cpu(code, build_dir, stem):
    """Compile CUDA source ``code`` with g++ into ``build_dir/<stem>.so`` and load it."""
    source = os.path.join(build_dir, stem + ".cu")
    library = os.path.join(build_dir, stem + ".so")
    with open(source, "w") as f:
        f.write(code)
    command = ["g++", "-std=c++17", "-O1", "-Wall", "-shared", "-fPIC",
               "-include", SHIM, "-x", "c++", source, "-o", library]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"g++ could not compile the CUDA source on the CPU:\n{done.stderr}")
    return ctypes.CDLL(library)


def _kernel_argument(a):
    """What a real kernel would receive for ``a``: a pointer to an array, or a long long."""
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:
            raise TypeError("a kernel was given a non-contiguous array; it indexes memory row-major")
        return ctypes.c_void_p(a.ctypes.data)
    if isinstance(a, int) and not isinstance(a, bool):
        return ctypes.c_longlong(a)     # CuPy passes a Python int as a long long
    # CuPy would pass a NumPy scalar with its own width, which our long long
    # parameters would misread; refuse it here so that such a bug fails a test
    raise TypeError(f"kernel argument of type {type(a).__name__}: expected an array or a Python int")


class CpuKernel:
    """One extern "C" kernel of a library built by ``compile_on_cpu``, called like a CuPy RawKernel."""

    def __init__(self, library, name):
        self.library = library
        self.function = getattr(library, name)   # AttributeError if the source has no such kernel
        self.function.restype = None

    def __call__(self, grid, block, args):
        (blocks,), (threads,) = grid, block      # our kernels are launched on 1-D grids
        arguments = [_kernel_argument(a) for a in args]
        self.library.shim_set_launch(blocks, threads)
        for b in range(blocks):
            for t in range(threads):
                self.library.shim_set_thread(b, t)
                self.function(*arguments)


def _poisoned_empty(shape, dtype=float):
    """Like np.empty, but filled with NaN (or the smallest integer), so an element a kernel forgets to write shows."""
    a = np.empty(shape, dtype=dtype)
    a.fill(np.nan if a.dtype.kind == "f" else np.iinfo(a.dtype).min)
    return a


def make_fake_cupy(build_dir):
    """A module that stands in for ``cupy`` inside kernels/gpu.py; libraries are built in ``build_dir``.

    ``fake.builds`` lists the source of every RawModule built, so a test can
    check that nothing is compiled again on every call.
    """
    fake = types.ModuleType("cupy")
    fake.ndarray = np.ndarray
    fake.empty = _poisoned_empty
    fake.ascontiguousarray = np.ascontiguousarray
    fake.builds = []

    class RawModule:
        def __init__(self, code, options=()):
            fake.builds.append(code)
            self.library = compile_on_cpu(code, build_dir, f"module{len(fake.builds)}")

        def get_function(self, name):
            return CpuKernel(self.library, name)

    fake.RawModule = RawModule
    return fake


def import_gpu_kernels(fake_cupy):
    """A fresh copy of kernels/gpu.py whose ``import cupy`` finds ``fake_cupy``."""
    from scratchnet import kernels
    path = os.path.join(os.path.dirname(os.path.abspath(kernels.__file__)), "gpu.py")
    # a name inside the kernels package, so that gpu.py's relative imports work,
    # and a different one from scratchnet.kernels.gpu, so that a real import is never disturbed
    spec = importlib.util.spec_from_file_location("scratchnet.kernels._gpu_on_cpu", path)
    module = importlib.util.module_from_spec(spec)
    real_cupy = sys.modules.get("cupy")
    sys.modules["cupy"] = fake_cupy
    try:
        spec.loader.exec_module(module)
    finally:
        if real_cupy is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = real_cupy
    return module
