"""Numba versions of the kernels in ``kernels/reference.py`` (same signatures).

Each ``@njit(parallel=True, cache=True)`` loop runs ``prange`` only over an
index whose output the thread alone writes, so no two threads ever touch the
same element and no atomics are needed. The max-pool backward pass gives each
thread whole image planes (n, c); inside its own plane a thread adds every dy
onto its winning pixel, which no other thread can touch. Sums over the batch
(a convolution's dW and db) are kept per block of consecutive images, one
block per thread, and the blocks' sums are added in block order at the end:
which thread runs which block never changes a number.

The whole-layer convolution kernels (``conv2d_forward``, ``conv2d_backward``)
work on one image, or a few, at a time in each thread, with buffers that stay
in its core's cache, and never build the batch's whole im2col matrix (85 MB
for the Papernot network's second convolution at batch 128), whose trips to
main memory cost more than the arithmetic. 3x3 filters at stride 1 go to
Winograd F(2x2, 3x3) or F(4x4, 3x3) (see its section), which need 2.25x or
4x fewer multiplications, and, on one or two input channels, forward to
direct loops; other shapes to im2col, one image per thread. There is no
batch im2col / col2im here: the registry hands out the reference's.

Threads: Numba's thread pool is the only one that runs in parallel. Importing
this module therefore

* sets every BLAS library (NumPy's, and SciPy's, which Numba's ``np.dot``
  calls) to one thread, so OpenBLAS never starts threads under Numba's; and
* picks Numba's ``omp`` threading layer (GNU OpenMP), with its idle threads
  spinning for at most ``OMP_SPIN_COUNT`` rounds before they sleep, and
  ``workqueue`` where OpenMP cannot be loaded; unless ``NUMBA_THREADING_LAYER``
  (or, for the spin, ``GOMP_SPINCOUNT``) says otherwise.

Both choices come from measurements on the project's 2-core machine. A
training step runs about forty parallel kernels of a few milliseconds each,
and between two of them a thread either spins or sleeps. ``workqueue``'s
threads sleep at once, and waking them costs so much that the step kept only
1.3-1.5 of the 2 cores busy. OpenMP's spinning threads keep both (1.8-2.0),
but a thread that spins long takes the core a working thread needs as soon as
anything else runs. Training step, batch 128, images/s, workqueue / OpenMP
with GNU's default spin (300,000 rounds) / with 30,000 rounds: nothing else
running 1,222-1,514 / 1,693-1,854 / 1,745-1,827; one other busy process
beside it 911-1,003 / 460-464 / 810-890. So the spin is bounded: nearly all
of the gain on a quiet machine, little of the loss on a shared one. (With
``NUMBA_NUM_THREADS=1`` there is no second thread to spin or sleep.) OpenBLAS's
own threads spin as well, hence one BLAS thread (at a load average of 10,
the OpenMP layer with 2 BLAS threads took 642 ms wall a step, workqueue with
1 BLAS thread 289 ms).
The threading layer changes no number: every sum is split into the same
blocks under every layer (see above), so the same seed gives the same
weights under ``omp``, ``workqueue`` and ``tbb`` (``tests/test_cpu_settings.py``
compares the layers that load).
``threadpoolctl.threadpool_limits`` changes the BLAS setting back if needed.
"""
import ctypes
import math
import os
import sys

import numba
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba's np.dot calls; loaded so threadpoolctl sees it)
from numba import njit, prange
from threadpoolctl import ThreadpoolController

from . import reference
from .reference import output_size

# rounds an idle OpenMP thread spins before it sleeps (GNU's default: 300,000); see above
OMP_SPIN_COUNT = 30000

if "NUMBA_THREADING_LAYER" not in os.environ:    # the user's explicit choice wins
    # both take effect at the first parallel kernel, when Numba loads the layer and
    # the layer loads OpenMP, which reads GOMP_SPINCOUNT then
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
    numba.config.THREADING_LAYER = "default"     # the first of these that loads
    os.environ.setdefault("GOMP_SPINCOUNT", str(OMP_SPIN_COUNT))
_threadpools = ThreadpoolController()
_threadpools.limit(limits=1, user_api="blas")


# ===== memory: freed arrays kept for the next ones =====
#
# A training step allocates the same arrays every time (each layer's output
# and gradient, up to 11 MB at batch 128 and 86 MB at batch 1000), and frees
# them before the next step. glibc's malloc gives every large array pages of
# its own from the operating system and hands them back when it is freed, so
# the next step's array starts on fresh pages, which the kernel must fault in
# and zero: measured, 630 page faults and 11 ms of system time in each
# training step (about 8 % of its CPU time), none with the setting below.
# Keeping freed memory in the heap for the next arrays instead gave (2-core
# machine, nothing else running, images/s, before / after, two interleaved
# runs each): training step 1,552-1,670 / 1,695-1,735; input gradient at
# batch 1000 2,055-2,201 / 2,805-2,808. The price: a process holds on to its
# largest working set until it exits, rather than giving it back between
# steps (it reuses it), and every array now comes from one heap, which
# fragments a little: the input gradient's peak at batch 1000 rose from 606
# to 698 MiB in experiments/bench.py (training: 155 MiB either way).

MALLOC_TRIM_BYTES = 1 << 30          # free memory at the heap's top that malloc may keep


def _keep_freed_memory():
    """Ask glibc's malloc to take every array from its heap (no separate mapping per
    array) and to keep up to MALLOC_TRIM_BYTES of freed memory for reuse.

    Only on Linux with glibc, and only when the user has set none of glibc's own
    malloc variables (``MALLOC_*``, ``GLIBC_TUNABLES``): those win. Returns whether
    the setting was made.
    """
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ \
            or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                      # not glibc (musl, for one): left as it is
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4    # mallopt's parameters, from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_BYTES))


FREED_MEMORY_KEPT = _keep_freed_memory()


# ===== max pooling =====

@njit(parallel=True, cache=True)
def _maxpool_2x2(x, H, W, y, argmax, planes, OH, OW):
    """_maxpool_forward for 2x2 windows at stride 2 (the Papernot network's): the
    window's four pixels named rather than looped over, 2.2x faster than the
    general loop (batch 128 of 32x24x24, 2 threads: 1.13 -> 0.51 ms)."""
    for p in prange(planes):                 # this thread alone writes plane p of y and argmax
        for oh in range(OH):
            top = np.uint64(p * H * W + 2 * oh * W)    # the window row's two input rows
            bottom = top + np.uint64(W)
            out = np.uint64((p * OH + oh) * OW)
            for ow in range(np.uint64(OW)):  # unsigned, as in _copy
                best, best_k = x[top + 2 * ow], 0
                v = x[top + 2 * ow + 1]
                if v > best:                 # strict: the first maximum wins a tie
                    best, best_k = v, 1
                v = x[bottom + 2 * ow]
                if v > best:
                    best, best_k = v, 2
                v = x[bottom + 2 * ow + 1]
                if v > best:
                    best, best_k = v, 3
                y[out + ow] = best
                argmax[out + ow] = best_k


@njit(parallel=True, cache=True)
def _maxpool_forward(x, KH, KW, stride, y, argmax):
    N, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    # flat arrays and unsigned offsets, as in _copy: no negative-index checks in
    # the innermost loops (1.3x faster than 4-D indexing, batch 128 of 32x24x24)
    x_flat, y_flat, a_flat = x.ravel(), y.ravel(), argmax.ravel()
    if KH == 2 and KW == 2 and stride == 2:
        _maxpool_2x2(x_flat, H, W, y_flat, a_flat, N * C, OH, OW)
        return
    for n_c in prange(N * C):                # this thread alone writes plane (n, c) of y and argmax
        x0 = np.uint64(n_c * H * W)          # pixel (0, 0) of plane (n, c)
        y0 = np.uint64(n_c * OH * OW)
        for oh in range(OH):
            for ow in range(OW):
                at = x0 + np.uint64(oh * stride * W + ow * stride)   # the window's top-left pixel
                best = x_flat[at]
                best_k = 0
                for kh in range(KH):
                    for kw in range(KW):
                        v = x_flat[at + np.uint64(kh * W + kw)]
                        if v > best:         # strict: the first maximum wins a tie
                            best = v
                            best_k = kh * KW + kw
                out = y0 + np.uint64(oh * OW + ow)
                y_flat[out] = best
                a_flat[out] = best_k


def maxpool_forward(x, KH, KW, stride):
    """Fast max pooling; see ``kernels.reference.maxpool_forward``."""
    N, C, H, W = x.shape
    OH, OW = output_size(H, KH, stride, 0), output_size(W, KW, stride, 0)
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = np.empty((N, C, OH, OW), dtype=np.int64)
    _maxpool_forward(np.ascontiguousarray(x), KH, KW, stride, y, argmax)
    return y, argmax


@njit(parallel=True, cache=True)
def _maxpool_2x2_backward(dy, argmax, H, W, dx, planes, OH, OW):
    """_maxpool_backward for 2x2 windows at stride 2: flat arrays and unsigned offsets,
    and, since the windows do not overlap, each dy stored onto its pixel rather than
    added; 1.5x faster than the general loop (batch 128 of 32x24x24, 2 threads:
    0.68 -> 0.46 ms). (Writing all four pixels of each window, dy or 0, without
    zeroing dx first, was 3x slower: a branch per pixel that the data decides.)"""
    for p in prange(planes):                 # this thread alone writes plane p of dx
        plane = np.uint64(p * H * W)
        for i in range(np.uint64(H * W)):    # the pixels no dy reaches stay 0
            dx[plane + i] = 0.0
        for oh in range(OH):
            top = plane + np.uint64(2 * oh * W)
            at = np.uint64((p * OH + oh) * OW)
            for ow in range(np.uint64(OW)):  # unsigned, as in _copy
                k = argmax[at + ow]          # window position kh * 2 + kw
                dx[top + 2 * ow + np.uint64((k >> 1) * W + (k & 1))] = dy[at + ow]


@njit(parallel=True, cache=True)
def _maxpool_backward(dy, argmax, KH, KW, stride, dx):
    N, C, H, W = dx.shape
    OH, OW = dy.shape[2], dy.shape[3]
    if KH == 2 and KW == 2 and stride == 2:
        _maxpool_2x2_backward(dy.ravel(), argmax.ravel(), H, W, dx.ravel(), N * C, OH, OW)
        return
    # the window offset (kh, kw) of every flat position k = kh * KW + kw, looked up
    # instead of divided out for every pixel
    k_h = np.arange(KH * KW) // KW
    k_w = np.arange(KH * KW) % KW
    for n_c in prange(N * C):                # this thread alone writes plane (n, c) of dx
        n = n_c // C
        c = n_c % C
        dx[n, c] = 0.0
        for oh in range(OH):
            for ow in range(OW):
                k = argmax[n, c, oh, ow]
                # += : overlapping windows (stride < window) may pick the same pixel
                dx[n, c, oh * stride + k_h[k], ow * stride + k_w[k]] += dy[n, c, oh, ow]


def maxpool_backward(dy, argmax, x_shape, KH, KW, stride):
    """Fast max-pool backward; see ``kernels.reference.maxpool_backward``."""
    dx = np.empty(x_shape, dtype=dy.dtype)
    _maxpool_backward(np.ascontiguousarray(dy), np.ascontiguousarray(argmax), KH, KW, stride, dx)
    return dx


# ===== ReLU =====

@njit(parallel=True, cache=True)
def _relu_forward(x, y):
    x_flat, y_flat = x.ravel(), y.ravel()
    for i in prange(x_flat.size):            # each thread writes its own range of elements
        y_flat[i] = np.maximum(x_flat[i], 0)   # np.maximum keeps a NaN, as the reference does


def relu_forward(x):
    """Fast ReLU in one parallel pass; see ``kernels.reference.relu_forward``."""
    y = np.empty_like(x)
    _relu_forward(np.ascontiguousarray(x), y)
    return y


@njit(parallel=True, cache=True)
def _relu_backward(dy, y, dx):
    dy_flat, y_flat, dx_flat = dy.ravel(), y.ravel(), dx.ravel()
    for i in prange(dy_flat.size):
        dx_flat[i] = dy_flat[i] * (y_flat[i] > 0)


def relu_backward(dy, y):
    """Fast ReLU gradient in one parallel pass; see ``kernels.reference.relu_backward``."""
    dx = np.empty(dy.shape, dtype=dy.dtype)
    _relu_backward(np.ascontiguousarray(dy), np.ascontiguousarray(y), dx)
    return dx


# ===== threads =====

def _one_blas_thread():
    """Context in which every BLAS library runs single-threaded, whatever the user
    set since the import: Numba's threads call BLAS inside the conv kernels."""
    return _threadpools.limit(limits=1, user_api="blas")


def describe_threads():
    """The thread pools in use: {numba_threads, numba_threading_layer, omp_spin_count, blas_threads, blas,
    freed_memory_kept} (the last: whether ``_keep_freed_memory`` made its setting).

    The layer is known once a parallel kernel has run; before, this names the
    setting (``default``: the first of the priority list that loads).
    """
    layer = numba.config.THREADING_LAYER
    try:
        layer = numba.threading_layer()
    except ValueError:
        pass
    blas = [lib for lib in _threadpools.info() if lib["user_api"] == "blas"]
    return {"numba_threads": numba.get_num_threads(), "numba_threading_layer": layer,
            "omp_spin_count": os.environ.get("GOMP_SPINCOUNT") if layer == "omp" else None,
            "blas_threads": max((lib["num_threads"] for lib in blas), default=None),
            "blas": ", ".join(sorted({f"{lib['internal_api']} {lib.get('version')}" for lib in blas})),
            "freed_memory_kept": FREED_MEMORY_KEPT}


# ===== copies between flat arrays =====

@njit(cache=True, inline="always")
def _copy(dst, d0, src, s0, step, n):
    """dst[d0 + i] = src[s0 + i * step] for i < n (flat arrays).

    The indices are unsigned so that Numba can drop its negative-index
    (wraparound) check; the compiler then vectorises the loop, about 4x faster.
    """
    d0, s0, step = np.uint64(d0), np.uint64(s0), np.uint64(step)
    for i in range(np.uint64(n)):
        dst[d0 + i] = src[s0 + i * step]


@njit(cache=True, inline="always")
def _add(dst, d0, step, src, s0, n):
    """dst[d0 + i * step] += src[s0 + i] for i < n (flat arrays; unsigned as in _copy)."""
    d0, s0, step = np.uint64(d0), np.uint64(s0), np.uint64(step)
    for i in range(np.uint64(n)):
        dst[d0 + i * step] += src[s0 + i]


@njit(cache=True, inline="always")
def _scatter(dst, d0, step, src, s0, n):
    """dst[d0 + i * step] = src[s0 + i] for i < n (flat arrays; unsigned as in _copy)."""
    d0, s0, step = np.uint64(d0), np.uint64(s0), np.uint64(step)
    for i in range(np.uint64(n)):
        dst[d0 + i * step] = src[s0 + i]


# Numba's array ``a += b`` and ``a += scalar`` check shapes and broadcast on every
# call, which for the small arrays of a chunk costs more than the additions:
# one thread's dW products of the network's second layer took 69 us a chunk
# with ``dU += dU_chunk`` and 59 us with the loop below. These two are plain loops.

@njit(cache=True, inline="always")
def _add_array(dst, src):
    """dst += src, elementwise, for two C-contiguous arrays of one shape."""
    _add(dst.ravel(), 0, 1, src.ravel(), 0, dst.size)


@njit(cache=True, inline="always")
def _add_per_row(plane, b, n):
    """plane[f n:(f + 1) n] += b[f] for every f < len(b): a bias on rows of n elements."""
    for f in range(b.size):
        for i in range(f * n, (f + 1) * n):
            plane[i] += b[f]


# ===== convolution 3x3, stride 1: Winograd F(m x m, 3x3), a few images per thread =====
#
# The algorithm is ``kernels.reference.winograd_conv3x3_forward`` (Lavin and
# Gray, 2016), with output tiles of m x m pixels (m = 2 or 4) and input tiles
# of a x a, a = m + 2: V = B^T d B for every input tile d, a^2 matrix products
# M[k, l] = U[k, l] V[k, l] over the channels, then A^T M A for every output
# tile. The products spend a^2 multiply-adds per (tile, channel, filter) where
# im2col spends 9 m^2: 16 against 36 for F(2x2, 3x3), 36 against 144 for
# F(4x4, 3x3). The transforms only add and scale, once per tile and channel
# (or filter) rather than per channel *and* filter.
#
# The transforms are written so that every inner loop is long and contiguous,
# which the compiler turns into vector instructions. Two choices make that
# possible. (1) Row i of every tile is kept with its columns split by phase:
# the padded image's columns 0, m, 2m, ... in one plane, 1, m + 1, ... in the
# next, and so on; tiles start every m columns, so column j of tile q is entry
# q + j // m of phase plane j % m. (2) Every row gets one tile more than it
# needs (TW + 1 instead of TW). Then the tiles of all rows, images and
# channels form one flat sequence u, and column j of tile u is element
# u + j // m of phase plane j % m: a whole transform is a handful of loops
# over u, instead of thousands of loops of TW iterations per image. The extra
# tile of each row is computed and thrown away; it costs the products 1 / TW
# more work.
#
# A thread takes a chunk of ``nb`` images at a time (as many as keep its
# buffers in its core's cache), so that the products are wide enough for BLAS
# even on the 8x8 images of the network's last layer. With
# u = ((c nb + n) TH + th) (TW + 1) + q over the TE = nb TH (TW + 1) tiles of
# each channel c (for the output: filter f), image n of the chunk, tile row
# th, column q:
#
#   R[i, p][u]    = pixel (m th + i, m q + p) of padded image n   (_tile_rows:    row i of each tile, phase p)
#   S[k, p]       = sum_i B^T[k, i] R[i, p]                      (_mix_rows:     B^T d)
#   V[k, l][u]    = sum_j B^T[l, j] S[k, j % m][u + j // m]      (_mix_columns:  (B^T d) B)
#   M[kl] (F, TE) = U[kl] (F, C) @ V[kl] (C, TE)                 a^2 BLAS products
#   M[1, 1][f]   += b[f]                                         the bias (see below)
#   Z[i, l]       = sum_k A^T[i, k] M[k, l]                      (_mix_rows:     A^T m)
#   y[n, f, m th + i, m q + j] = sum_l A^T[j, l] Z[i, l][u]      (_put_tiles:    (A^T m) A)
#
# The backward pass runs the same algebra transposed
# (``reference.winograd_conv3x3_backward``). The m x m tiles dY of dy go
# through the same steps with A in place of B^T, giving Mbar = A dY A^T (the
# extra tiles read dy's zero padding, so their Mbar is 0 and they add nothing
# below). Then dV[kl] = U[kl]^T Mbar[kl], and the adjoints of _mix_columns,
# _mix_rows and _tile_rows take dV back onto the pixels of dx; and
# dU[kl] = sum of Mbar[kl] V[kl]^T over the images, with V of x computed again
# as in the forward pass, gives dW = G^T dU G.
#
# The bias rides on one product. Column 1 of A^T is all ones (for m = 2 and
# 4), so product m[1, 1] enters every output of its tile with weight 1: adding
# b[f] to the plane M[1, 1] (one plane, before the output transform) adds it
# to all m^2 outputs, where adding it to y afterwards is a pass over m^2
# planes. The same column makes Mbar[1, 1] = A[1] dY A[1]^T the sum of the m^2
# dy of its tile, so db[f] is the sum of plane Mbar[1, 1] over filter f's
# tiles, a 1 / m^2 of dy's elements and already in cache.
#
# Which m. F(4x4, 3x3) needs 1.78x fewer multiplications per output pixel
# than F(2x2, 3x3), but its transforms are denser (rows of three to six
# terms, against two or three), so they cost about as much per pixel, and
# its tiles are coarse: where the output is not a multiple of 4, the last
# tiles are partly wasted, and the extra tile of each row costs a third or
# half more products on outputs 8 to 12 wide. Measured, forward plus backward,
# batch 128, 32 -> 32 channels, 2 threads (ms, F(2x2, 3x3) / F(4x4, 3x3)):
# 24x24 output 23.4-23.7 / 21.4; 20x20 17.6-17.8 / 15.9-16.0; 16x16
# 11.2-11.5 / 10.6-10.7; 12x12 7.7 / 7.3; 10x10 5.9-6.0 / 7.0-7.2; 8x8
# 4.0-4.1 / 4.8-5.1. So F(4x4, 3x3) takes outputs whose sides are multiples
# of 4, at least 12 (the Papernot network's second layer, 24x24), and
# F(2x2, 3x3) the rest (its third and fourth, 10x10 and 8x8). In float32
# F(4x4, 3x3) rounds more: its errors are about 5e-6 of the largest output,
# against 2e-7 for F(2x2, 3x3) and 6e-7 for im2col (the transforms multiply
# by up to 8 where F(2x2, 3x3) only adds); in float64 both are exact to 1e-14.

# the fewest input channels for which Winograd is used: the products shrink
# with C, the transforms of the output (one per filter) do not. Forward plus
# backward, batch 128, 32 filters on 26x26 images, one thread (ms, im2col /
# Winograd F(2x2, 3x3)): C = 1: 3.5 / 9.5; 4: 8.6 / 14.3; 8: 20.0 / 19.6;
# 16: 35.4 / 30.5; and 64 filters on 10x10: C = 16: 7.0 / 7.8; 32 (with 32
# filters): 9.8 / 7.8. So the first layer (C = 1) keeps im2col and the others
# (C = 32, 64) take Winograd.
WINOGRAD_MIN_CHANNELS = 16

# bytes of buffers a thread's chunk of images may fill, for each tile size m
# (F(2x2, 3x3): half a core's 2 MB L2 on the machine it was measured on, 1 to
# 8 images for the Papernot network; F(4x4, 3x3): 4 images of its second
# layer, whose products get wider: forward plus backward at batch 128,
# 20.3-20.5 ms in chunks of 4 images, 20.9-21.7 in chunks of 2 or 3,
# 21.8-22.8 in chunks of 1)
WINOGRAD_CHUNK_BYTES = {2: 1 << 20, 4: 5 << 19}

# the smallest output side (a multiple of 4) that takes F(4x4, 3x3); see above
WINOGRAD_F4_MIN_SIZE = 12


def _winograd_applies(W, stride, pad):
    """Whether the Winograd kernels compute this convolution (otherwise im2col does)."""
    F, C, KH, KW = W.shape
    return (KH, KW) == (3, 3) and stride == 1 and C >= WINOGRAD_MIN_CHANNELS


def _winograd_tile(OH, OW):
    """m of the F(m x m, 3x3) for an OH x OW output: 4 where both sides are multiples of 4
    and at least WINOGRAD_F4_MIN_SIZE, 2 otherwise (see above)."""
    return 4 if OH % 4 == 0 and OW % 4 == 0 and min(OH, OW) >= WINOGRAD_F4_MIN_SIZE else 2


@njit(cache=True, inline="always")
def _bias_product(m):
    """Row (m + 2) + 1 of M and Mbar: the product m[1, 1] that every output of a tile
    sums with weight 1, which carries the bias forward and gives db back (see above)."""
    return m + 3


def _row_length(n):
    """A buffer row length >= n + 2 that is not a multiple of 1024 elements.

    The spare elements let the shifted reads (u + 1) of the last extra tile run
    past the n that count; the length avoids rows exactly 4 KiB apart, which
    share L1 cache sets (the loops below read up to six rows at once).
    """
    n += 2 + 16 - (n + 2) % 16
    return n + 16 if n % 1024 == 0 else n


def _chunk(N, C, F, TH, TW, itemsize, m=2):
    """Images per chunk: as many as fit WINOGRAD_CHUNK_BYTES, at least 1, at most N."""
    a = m + 2
    per_image = (a * a * (C + F) + a * m * (F + C)) * TH * (TW + 1) * itemsize   # V, M, Z and R or S
    return int(max(1, min(N, WINOGRAD_CHUNK_BYTES[m] // per_image)))


# A float32 image row of even width is a row of 64-bit words, each holding one
# pixel pair (even column in the low half on a little-endian machine). Splitting
# the words into halves is one vector instruction per 8 or 16 pixels, where
# picking every other float32 out of a row is a shuffle the compiler does not
# vectorise: _tile_rows, the split of every row into its two phases for
# m = 2, is 1.3x faster so, and _untile_rows and _put_tiles, which join the
# halves back, gain as much. For m = 4, two words hold a tile's four phases
# (_split_quads): faster than four strided copies by 3.1x in _tile_rows and
# 1.4x in _put_tiles (the second layer, chunks of 4 images, one thread, per
# image: 40.6 -> 13.0 and 18.1 -> 13.2 us).
_PIXEL_PAIRS_AS_WORDS = sys.byteorder == "little"


@njit(cache=True, inline="always")
def _split_pairs(r, at_even, at_odd, x, s0, n):
    """r[at_even + t] = x[s0 + 2 t] and r[at_odd + t] = x[s0 + 2 t + 1] for t < n, with
    r and x float32 arrays viewed as uint32 and uint64: word t of x from word s0 / 2
    on is the pixel pair (2 t, 2 t + 1), the even one in its low half. s0 is even."""
    lo = np.uint64(0xFFFFFFFF)
    w0 = np.uint64(s0 // 2)
    for t in range(np.uint64(n)):            # unsigned, as in _copy
        word = x[w0 + t]
        r[at_even + t] = np.uint32(word & lo)
        r[at_odd + t] = np.uint32(word >> np.uint64(32))


@njit(cache=True, inline="always")
def _join_pairs(x, s0, r, at_even, at_odd, n):
    """The inverse of _split_pairs: x[s0 + 2 t] = r[at_even + t], x[s0 + 2 t + 1] = r[at_odd + t]
    for t < n, with x viewed as uint64 and r as uint32; s0 is even."""
    w0 = np.uint64(s0 // 2)
    for t in range(np.uint64(n)):
        x[w0 + t] = np.uint64(r[at_even + t]) | (np.uint64(r[at_odd + t]) << np.uint64(32))


@njit(cache=True, inline="always")
def _pairs_as_words(m, x, W):
    """Whether rows of x (W wide) split into, or join from, m = 2 phases as pixel pairs."""
    return m == 2 and _PIXEL_PAIRS_AS_WORDS and x.itemsize == 4 and W % 2 == 0


@njit(cache=True, inline="always")
def _split_quads(r, row, phase, x, s0, W):
    """For m = 4: r[row + p phase + g] = x[s0 + 4 g + p], the W pixels of a float32 row
    (W even) split into their four phases, with r viewed as uint32 and x as uint64:
    words 2 g and 2 g + 1 from word s0 / 2 on hold pixels 4 g, 4 g + 1 and
    4 g + 2, 4 g + 3 (a last word, if W is not a multiple of 4, phases 0 and 1)."""
    lo = np.uint64(0xFFFFFFFF)
    w0 = np.uint64(s0 // 2)
    a0 = np.uint64(row)
    a1 = a0 + np.uint64(phase)
    a2 = a1 + np.uint64(phase)
    a3 = a2 + np.uint64(phase)
    two, one, s32 = np.uint64(2), np.uint64(1), np.uint64(32)
    G = np.uint64(W // 4)
    for g in range(G):
        u = x[w0 + two * g]
        v = x[w0 + two * g + one]
        r[a0 + g] = np.uint32(u & lo)
        r[a1 + g] = np.uint32(u >> s32)
        r[a2 + g] = np.uint32(v & lo)
        r[a3 + g] = np.uint32(v >> s32)
    if W % 4:
        u = x[w0 + two * G]
        r[a0 + G] = np.uint32(u & lo)
        r[a1 + G] = np.uint32(u >> s32)


@njit(cache=True, inline="always")
def _join_quads(x, s0, r, row, phase, W):
    """The inverse of _split_quads: x[s0 + 4 g + p] = r[row + p phase + g] for the W pixels
    of a row, with x viewed as uint64 and r as uint32."""
    w0 = np.uint64(s0 // 2)
    a0 = np.uint64(row)
    a1 = a0 + np.uint64(phase)
    a2 = a1 + np.uint64(phase)
    a3 = a2 + np.uint64(phase)
    two, one, s32 = np.uint64(2), np.uint64(1), np.uint64(32)
    G = np.uint64(W // 4)
    for g in range(G):
        x[w0 + two * g] = np.uint64(r[a0 + g]) | (np.uint64(r[a1 + g]) << s32)
        x[w0 + two * g + one] = np.uint64(r[a2 + g]) | (np.uint64(r[a3 + g]) << s32)
    if W % 4:
        x[w0 + two * G] = np.uint64(r[a0 + G]) | (np.uint64(r[a1 + G]) << s32)


@njit(cache=True, inline="always")
def _quads_as_words(m, pad, x, W):
    """Whether rows of x (W wide, padded by pad) split into, or join from, m = 4 phases
    as word pairs: pad a multiple of 4 keeps every word's two pixels in phases 0 and 1,
    or 2 and 3."""
    return m == 4 and pad % 4 == 0 and _PIXEL_PAIRS_AS_WORDS and x.itemsize == 4 and W % 2 == 0


@njit(cache=True)
def _tile_rows(imgs, pad, R):
    """R[i, w % m, c, n, th, w // m] = padded image n's pixel (c, m th + i, w): row i of
    every tile row, its columns split by phase.

    imgs : (<= nb, C, H, W), a chunk of images;  R : (I, m, C, nb, TH, TW + 1).
    The padding of R is zeroed by the caller: these writes land on the same
    places for every chunk and never on it.
    """
    count, C, H, W = imgs.shape              # count <= nb: the last chunk may be short
    I, m, _, nb, TH, TQ = R.shape
    r, x = R.ravel(), imgs.ravel()
    phase = R.size // (I * m)                # elements from one phase plane to the next
    as_words = _pairs_as_words(m, x, W)      # see _split_pairs
    quads = _quads_as_words(m, pad, x, W)    # see _split_quads
    r_u32, x_u64 = r.view(np.uint32), x[:x.size - x.size % 2].view(np.uint64)
    for i in range(I):
        for c in range(C):
            for n in range(count):
                for th in range(TH):
                    h = m * th + i - pad
                    if h < 0 or h >= H:
                        continue
                    row = (((i * m * C + c) * nb + n) * TH + th) * TQ   # phase 0 of this tile row
                    s0 = ((n * C + c) * H + h) * W
                    if quads:                # padded column w + pad: phase w % 4, entry (w + pad) // 4
                        _split_quads(r_u32, row + pad // 4, phase, x_u64, s0, W)
                        continue
                    if as_words:             # image column w is padded column w + pad: phase (w + pad) % 2
                        _split_pairs(r_u32, np.uint64(row + (pad % 2) * phase + pad // 2),
                                     np.uint64(row + (1 - pad % 2) * phase + (pad + 1) // 2),
                                     x_u64, np.uint64(s0), W // 2)
                        continue
                    for p in range(m):       # the image columns w with (w + pad) % m = p
                        w0 = (p - pad) % m
                        if w0 < W:
                            _copy(r, row + p * phase + (w0 + pad) // m, x, s0 + w0, m, (W - w0 + m - 1) // m)


@njit(cache=True)
def _terms(row):
    """The nonzero coefficients of one matrix row, and where they stand (at most 6)."""
    coef = np.zeros(6, dtype=row.dtype)
    at = np.zeros(6, dtype=np.int64)
    count = 0
    for i in range(row.size):
        if row[i] != 0:
            coef[count], at[count] = row[i], i
            count += 1
    return coef, at, count


@njit(cache=True, inline="always")
def _weighted_sum(o, c, count, s0, s1, s2, s3, s4, s5):
    """o[:] = c[0] s0 + ... + c[count - 1] s{count - 1}: one pass, every array contiguous."""
    n = o.size
    if count == 1:
        for e in range(n):
            o[e] = c[0] * s0[e]
    elif count == 2:
        for e in range(n):
            o[e] = c[0] * s0[e] + c[1] * s1[e]
    elif count == 3:
        for e in range(n):
            o[e] = c[0] * s0[e] + c[1] * s1[e] + c[2] * s2[e]
    elif count == 4:
        for e in range(n):
            o[e] = c[0] * s0[e] + c[1] * s1[e] + c[2] * s2[e] + c[3] * s3[e]
    elif count == 5:
        for e in range(n):
            o[e] = c[0] * s0[e] + c[1] * s1[e] + c[2] * s2[e] + c[3] * s3[e] + c[4] * s4[e]
    else:
        for e in range(n):
            o[e] = c[0] * s0[e] + c[1] * s1[e] + c[2] * s2[e] + c[3] * s3[e] + c[4] * s4[e] + c[5] * s5[e]


@njit(cache=True)
def _mix_rows(Mat, src, n, out):
    """out[k L + l, :n] = sum_i Mat[k, i] src[i L + l, :n], where L = len(src) // Mat.shape[1].

    A small matrix applied along the first tile axis, to whole planes of tiles
    at once. Only the nonzero coefficients take part (B^T has two to four a
    row, A^T three to five), so each result is exactly the sum the matrix names.
    """
    K, I = Mat.shape
    L = src.shape[0] // I
    for k in range(K):
        c, i, count = _terms(Mat[k])
        for l in range(L):
            _weighted_sum(out[k * L + l, :n], c, count, src[i[0] * L + l, :n], src[i[1] * L + l, :n],
                          src[i[2] * L + l, :n], src[i[3] * L + l, :n], src[i[4] * L + l, :n],
                          src[i[5] * L + l, :n])


@njit(cache=True)
def _mix_columns(Mat, S, m, n, out):
    """out[k L + l, u] = sum_j Mat[l, j] S[m k + j % m, u + j // m] for u < n, L = Mat.shape[0].

    The same along the second tile axis. S holds each tile row's m column phases
    apart, so column j of every tile u is the plane S[m k + j % m] shifted by
    j // m, and the sum is again one pass over contiguous planes.
    """
    L, J = Mat.shape
    for l in range(L):
        c, j, count = _terms(Mat[l])
        o = j // m                           # the shifts
        for k in range(S.shape[0] // m):
            _weighted_sum(out[k * L + l, :n], c, count, S[m * k + j[0] % m, o[0]:o[0] + n],
                          S[m * k + j[1] % m, o[1]:o[1] + n], S[m * k + j[2] % m, o[2]:o[2] + n],
                          S[m * k + j[3] % m, o[3]:o[3] + n], S[m * k + j[4] % m, o[4]:o[4] + n],
                          S[m * k + j[5] % m, o[5]:o[5] + n])


@njit(cache=True)
def _unmix_columns(Mat, dV, m, n, dS):
    """The adjoint of ``_mix_columns``: dS[m k + p, v] = sum of Mat[l, j] dV[k L + l, v - j // m]
    over the (l, j) with j % m = p, for v < n.

    dV's rows hold their planes from element 1 on, after a zero: the shift by
    one tile reads that zero at v = 0. (Each column phase of B^T gives up to
    six terms: F(4x4, 3x3)'s phase 0 takes column 0's one and column 4's five.)
    """
    L, J = Mat.shape
    for p in range(m):
        coef = np.zeros(6, dtype=dV.dtype)
        plane = np.zeros(6, dtype=np.int64)
        start = np.zeros(6, dtype=np.int64)
        count = 0
        for l in range(L):
            for j in range(p, J, m):
                if Mat[l, j] != 0:
                    coef[count], plane[count], start[count] = Mat[l, j], l, 1 - j // m
                    count += 1
        for k in range(dS.shape[0] // m):
            _weighted_sum(dS[m * k + p, :n], coef, count,
                          dV[k * L + plane[0], start[0]:start[0] + n], dV[k * L + plane[1], start[1]:start[1] + n],
                          dV[k * L + plane[2], start[2]:start[2] + n], dV[k * L + plane[3], start[3]:start[3] + n],
                          dV[k * L + plane[4], start[4]:start[4] + n], dV[k * L + plane[5], start[5]:start[5] + n])


@njit(cache=True)
def _untile_rows(dR, pad, dx):
    """The adjoint of ``_tile_rows``: dx[n, c, h, w] = the sum of the entries of dR that
    ``_tile_rows`` copied from pixel (c, h, w) of image n (one or two tile rows hold each row).

    dR : (m + 2, m, C, nb, TH, TW + 1), also used as scratch;  dx : (<= nb, C, H, W), overwritten.
    First the tile rows that hold an image row are added onto one of them (long
    contiguous loops, in place in dR), then its phases are joined into the row.
    """
    count, C, H, W = dx.shape
    I, m, _, nb, TH, TQ = dR.shape
    r, x = dR.ravel(), dx.ravel()
    phase = dR.size // (I * m)
    as_words = _pairs_as_words(m, x, W)      # see _split_pairs
    quads = _quads_as_words(m, pad, x, W)    # see _split_quads
    r_u32, x_u64 = r.view(np.uint32), x[:x.size - x.size % 2].view(np.uint64)
    for n in range(count):
        for c in range(C):
            for h in range(H):
                # the tile rows th whose row i = h + pad - m th is image row h; every image
                # row lies in one at least (the tiles cover the whole padded image)
                first = -1
                for i in range((h + pad) % m, I, m):
                    th = (h + pad - i) // m
                    if th < 0 or th >= TH:
                        continue
                    row = (((i * m * C + c) * nb + n) * TH + th) * TQ
                    if first < 0:
                        first = row
                        continue
                    for p in range(m):       # the second: added onto the first
                        _add(r, first + p * phase, 1, r, row + p * phase, TQ)
                s0 = ((n * C + c) * H + h) * W
                if quads:
                    _join_quads(x_u64, s0, r_u32, first + pad // 4, phase, W)
                    continue
                if as_words:
                    _join_pairs(x_u64, s0, r_u32, np.uint64(first + (pad % 2) * phase + pad // 2),
                                np.uint64(first + (1 - pad % 2) * phase + (pad + 1) // 2), W // 2)
                    continue
                for p in range(m):
                    w0 = (p - pad) % m
                    if w0 < W:
                        _scatter(x, s0 + w0, m, r, first + p * phase + (w0 + pad) // m, (W - w0 + m - 1) // m)


@njit(cache=True)
def _put_tiles(AT, Z, Y, nb, TW, y):
    """y[n, f, m th + i, m q + j] = sum_l AT[j, l] Z[(m + 2) i + l, u] for n < len(y): the
    second half of the output transform, written into NCHW (the bias is already in Z).

    Z : (m (m + 2), R) with R >= F nb TH (TW + 1), u = ((f nb + n) TH + th) (TW + 1) + q;
    Y : ((m + 2)^2, R), scratch (the products' buffer, free by now);  y : (<= nb,
    F, OH, OW). First the m^2 output planes Y[m i + j] in long loops, then each
    output row interleaves its m. Where OH or OW is not a multiple of m, the
    last tiles' rows or columns past the edge are dropped.
    """
    _, F, OH, OW = y.shape
    m, a = AT.shape
    TH = (OH + m - 1) // m
    n = F * nb * TH * (TW + 1)
    R = Z.shape[1]
    Y = Y[:m * m].reshape(m, m, R)
    for i in range(m):                       # Y[i, j] = sum_l AT[j, l] Z[a i + l]
        _mix_rows(AT, Z[a * i:a * (i + 1)], n, Y[i])
    yf = y.ravel()
    as_words = _pairs_as_words(m, yf, OW)    # see _split_pairs
    quads = _quads_as_words(m, 0, yf, OW)
    y_u64, Y_u32 = yf[:yf.size - yf.size % 2].view(np.uint64), Y.ravel().view(np.uint32)
    whole = OW // m                          # tiles with all m columns inside the image
    for i in range(m):
        for k in range(y.shape[0]):
            for f in range(F):
                for th in range(TH):
                    h = m * th + i
                    if h >= OH:
                        continue
                    d0 = ((k * F + f) * OH + h) * OW
                    s0 = ((f * nb + k) * TH + th) * (TW + 1)
                    if as_words:
                        _join_pairs(y_u64, d0, Y_u32, np.uint64((2 * i) * R + s0),
                                    np.uint64((2 * i + 1) * R + s0), whole)
                        continue
                    if quads:
                        _join_quads(y_u64, d0, Y_u32, (4 * i) * R + s0, R, OW)
                        continue
                    for j in range(m):       # column j of the tiles whose column j is inside
                        _scatter(yf, d0 + j, m, Y[i, j], s0, whole + (1 if j < OW - m * whole else 0))


# The filters' transform U = G g G^T, and its adjoint for dW, are tiny next to
# the convolution (84 multiply-adds per filter and channel for F(2x2, 3x3)),
# but as NumPy einsums (the reference's) they took 0.16-1.6 ms a call, 5.5 ms
# of every training step at batch 128 (nine calls), whatever the batch size;
# these loops take 12-47 us (the network's three layers, 2 threads). Both work
# in float64 and round once, as the reference does.

@njit(parallel=True, cache=True)
def _winograd_filters(W, G, U):
    """U[a k + l, f, c] = (G W[f, c] G^T)[k, l], a = len(G); U may be a transposed view."""
    F, C = W.shape[0], W.shape[1]
    a = G.shape[0]
    for f in prange(F):                      # this thread alone writes U[:, f]
        Gg = np.empty((a, 3))
        for c in range(C):
            for k in range(a):               # Gg = G g
                for l in range(3):
                    Gg[k, l] = G[k, 0] * W[f, c, 0, l] + G[k, 1] * W[f, c, 1, l] + G[k, 2] * W[f, c, 2, l]
            for k in range(a):               # U = (G g) G^T
                for l in range(a):
                    U[a * k + l, f, c] = Gg[k, 0] * G[l, 0] + Gg[k, 1] * G[l, 1] + Gg[k, 2] * G[l, 2]


@njit(parallel=True, cache=True)
def _winograd_filters_adjoint(dU, G, dW):
    """dW[f, c] = G^T dU[:, f, c] G, with dU[a k + l, f, c], a = len(G)."""
    F, C = dW.shape[0], dW.shape[1]
    a = G.shape[0]
    for f in prange(F):                      # this thread alone writes dW[f]
        GdU = np.empty((3, a))
        for c in range(C):
            for k in range(3):               # G^T dU
                for l in range(a):
                    s = 0.0
                    for i in range(a):
                        s += G[i, k] * dU[a * i + l, f, c]
                    GdU[k, l] = s
            for k in range(3):               # (G^T dU) G
                for l in range(3):
                    s = 0.0
                    for j in range(a):
                        s += GdU[k, j] * G[j, l]
                    dW[f, c, k, l] = s


def winograd_filters(W, m=2, transposed=False):
    """``reference.winograd_filters`` as ((m + 2)^2, F, C) (or ((m + 2)^2, C, F) if
    ``transposed``), W's dtype: the products' left operands U[kl] (or U[kl]^T)."""
    F, C = W.shape[0], W.shape[1]
    a = m + 2
    U = np.empty((a * a, C, F) if transposed else (a * a, F, C))
    _winograd_filters(W, reference.WINOGRAD[m].G, U.transpose(0, 2, 1) if transposed else U)
    return U.astype(W.dtype)


def winograd_filters_adjoint(dU, dtype):
    """``reference.winograd_filters_adjoint`` for dU as ((m + 2)^2, F, C): dW (F, C, 3, 3)
    in ``dtype``."""
    a = math.isqrt(dU.shape[0])
    dW = np.empty((dU.shape[1], dU.shape[2], 3, 3))
    _winograd_filters_adjoint(dU, reference.WINOGRAD[a - 2].G, dW)
    return dW.astype(dtype)


@njit(cache=True)
def _next_chunk(x, n, nb, R):
    """Images n .. n + nb of x (fewer at the end); a short chunk's empty slots in R are zeroed."""
    chunk = x[n:min(n + nb, x.shape[0])]
    if chunk.shape[0] < nb:
        R[:, :, :, chunk.shape[0]:] = 0.0    # the missing images count as zeros
    return chunk


@njit(cache=True)
def _winograd_input(imgs, pad, BT, R, S, V):
    """V[a k + l, u] = (B^T d B)[k, l] for every a x a tile d of the chunk, padded by pad."""
    I, m, C, nb, TH, TQ = R.shape
    n = C * nb * TH * TQ                     # tiles per row or column plane
    _tile_rows(imgs, pad, R)
    _mix_rows(BT, R.reshape(I * m, n), n, S)
    _mix_columns(BT, S, m, n, V)


@njit(parallel=True, cache=True)
def _winograd_forward(x, U, b, pad, BT, AT, y, R, S, V, M, Z):
    N, C = x.shape[0], x.shape[1]
    F = y.shape[1]
    m, nb, TH, TQ = R.shape[2], R.shape[4], R.shape[5], R.shape[6]   # R: (threads, m + 2, m, C, nb, TH, TW + 1)
    TE = nb * TH * TQ                        # tiles per channel in a chunk, extra ones included
    R[:] = 0.0                               # the zero padding, once (see _tile_rows)
    S[:] = 0.0                               # ... and the spare elements past each row
    for chunk in prange((N + nb - 1) // nb): # this thread alone writes these images' outputs
        t = numba.get_thread_id()            # ... using its own buffers
        n = chunk * nb
        imgs = _next_chunk(x, n, nb, R[t])
        _winograd_input(imgs, pad, BT, R[t], S[t], V[t])
        for kl in range(U.shape[0]):
            np.dot(U[kl], V[t, kl, :C * TE].reshape(C, TE), M[t, kl, :F * TE].reshape(F, TE))
        _add_per_row(M[t, _bias_product(m)], b, TE)   # the bias, on the product every output sums (see above)
        _mix_rows(AT, M[t], F * TE, Z[t])
        _put_tiles(AT, Z[t], M[t], nb, TQ - 1, y[n:n + imgs.shape[0]])


def winograd_conv2d_forward(x, W, b, pad, m=None):
    """3x3, stride-1 convolution by Winograd F(m x m, 3x3), a few images per thread
    (m: ``_winograd_tile``'s choice unless given); see
    ``kernels.reference.winograd_conv3x3_forward`` (the algorithm) and
    ``kernels.reference.conv2d_forward`` (what it computes)."""
    N, C, H, Wd = x.shape
    F = W.shape[0]
    OH, OW = H + 2 * pad - 2, Wd + 2 * pad - 2
    m = _winograd_tile(OH, OW) if m is None else m
    a = m + 2
    TH, TW = -(-OH // m), -(-OW // m)
    dtype = np.result_type(x, W)
    nb = _chunk(N, C, F, TH, TW, dtype.itemsize, m)
    TE = nb * TH * (TW + 1)
    T = numba.get_num_threads()
    BT, _, AT = reference.WINOGRAD[m]
    U = winograd_filters(W.astype(dtype, copy=False), m)
    y = np.empty((N, F, OH, OW), dtype=dtype)
    buffers = (np.empty((T, a, m, C, nb, TH, TW + 1), dtype=dtype),   # R: the rows of every tile row
               np.empty((T, a * m, _row_length(C * TE)), dtype=dtype),   # S = B^T d
               np.empty((T, a * a, _row_length(C * TE)), dtype=dtype),   # V = B^T d B
               np.empty((T, a * a, _row_length(F * TE)), dtype=dtype),   # M = U V
               np.empty((T, m * a, _row_length(F * TE)), dtype=dtype))   # Z = A^T M
    with _one_blas_thread():
        _winograd_forward(np.ascontiguousarray(x, dtype), np.ascontiguousarray(U), np.ascontiguousarray(b, dtype),
                          pad, BT.astype(dtype), AT.astype(dtype), y, *buffers)
    return y


@njit(parallel=True, cache=True)
def _winograd_backward(dy, x, UT, pad, param_grads, need_dx, BT, B, A, dx, P, Q, Mbar, dV, dS, dR, R, S, V, dU_chunk,
                       dU_parts, db_parts, ones):
    N, C = x.shape[0], x.shape[1]
    F = dy.shape[1]
    blocks, m, nb, TH, TQ = P.shape[0], P.shape[1], P.shape[4], P.shape[5], P.shape[6]
    a = m + 2
    TE = nb * TH * TQ
    P[:] = 0.0                               # the tiles of dy past its edge stay 0
    dV[:] = 0.0                              # ... and the zero before each plane (_unmix_columns)
    R[:] = 0.0
    S[:] = 0.0
    dU_parts[:] = 0.0
    db_parts[:] = 0.0
    for blk in prange(blocks):               # block blk alone writes its images' dx and dU_parts[blk]
        chunks = (N + nb - 1) // nb
        for chunk in range(blk * chunks // blocks, (blk + 1) * chunks // blocks):   # in order:
            n = chunk * nb                   # the same sums on every run
            # Mbar = A dY A^T for every m x m tile dY of dy: its rows, then its columns
            dys = _next_chunk(dy, n, nb, P[blk])
            _tile_rows(dys, 0, P[blk])
            _mix_rows(A, P[blk].reshape(m * m, F * TE), F * TE, Q[blk])
            _mix_columns(A, Q[blk], m, F * TE, Mbar[blk])
            if need_dx:                      # dV = U^T Mbar, then B dV B^T back onto the pixels of dx
                for kl in range(a * a):      # (every step above, transposed)
                    np.dot(UT[kl], Mbar[blk, kl, :F * TE].reshape(F, TE),
                           dV[blk, kl, 1:1 + C * TE].reshape(C, TE))
                _unmix_columns(BT, dV[blk], m, C * TE, dS[blk])
                _mix_rows(B, dS[blk], C * TE, dR[blk].reshape(a * m, C * TE))
                _untile_rows(dR[blk], pad, dx[n:n + dys.shape[0]])
            if param_grads:                  # dU[kl] += Mbar[kl] V[kl]^T, with V = B^T d B of x
                _winograd_input(_next_chunk(x, n, nb, R[blk]), pad, BT, R[blk], S[blk], V[blk])
                for kl in range(a * a):
                    np.dot(Mbar[blk, kl, :F * TE].reshape(F, TE), V[blk, kl, :C * TE].reshape(C, TE).T,
                           dU_chunk[blk])
                    _add_array(dU_parts[blk, kl], dU_chunk[blk])
                # db: the sums of dy's tiles, Mbar[1, 1], over each filter's tiles
                _add_array(db_parts[blk], np.dot(Mbar[blk, _bias_product(m), :F * TE].reshape(F, TE), ones))


def winograd_conv2d_backward(dy, x, W, pad, param_grads=True, need_dx=True, m=None):
    """Gradients of ``winograd_conv2d_forward`` (the same m); see
    ``kernels.reference.winograd_conv3x3_backward``.

    dx and dW both start from Mbar = A dY A^T, computed once per chunk. dW and
    db are summed over blocks of consecutive images, one block per thread, and
    the blocks' sums added in block order: the same numbers on every run.
    """
    N, C, H, Wd = x.shape
    F, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    m = _winograd_tile(OH, OW) if m is None else m
    a = m + 2
    TH, TW = -(-OH // m), -(-OW // m)
    dtype = np.result_type(dy, W)
    nb = _chunk(N, C, F, TH, TW, dtype.itemsize, m)
    TE = nb * TH * (TW + 1)
    BT, _, AT = reference.WINOGRAD[m]
    UT = winograd_filters(W.astype(dtype, copy=False), m, transposed=True)
    B = numba.get_num_threads()
    dx = np.empty((N, C, H, Wd) if need_dx else (0, C, H, Wd), dtype=dtype)   # no dx: an empty stand-in
    dU_parts = np.empty((B, a * a, F, C), dtype=dtype)
    db_parts = np.empty((B, F), dtype=dtype)
    x_bufs = 1 if param_grads else 0         # no buffers for V when only dx is wanted
    with _one_blas_thread():
        _winograd_backward(
            np.ascontiguousarray(dy, dtype), np.ascontiguousarray(x, dtype), np.ascontiguousarray(UT), pad,
            param_grads, need_dx, BT.astype(dtype), np.ascontiguousarray(BT.T, dtype),
            np.ascontiguousarray(AT.T, dtype), dx,
            np.empty((B, m, m, F, nb, TH, TW + 1), dtype=dtype),         # P: rows of dy's m x m tiles
            np.empty((B, a * m, _row_length(F * TE)), dtype=dtype),      # Q = A dY
            np.empty((B, a * a, _row_length(F * TE)), dtype=dtype),      # Mbar = A dY A^T
            np.empty((B, a * a, 1 + _row_length(C * TE)), dtype=dtype),  # dV = U^T Mbar, after a 0
            np.empty((B, a * m, _row_length(C * TE)), dtype=dtype),      # dS = dV B^T
            np.empty((B, a, m, C, nb, TH, TW + 1), dtype=dtype),         # dR = B dS
            np.empty((B, a, m, C, nb * x_bufs, TH, TW + 1), dtype=dtype),  # R: rows of x's tile rows
            np.empty((B, a * m, _row_length(C * TE) * x_bufs), dtype=dtype),  # S = B^T d
            np.empty((B, a * a, _row_length(C * TE) * x_bufs), dtype=dtype),  # V = B^T d B
            np.empty((B, F, C), dtype=dtype), dU_parts, db_parts,        # one chunk's Mbar V^T, and the sums
            np.ones(TE, dtype=dtype))
    dx = dx if need_dx else None
    if not param_grads:
        return dx, None, None
    dW = winograd_filters_adjoint(dU_parts.sum(axis=0), dtype)
    return dx, dW, db_parts.sum(axis=0)


# ===== convolution 3x3, stride 1, one or two channels: direct loops (forward) =====
#
# The first layer of an image network sees one channel (or a few): im2col
# then multiplies the 32 filters by a 9 x (OH OW) matrix, a product whose
# inner dimension, 9, is too short for BLAS to reach its speed. Written out,
# the convolution is nine multiply-adds per output pixel per channel, in loops
# along each output row that the compiler turns into vector instructions:
#
#   y[n, f, i, j] = b[f] + sum_c sum_{kh, kw} W[f, c, kh, kw] xpad[n, c, i + kh, j + kw]
#
# The Papernot network's first layer (batch 128, 1 -> 32 channels, 28x28,
# 2 threads): 1.38-1.40 ms by im2col, 0.76-0.77 ms so (36 and 65 GFLOP/s).
# With more channels each one is another pass over the output rows, where
# im2col's product only gets deeper (ms, im2col / direct, the same layer with
# C channels): C = 2: 1.65-1.72 / 1.41-1.51; 3: 2.05-2.18 / 2.11-2.39;
# 4: 2.35-2.49 / 2.92-3.06. So the direct loops take C <= 2.
#
# Only the forward pass. In the backward pass the products' inner dimension is
# the OH OW pixels (for dW) or the 32 filters (for dx), long enough for BLAS:
# direct loops for dW (rows of partial sums per filter tap) and for dx (the
# correlation of dy with the flipped filters) took 3.76 and 1.70 ms where
# im2col takes 1.67 and 0.97. conv2d_backward keeps im2col for these layers.

# the most input channels for which the forward pass takes the direct loops
DIRECT_MAX_CHANNELS = 2


def _direct_applies(W, stride):
    """Whether the direct loops compute this convolution's forward pass."""
    F, C, KH, KW = W.shape
    return (KH, KW) == (3, 3) and stride == 1 and C <= DIRECT_MAX_CHANNELS


@njit(cache=True, inline="always")
def _taps(s, r0, r1, r2, k0, k1, k2, k3, k4, k5, k6, k7, k8):
    """The nine products of one 3x3 window whose three rows start at s[r0], s[r1], s[r2]."""
    one, two = np.uint64(1), np.uint64(2)    # unsigned, as the offsets: an int64 1 added to
    return (k0 * s[r0] + k1 * s[r0 + one] + k2 * s[r0 + two]      # them would make a float64
            + k3 * s[r1] + k4 * s[r1 + one] + k5 * s[r1 + two]    # index, and the loop 4x slower
            + k6 * s[r2] + k7 * s[r2 + one] + k8 * s[r2 + two])


@njit(cache=True)
def _correlate3x3(src, K, bias, out):
    """out[o, i, j] = bias[o] + sum_s sum_{kh, kw} K[o, s, kh, kw] src[s, i + kh, j + kw]
    for one image; src (S, Hs, Ws) and out (O, OH, OW) C-contiguous."""
    O, OH, OW = out.shape
    S, Hs, Ws = src.shape
    s_flat, o_flat = src.ravel(), out.ravel()
    for o in range(O):
        for s in range(S):
            k0, k1, k2 = K[o, s, 0, 0], K[o, s, 0, 1], K[o, s, 0, 2]
            k3, k4, k5 = K[o, s, 1, 0], K[o, s, 1, 1], K[o, s, 1, 2]
            k6, k7, k8 = K[o, s, 2, 0], K[o, s, 2, 1], K[o, s, 2, 2]
            for i in range(OH):
                r0 = np.uint64((s * Hs + i) * Ws)           # the window's top row at j = 0
                r1, r2 = r0 + np.uint64(Ws), r0 + np.uint64(2 * Ws)
                d = np.uint64((o * OH + i) * OW)
                if s == 0:                   # the first channel starts from the bias
                    for j in range(np.uint64(OW)):
                        o_flat[d + j] = bias[o] + _taps(s_flat, r0 + j, r1 + j, r2 + j,
                                                        k0, k1, k2, k3, k4, k5, k6, k7, k8)
                else:
                    for j in range(np.uint64(OW)):
                        o_flat[d + j] += _taps(s_flat, r0 + j, r1 + j, r2 + j, k0, k1, k2, k3, k4, k5, k6, k7, k8)


@njit(cache=True)
def _pad_into(img, pad, buf):
    """buf = img (C, H, W) zero-padded by pad on every side; its border is zeroed by the caller."""
    C, H, W = img.shape
    for c in range(C):
        for h in range(H):
            buf[c, h + pad, pad:pad + W] = img[c, h]
    return buf


@njit(parallel=True, cache=True)
def _direct_forward(x, W, b, pad, y, xpad):
    xpad[:] = 0.0                            # the zero border, once
    for n in prange(x.shape[0]):             # this thread alone writes image n's output
        src = x[n] if pad == 0 else _pad_into(x[n], pad, xpad[numba.get_thread_id()])
        _correlate3x3(src, W, b, y[n])


def direct_conv2d_forward(x, W, b, pad):
    """3x3, stride-1 convolution by direct loops, one image per thread (the first
    layer's: one or two channels); see ``kernels.reference.conv2d_forward``."""
    N, C, H, Wd = x.shape
    dtype = np.result_type(x, W)
    y = np.empty((N, W.shape[0], H + 2 * pad - 2, Wd + 2 * pad - 2), dtype=dtype)
    xpad = np.empty((numba.get_num_threads() if pad else 0, C, H + 2 * pad, Wd + 2 * pad), dtype=dtype)
    _direct_forward(np.ascontiguousarray(x, dtype), np.ascontiguousarray(W, dtype), np.ascontiguousarray(b, dtype),
                    pad, y, xpad)
    return y


# ===== convolution, one image per thread =====

@njit(cache=True, inline="always")
def _valid_ow(OW, W, kw, stride, pad):
    """The output columns [lo, hi) whose input column ow stride - pad + kw lies inside the image."""
    lo = min(max(0, (pad - kw + stride - 1) // stride), OW)
    hi = max(min(OW, (W - 1 + pad - kw) // stride + 1), lo)
    return lo, hi


@njit(cache=True)
def _unfold(x, KH, KW, stride, pad, cols):
    """im2col of ONE image, transposed: x (C, H, W) -> cols (C*KH*KW, OH*OW).

    Row (c, kh, kw) holds that tap for every output pixel (oh, ow), so that
    W (F, C*KH*KW) @ cols gives the image's output (F, OH*OW), already NCHW.
    Both arrays are used flat: pixel (c, h, w) is x_flat[(c H + h) W + w].
    """
    C, H, W = x.shape
    OW = (W + 2 * pad - KW) // stride + 1
    P = cols.shape[1]
    OH = P // OW
    x_flat, cols_flat = x.ravel(), cols.ravel()
    for c in range(C):
        for kh in range(KH):
            for kw in range(KW):
                lo, hi = _valid_ow(OW, W, kw, stride, pad)
                for oh in range(OH):
                    at = ((c * KH + kh) * KW + kw) * P + oh * OW   # cols[r, oh * OW]
                    h = oh * stride - pad + kh
                    if h < 0 or h >= H:                            # the whole row is zero padding
                        lo_row, hi_row = OW, OW
                    else:
                        lo_row, hi_row = lo, hi
                    cols_flat[at:at + lo_row] = 0.0
                    cols_flat[at + hi_row:at + OW] = 0.0
                    _copy(cols_flat, at + lo_row,
                          x_flat, (c * H + h) * W + lo_row * stride - pad + kw, stride, hi_row - lo_row)


@njit(cache=True)
def _fold(dcols, KH, KW, stride, pad, dx):
    """Adjoint of _unfold for ONE image: dx (C, H, W) = sum of the taps in dcols (C*KH*KW, OH*OW)."""
    C, H, W = dx.shape
    OW = (W + 2 * pad - KW) // stride + 1
    P = dcols.shape[1]
    OH = P // OW
    dx_flat, dcols_flat = dx.ravel(), dcols.ravel()
    dx_flat[:] = 0.0
    for c in range(C):
        for kh in range(KH):
            for kw in range(KW):
                lo, hi = _valid_ow(OW, W, kw, stride, pad)
                for oh in range(OH):
                    h = oh * stride - pad + kh
                    if 0 <= h < H:                                 # padding rows send nothing back
                        _add(dx_flat, (c * H + h) * W + lo * stride - pad + kw, stride,
                             dcols_flat, ((c * KH + kh) * KW + kw) * P + oh * OW + lo, hi - lo)


@njit(parallel=True, cache=True)
def _conv2d_forward(x, Wm, b, KH, KW, stride, pad, y, cols):
    N, F = y.shape[0], y.shape[1]
    for n in prange(N):                      # this thread alone writes image n's output
        t = numba.get_thread_id()            # ... using its own column buffer
        _unfold(x[n], KH, KW, stride, pad, cols[t])
        yn = y[n].reshape(F, -1)             # (F, OH*OW), a view
        np.dot(Wm, cols[t], yn)              # y_n = W cols_n
        _add_per_row(yn.ravel(), b, yn.shape[1])


def conv2d_forward(x, W, b, stride, pad):
    """Fast convolution, one image per thread; see ``kernels.reference.conv2d_forward``.

    3x3 filters at stride 1 on several channels go to Winograd F(2x2, 3x3) or
    F(4x4, 3x3) (``winograd_conv2d_forward``), on one or two channels to direct loops
    (``direct_conv2d_forward``), everything else to im2col and one product.
    """
    if _winograd_applies(W, stride, pad):
        return winograd_conv2d_forward(x, W, b, pad)
    if _direct_applies(W, stride):
        return direct_conv2d_forward(x, W, b, pad)
    N, C, H, Wd = x.shape
    F, _, KH, KW = W.shape
    OH, OW = output_size(H, KH, stride, pad), output_size(Wd, KW, stride, pad)
    dtype = np.result_type(x, W)
    y = np.empty((N, F, OH, OW), dtype=dtype)
    cols = np.empty((numba.get_num_threads(), C * KH * KW, OH * OW), dtype=dtype)
    with _one_blas_thread():
        _conv2d_forward(np.ascontiguousarray(x, dtype), np.ascontiguousarray(W.reshape(F, -1), dtype),
                        np.ascontiguousarray(b, dtype), KH, KW, stride, pad, y, cols)
    return y


@njit(parallel=True, cache=True)
def _conv2d_backward(dy, x, Wm, KH, KW, stride, pad, param_grads, need_dx, dx, dWT_parts, dWT_image, db_parts,
                     cols, dcols, ones):
    N, F = dy.shape[0], dy.shape[1]
    blocks = dWT_parts.shape[0]
    WmT = Wm.T                               # (C*KH*KW, F), a view
    dWT_parts[:] = 0.0
    db_parts[:] = 0.0
    for blk in prange(blocks):               # block blk alone writes its images' dx and dWT_parts[blk]
        # its images in order: the same sums on every run, whichever thread takes the block
        for n in range(blk * N // blocks, (blk + 1) * N // blocks):
            dyn = dy[n].reshape(F, -1)       # dy_n (F, OH*OW)
            if need_dx:
                np.dot(WmT, dyn, dcols[blk]) # dcols_n = W^T dy_n
                _fold(dcols[blk], KH, KW, stride, pad, dx[n])
            if param_grads:
                _unfold(x[n], KH, KW, stride, pad, cols[blk])
                # dW^T += cols_n dy_n^T: the same product as dW += dy_n cols_n^T, but in the
                # operand order BLAS runs about 1.4x faster for these shapes
                np.dot(cols[blk], dyn.T, dWT_image[blk])
                _add_array(dWT_parts[blk], dWT_image[blk])
                _add_array(db_parts[blk], np.dot(dyn, ones))   # db_f += sum of dy_n's plane f


def conv2d_backward(dy, x, W, stride, pad, param_grads=True, need_dx=True):
    """Fast convolution gradients, one image at a time in each thread; see
    ``kernels.reference.conv2d_backward``.

    Winograd where ``conv2d_forward`` uses it, im2col otherwise (also where the
    forward pass takes the direct loops: see their section). As there, dW
    and db are summed over blocks of consecutive images, one block per thread,
    and the blocks' sums added in block order: the same numbers on every run.
    """
    if _winograd_applies(W, stride, pad):
        return winograd_conv2d_backward(dy, x, W, pad, param_grads, need_dx)
    F, C, KH, KW = W.shape
    dtype = np.result_type(dy, W)
    T = numba.get_num_threads()
    P = dy.shape[2] * dy.shape[3]
    dx = np.empty(x.shape if need_dx else (0,) + x.shape[1:], dtype=dtype)   # no dx: an empty stand-in
    dWT_parts = np.empty((T, C * KH * KW, F), dtype=dtype)  # one partial sum of dW^T per block
    dWT_image = np.empty((T, C * KH * KW, F), dtype=dtype)  # one image's term, before it is added
    db_parts = np.empty((T, F), dtype=dtype)
    cols = np.empty((T, C * KH * KW, P), dtype=dtype)
    dcols = np.empty((T, C * KH * KW, P), dtype=dtype)
    with _one_blas_thread():
        _conv2d_backward(np.ascontiguousarray(dy, dtype), np.ascontiguousarray(x, dtype),
                         np.ascontiguousarray(W.reshape(F, -1), dtype), KH, KW, stride, pad,
                         param_grads, need_dx, dx, dWT_parts, dWT_image, db_parts, cols, dcols, np.ones(P, dtype))
    dx = dx if need_dx else None
    if not param_grads:
        return dx, None, None
    dW = np.ascontiguousarray(dWT_parts.sum(axis=0).T).reshape(W.shape)
    return dx, dW, db_parts.sum(axis=0)


# ===== JSMA's pixel-pair search =====

from .reference import JSMA_PAIR_CHUNK, jsma_pair_scale  # noqa: E402  (kept with the kernel it serves)


@njit(parallel=True, cache=True)
def _jsma_pair_search(a, b, domain, p_out, q_out, found):
    n, P = a.shape
    for i in prange(n):                  # this thread alone writes image i's answer
        # the pixels still in the domain, in decreasing order of alpha
        pix = np.flatnonzero(domain[i])
        pix = pix[np.argsort(-a[i, pix], kind="mergesort")]
        m = len(pix)
        ad = np.empty(m, a.dtype)
        bd = np.empty(m, b.dtype)
        for k in range(m):
            ad[k] = a[i, pix[k]]
            bd[k] = b[i, pix[k]]
        # bmin[k] = the smallest beta among positions k, k + 1, ..., m - 1
        bmin = np.empty(m, b.dtype)
        for k in range(m - 1, -1, -1):
            bmin[k] = bd[k] if k == m - 1 else min(bd[k], bmin[k + 1])
        best = 0.0                       # Algorithm 3 starts from a best score of 0
        bp, bq, ok = 0, 0, False
        for k in range(m - 1):
            # Every pair (k, l), l > k, has A <= ad[k] + ad[k + 1] (alpha decreases) and
            # B >= bd[k] + bmin[k + 1]; rounding is monotonic, so these bounds hold for
            # the computed A and B, and their product bounds the row's scores.
            A_max = ad[k] + ad[k + 1]
            if not A_max > 0:
                break                    # no later pair can have A > 0 either
            B_min = bd[k] + bmin[k + 1]
            if not B_min < 0:
                continue
            bound = -(A_max * B_min)
            if bound < best or not bound > 0:
                continue                 # nothing in this row can win (ties still can: not skipped)
            ak, bk, pk = ad[k], bd[k], pix[k]
            for l in range(k + 1, m):
                A = ak + ad[l]           # in the gradients' dtype, as the reference's tables
                if A > 0:
                    B = bk + bd[l]
                    if B < 0:
                        s = -(A * B)     # float32 product for float32 gradients: it may underflow
                        if s >= best and s > 0:
                            p, q = min(pk, pix[l]), max(pk, pix[l])
                            # the reference's argmax keeps the first maximum in (p, q) order
                            if s > best or p < bp or (p == bp and q < bq):
                                best, bp, bq, ok = s, p, q, True
        p_out[i], q_out[i], found[i] = bp, bq, ok


def jsma_pair_search(alpha, beta, domain, rescale=True, pair_chunk=JSMA_PAIR_CHUNK):
    """Fused JSMA pair search, one image per thread; see ``kernels.reference.jsma_pair_search``.

    Each pair's score is computed and compared on the fly, so no (P x P) table
    is ever formed: memory is O(P) per thread, and ``pair_chunk`` (kept for the
    shared signature) has nothing to bound. Pixels outside the domain are
    skipped rather than given the reference's -inf / +inf, which scores the same
    pairs 0.

    Most pairs are never scored: the pixels are visited in decreasing order of
    alpha, and a whole row of pairs is skipped when an upper bound on its
    scores is below the best so far (for the probabilities, beta is about
    -alpha, so only the few rows with the largest alpha survive). The pairs
    that are scored get the reference's arithmetic (the same inputs from
    ``jsma_pair_scale``, sums and products in the same dtype), and equal
    scores are resolved as its argmax does, so both return the same pairs.
    """
    dtype = np.result_type(alpha, beta)
    a = np.ascontiguousarray(jsma_pair_scale(alpha, rescale), dtype=dtype)
    b = np.ascontiguousarray(jsma_pair_scale(beta, rescale), dtype=dtype)
    n = a.shape[0]
    p, q = np.zeros(n, np.int64), np.zeros(n, np.int64)
    found = np.zeros(n, bool)
    _jsma_pair_search(a, b, np.ascontiguousarray(domain, dtype=bool), p, q, found)
    return p, q, found
