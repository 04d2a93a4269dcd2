"""Numba versions of the kernels in ``kernels/reference.py`` (same signatures).

Each ``@njit(parallel=True, cache=True)`` loop runs ``prange`` only over an
index whose output the thread alone writes, so no two threads ever touch the
same element and no atomics are needed. col2im and the max-pool backward pass
are written as *gathers*: each input pixel sums the entries that came from it,
instead of each entry being scattered onto its pixel.
"""
import numpy as np
from numba import njit, prange

from .reference import output_size


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
    for n_c in prange(N * C):
        n = n_c // C
        c = n_c % C
        for oh in range(OH):
            for ow in range(OW):
                best = x[n, c, oh * stride, ow * stride]
                best_k = 0
                for kh in range(KH):
                    for kw in range(KW):
                        v = x[n, c, oh * stride + kh, ow * stride + kw]
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
    for n_c in prange(N * C):            # gather: pixel (h, w) sums the windows it won
        n = n_c // C
        c = n_c % C
        for h in range(H):
            for w in range(W):
                acc = 0.0
                for kh in range(KH):
                    t = h - kh
                    if t < 0 or t % stride != 0 or t // stride >= OH:
                        continue
                    oh = t // stride
                    for kw in range(KW):
                        u = w - kw
                        if u < 0 or u % stride != 0 or u // stride >= OW:
                            continue
                        ow = u // stride
                        if argmax[n, c, oh, ow] == kh * KW + kw:
                            acc += dy[n, c, oh, ow]
                dx[n, c, h, w] = acc


def maxpool_backward(dy, argmax, x_shape, KH, KW, stride):
    """Fast max-pool backward as a gather; see ``kernels.reference.maxpool_backward``."""
    dx = np.empty(x_shape, dtype=dy.dtype)
    _maxpool_backward(np.ascontiguousarray(dy), np.ascontiguousarray(argmax), KH, KW, stride, dx)
    return dx
