"""Softmax cross-entropy at temperature T, from logits.

The loss a network trained "at temperature T" sees is the cross-entropy of
``softmax(z / T)``. Its gradient w.r.t. the logits is ``(p - t) / T``: the
``1 / T`` is why plain SGD at a T = 1 learning rate crawls at T = 100, and why
the network answers by growing its logits about T times larger.
"""
import numpy as np

from .backend import get_array_module
from .functional import check_T, log_softmax, softmax_forward


# ===== labels =====

def check_labels(labels, N, K, what="labels"):
    """Integer class indices of shape (N,) in [0, K), or a ValueError that says what came.

    The one check of class labels in scratchnet (training targets, attack
    labels and targets). A list becomes a NumPy array; arrays keep their module.
    """
    if isinstance(labels, (list, tuple)):
        labels = np.asarray(labels)
    shape = tuple(getattr(labels, "shape", ()))
    if len(shape) != 1 or shape[0] != N:
        raise ValueError(f"{what} must have shape ({N},), got {shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integer class indices, got dtype {labels.dtype}")
    if N and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise ValueError(f"{what} must lie in [0, {K - 1}], got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels


def one_hot(labels, K, xp, dtype):
    """(N, K) rows of array module ``xp`` with a 1 at each label (N,)."""
    t = xp.zeros((labels.shape[0], K), dtype=dtype)
    t[xp.arange(labels.shape[0]), labels] = 1
    return t


# ===== cross-entropy at T =====

def _as_target_matrix(targets, logits):
    """(N, K) probability rows from integer labels (N,) or soft targets (N, K)."""
    N, K = logits.shape
    if targets.ndim == 1:
        return one_hot(check_labels(targets, N, K), K, get_array_module(logits), logits.dtype)
    if targets.shape != logits.shape:
        raise ValueError(f"soft targets must have the logits' shape {logits.shape}, got {targets.shape}")
    return targets.astype(logits.dtype, copy=False)


def softmax_cross_entropy(logits, targets, T=1.0):
    """Mean cross-entropy between targets and softmax(logits / T), and its gradient.

    Parameters
    ----------
    logits : (N, K) float array
    targets : (N,) integer labels (hard) or (N, K) probability rows (soft, e.g.
        a teacher's softmax at T for defensive distillation)
    T : float > 0, the training temperature

    Returns
    -------
    loss : float, mean over the batch of -sum_k t_k log softmax(z / T)_k
    dlogits : (N, K), dloss/dz = (p - t) / (T N)

    Notes
    -----
    ``p_i - t_i`` is computed as ``p_i * sum_{j != i} t_j - t_i * sum_{j != i} p_j``
    (equal, since 1 - p_i = sum_{j != i} p_j), so no number near 1 is ever
    subtracted from another near 1: for a correct, saturated prediction the
    gradient ``p_y - 1`` comes out as ``-sum_{j != y} p_j``, its true, tiny
    size (about exp(-margin)), instead of rounding to zero. float64
    measurements therefore see the real magnitude.
    """
    T = check_T(T)
    t = _as_target_matrix(targets, logits)
    N = logits.shape[0]
    logp = log_softmax(logits, T)
    loss = float(-(t * logp).sum() / N)
    return loss, cross_entropy_dlogits(logp, t, T) / N


def cross_entropy_dlogits(logp, t, T):
    """Per-row gradient of -sum_k t_k log p_k w.r.t. the logits: (p - t) / T.

    Parameters
    ----------
    logp : (N, K) log softmax(z / T)
    t : (N, K) target rows (one-hot or soft)
    T : float > 0

    Returns
    -------
    dz : (N, K), not averaged over the batch; cancellation-free (see
        ``softmax_cross_entropy``)
    """
    xp = get_array_module(logp)
    K = logp.shape[1]
    p = xp.exp(logp)
    others = 1 - xp.eye(K, dtype=logp.dtype)     # (v @ others)_i = sum_{j != i} v_j
    dz = p * (t @ others) - t * (p @ others)     # = p - t, with no 1 - p_y formed
    dz = dz / T                                  # the temperature: d(z / T)/dz = 1 / T
    return dz


# ===== the two formulations of the loss gradient =====
#
# ``cross_entropy_dlogits`` above is the *exact* gradient: it never forms
# 1 - p_y, so a saturated image keeps its true, tiny gradient. Frameworks
# (and every published FGSM / PGD implementation) instead evaluate
# ``softmax(z / T) - onehot`` in the model's float32. Once p_y rounds to 1.0,
# p_y - 1 is exactly 0 there while the other p_j are still tiny but non-zero:
# the gradient keeps the push *up* on the other classes and loses the push
# *down* on the true class, so its direction changes. ``formulation="paper"``
# reproduces that gradient so that published results can be compared like for
# like; ``"exact"`` (the default) is the cancellation-free one.

FORMULATIONS = ("exact", "paper")


def check_formulation(formulation, who="this gradient"):
    """Raise a ValueError unless ``formulation`` is "exact" or "paper"."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"{who} has formulation 'exact' (cancellation-free, the default) or "
                         f"'paper' (as published, in the model's float32), got {formulation!r}")
    return formulation


def softmax_minus_onehot_dlogits(z, t, T):
    """Per-row gradient of the cross-entropy as frameworks compute it: (softmax(z / T) - t) / T.

    Parameters
    ----------
    z : (N, K) logits, in the model's dtype (float32 for a float32 model)
    t : (N, K) target rows (one-hot or soft)
    T : float > 0

    Returns
    -------
    dz : (N, K) in z's dtype, not averaged over the batch

    Notes
    -----
    Mathematically equal to ``cross_entropy_dlogits``; numerically it is the
    float32 gradient of the papers. Where the softmax saturates (p_y == 1.0 in
    float32 while some other p_j > 0) the entry at y is exactly 0 instead of
    ``-sum_{j != y} p_j``; everywhere else the two agree to rounding.
    """
    p, _ = softmax_forward(z, T)                 # p = softmax(z / T), in z's dtype
    dz = p - t.astype(p.dtype, copy=False)       # p_y - 1 is exactly 0 once p_y rounds to 1.0
    dz = dz / T                                  # the temperature: d(z / T)/dz = 1 / T
    return dz
