"""Numba versions of the kernels in ``kernels/reference.py`` (same signatures).

Each ``@njit(parallel=True, cache=True)`` loop runs ``prange`` only over an
index whose output the thread alone writes, so no two threads ever touch the
same element and no atomics are needed. col2im is written as a *gather*: each
input pixel sums the entries that came from it, instead of each entry being
scattered onto its pixel. The max-pool backward pass gives each thread whole
image planes (n, c); inside its own plane a thread adds every dy onto its
winning pixel, which no other thread can touch.

The whole-layer convolution kernels (``conv2d_forward``, ``conv2d_backward``)
work one image at a time: each thread unfolds its image into a small
column matrix that stays in its core's cache, multiplies it by the filters
with BLAS, and writes that image's output. This never builds the batch's
whole im2col matrix (85 MB for the Papernot network's second convolution at
batch 128), whose trips to main memory cost more than the arithmetic.

Threads: Numba's thread pool is the only one that runs in parallel. Importing
this module therefore

* sets every BLAS library (NumPy's, and SciPy's, which Numba's ``np.dot``
  calls) to one thread, so OpenBLAS never starts threads under Numba's; and
* picks Numba's ``workqueue`` threading layer, whose idle threads sleep,
  unless ``NUMBA_THREADING_LAYER`` names another.

Both choices come from measurements on the project's 2-core machine
(``experiments/bench.py``): OpenMP's and OpenBLAS's idle threads spin, and a
spinning thread takes a core the working threads need. Training step, batch
128, while other jobs shared the machine (load average about 10): OpenMP
layer with 2 BLAS threads 642 ms wall / 309 ms CPU; workqueue with 1 BLAS
thread 289 ms / 165 ms.
``threadpoolctl.threadpool_limits`` changes the BLAS setting back if needed.
"""
import os

import numba
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba's np.dot calls; loaded so threadpoolctl sees it)
from numba import njit, prange
from threadpoolctl import ThreadpoolController

from .reference import output_size

if "NUMBA_THREADING_LAYER" not in os.environ:    # the user's explicit choice wins
    numba.config.THREADING_LAYER = "workqueue"   # takes effect at the first parallel kernel
_threadpools = ThreadpoolController()
_threadpools.limit(limits=1, user_api="blas")


# ===== im2col / col2im =====

@njit(parallel=True, cache=True)
def _im2col(x, KH, KW, stride, pad, cols):
    N, C, H, W = x.shape
    OH = (H + 2 * pad - KH) // stride + 1
    OW = (W + 2 * pad - KW) // stride + 1
    for n_oh in prange(N * OH):          # this thread alone writes rows (n, oh, :)
        n = n_oh // OH
        oh = n_oh % OH
        for ow in range(OW):
            row = n_oh * OW + ow
            for c in range(C):
                for kh in range(KH):
                    h = oh * stride - pad + kh
                    for kw in range(KW):
                        w = ow * stride - pad + kw
                        col = (c * KH + kh) * KW + kw
                        if 0 <= h < H and 0 <= w < W:
                            cols[row, col] = x[n, c, h, w]
                        else:
                            cols[row, col] = 0.0


def im2col(x, KH, KW, stride, pad):
    """Fast im2col; see ``kernels.reference.im2col`` (the specification)."""
    N, C, H, W = x.shape
    OH, OW = output_size(H, KH, stride, pad), output_size(W, KW, stride, pad)
    cols = np.empty((N * OH * OW, C * KH * KW), dtype=x.dtype)
    _im2col(np.ascontiguousarray(x), KH, KW, stride, pad, cols)
    return cols


@njit(parallel=True, cache=True)
def _col2im(cols, KH, KW, stride, pad, x):
    N, C, H, W = x.shape
    OH = (H + 2 * pad - KH) // stride + 1
    OW = (W + 2 * pad - KW) // stride + 1
    for n_c in prange(N * C):            # this thread alone writes image plane (n, c)
        n = n_c // C
        c = n_c % C
        for h in range(H):
            for w in range(W):
                acc = 0.0
                for kh in range(KH):
                    t = h + pad - kh         # = oh * stride for the window that put (h, w) at tap kh
                    if t < 0 or t % stride != 0:
                        continue
                    oh = t // stride
                    if oh >= OH:
                        continue
                    for kw in range(KW):
                        u = w + pad - kw
                        if u < 0 or u % stride != 0:
                            continue
                        ow = u // stride
                        if ow >= OW:
                            continue
                        acc += cols[(n * OH + oh) * OW + ow, (c * KH + kh) * KW + kw]
                x[n, c, h, w] = acc


def col2im(cols, x_shape, KH, KW, stride, pad):
    """Fast col2im as a gather; see ``kernels.reference.col2im``."""
    x = np.empty(x_shape, dtype=cols.dtype)
    _col2im(np.ascontiguousarray(cols), KH, KW, stride, pad, x)
    return x


# ===== max pooling =====

@njit(parallel=True, cache=True)
def _maxpool_forward(x, KH, KW, stride, y, argmax):
    N, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    for n_c in prange(N * C):                # this thread alone writes plane (n, c) of y and argmax
        n = n_c // C
        c = n_c % C
        for oh in range(OH):
            for ow in range(OW):
                h0, w0 = oh * stride, ow * stride
                best = x[n, c, h0, w0]
                best_k = 0
                for kh in range(KH):
                    for kw in range(KW):
                        v = x[n, c, h0 + kh, w0 + kw]
                        if v > best:         # strict: the first maximum wins a tie
                            best = v
                            best_k = kh * KW + kw
                y[n, c, oh, ow] = best
                argmax[n, c, oh, ow] = best_k


def maxpool_forward(x, KH, KW, stride):
    """Fast max pooling; see ``kernels.reference.maxpool_forward``."""
    N, C, H, W = x.shape
    OH, OW = output_size(H, KH, stride, 0), output_size(W, KW, stride, 0)
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = np.empty((N, C, OH, OW), dtype=np.int64)
    _maxpool_forward(np.ascontiguousarray(x), KH, KW, stride, y, argmax)
    return y, argmax


@njit(parallel=True, cache=True)
def _maxpool_backward(dy, argmax, KH, KW, stride, dx):
    N, C, H, W = dx.shape
    OH, OW = dy.shape[2], dy.shape[3]
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
    """The thread pools in use: {numba_threads, numba_threading_layer, blas_threads, blas}."""
    layer = numba.config.THREADING_LAYER
    try:
        layer = numba.threading_layer()      # known once a parallel kernel has run
    except ValueError:
        pass
    blas = [lib for lib in _threadpools.info() if lib["user_api"] == "blas"]
    return {"numba_threads": numba.get_num_threads(), "numba_threading_layer": layer,
            "blas_threads": max((lib["num_threads"] for lib in blas), default=None),
            "blas": ", ".join(sorted({f"{lib['internal_api']} {lib.get('version')}" for lib in blas}))}


# ===== convolution, one image per thread =====

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
        for f in range(F):
            yn[f] += b[f]


def conv2d_forward(x, W, b, stride, pad):
    """Fast convolution, one image per thread; see ``kernels.reference.conv2d_forward``."""
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
def _conv2d_backward(dy, x, Wm, KH, KW, stride, pad, param_grads, dx, dWT_parts, dWT_image, db_parts,
                     cols, dcols):
    N, F = dy.shape[0], dy.shape[1]
    WmT = Wm.T                               # (C*KH*KW, F), a view
    dWT_parts[:] = 0.0
    db_parts[:] = 0.0
    for n in prange(N):                      # this thread alone writes dx[n] and its own dWT_parts[t]
        t = numba.get_thread_id()
        dyn = dy[n].reshape(F, -1)           # (F, OH*OW)
        np.dot(WmT, dyn, dcols[t])           # dcols_n = W^T dy_n
        _fold(dcols[t], KH, KW, stride, pad, dx[n])
        if param_grads:
            _unfold(x[n], KH, KW, stride, pad, cols[t])
            # dW^T += cols_n dy_n^T: the same product as dW += dy_n cols_n^T, but in the
            # operand order BLAS runs about 1.4x faster for these shapes
            np.dot(cols[t], dyn.T, dWT_image[t])
            dWT_parts[t] += dWT_image[t]
            for f in range(F):
                db_parts[t, f] += dyn[f].sum()


def conv2d_backward(dy, x, W, stride, pad, param_grads=True):
    """Fast convolution gradients, one image per thread; see ``kernels.reference.conv2d_backward``."""
    F, C, KH, KW = W.shape
    dtype = np.result_type(dy, W)
    T = numba.get_num_threads()
    P = dy.shape[2] * dy.shape[3]
    dx = np.empty(x.shape, dtype=dtype)
    dWT_parts = np.empty((T, C * KH * KW, F), dtype=dtype)  # one partial sum of dW^T per thread
    dWT_image = np.empty((T, C * KH * KW, F), dtype=dtype)  # one image's term, before it is added
    db_parts = np.empty((T, F), dtype=dtype)
    cols = np.empty((T, C * KH * KW, P), dtype=dtype)
    dcols = np.empty((T, C * KH * KW, P), dtype=dtype)
    with _one_blas_thread():
        _conv2d_backward(np.ascontiguousarray(dy, dtype), np.ascontiguousarray(x, dtype),
                         np.ascontiguousarray(W.reshape(F, -1), dtype), KH, KW, stride, pad,
                         param_grads, dx, dWT_parts, dWT_image, db_parts, cols, dcols)
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
