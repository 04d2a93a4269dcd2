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
Winograd F(2x2, 3x3) on 16 input channels or more (see its section), which
needs 2.25x fewer multiplications, and, for the forward pass, to direct
loops on one or two; other shapes to im2col, one image per thread. There is no
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


# ===== convolution 3x3, stride 1: Winograd F(2x2, 3x3), a few images per thread =====
#
# The algorithm is ``kernels.reference.winograd_conv3x3_forward`` (Lavin and
# Gray, 2016): V = B^T d B for every 4x4 input tile d, 16 matrix products
# M[a, b] = U[a, b] V[a, b] over the channels, then A^T M A for every 2x2 output
# tile. The products spend 16 multiply-adds per (tile, channel, filter) where
# im2col spends 2 * 2 * 9 = 36; the transforms only add, once per tile and
# channel (or filter) rather than per channel *and* filter.
#
# The transforms are written so that every inner loop is long and contiguous,
# which the compiler turns into vector instructions. Two choices make that
# possible. (1) Row i of every tile is kept with its even and odd columns
# apart, so column j of a tile is entry j // 2 of its parity's half-row.
# (2) Every row gets one tile more than it needs (TW + 1 instead of TW).
# Then the tiles of all rows, images and channels form one flat sequence u,
# and column j of tile u is element u + j // 2 of parity plane j % 2: a whole
# transform is a handful of loops over u, instead of thousands of loops of TW
# iterations per image. The extra tile of each row is computed and thrown
# away; it costs the products 1 / TW more work.
#
# A thread takes a chunk of ``nb`` images at a time (as many as keep its
# buffers in its core's cache), so that the products are wide enough for BLAS
# even on the 8x8 images of the network's last layer. With
# u = ((c nb + m) TH + th) (TW + 1) + q over the TE = nb TH (TW + 1) tiles of
# each channel c (for the output: filter f), image m, tile row th, column q:
#
#   R[i, p][u]    = pixel (2 th + i, 2 q + p) of padded image m   (_tile_rows:    row i of each tile)
#   S[k, p]       = sum_i B^T[k, i] R[i, p]                      (_mix_rows:     B^T d)
#   V[k, l][u]    = sum_j B^T[l, j] S[k, j % 2][u + j // 2]      (_mix_columns:  (B^T d) B)
#   M[ab] (F, TE) = U[ab] (F, C) @ V[ab] (C, TE)                 16 BLAS products
#   M[1, 1][f]   += b[f]                                         the bias (see below)
#   Z[i, l]       = sum_k A^T[i, k] M[k, l]                      (_mix_rows:     A^T m)
#   y[m, f, 2 th + i, 2 q + j] = sum_l A^T[j, l] Z[i, l][u]      (_put_tiles:    (A^T m) A)
#
# The backward pass runs the same algebra transposed
# (``reference.winograd_conv3x3_backward``). The 2x2 tiles dY of dy go
# through the same steps with A in place of B^T, giving Mbar = A dY A^T (the
# extra tiles read dy's zero padding, so their Mbar is 0 and they add nothing
# below). Then dV[ab] = U[ab]^T Mbar[ab], and the adjoints of _mix_columns,
# _mix_rows and _tile_rows take dV back onto the pixels of dx; and
# dU[ab] = sum of Mbar[ab] V[ab]^T over the images, with V of x computed again
# as in the forward pass, gives dW = G^T dU G.
#
# The bias rides on one product. Column 1 of A^T is (1, 1), so product
# m[1, 1] enters every output of its tile with weight 1: adding b[f] to the
# plane M[1, 1] (one plane, before the output transform) adds it to all four
# outputs, where adding it to y afterwards is a pass over four planes. The
# same column makes Mbar[1, 1] = A[1] dY A[1]^T the sum of the four dy of its
# tile, so db[f] is the sum of plane Mbar[1, 1] over filter f's tiles, a
# quarter of dy's elements and already in cache.

# the fewest input channels for which Winograd is used: the products shrink
# with C, the transforms of the output (one per filter) do not. Forward plus
# backward, batch 128, 32 filters on 26x26 images, one thread (ms, im2col /
# Winograd): C = 1: 3.5 / 9.5; 4: 8.6 / 14.3; 8: 20.0 / 19.6; 16: 35.4 / 30.5;
# and 64 filters on 10x10: C = 16: 7.0 / 7.8; 32 (with 32 filters): 9.8 / 7.8.
# So the first layer (C = 1) keeps im2col and the others (C = 32, 64) take Winograd.
WINOGRAD_MIN_CHANNELS = 16

# bytes of buffers a thread's chunk of images may fill (half a core's 2 MB L2
# on the machine it was measured on; 1 to 8 images for the Papernot network)
WINOGRAD_CHUNK_BYTES = 1 << 20

# the product m[1, 1] (row 4 a + b of M and Mbar) that every output of a tile
# sums with weight 1: it carries the bias forward and gives db back (see above)
BIAS_PRODUCT = 5

_BT = reference.WINOGRAD_BT                             # input tiles:   d -> B^T d B
_AT = reference.WINOGRAD_AT                             # output tiles:  m -> A^T m A
_A = np.ascontiguousarray(reference.WINOGRAD_AT.T)      # dy's tiles:   dY -> A dY A^T


def _winograd_applies(W, stride, pad):
    """Whether the Winograd kernels compute this convolution (otherwise im2col does)."""
    F, C, KH, KW = W.shape
    return (KH, KW) == (3, 3) and stride == 1 and C >= WINOGRAD_MIN_CHANNELS


def _row_length(n):
    """A buffer row length >= n + 2 that is not a multiple of 1024 elements.

    The spare elements let the shifted reads (u + 1) of the last extra tile run
    past the n that count; the length avoids rows exactly 4 KiB apart, which
    share L1 cache sets (the loops below read up to four rows at once).
    """
    n += 2 + 16 - (n + 2) % 16
    return n + 16 if n % 1024 == 0 else n


def _chunk(N, C, F, TH, TW, itemsize):
    """Images per chunk: as many as fit WINOGRAD_CHUNK_BYTES, at least 1, at most N."""
    per_image = (16 * (C + F) + 8 * F + 8 * C) * TH * (TW + 1) * itemsize   # V, M, Z, R and S
    return int(max(1, min(N, WINOGRAD_CHUNK_BYTES // per_image)))


# A float32 image row of even width is a row of 64-bit words, each holding one
# pixel pair (even column in the low half on a little-endian machine). Splitting
# the words into halves is one vector instruction per 8 or 16 pixels, where
# picking every other float32 out of a row is a shuffle the compiler does not
# vectorise: _tile_rows, the even/odd split of every row, is 1.3x faster so,
# and _untile_rows and _put_tiles, which join the halves back, gain as much.
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


@njit(cache=True)
def _tile_rows(imgs, pad, R):
    """R[i, w % 2, c, m, th, w // 2] = padded image m's pixel (c, 2 th + i, w): row i of
    every tile row, its even and odd columns apart.

    imgs : (<= nb, C, H, W), a chunk of images;  R : (I, 2, C, nb, TH, TW + 1).
    The padding of R is zeroed by the caller: these writes land on the same
    places for every chunk and never on it.
    """
    count, C, H, W = imgs.shape              # count <= nb: the last chunk may be short
    I, _, _, nb, TH, TQ = R.shape
    r, x = R.ravel(), imgs.ravel()
    parity = R.size // (2 * I)               # elements from an even plane to its odd one
    as_words = _PIXEL_PAIRS_AS_WORDS and x.itemsize == 4 and W % 2 == 0   # see _split_pairs
    r_u32, x_u64 = r.view(np.uint32), x[:x.size - x.size % 2].view(np.uint64)
    for i in range(I):
        for c in range(C):
            for m in range(count):
                for th in range(TH):
                    h = 2 * th + i - pad
                    if 0 <= h < H:
                        # image column w lands on padded column w + pad: parity (w + pad) % 2
                        even = ((((i * 2) * C + c) * nb + m) * TH + th) * TQ
                        at = np.uint64(even + (pad % 2) * parity + pad // 2)        # w = 0, 2, 4, ...
                        at1 = np.uint64(even + (1 - pad % 2) * parity + (pad + 1) // 2)   # w = 1, 3, ...
                        s0 = np.uint64(((m * C + c) * H + h) * W)
                        if as_words:
                            _split_pairs(r_u32, at, at1, x_u64, s0, W // 2)
                            continue
                        for t in range(np.uint64(W // 2)):   # unsigned, as in _copy
                            r[at + t] = x[s0 + 2 * t]
                            r[at1 + t] = x[s0 + 2 * t + 1]
                        if W % 2:
                            r[at + np.uint64(W // 2)] = x[s0 + np.uint64(W - 1)]


@njit(cache=True)
def _terms(row):
    """The nonzero coefficients of one matrix row, and where they stand (at most 4)."""
    coef = np.zeros(4, dtype=row.dtype)
    at = np.zeros(4, dtype=np.int64)
    count = 0
    for i in range(row.size):
        if row[i] != 0:
            coef[count], at[count] = row[i], i
            count += 1
    return coef, at, count


@njit(cache=True, inline="always")
def _weighted_sum(o, m, count, s0, s1, s2, s3):
    """o[:] = m[0] s0 + ... + m[count - 1] s{count - 1}: one pass, every array contiguous."""
    n = o.size
    if count == 1:
        for e in range(n):
            o[e] = m[0] * s0[e]
    elif count == 2:
        for e in range(n):
            o[e] = m[0] * s0[e] + m[1] * s1[e]
    elif count == 3:
        for e in range(n):
            o[e] = m[0] * s0[e] + m[1] * s1[e] + m[2] * s2[e]
    else:
        for e in range(n):
            o[e] = m[0] * s0[e] + m[1] * s1[e] + m[2] * s2[e] + m[3] * s3[e]


@njit(cache=True)
def _mix_rows(Mat, src, n, out):
    """out[k L + l, :n] = sum_i Mat[k, i] src[i L + l, :n], where L = len(src) // Mat.shape[1].

    A small matrix applied along the first tile axis, to whole planes of tiles
    at once. Only the nonzero coefficients take part (B^T and A have two a
    row, A^T three), so each result is exactly the sum the matrix names.
    """
    K, I = Mat.shape
    L = src.shape[0] // I
    for k in range(K):
        m, i, count = _terms(Mat[k])
        for l in range(L):
            _weighted_sum(out[k * L + l, :n], m, count, src[i[0] * L + l, :n], src[i[1] * L + l, :n],
                          src[i[2] * L + l, :n], src[i[3] * L + l, :n])


@njit(cache=True)
def _mix_columns(Mat, S, n, out):
    """out[k L + l, u] = sum_j Mat[l, j] S[2k + j % 2, u + j // 2] for u < n, L = Mat.shape[0].

    The same along the second tile axis. S holds even and odd columns apart,
    so column j of every tile u is the plane S[2k + j % 2] shifted by j // 2,
    and the sum is again one pass over contiguous planes.
    """
    L, J = Mat.shape
    for l in range(L):
        m, j, count = _terms(Mat[l])
        o0, o1, o2, o3 = j[0] // 2, j[1] // 2, j[2] // 2, j[3] // 2    # the shifts
        for k in range(S.shape[0] // 2):
            _weighted_sum(out[k * L + l, :n], m, count, S[2 * k + j[0] % 2, o0:o0 + n],
                          S[2 * k + j[1] % 2, o1:o1 + n], S[2 * k + j[2] % 2, o2:o2 + n],
                          S[2 * k + j[3] % 2, o3:o3 + n])


@njit(cache=True)
def _unmix_columns(Mat, dV, n, dS):
    """The adjoint of ``_mix_columns``: dS[2k + p, v] = sum of Mat[l, j] dV[k L + l, v - j // 2]
    over the (l, j) with j % 2 = p, for v < n.

    dV's rows hold their planes from element 1 on, after a zero: the shift by
    one tile reads that zero at v = 0. (Each column parity of B^T gives four
    terms: at most four are supported.)
    """
    L, J = Mat.shape
    for p in range(2):
        coef = np.zeros(4, dtype=dV.dtype)
        plane = np.zeros(4, dtype=np.int64)
        start = np.zeros(4, dtype=np.int64)
        count = 0
        for l in range(L):
            for j in range(p, J, 2):
                if Mat[l, j] != 0:
                    coef[count], plane[count], start[count] = Mat[l, j], l, 1 - j // 2
                    count += 1
        for k in range(dS.shape[0] // 2):
            _weighted_sum(dS[2 * k + p, :n], coef, count,
                          dV[k * L + plane[0], start[0]:start[0] + n], dV[k * L + plane[1], start[1]:start[1] + n],
                          dV[k * L + plane[2], start[2]:start[2] + n], dV[k * L + plane[3], start[3]:start[3] + n])


@njit(cache=True)
def _untile_rows(dR, pad, dx):
    """The adjoint of ``_tile_rows``: dx[m, c, h, w] = the sum of the entries of dR that
    ``_tile_rows`` copied from pixel (c, h, w) of image m (two tile rows hold each row).

    dR : (4, 2, C, nb, TH, TW + 1), also used as scratch;  dx : (<= nb, C, H, W), overwritten.
    """
    count, C, H, W = dx.shape
    _, _, _, nb, TH, TQ = dR.shape
    r, x = dR.ravel(), dx.ravel()
    parity = dR.size // 8
    if _PIXEL_PAIRS_AS_WORDS and x.itemsize == 4 and W % 2 == 0:
        # float32, even width: first add the two tile rows that hold each image row
        # (long contiguous loops, in place in dR), then join the halves into pixel
        # pairs as 64-bit words (see _split_pairs)
        r_u32, x_u64 = r.view(np.uint32), x.view(np.uint64)
        for m in range(count):
            for c in range(C):
                for h in range(H):
                    at0, at1, found = np.uint64(0), np.uint64(0), False
                    for i in range((h + pad) % 2, 4, 2):     # the two rows i with 2 th + i = h + pad
                        th = (h + pad - i) // 2
                        if th < 0 or th >= TH:
                            continue
                        even = ((((i * 2) * C + c) * nb + m) * TH + th) * TQ
                        at = np.uint64(even + (pad % 2) * parity + pad // 2)
                        at_1 = np.uint64(even + (1 - pad % 2) * parity + (pad + 1) // 2)
                        if found:            # the second row: add it onto the first
                            for t in range(np.uint64(W // 2)):
                                r[at0 + t] += r[at + t]
                                r[at1 + t] += r[at_1 + t]
                        else:
                            at0, at1, found = at, at_1, True
                    # (every image row lies in one tile row at least: the tiles cover the
                    # whole padded image, 2 TH + 2 >= OH + 2 rows)
                    _join_pairs(x_u64, ((m * C + c) * H + h) * W, r_u32, at0, at1, W // 2)
        return
    for m in range(count):
        for c in range(C):
            for h in range(H):
                s0 = np.uint64(((m * C + c) * H + h) * W)
                first = True
                for i in range((h + pad) % 2, 4, 2):         # the two rows i with 2 th + i = h + pad
                    th = (h + pad - i) // 2
                    if th < 0 or th >= TH:
                        continue
                    even = ((((i * 2) * C + c) * nb + m) * TH + th) * TQ
                    at = np.uint64(even + (pad % 2) * parity + pad // 2)
                    at1 = np.uint64(even + (1 - pad % 2) * parity + (pad + 1) // 2)
                    if first:
                        for t in range(np.uint64(W // 2)):   # unsigned, as in _copy
                            x[s0 + 2 * t] = r[at + t]
                            x[s0 + 2 * t + 1] = r[at1 + t]
                        if W % 2:
                            x[s0 + np.uint64(W - 1)] = r[at + np.uint64(W // 2)]
                        first = False
                    else:
                        for t in range(np.uint64(W // 2)):
                            x[s0 + 2 * t] += r[at + t]
                            x[s0 + 2 * t + 1] += r[at1 + t]
                        if W % 2:
                            x[s0 + np.uint64(W - 1)] += r[at + np.uint64(W // 2)]


@njit(cache=True)
def _put_tiles(AT, Z, Y, nb, TW, y):
    """y[m, f, 2 th + i, 2 q + j] = sum_l AT[j, l] Z[4 i + l, u] for m < len(y): the
    second half of the output transform, written into NCHW (the bias is already in Z).

    Z : (8, R) with R >= F nb TH (TW + 1), u = ((f nb + m) TH + th) (TW + 1) + q;
    Y : (16, R), scratch (the 16 products' buffer, free by now);  y : (<= nb, F,
    OH, OW). First the four output planes Y[2i + j] in long loops, then each
    output row interleaves its two. An odd OH or OW drops the last tiles'
    second row or column.
    """
    _, F, OH, OW = y.shape
    TH = (OH + 1) // 2
    n = F * nb * TH * (TW + 1)
    R = Z.shape[1]
    Y = Y.reshape(4, 4, R)[0].reshape(2, 2, R)
    for i in range(2):                       # Y[i, j] = sum_l AT[j, l] Z[4i + l]
        _mix_rows(AT, Z.reshape(2, 4, R)[i], n, Y[i])
    yf = y.ravel()
    pairs = np.uint64(OW // 2)               # tiles with both columns inside the image
    if _PIXEL_PAIRS_AS_WORDS and yf.itemsize == 4 and OW % 2 == 0:
        # float32, even width: each output row's halves joined as 64-bit words (see _split_pairs)
        y_u64, Y_u32 = yf.view(np.uint64), Y.ravel().view(np.uint32)
        for i in range(2):
            for m in range(y.shape[0]):
                for f in range(F):
                    for th in range(TH):
                        h = 2 * th + i
                        if h < OH:
                            s0 = ((f * nb + m) * TH + th) * (TW + 1)
                            _join_pairs(y_u64, ((m * F + f) * OH + h) * OW,
                                        Y_u32, np.uint64(2 * i * R + s0), np.uint64((2 * i + 1) * R + s0), pairs)
        return
    for i in range(2):
        even, odd = Y[i, 0], Y[i, 1]
        for m in range(y.shape[0]):
            for f in range(F):
                for th in range(TH):
                    h = 2 * th + i
                    if h >= OH:
                        continue
                    d0 = np.uint64(((m * F + f) * OH + h) * OW)
                    s0 = np.uint64(((f * nb + m) * TH + th) * (TW + 1))
                    for q in range(pairs):   # unsigned, as in _copy
                        yf[d0 + 2 * q] = even[s0 + q]
                        yf[d0 + 2 * q + 1] = odd[s0 + q]
                    if OW % 2:               # the last tile's first column only
                        yf[d0 + 2 * pairs] = even[s0 + pairs]


# The filters' transform U = G g G^T, and its adjoint for dW, are tiny next to
# the convolution (84 multiply-adds per filter and channel), but as NumPy
# einsums (the reference's) they took 0.16-1.6 ms a call, 5.5 ms of every
# training step at batch 128 (nine calls), whatever the batch size; these
# loops take 12-47 us (the network's three layers, 2 threads). Both work in
# float64 and round once, as the reference does: in float32 the same bits.

@njit(parallel=True, cache=True)
def _winograd_filters(W, G, U):
    """U[4 a + b, f, c] = (G W[f, c] G^T)[a, b]; U may be a transposed view."""
    F, C = W.shape[0], W.shape[1]
    for f in prange(F):                      # this thread alone writes U[:, f]
        Gg = np.empty((4, 3))
        for c in range(C):
            for a in range(4):               # Gg = G g
                for l in range(3):
                    Gg[a, l] = G[a, 0] * W[f, c, 0, l] + G[a, 1] * W[f, c, 1, l] + G[a, 2] * W[f, c, 2, l]
            for a in range(4):               # U = (G g) G^T
                for b in range(4):
                    U[4 * a + b, f, c] = Gg[a, 0] * G[b, 0] + Gg[a, 1] * G[b, 1] + Gg[a, 2] * G[b, 2]


@njit(parallel=True, cache=True)
def _winograd_filters_adjoint(dU, G, dW):
    """dW[f, c] = G^T dU[:, f, c] G, with dU[4 a + b, f, c]."""
    F, C = dW.shape[0], dW.shape[1]
    for f in prange(F):                      # this thread alone writes dW[f]
        GdU = np.empty((3, 4))
        for c in range(C):
            for k in range(3):               # G^T dU
                for b in range(4):
                    GdU[k, b] = (G[0, k] * dU[b, f, c] + G[1, k] * dU[4 + b, f, c]
                                 + G[2, k] * dU[8 + b, f, c] + G[3, k] * dU[12 + b, f, c])
            for k in range(3):               # (G^T dU) G
                for l in range(3):
                    dW[f, c, k, l] = (GdU[k, 0] * G[0, l] + GdU[k, 1] * G[1, l]
                                      + GdU[k, 2] * G[2, l] + GdU[k, 3] * G[3, l])


def winograd_filters(W, transposed=False):
    """``reference.winograd_filters`` as (16, F, C) (or (16, C, F) if ``transposed``),
    W's dtype: the products' left operands U[ab] (or U[ab]^T)."""
    F, C = W.shape[0], W.shape[1]
    U = np.empty((16, C, F) if transposed else (16, F, C))
    _winograd_filters(W, reference.WINOGRAD_G, U.transpose(0, 2, 1) if transposed else U)
    return U.astype(W.dtype)


def winograd_filters_adjoint(dU, dtype):
    """``reference.winograd_filters_adjoint`` for dU as (16, F, C): dW (F, C, 3, 3) in ``dtype``."""
    dW = np.empty((dU.shape[1], dU.shape[2], 3, 3))
    _winograd_filters_adjoint(dU, reference.WINOGRAD_G, dW)
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
    """V[4k + l, u] = (B^T d B)[k, l] for every 4x4 tile d of the chunk, padded by pad."""
    I, _, C, nb, TH, TQ = R.shape
    n = C * nb * TH * TQ                     # tiles per row or column plane
    _tile_rows(imgs, pad, R)
    _mix_rows(BT, R.reshape(2 * I, n), n, S)
    _mix_columns(BT, S, n, V)


@njit(parallel=True, cache=True)
def _winograd_forward(x, U, b, pad, BT, AT, y, R, S, V, M, Z):
    N, C = x.shape[0], x.shape[1]
    F = y.shape[1]
    nb, TH, TQ = R.shape[4], R.shape[5], R.shape[6]   # R: (threads, 4, 2, C, nb, TH, TW + 1)
    TE = nb * TH * TQ                        # tiles per channel in a chunk, extra ones included
    R[:] = 0.0                               # the zero padding, once (see _tile_rows)
    S[:] = 0.0                               # ... and the spare elements past each row
    for chunk in prange((N + nb - 1) // nb): # this thread alone writes these images' outputs
        t = numba.get_thread_id()            # ... using its own buffers
        n = chunk * nb
        imgs = _next_chunk(x, n, nb, R[t])
        _winograd_input(imgs, pad, BT, R[t], S[t], V[t])
        for ab in range(16):
            np.dot(U[ab], V[t, ab, :C * TE].reshape(C, TE), M[t, ab, :F * TE].reshape(F, TE))
        _add_per_row(M[t, BIAS_PRODUCT], b, TE)   # the bias, on the product every output sums (see above)
        _mix_rows(AT, M[t], F * TE, Z[t])
        _put_tiles(AT, Z[t], M[t], nb, TQ - 1, y[n:n + imgs.shape[0]])


def winograd_conv2d_forward(x, W, b, pad):
    """3x3, stride-1 convolution by Winograd F(2x2, 3x3), a few images per thread;
    see ``kernels.reference.winograd_conv3x3_forward`` (the algorithm) and
    ``kernels.reference.conv2d_forward`` (what it computes)."""
    N, C, H, Wd = x.shape
    F = W.shape[0]
    OH, OW = H + 2 * pad - 2, Wd + 2 * pad - 2
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    dtype = np.result_type(x, W)
    nb = _chunk(N, C, F, TH, TW, dtype.itemsize)
    TE = nb * TH * (TW + 1)
    T = numba.get_num_threads()
    U = winograd_filters(W.astype(dtype, copy=False))
    y = np.empty((N, F, OH, OW), dtype=dtype)
    buffers = (np.empty((T, 4, 2, C, nb, TH, TW + 1), dtype=dtype),   # R: the rows of every tile row
               np.empty((T, 8, _row_length(C * TE)), dtype=dtype),   # S = B^T d
               np.empty((T, 16, _row_length(C * TE)), dtype=dtype),   # V = B^T d B
               np.empty((T, 16, _row_length(F * TE)), dtype=dtype),   # M = U V
               np.empty((T, 8, _row_length(F * TE)), dtype=dtype))    # Z = A^T M
    with _one_blas_thread():
        _winograd_forward(np.ascontiguousarray(x, dtype), np.ascontiguousarray(U), np.ascontiguousarray(b, dtype),
                          pad, _BT.astype(dtype), _AT.astype(dtype), y, *buffers)
    return y


@njit(parallel=True, cache=True)
def _winograd_backward(dy, x, UT, pad, param_grads, need_dx, BT, B, A, dx, P, Q, Mbar, dV, dS, dR, R, S, V, dU_chunk,
                       dU_parts, db_parts, ones):
    N, C = x.shape[0], x.shape[1]
    F = dy.shape[1]
    blocks, nb, TH, TQ = P.shape[0], P.shape[4], P.shape[5], P.shape[6]
    TE = nb * TH * TQ
    P[:] = 0.0                               # the 2x2 tiles of dy past its edge stay 0
    dV[:] = 0.0                              # ... and the zero before each plane (_unmix_columns)
    R[:] = 0.0
    S[:] = 0.0
    dU_parts[:] = 0.0
    db_parts[:] = 0.0
    for blk in prange(blocks):               # block blk alone writes its images' dx and dU_parts[blk]
        chunks = (N + nb - 1) // nb
        for chunk in range(blk * chunks // blocks, (blk + 1) * chunks // blocks):   # in order:
            n = chunk * nb                   # the same sums on every run
            # Mbar = A dY A^T for every 2x2 tile dY of dy: its rows, then its columns
            dys = _next_chunk(dy, n, nb, P[blk])
            _tile_rows(dys, 0, P[blk])
            _mix_rows(A, P[blk].reshape(4, F * TE), F * TE, Q[blk])
            _mix_columns(A, Q[blk], F * TE, Mbar[blk])
            if need_dx:                      # dV = U^T Mbar, then B dV B^T back onto the pixels of dx
                for ab in range(16):         # (every step above, transposed)
                    np.dot(UT[ab], Mbar[blk, ab, :F * TE].reshape(F, TE),
                           dV[blk, ab, 1:1 + C * TE].reshape(C, TE))
                _unmix_columns(BT, dV[blk], C * TE, dS[blk])
                _mix_rows(B, dS[blk], C * TE, dR[blk].reshape(8, C * TE))
                _untile_rows(dR[blk], pad, dx[n:n + dys.shape[0]])
            if param_grads:                  # dU[ab] += Mbar[ab] V[ab]^T, with V = B^T d B of x
                _winograd_input(_next_chunk(x, n, nb, R[blk]), pad, BT, R[blk], S[blk], V[blk])
                for ab in range(16):
                    np.dot(Mbar[blk, ab, :F * TE].reshape(F, TE), V[blk, ab, :C * TE].reshape(C, TE).T,
                           dU_chunk[blk])
                    _add_array(dU_parts[blk, ab], dU_chunk[blk])
                # db: the sums of dy's tiles, Mbar[1, 1], over each filter's tiles
                _add_array(db_parts[blk], np.dot(Mbar[blk, BIAS_PRODUCT, :F * TE].reshape(F, TE), ones))


def winograd_conv2d_backward(dy, x, W, pad, param_grads=True, need_dx=True):
    """Gradients of ``winograd_conv2d_forward``; see ``kernels.reference.winograd_conv3x3_backward``.

    dx and dW both start from Mbar = A dY A^T, computed once per chunk. dW and
    db are summed over blocks of consecutive images, one block per thread, and
    the blocks' sums added in block order: the same numbers on every run.
    """
    N, C, H, Wd = x.shape
    F, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    dtype = np.result_type(dy, W)
    nb = _chunk(N, C, F, TH, TW, dtype.itemsize)
    TE = nb * TH * (TW + 1)
    UT = winograd_filters(W.astype(dtype, copy=False), transposed=True)
    B = numba.get_num_threads()
    dx = np.empty((N, C, H, Wd) if need_dx else (0, C, H, Wd), dtype=dtype)   # no dx: an empty stand-in
    dU_parts = np.empty((B, 16, F, C), dtype=dtype)
    db_parts = np.empty((B, F), dtype=dtype)
    x_bufs = 1 if param_grads else 0         # no buffers for V when only dx is wanted
    with _one_blas_thread():
        _winograd_backward(
            np.ascontiguousarray(dy, dtype), np.ascontiguousarray(x, dtype), np.ascontiguousarray(UT), pad,
            param_grads, need_dx, _BT.astype(dtype), np.ascontiguousarray(_BT.T, dtype), _A.astype(dtype), dx,
            np.empty((B, 2, 2, F, nb, TH, TW + 1), dtype=dtype),         # P: rows of dy's 2x2 tiles
            np.empty((B, 8, _row_length(F * TE)), dtype=dtype),          # Q = A dY
            np.empty((B, 16, _row_length(F * TE)), dtype=dtype),         # Mbar = A dY A^T
            np.empty((B, 16, 1 + _row_length(C * TE)), dtype=dtype),     # dV = U^T Mbar, after a 0
            np.empty((B, 8, _row_length(C * TE)), dtype=dtype),          # dS = dV B^T
            np.empty((B, 4, 2, C, nb, TH, TW + 1), dtype=dtype),         # dR = B dS
            np.empty((B, 4, 2, C, nb * x_bufs, TH, TW + 1), dtype=dtype),  # R: rows of x's tile rows
            np.empty((B, 8, _row_length(C * TE) * x_bufs), dtype=dtype),   # S = B^T d
            np.empty((B, 16, _row_length(C * TE) * x_bufs), dtype=dtype),  # V = B^T d B
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
    # unsigned, as the offsets: a plain 1 added to them makes the index a signed int64, whose
    # negative-index check keeps the loop from being vectorised (4x slower; see _copy)
    one, two = np.uint64(1), np.uint64(2)
    return (k0 * s[r0] + k1 * s[r0 + one] + k2 * s[r0 + two]
            + k3 * s[r1] + k4 * s[r1 + one] + k5 * s[r1 + two]
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

    3x3 filters at stride 1 on several channels go to Winograd F(2x2, 3x3)
    (``winograd_conv2d_forward``), on one or two channels to direct loops
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
