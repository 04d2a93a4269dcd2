"""FGSM: the fast gradient sign method (Goodfellow, Shlens and Szegedy, ICLR 2015).

One step of size eps along the sign of the input gradient::

    untargeted:  x_adv = clip(x + eps * sign(grad_x objective(x, y)), 0, 1)
    targeted:    x_adv = clip(x + eps * sign(grad_x objective(x, t)), 0, 1)

where the objective is the one ``sources.attack_dlogits`` tabulates for
``wrt`` (it is increased; for ``wrt="loss"`` the targeted objective is minus
the target's cross-entropy). The default, ``wrt="loss", T=1``, is the paper's:
the cross-entropy of the deployed softmax.

The sign hides the gradient's *size*, so FGSM only fails where the gradient is
*exactly zero*: sign(0) = 0 leaves the pixel alone. On a network trained at a
high T and deployed at T = 1 that is what float32 gives for most images.

Two formulations of the loss gradient (``wrt="loss"`` only; the probabilities
and the logits have one):

``formulation="exact"`` (default)
    ``(p - onehot) / T`` with ``p_y - 1`` computed as ``-sum_{j != y} p_j``
    (``losses.cross_entropy_dlogits``): no cancellation, so a saturated image
    keeps its true gradient, pushing the true class down *and* the others up.
    It exists to measure what the model really offers an attacker.
``formulation="paper"``
    ``softmax(z / T) - onehot`` evaluated in the model's float32, as
    frameworks (and so the published attacks) compute it
    (``losses.softmax_minus_onehot_dlogits``). Once p_y rounds to 1.0 the
    entry at y is exactly 0: the gradient keeps only the tiny push up on the
    other classes, a different direction, and a different sign pattern. It
    exists to reproduce published numbers like for like.

They differ only in the entry of the class whose loss is taken, and by at
most a few float32 roundings of 1 (about 1e-7 / T): nothing while 1 - p_y is
large, the whole entry once p_y rounds to 1.0. A targeted attack takes the
loss of a target the model gives a small p_t, so there the two coincide; the
untargeted attack on a confidently classified image is where they part.
"""
import numpy as np
from ..progress import tqdm          # a bar on a terminal, a line now and then in a log

from .common import batches, make_result, prepare
from ..functional import check_T
from .sources import attack_gradient, check_wrt
from ..losses import check_formulation


def fgsm(model, x, labels, eps, targets=None, wrt="loss", T=1.0, batch_size=100, progress=False,
         formulation="exact"):
    """Fast gradient sign method, batched.

    Parameters
    ----------
    model : Sequential
    x : (N, C, H, W) images in [0, 1] (NumPy or the model's array module)
    labels : (N,) int true classes
    eps : float >= 0, the L-infinity size of the step
    targets : (N,) int target classes, or None (untargeted)
    wrt : "loss" (default, as Goodfellow et al.), "probs" or "logits": what is differentiated
    T : float > 0, the softmax temperature of "loss" / "probs" (ignored for "logits")
    batch_size : images per forward/backward pass
    formulation : "exact" (default) or "paper": how the loss gradient is evaluated
        (see the module docstring; no effect for "probs" and "logits")

    Returns
    -------
    x_adv : (N, C, H, W) NumPy; result : AttackResult
    """
    check_wrt(wrt, who="FGSM")
    T = check_T(T)
    check_formulation(formulation, "FGSM's loss gradient")
    if not (isinstance(eps, (int, float, np.floating)) and eps >= 0 and np.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    x, labels, targets = prepare(model, x, labels, targets)
    xp = model.xp
    x_adv = xp.empty_like(x)
    pred_before = xp.empty(len(x), dtype=xp.int64)
    for sl in tqdm(batches(len(x), batch_size), desc="FGSM", disable=not progress):
        t = None if targets is None else targets[sl]
        g, z = attack_gradient(model, x[sl], labels[sl], wrt, T, t, formulation)
        pred_before[sl] = z.argmax(axis=1)
        step = x.dtype.type(eps) * xp.sign(g)            # sign(0) = 0: a masked pixel does not move
        x_adv[sl] = xp.clip(x[sl] + step, 0, 1)           # stay a valid image
    ones = np.ones(len(x), dtype=np.int64)
    result = make_result("fgsm", wrt, T, {"eps": float(eps)}, model, x, x_adv, labels, targets,
                         pred_before, iterations=ones, gradient_evals=ones, formulation=formulation)
    return result.x_adv, result
