"""Gradient sources: every quantity an attack differentiates, by explicit backprop.

An attack needs the derivative of something the network outputs w.r.t. the
*input image*. There are three candidates, and which one an attack looks at
decides whether a high training temperature hides the gradient from it:

``wrt="logits"``
    the logits ``z`` themselves (T plays no role). Nothing saturates here: this
    is Carlini and Wagner's choice, and the gradient is always there.
``wrt="probs"``
    the probabilities ``p = softmax(z / T)``. Every vector-Jacobian product goes
    through ``dp_i / dz_j = p_i (delta_ij - p_j) / T``. For a network trained at
    a high temperature and deployed at T = 1 the top probability is 1.0 in
    float32 and the others underflow, so that factor is ``exp(-margin)`` or
    exactly 0: this is the gradient Papernot et al. measured, and the one
    defensive distillation masks. ``T = T_train`` is Carlini and Wagner's fix.
``wrt="loss"``
    the cross-entropy of ``softmax(z / T)`` against a label; its gradient
    w.r.t. the logits is ``(p - onehot) / T`` (the FGSM / PGD choice).

Everything here is batched over N images, runs on NumPy or CuPy (the model's
array module), and is computed by ``model.backward`` -- never by finite
differences. One forward pass can serve several backward passes (several
vector-Jacobian products): each ``model.backward(dz)`` is one VJP.

The true size of these gradients, far below what float32 or even float64 can
hold, is measured in log space by ``magnitudes.py``.
"""
from .. import functional as F
from ..backend import get_array_module
from ..functional import check_T
from ..losses import (check_formulation, check_labels, cross_entropy_dlogits, one_hot,
                      softmax_minus_onehot_dlogits)

WRT_CHOICES = ("probs", "logits", "loss")


# ===== argument checks =====

def check_wrt(wrt, allowed=WRT_CHOICES, who="this attack"):
    """Raise a ValueError unless ``wrt`` is one of ``allowed``."""
    if wrt not in allowed:
        raise ValueError(f"{who} differentiates one of {', '.join(allowed)} (wrt=...), got {wrt!r}")
    return wrt


# ===== from a cotangent on an output to a cotangent on the logits =====

def loss_dlogits(z, labels, T=1.0, formulation="exact"):
    """Per-image gradient of the cross-entropy of softmax(z / T) w.r.t. z.

    Parameters
    ----------
    z : (N, K) logits
    labels : (N,) int, the class whose cross-entropy is measured
    T : float > 0
    formulation : "exact" (below) or "paper": ``softmax(z / T) - onehot`` in z's
        dtype, as frameworks compute it (``losses.softmax_minus_onehot_dlogits``)

    Returns
    -------
    dz : (N, K) = (p - onehot) / T, one row per image (not averaged over the
        batch as ``losses.softmax_cross_entropy`` does for training).

    ``p_y - 1`` is computed as ``-sum_{j != y} p_j`` (as in ``losses``), so no
    two numbers near 1 are subtracted: the gradient of a saturated image keeps
    its true tiny size as long as the other probabilities do not underflow.
    """
    xp = get_array_module(z)
    t = one_hot(labels, z.shape[1], xp, z.dtype)
    if check_formulation(formulation, "the loss gradient") == "paper":
        return softmax_minus_onehot_dlogits(z, t, T)          # p_y - 1 cancels to 0 once p_y == 1.0
    return cross_entropy_dlogits(F.log_softmax(z, T), t, T)   # (p - onehot) / T: the 1/T is inside


def probs_dlogits(z, dp, T=1.0):
    """Turn a cotangent dp on p = softmax(z / T) into one on the logits.

    dz_j = sum_i dp_i p_i (delta_ij - p_j) / T, computed by
    ``functional.softmax_backward`` exactly as a framework would (and as an
    attacker gets it): p * (dp - sum(p * dp)) / T.

    THIS is where the gradient vanishes. The factor p_i (delta_ij - p_j) is
    about exp(-margin) for a confident image; for a network trained at a high
    T and deployed at T = 1, p rounds to exactly 1.0 in float32, the bracket
    cancels to exactly 0, and no gradient reaches the input at all.
    """
    _, cache = F.softmax_forward(z, T)           # p = softmax(z / T); the 1/T is in there
    dz = F.softmax_backward(dp, cache)           # p_i (delta_ij - p_j) / T enters here
    return dz


def output_dlogits(z, v, wrt, T=1.0):
    """Cotangent on the logits for a cotangent ``v`` (N, K) on the chosen output."""
    if wrt == "logits":
        return v                                 # d z / d z = identity: nothing to saturate
    if wrt == "probs":
        return probs_dlogits(z, v, T)
    raise ValueError(f"a class-output vector-Jacobian product needs wrt='probs' or 'logits', got {wrt!r}")


# ===== input gradients (forward once, backward as often as needed) =====

def input_backward(model, dz):
    """dx = backprop of the logits cotangent dz (N, K) through the last forward pass.

    An attack needs only the input gradient, so the parameter gradients are not
    computed (``param_grads=False``: about half the work of a training backward).
    """
    return model.backward(dz, param_grads=False)


def loss_gradient(model, x, labels, T=1.0):
    """d CE(softmax(z(x) / T), y) / dx for each image.

    Parameters
    ----------
    model : Sequential
    x : (N, C, H, W) images on the model's device
    labels : (N,) int
    T : float > 0, the temperature the loss is measured at

    Returns
    -------
    dx : (N, C, H, W); z : (N, K) logits of x
    """
    T = check_T(T)
    z = model.logits(x)
    labels = check_labels(labels, z.shape[0], z.shape[1])
    return input_backward(model, loss_dlogits(z, labels, T)), z


def vjps(model, x, vs, wrt="probs", T=1.0):
    """Several vector-Jacobian products of one forward pass.

    Parameters
    ----------
    x : (N, C, H, W)
    vs : list of (N, K) cotangents on the output chosen by ``wrt``
    wrt : "probs" (softmax(z / T)) or "logits"

    Returns
    -------
    dxs : list of (N, C, H, W), dxs[k][n] = d (vs[k][n] . output(x_n)) / d x_n
    z : (N, K) logits
    """
    check_wrt(wrt, ("probs", "logits"), "a class-output vector-Jacobian product")
    T = check_T(T)
    z = model.logits(x)
    return [input_backward(model, output_dlogits(z, v, wrt, T)) for v in vs], z


def jacobian(model, x, wrt="probs", T=1.0):
    """The full Jacobian of the K class outputs w.r.t. the input: K backward passes.

    Returns
    -------
    J : (N, K, C, H, W), J[n, i] = d output_i(x_n) / d x_n;  z : (N, K) logits
    """
    xp = get_array_module(x)
    z = model.logits(x)
    N, K = z.shape
    check_wrt(wrt, ("probs", "logits"), "jacobian")
    T = check_T(T)
    rows = []
    for i in range(K):
        e_i = xp.zeros((N, K), dtype=z.dtype)
        e_i[:, i] = 1
        rows.append(input_backward(model, output_dlogits(z, e_i, wrt, T)))
    return xp.stack(rows, axis=1), z


def objective_gradient(model, x, objective):
    """Gradient of any per-image scalar built from the logits (C&W's f6, say).

    Parameters
    ----------
    objective : callable z (N, K) -> (values (N,), dvalues_dz (N, K))

    Returns
    -------
    dx : (N, C, H, W) = d values_n / d x_n;  values : (N,);  z : (N, K)
    """
    z = model.logits(x)
    values, dz = objective(z)
    return input_backward(model, dz), values, z


def attack_dlogits(z, labels, wrt, T=1.0, targets=None, formulation="exact"):
    """The logits cotangent of the objective an FGSM / PGD step *increases*.

    =========  ===================================  ==================================
    wrt        untargeted (move away from label y)   targeted (move towards target t)
    =========  ===================================  ==================================
    loss       CE(softmax(z / T), y)                  -CE(softmax(z / T), t)
    probs      -softmax(z / T)_y                      softmax(z / T)_t
    logits     max_{j != y} z_j - z_y                 z_t - max_{j != t} z_j
    =========  ===================================  ==================================

    ``formulation`` ("exact" | "paper") picks the loss gradient (see ``loss_dlogits``);
    probabilities and logits have one formulation, so it does not change them.
    """
    xp = get_array_module(z)
    N, K = z.shape
    if targets is None:
        cls, sign = labels, -1                   # push the true class down
    else:
        cls, sign = targets, +1                  # pull the target class up
    if wrt == "loss":
        return -sign * loss_dlogits(z, cls, T, formulation)
    e = one_hot(cls, K, xp, z.dtype)
    if wrt == "probs":
        return probs_dlogits(z, sign * e, T)
    if wrt == "logits":
        masked = xp.where(e > 0, -xp.inf, z)     # best of the other classes
        rival = one_hot(masked.argmax(axis=1), K, xp, z.dtype)
        return sign * (e - rival)
    raise ValueError(f"wrt must be one of {WRT_CHOICES}, got {wrt!r}")


def attack_gradient(model, x, labels, wrt="loss", T=1.0, targets=None, formulation="exact"):
    """Input gradient of the objective in ``attack_dlogits`` (to be increased).

    Returns
    -------
    dx : (N, C, H, W);  z : (N, K) logits of x
    """
    check_wrt(wrt)
    T = check_T(T)
    z = model.logits(x)
    return input_backward(model, attack_dlogits(z, labels, wrt, T, targets, formulation)), z
