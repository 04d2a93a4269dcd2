"""Pure forward/backward pairs, one banner per operation.

Every operation is a pair in the style of a lecture note::

    y, cache = op_forward(x, ...)      # keeps what backward needs, by name
    dx, ... = op_backward(dy, cache)   # gradient of a scalar L w.r.t. the inputs

``dy`` is dL/dy and is never modified. The derivative sits right below the
forward maths it differentiates. All functions work on NumPy and CuPy arrays
alike: the array module ``xp`` is taken from the data, and the hot loops
(convolution, max pooling, ReLU) come from the kernel registry in ``kernels``,
whose plain NumPy versions in ``kernels/reference.py`` spell out the maths.
"""
import math

import numpy as np

from . import kernels

from .backend import get_array_module


# ===== dense (fully connected) =====

def dense_forward(x, W, b):
    """y = x @ W + b.

    Parameters
    ----------
    x : (N, D) input
    W : (D, M) weights, so that each output unit is a column
    b : (M,) bias

    Returns
    -------
    y : (N, M); cache : dict(x, W)

    Local derivative: dy/dx = W^T, dy/dW = x^T, dy/db = 1.
    """
    y = x @ W + b
    return y, {"x": x, "W": W}


def dense_backward(dy, cache, param_grads=True, need_dx=True):
    """Gradients of y = x @ W + b.

    ``param_grads=False`` skips dW and db (returned as None) when only dx is wanted;
    ``need_dx=False`` skips dx (returned as None) when only dW and db are.

    Returns
    -------
    dx : (N, D) = dy @ W^T;  dW : (D, M) = x^T @ dy;  db : (M,) = sum of dy over the batch
    """
    x, W = cache["x"], cache["W"]
    dx = dy @ W.T if need_dx else None
    if not param_grads:
        return dx, None, None
    dW = x.T @ dy
    db = dy.sum(axis=0)
    return dx, dW, db


# ===== 2-D convolution (via im2col) =====

def conv2d_forward(x, W, b, stride=1, pad=0):
    """Cross-correlation of x with F filters, as a matrix product.

    Parameters
    ----------
    x : (N, C, H, W) images
    W : (F, C, KH, KW) filters
    b : (F,) bias
    stride, pad : int; zero padding on every side

    Returns
    -------
    y : (N, F, OH, OW), with OH = (H + 2 pad - KH) // stride + 1 (same for OW)
    cache : dict(x, W, stride, pad)

    The maths (``kernels/reference.py``): im2col unfolds every KHxKW window of
    x into one row of ``cols`` (N*OH*OW, C*KH*KW), and ``y = cols @ W_flat^T + b``
    with W_flat = W.reshape(F, C*KH*KW). The CPU kernel does the same product
    one image at a time, so the unfolded image stays in the core's cache.

    Local derivative: y is linear in x and in W; backward is the same product
    transposed (dW = dy^T cols, dcols = dy W_flat, dx = col2im(dcols)).
    """
    xp = get_array_module(x)
    y = kernels.get("conv2d_forward", xp)(x, W, b, stride, pad)
    return y, {"x": x, "W": W, "stride": stride, "pad": pad}


def conv2d_backward(dy, cache, param_grads=True, need_dx=True):
    """Gradients of conv2d_forward.

    Parameters
    ----------
    dy : (N, F, OH, OW)
    param_grads : bool; False skips dW and db (returned as None): an attack
        needs only dx, and dW costs as much as dx
    need_dx : bool; False skips dx (returned as None): training needs no dx
        of the network's first layer, whose input is the image

    Returns
    -------
    dx : (N, C, H, W) = col2im(dy W_flat);  dW : (F, C, KH, KW) = dy^T im2col(x);
    db : (F,) = sum of dy over the batch and the pixels
    """
    xp = get_array_module(dy)
    return kernels.get("conv2d_backward", xp)(dy, cache["x"], cache["W"], cache["stride"], cache["pad"],
                                              param_grads, need_dx)


# ===== max pooling =====

def maxpool_forward(x, KH=2, KW=2, stride=2):
    """Maximum over each KHxKW window, moving by stride (no padding).

    Parameters
    ----------
    x : (N, C, H, W)

    Returns
    -------
    y : (N, C, OH, OW); cache : dict(argmax, x_shape, KH, KW, stride)

    Local derivative: 1 for the window's winning pixel, 0 for the others.
    """
    xp = get_array_module(x)
    y, argmax = kernels.get("maxpool_forward", xp)(x, KH, KW, stride)
    return y, {"argmax": argmax, "x_shape": x.shape, "KH": KH, "KW": KW, "stride": stride}


def maxpool_backward(dy, cache):
    """dx: each dy goes back to the pixel that won its window (sums where windows overlap)."""
    xp = get_array_module(dy)
    return kernels.get("maxpool_backward", xp)(
        dy, cache["argmax"], cache["x_shape"], cache["KH"], cache["KW"], cache["stride"])


# ===== ReLU =====

def relu_forward(x):
    """y = max(x, 0). Local derivative: 1 where x > 0, else 0.

    The cache keeps y itself: y > 0 exactly where x > 0, so y is the mask.
    """
    xp = get_array_module(x)
    y = kernels.get("relu_forward", xp)(x)
    return y, {"y": y}


def relu_backward(dy, cache):
    """dx = dy where the input was positive (where y > 0), 0 elsewhere."""
    xp = get_array_module(dy)
    return kernels.get("relu_backward", xp)(dy, cache["y"])


# ===== flatten =====

def flatten_forward(x):
    """(N, ...) -> (N, D). Local derivative: identity, reshaped."""
    return x.reshape(x.shape[0], -1), {"x_shape": x.shape}


def flatten_backward(dy, cache):
    """dx = dy reshaped back to the input's shape."""
    return dy.reshape(cache["x_shape"])


# ===== dropout (inverted) =====

def dropout_forward(x, rate, rng):
    """Zero each unit with probability ``rate`` and scale the survivors by 1 / (1 - rate),
    so that the expected activation is unchanged and evaluation needs no rescaling.

    Parameters
    ----------
    x : any shape
    rate : float in [0, 1)
    rng : a Generator of x's array module (numpy.random.Generator or cupy's)

    Local derivative: the same mask, mask = keep / (1 - rate).
    """
    keep = rng.random(x.shape, dtype=x.dtype) >= rate
    mask = keep.astype(x.dtype) / x.dtype.type(1.0 - rate)
    return x * mask, {"mask": mask}


def dropout_backward(dy, cache):
    """dx = dy * mask."""
    return dy * cache["mask"]


# ===== softmax at temperature T =====

# The temperatures float32 can work with. softmax(z / T) in float32 tells two
# logits apart only when their difference divided by T is above float32's
# resolution near 1, 2^-24 (about 6e-8). A network starts with logits that
# differ by about 0.1 to 1: at T = 1e6 those differences become 1e-7 to 1e-6,
# the edge of what float32 resolves; beyond it the training loss sees less and
# less of the image, and from about T = 1e12 on softmax(z / T) is exactly the
# same uniform vector for every image. Measured (the small network, 2 epochs on
# 3,000 images, Adam at lr 1e-2): test accuracy 86 % at T = 1, 77 % at 100, 54 %
# at 1e3, 37 % at 1e4, 32 % at 1e6, 44 % at 1e8 (what survives the rounding),
# chance from 1e12 on; above 3.4e38 T is not even a float32. The lower limit
# mirrors it: at T = 1e-6 softmax(z / T) is already a hard arg-max for any
# logits, and below about 1e-34 z / T overflows float32 (warnings, then NaN).
T_MIN = 1e-6
T_MAX = 1e6


def check_T(T):
    """The temperature as a float; a ValueError unless it is a finite number in
    [T_MIN, T_MAX] (1e-6 to 1e6: what float32 can resolve, see above).

    The one check of T in scratchnet: the training loop, the cache, the
    attacks and the command line all call it.
    """
    try:
        value = float(T)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and T_MIN <= value <= T_MAX):
        raise ValueError(f"temperature T must be a finite number > 0, from {T_MIN:g} to {T_MAX:g} "
                         f"(the range float32 softmax(z / T) can resolve), got {T!r}")
    return value


def softmax_forward(z, T=1.0):
    """p = softmax(z / T) over the last axis.

    Parameters
    ----------
    z : (N, K) logits
    T : float > 0, the temperature

    Returns
    -------
    p : (N, K); cache : dict(p, T)

    Local derivative: dp_i/dz_j = p_i (delta_ij - p_j) / T.
    A large T during training makes the network learn logits about T times
    larger; evaluated at T = 1 those logits saturate p to exactly 1.0 in float32,
    and the factor p_i (delta_ij - p_j) above becomes about exp(-margin).
    """
    xp = get_array_module(z)
    s = z / T                                    # the temperature: divide the logits by T
    s = s - s.max(axis=-1, keepdims=True)        # stability shift; softmax is shift-invariant
    e = xp.exp(s)
    p = e / e.sum(axis=-1, keepdims=True)
    return p, {"p": p, "T": T}


def softmax_backward(dp, cache):
    """dz = p * (dp - sum_j p_j dp_j) / T.

    This is exactly what every framework computes (and what an attacker who
    differentiates the deployed probabilities gets). Where p rounds to 1.0, the
    bracket cancels to exactly 0 in floating point: that cancellation *is* the
    float32 gradient masking the project studies.
    """
    p, T = cache["p"], cache["T"]
    dz = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
    dz = dz / T                                  # the temperature: chain rule through z / T
    return dz


def logsumexp(a, axis=-1):
    """log sum_k exp(a_k) along ``axis``, without overflow or underflow.

    The largest entry is taken out first (a stability shift); a slice that is
    all -inf (nothing to sum) gives -inf rather than NaN.
    """
    xp = get_array_module(a)
    m = a.max(axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)           # an all -inf slice: shift by 0, the sum is 0
    with np.errstate(divide="ignore"):           # log(0) = -inf is the answer, not an accident
        return (m + xp.log(xp.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def log_softmax(z, T=1.0):
    """log softmax(z / T) = s - logsumexp(s) with s = z / T: no probability is formed,
    so a class far below the top keeps its true (very negative) log-probability."""
    s = z / T                                    # the temperature
    s = s - s.max(axis=-1, keepdims=True)        # stability shift: the top class's log p is exact
    return s - logsumexp(s, axis=-1)[..., None]


def logit_margins(z):
    """Top logit minus the runner-up, per row of z (N, K) -> (N,): the margin M that
    sets how far softmax(z) saturates (1 - p_top is about exp(-M))."""
    xp = get_array_module(z)
    top2 = xp.sort(z, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def log_one_minus_p(logp, idx):
    """log(1 - p_idx) per row, from log-probabilities: logsumexp over the other classes.

    Parameters
    ----------
    logp : (N, K) log softmax
    idx : (N,) int, the class of each row

    Returns
    -------
    (N,): log(1 - p_idx) = log sum_{j != idx} p_j. Exact where 1 - p_idx is far
    below the dtype's resolution (a saturated softmax), where forming 1 - p
    would give 0.
    """
    xp = get_array_module(logp)
    N, K = logp.shape
    others = xp.where(xp.arange(K)[None, :] == idx[:, None], -xp.inf, logp)
    return logsumexp(others, axis=1)
