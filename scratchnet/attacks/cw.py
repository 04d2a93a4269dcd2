"""Carlini and Wagner's L2 attack (arXiv 1608.04644), written out step by step.

Minimise over w, for each image x (target t, or true label y if untargeted)::

    x_adv = (tanh(w) + 1) / 2                  # the change of variables: always in [0, 1]
    loss  = ||x_adv - x||_2^2 + c * f6(x_adv)

with their objective f6 on the logits Z (``wrt="logits"``, the default)::

    targeted:    f6 = max(max_{i != t} Z_i - Z_t, -kappa)
    untargeted:  f6 = max(Z_y - max_{i != y} Z_i, -kappa)

minimised with Adam, and a binary search over c per image: where an
adversarial example was found, c is lowered (a smaller distortion may still
work); where none was, c is raised (ten-fold until an upper bound is known).
The smallest-L2 adversarial example seen is kept.

The paper's budget (their public code's defaults): 9 binary-search rounds, up
to 10,000 Adam steps each, learning rate 0.01, initial c = 1e-3, and an early
abort: every tenth of the steps, a round stops once its loss has not fallen
by 0.01 % since the last check (``PAPER_BUDGET``; ``abort_early``). The
defaults here are far smaller (5 x 100 steps at lr 0.05) so that it runs on a
CPU; with fewer steps the optimisation stops earlier and the distortions it
finds are larger.

``wrt="probs"`` applies the same f6 to Z = softmax(z / T) instead (kappa then
in probability units): at the deployed T = 1 of a high-temperature network its
gradient is masked, which is why Carlini and Wagner attack the logits.
Images where no adversarial example is found are returned unchanged.
"""
import numpy as np
from ..progress import tqdm          # a bar on a terminal, a line now and then in a log

from .. import functional as F
from ..backend import get_array_module, to_numpy
from .common import batches, make_result, prepare
from ..functional import check_T
from ..losses import one_hot
from .sources import check_wrt, objective_gradient, probs_dlogits

BIG = 1e10          # "no upper bound on c found yet"
# Carlini and Wagner's L2 attack as published (their public code's defaults)
PAPER_BUDGET = {"binary_steps": 9, "steps": 10000, "lr": 0.01, "c": 1e-3, "abort_early": True}


def f6(Z, cls, kappa, targeted):
    """Carlini and Wagner's f6 and its gradient w.r.t. Z.

    Parameters
    ----------
    Z : (n, K) the class outputs attacked (logits, or probabilities)
    cls : (n,) int, the target (targeted) or the true label (untargeted)
    kappa : float >= 0, the confidence margin

    Returns
    -------
    f : (n,) values; dZ : (n, K) df/dZ; margin : (n,) how far past the
        boundary x_adv is (Z_t - max other, or max other - Z_y)
    """
    xp = get_array_module(Z)
    n, K = Z.shape
    e = one_hot(cls, K, xp, Z.dtype)
    others = xp.where(e > 0, -xp.inf, Z)
    j = others.argmax(axis=1)                                  # the strongest rival class
    rival = one_hot(j, K, xp, Z.dtype)
    Z_cls, Z_rival = Z[xp.arange(n), cls], others[xp.arange(n), j]
    margin = (Z_cls - Z_rival) if targeted else (Z_rival - Z_cls)
    f = xp.maximum(-margin, -kappa)
    active = (-margin > -kappa)[:, None]                      # the max picks -margin here
    dZ = active * ((rival - e) if targeted else (e - rival))
    return f, dZ, margin


def cw_l2(model, x, labels, targets=None, wrt="logits", T=1.0, kappa=0.0, c=0.1,
          binary_steps=5, steps=100, lr=0.05, abort_early=False, batch_size=100, progress=False):
    """Carlini-Wagner L2, batched.

    Parameters
    ----------
    x : (N, C, H, W) images in [0, 1]; labels : (N,) int
    targets : (N,) int, or None for the untargeted attack
    wrt : "logits" (default, as the paper) or "probs" (f6 on softmax(z / T))
    T : the temperature of "probs" (ignored for "logits")
    kappa : float >= 0, confidence: the margin f6 asks for
    c : float > 0, the initial trade-off constant
    binary_steps : int >= 1, rounds of the search over c
    steps : int >= 1, Adam steps per round (modest by default so it runs on a CPU;
        the paper uses up to 10,000)
    lr : Adam's learning rate in w-space. The paper's 0.01 needs thousands of
        steps: a pixel at 0 or 1 starts at w = arctanh(-+0.999999) = -+7.25, and
        Adam moves w by about lr per step. 0.05 reaches the paper's success rates
        in 100 steps on MNIST.
    abort_early : stop an image's round once its loss ||d||^2 + c f6 has not
        fallen below 0.9999 of its value at the previous check (checks every
        steps // 10 steps), as in Carlini and Wagner's code; the batch's round
        ends when every image has stopped

    Returns
    -------
    x_adv : (N, C, H, W) NumPy (the original image where the attack failed);
    result : AttackResult (``extra["final_c"]``: each image's last c;
        ``gradient_evals``: the Adam steps each image took, over all rounds)
    """
    check_wrt(wrt, ("logits", "probs"), "C&W (its f6 objective is defined on class outputs)")
    T = check_T(T)
    for name, v, ok in (("kappa", kappa, kappa >= 0), ("c", c, c > 0), ("lr", lr, lr > 0),
                        ("binary_steps", binary_steps, isinstance(binary_steps, (int, np.integer)) and binary_steps >= 1),
                        ("steps", steps, isinstance(steps, (int, np.integer)) and steps >= 1)):
        if not ok:
            raise ValueError(f"{name} must be {'an integer >= 1' if 'steps' in name else ('>= 0' if name == 'kappa' else '> 0')}, got {v!r}")
    x, labels, targets = prepare(model, x, labels, targets)
    xp = model.xp
    dt = x.dtype.type
    targeted = targets is not None
    N = len(x)
    pred_before = model.predict(x)
    x_best = x.copy()
    best_l2 = np.full(N, np.inf)
    final_c = np.zeros(N)
    evals = np.zeros(N, dtype=np.int64)
    check_every = max(1, steps // 10)                 # abort_early's checkpoints
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
    for sl in tqdm(batches(N, batch_size), desc="C&W L2", disable=not progress):
        xb = x[sl]
        cls = targets[sl] if targeted else labels[sl]
        n = len(xb)
        # tanh change of variables; shrink x a hair so arctanh(+-1) stays finite
        w0 = xp.arctanh((2 * xb - 1) * dt(1 - 1e-6))
        cc = np.full(n, float(c))
        lo, hi = np.zeros(n), np.full(n, BIG)
        for _ in range(binary_steps):
            w = w0.copy()
            m, v = xp.zeros_like(w), xp.zeros_like(w)
            found = np.zeros(n, dtype=bool)
            c_dev = xp.asarray(cc, dtype=x.dtype)[:, None]
            active = np.ones(n, dtype=bool)           # images still optimising in this round
            prev = np.full(n, np.inf)                 # each image's loss at the last checkpoint

            def objective(z):
                """f6 on the attacked output, and its logits cotangent (times c)."""
                Z = F.softmax_forward(z, T)[0] if wrt == "probs" else z   # softmax(z / T) or z
                f, dZ, margin = f6(Z, cls, dt(kappa), targeted)
                dz = c_dev * dZ
                if wrt == "probs":
                    dz = probs_dlogits(z, dz, T)      # p_i (delta_ij - p_j) / T: masked at T = 1
                return (f, margin), dz

            for it in range(1, steps + 1):
                tw = xp.tanh(w)
                xa = (tw + 1) / 2                     # the change of variables: x_adv in [0, 1]
                g_f, (f, margin), z = objective_gradient(model, xa, objective)
                d = xa - xb
                l2 = to_numpy((d * d).reshape(n, -1).sum(axis=1)).astype(np.float64) ** 0.5
                # adversarial at this iterate: predicted class right, and the margin kappa met
                pred = z.argmax(axis=1)
                hit = to_numpy(((pred == cls) if targeted else (pred != cls)) & (margin >= dt(kappa)))
                better = hit & (l2 < best_l2[sl])
                if better.any():
                    rows = np.flatnonzero(better)
                    best_l2[sl.start + rows] = l2[rows]
                    x_best[xp.asarray(sl.start + rows)] = xa[xp.asarray(rows)]
                found |= hit & active
                if abort_early and (it - 1) % check_every == 0:
                    # Carlini and Wagner's early abort: stop where the loss no longer falls
                    loss = l2 ** 2 + cc * to_numpy(f).astype(np.float64)
                    active &= ~(loss > prev * 0.9999)
                    prev = np.where(active, loss, prev)
                    if not active.any():
                        break
                evals[sl.start + np.flatnonzero(active)] += 1
                # gradient of ||d||^2 + c f6 w.r.t. x_adv, then through x_adv = (tanh(w) + 1) / 2
                g = 2 * d + g_f
                g = g * (1 - tw * tw) / 2
                # Adam (an image that aborted keeps its w: its step is masked to 0)
                m = beta1 * m + (1 - beta1) * g
                v = beta2 * v + (1 - beta2) * g * g
                m_hat = m / dt(1 - beta1 ** it)
                v_hat = v / dt(1 - beta2 ** it)
                move = xp.asarray(active, dtype=x.dtype).reshape((n,) + (1,) * (w.ndim - 1))
                w = w - move * dt(lr) * m_hat / (xp.sqrt(v_hat) + dt(adam_eps))
            # binary search over c: lower it where we succeeded, raise it where we did not
            final_c[sl] = cc
            hi = np.where(found, np.minimum(hi, cc), hi)
            lo = np.where(found, lo, np.maximum(lo, cc))
            cc = np.where(hi < BIG, (lo + hi) / 2, cc * 10)
    params = {"kappa": float(kappa), "c": float(c), "binary_steps": int(binary_steps),
              "steps": int(steps), "lr": float(lr), "abort_early": bool(abort_early)}
    result = make_result("cw", wrt, T, params, model, x, x_best, labels, targets, pred_before,
                         iterations=evals, gradient_evals=evals, extra={"final_c": final_c.tolist()})
    return result.x_adv, result
