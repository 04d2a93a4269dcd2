"""CuPy versions of the kernels in ``kernels/reference.py`` (same signatures).

The CUDA source lives beside this file in ``kernels/cuda/*.cu``: ``im2col.cu``
holds im2col and col2im, ``maxpool.cu`` the max-pool forward and backward
passes. Each kernel runs one thread per output element, so no two threads write
the same place; col2im and the max-pool backward pass are *gathers* (each input
pixel sums what came from it) and need no atomics.

Every ``.cu`` file is compiled once per process, on first use, by
``cupy.RawModule`` and kept in ``_kernels``; CuPy also keeps the compiled
binary on disk between processes. Only this module imports CuPy, and
``kernels/__init__.py`` imports it only when the GPU table is first asked for.
"""
import os

import cupy
import numpy as np

from .reference import output_size

_CUDA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda")

# launch shape: 256 threads a block, as many blocks as it takes to give every
# output element its own thread, up to _MAX_BLOCKS; beyond that the kernels'
# grid-stride loops let each thread take several elements
_THREADS_PER_BLOCK = 256
_MAX_BLOCKS = 65535

# the kernels come in a float and a double version, named <kernel>_f32 / _f64
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}

_modules = {}   # file name -> cupy.RawModule, built once
_kernels = {}   # (file name, kernel name) -> compiled kernel


def _kernel(source, name, dtype, who):
    """The compiled CUDA kernel ``<name>_f32`` or ``<name>_f64`` of ``kernels/cuda/<source>``."""
    dtype = np.dtype(dtype)
    if dtype not in _SUFFIX:
        raise ValueError(f"{who}: the GPU kernels take float32 or float64 arrays, got {dtype}")
    entry = f"{name}_{_SUFFIX[dtype]}"
    key = (source, entry)
    if key not in _kernels:
        if source not in _modules:
            with open(os.path.join(_CUDA_DIR, source)) as f:
                _modules[source] = cupy.RawModule(code=f.read())
        _kernels[key] = _modules[source].get_function(entry)
    return _kernels[key]


def _launch(kernel, total, args):
    """Run ``kernel`` with one thread per output element (``total`` of them)."""
    if total == 0:
        return  # nothing to compute, and a grid of zero blocks is not a valid CUDA launch
    blocks = min((total + _THREADS_PER_BLOCK - 1) // _THREADS_PER_BLOCK, _MAX_BLOCKS)
    # Python ints reach the kernel as long long, the type of its size arguments
    kernel((blocks,), (_THREADS_PER_BLOCK,), args)


def _device_array(a, who, dtype=None):
    """``a`` as a C-contiguous CuPy array (the kernels index raw memory row-major)."""
    if not isinstance(a, cupy.ndarray):
        # a NumPy array handed to a raw kernel would not be a device pointer
        raise ValueError(f"{who}: expected a CuPy array, got {type(a).__module__}.{type(a).__name__}")
    return cupy.ascontiguousarray(a, dtype=dtype)


def _int_shape(shape, who):
    """``shape`` as four Python ints (a CuPy or NumPy integer would be passed with the wrong width)."""
    if len(shape) != 4:
        raise ValueError(f"{who}: expected an (N, C, H, W) shape, got {tuple(shape)}")
    return tuple(int(s) for s in shape)


# ===== im2col / col2im =====

def im2col(x, KH, KW, stride, pad):
    """CUDA im2col; see ``kernels.reference.im2col`` (the specification).

    Parameters
    ----------
    x : (N, C, H, W) cupy array, float32 or float64
    KH, KW, stride, pad : int

    Returns
    -------
    cols : (N * OH * OW, C * KH * KW) cupy array, same dtype as x
    """
    x = _device_array(x, "im2col")
    N, C, H, W = _int_shape(x.shape, "im2col")
    KH, KW, stride, pad = int(KH), int(KW), int(stride), int(pad)
    OH, OW = output_size(H, KH, stride, pad), output_size(W, KW, stride, pad)
    kernel = _kernel("im2col.cu", "im2col", x.dtype, "im2col")
    cols = cupy.empty((N * OH * OW, C * KH * KW), dtype=x.dtype)
    _launch(kernel, cols.size, (x, cols, N, C, H, W, KH, KW, OH, OW, stride, pad))
    return cols


def col2im(cols, x_shape, KH, KW, stride, pad):
    """CUDA col2im as a gather; see ``kernels.reference.col2im``.

    Parameters
    ----------
    cols : (N * OH * OW, C * KH * KW) cupy array, float32 or float64
    x_shape : (N, C, H, W)

    Returns
    -------
    x : (N, C, H, W) cupy array; a pixel covered by several windows gets their sum
    """
    cols = _device_array(cols, "col2im")
    N, C, H, W = _int_shape(x_shape, "col2im")
    KH, KW, stride, pad = int(KH), int(KW), int(stride), int(pad)
    OH, OW = output_size(H, KH, stride, pad), output_size(W, KW, stride, pad)
    if cols.shape != (N * OH * OW, C * KH * KW):
        raise ValueError(f"col2im: expected cols of shape {(N * OH * OW, C * KH * KW)} "
                         f"for x_shape {(N, C, H, W)}, got {tuple(cols.shape)}")
    kernel = _kernel("im2col.cu", "col2im", cols.dtype, "col2im")
    x = cupy.empty((N, C, H, W), dtype=cols.dtype)
    _launch(kernel, x.size, (cols, x, N, C, H, W, KH, KW, OH, OW, stride, pad))
    return x


# ===== max pooling =====

def maxpool_forward(x, KH, KW, stride):
    """CUDA max pooling; see ``kernels.reference.maxpool_forward``.

    Parameters
    ----------
    x : (N, C, H, W) cupy array, float32 or float64

    Returns
    -------
    y : (N, C, OH, OW) cupy array, the window maxima
    argmax : (N, C, OH, OW) int64 cupy array, flat position kh * KW + kw of the
        maximum inside its window; the first one wins a tie
    """
    x = _device_array(x, "maxpool_forward")
    N, C, H, W = _int_shape(x.shape, "maxpool_forward")
    KH, KW, stride = int(KH), int(KW), int(stride)
    OH, OW = output_size(H, KH, stride, 0), output_size(W, KW, stride, 0)
    kernel = _kernel("maxpool.cu", "maxpool_forward", x.dtype, "maxpool_forward")
    y = cupy.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = cupy.empty((N, C, OH, OW), dtype=np.int64)
    _launch(kernel, y.size, (x, y, argmax, N, C, H, W, KH, KW, OH, OW, stride))
    return y, argmax


def maxpool_backward(dy, argmax, x_shape, KH, KW, stride):
    """CUDA max-pool backward as a gather; see ``kernels.reference.maxpool_backward``.

    Parameters
    ----------
    dy : (N, C, OH, OW) cupy array, float32 or float64
    argmax : (N, C, OH, OW) integer cupy array from maxpool_forward
    x_shape : (N, C, H, W)

    Returns
    -------
    dx : (N, C, H, W) cupy array; overlapping windows add up
    """
    dy = _device_array(dy, "maxpool_backward")
    argmax = _device_array(argmax, "maxpool_backward", dtype=np.int64)   # the kernel reads long long
    N, C, H, W = _int_shape(x_shape, "maxpool_backward")
    KH, KW, stride = int(KH), int(KW), int(stride)
    OH, OW = output_size(H, KH, stride, 0), output_size(W, KW, stride, 0)
    if dy.shape != (N, C, OH, OW) or argmax.shape != (N, C, OH, OW):
        raise ValueError(f"maxpool_backward: expected dy and argmax of shape {(N, C, OH, OW)} "
                         f"for x_shape {(N, C, H, W)}, got {tuple(dy.shape)} and {tuple(argmax.shape)}")
    kernel = _kernel("maxpool.cu", "maxpool_backward", dy.dtype, "maxpool_backward")
    dx = cupy.empty((N, C, H, W), dtype=dy.dtype)
    _launch(kernel, dx.size, (dy, argmax, dx, N, C, H, W, KH, KW, OH, OW, stride))
    return dx


# ===== JSMA's pixel-pair search =====
# No CUDA version: the reference's chunked array code runs on CuPy arrays as it is.

from .reference import jsma_pair_search  # noqa: E402,F401
