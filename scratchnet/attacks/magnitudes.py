"""Log-space magnitudes: the true size of input gradients that float32, and even
float64, round to zero.

For a network trained at T = 100 the deployed logit margin M (top minus
runner-up) is hundreds to thousands, and the true gradient is about exp(-M):
below 1e-308 it underflows even float64. But backprop from the logits to the
input is *linear* in the logits cotangent dz. So we write dz = exp(s) * u with
u's largest entry exactly 1, compute log|dz_j| from log-probabilities (which
never underflow), backprop the well-scaled u in float64, and add s back::

    log10 ||dx|| = log10 ||backward(u)|| + s / ln 10.

What is differentiated (the loss, the probabilities at T) is defined in
``sources.py``; ``diagnostics.py`` reports these numbers image by image.

Where the size comes from. For a confidently classified image the loss
gradient is dominated by the runner-up class r (top class y)::

    dCE/dz = (p - e_y) / T  ~  p_r (e_r - e_y) / T
    dCE/dx ~ -p_r * d[(z_y - z_r) / T] / dx,      p_r ~ exp(-M),  M = (z_y - z_r) / T

so log10 ||dCE/dx|| ~ -M / ln 10 + log10 ||dM/dx||: the softmax factor
exp(-M) *times* the gradient of the margin itself (``log10_margin_grad_norms``).
Training at T grows the logits about T-fold, and with them dM/dx: the second
term is the part of the suppression that the margin alone does not predict.
"""
import math

import numpy as np

from .. import functional as F
from ..backend import get_array_module
from ..functional import check_T, logsumexp
from ..losses import check_labels
from ..model import build
from .sources import input_backward

LN10 = math.log(10.0)


def float64_copy(model):
    """The same network with float64 parameters, on the same device."""
    xp = model.xp
    copy = build(model.architecture(), dtype=np.float64)
    copy.set_params({k: v.astype(xp.float64) for k, v in model.params.items()})
    return copy


def log_onehot_minus_p(logp, idx):
    """log|e_idx - p| and sign(e_idx - p), from log-probabilities, without underflow.

    Parameters
    ----------
    logp : (N, K) float64 log softmax(z / T)
    idx : (N,) int

    Returns
    -------
    log_mag : (N, K): log p_j for j != idx; log(1 - p_idx) = logsumexp_{j != idx} log p_j at idx
    sign : (N, K): -1 for j != idx, +1 at idx
    """
    xp = get_array_module(logp)
    N, K = logp.shape
    at = xp.arange(K)[None, :] == idx[:, None]
    rest = F.log_one_minus_p(logp, idx)          # log(1 - p_idx), exact in log space
    log_mag = xp.where(at, rest[:, None], logp)
    sign = xp.where(at, 1.0, -1.0)
    return log_mag, sign


def _log10_norms(dx_scaled, log_scale):
    """log10 of the L1, L2, Linf norms of exp(log_scale) * dx_scaled, per image."""
    xp = get_array_module(dx_scaled)
    flat = xp.abs(dx_scaled.reshape(dx_scaled.shape[0], -1))
    with np.errstate(divide="ignore"):           # a norm that is truly 0 is -inf in log space
        out = {"l1": xp.log10(flat.sum(axis=1)),
               "l2": xp.log10(xp.sqrt((flat * flat).sum(axis=1))),
               "linf": xp.log10(flat.max(axis=1))}
    return {k: v + log_scale / LN10 for k, v in out.items()}


def _scaled_backward(model64, log_mag, sign, T):
    """backward(u) with u = sign * exp(log_mag - s), s = max log_mag per image; returns (dx_u, s)."""
    xp = get_array_module(log_mag)
    s = log_mag.max(axis=1)                      # the log of the largest |dz_j|
    u = sign * xp.exp(log_mag - s[:, None])      # largest entry is exactly +-1: nothing underflows
    u = u / T                                    # the temperature: chain rule through z / T
    return input_backward(model64, u), s


def log10_loss_grad_norms(model64, x, labels, T=1.0):
    """True log10 L1 / L2 / Linf norms of d CE(softmax(z / T), y) / dx, per image.

    Parameters
    ----------
    model64 : a float64 model (see ``float64_copy``)
    x : (N, C, H, W) images (cast to float64)
    labels : (N,) int
    T : float > 0

    Returns
    -------
    dict with "l1", "l2", "linf": (N,) log10 norms (-inf only if truly zero), and
    "log10_factor": (N,) log10 max_j |p_j - t_j|, the softmax factor that scales
    the whole gradient (log10(1 - p_y) for a correctly classified image), and
    "logits": (N, K) the float64 logits.
    """
    T = check_T(T)
    xp = get_array_module(x)
    z = model64.logits(x.astype(xp.float64))
    labels = check_labels(labels, z.shape[0], z.shape[1])
    logp = F.log_softmax(z, T)                   # float64 log-probabilities: no underflow
    log_mag, sign = log_onehot_minus_p(logp, labels)
    dx_u, s = _scaled_backward(model64, log_mag, -sign, T)  # dz = p - e_y = -(e_y - p)
    out = _log10_norms(dx_u, s)
    out["log10_factor"] = s / LN10
    out["logits"] = z
    return out


def log10_probs_jacobian_norms(model64, x, T=1.0):
    """True log10 norms of each row of d softmax(z / T) / dx, and of the whole Jacobian.

    Row i's logits cotangent is dz_j = p_i (delta_ij - p_j) / T, so
    log|dz_j| = log p_i + log|delta_ij - p_j|: two log-probabilities added,
    never two probabilities multiplied.

    Returns
    -------
    dict with "rows": {"l1", "l2", "linf"} each (N, K) log10 norms of row i;
    "l1", "l2", "linf": (N,) log10 norms of the whole (K x pixels) Jacobian
    (L1 summed over rows, L2 the Frobenius norm, Linf the largest entry).
    """
    T = check_T(T)
    xp = get_array_module(x)
    z = model64.logits(x.astype(xp.float64))
    N, K = z.shape
    logp = F.log_softmax(z, T)
    rows = {"l1": [], "l2": [], "linf": []}
    for i in range(K):
        idx = xp.full(N, i, dtype=xp.int64)
        log_mag, sign = log_onehot_minus_p(logp, idx)
        log_mag = logp[:, i:i + 1] + log_mag     # log p_i + log|delta_ij - p_j|
        dx_u, s = _scaled_backward(model64, log_mag, sign, T)
        for k, v in _log10_norms(dx_u, s).items():
            rows[k].append(v)
    rows = {k: xp.stack(v, axis=1) for k, v in rows.items()}
    return {"rows": rows,
            "l1": logsumexp(rows["l1"] * LN10, axis=1) / LN10,
            "l2": 0.5 * logsumexp(2 * rows["l2"] * LN10, axis=1) / LN10,
            "linf": rows["linf"].max(axis=1)}


def log10_margin_grad_norms(model64, x, T=1.0):
    """log10 L2 norm of the gradient of the logit margin M = (z_top - z_runner-up) / T, per image.

    The classes are the top and runner-up logits of each image (not its label),
    as in ``functional.logit_margins``. M is a difference of logits: nothing
    saturates and nothing underflows, so a plain float64 backward is exact.

    Parameters
    ----------
    model64 : a float64 model (see ``float64_copy``)
    x : (N, C, H, W) images (cast to float64)
    T : float > 0, the temperature M is measured at (the margin of z / T)

    Returns
    -------
    (N,) log10 ||dM / dx||_2 (-inf only where the gradient is truly zero)
    """
    T = check_T(T)
    xp = get_array_module(x)
    z = model64.logits(x.astype(xp.float64))
    N, K = z.shape
    order = xp.argsort(z, axis=1)
    top, runner = order[:, -1], order[:, -2]
    rows = xp.arange(N)
    dz = xp.zeros_like(z)
    dz[rows, top] = 1.0
    dz[rows, runner] = -1.0
    dz = dz / T                                  # the temperature: M is the margin of z / T
    dx = input_backward(model64, dz).reshape(N, -1)
    with np.errstate(divide="ignore"):
        return xp.log10(xp.sqrt((dx * dx).sum(axis=1)))
