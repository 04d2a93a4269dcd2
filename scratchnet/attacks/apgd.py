"""APGD: projected gradient ascent with an automatic step size (Croce and Hein, ICML 2020).

"Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", arXiv 2003.01690, Algorithm 1. PGD with a fixed step
needs tuning and stalls; APGD needs none:

* start from x (or a random point of the eps-ball) with step eta = 2 eps;
* each step goes along the sign (L-infinity) or the unit direction (L2) of the
  loss gradient, projects onto the ball and [0, 1], and adds momentum::

      z_{k+1} = P(x_k + eta * dir(grad f(x_k)))
      x_{k+1} = P(x_k + 0.75 (z_{k+1} - x_k) + 0.25 (x_k - x_{k-1}))   (no momentum at k = 0)

* at the checkpoints w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22,
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), the step is halved and the
  iterate moved back to the best point seen so far, x_max, when

      condition 1: fewer than rho = 0.75 of the steps since the last checkpoint
                   increased the loss (the step is too large: it oscillates), or
      condition 2: the step was not halved at the last checkpoint and the best
                   loss has not improved since (it is stuck).

Two losses (``loss=``), both *increased*:

``"ce"``
    the cross-entropy of softmax(z / T) (targeted: minus that of the target).
    At the deployed T = 1 on a network trained at a high T its gradient is
    exactly zero in float32 (``sources.py``): APGD-CE is masked exactly as
    FGSM is. At T = T_train (Carlini and Wagner's rescaling) it works again.
``"dlr"``
    the difference-of-logits ratio (``dlr.py``), invariant to shifting and
    scaling the logits: the T-fold growth of the logits cancels out of it, so
    APGD-DLR sees the temperature network as it sees the standard one. T plays
    no role.

Every image runs all ``steps`` (the loss keeps rising after success, which the
indicators of attack failure read); the returned image is the adversarial
iterate with the highest loss where one was found, else x_max. Per-image loss
traces are kept in ``result.extra``.
"""
import math

import numpy as np
from ..progress import tqdm          # a bar on a terminal, a line now and then in a log

from .. import functional as F
from ..backend import get_array_module, to_numpy
from .common import batches, make_result, prepare
from .dlr import dlr_loss
from ..functional import check_T
from .sources import loss_dlogits, objective_gradient

LOSSES = ("ce", "dlr")
NORMS = ("linf", "l2")
MOMENTUM = 0.75           # alpha in the paper: weight of the new step against the last move
RHO = 0.75                # condition 1: the fraction of loss-increasing steps asked for


# ===== the two losses: values and logit gradients =====

def ce_objective(z, labels, T=1.0, targets=None):
    """Cross-entropy of softmax(z / T) as APGD increases it, and its logit gradient.

    Parameters
    ----------
    z : (N, K) logits; labels : (N,) int; T : float > 0
    targets : (N,) int or None

    Returns
    -------
    values : (N,)  CE(y) untargeted, -CE(t) targeted
    dz : (N, K)    (p - e_y) / T untargeted, -(p - e_t) / T targeted

    For a saturated float32 softmax p = e_y exactly: the value is 0 and dz is
    exactly zero. Nothing downstream can undo that.
    """
    xp = get_array_module(z)
    rows = xp.arange(z.shape[0])
    logp = F.log_softmax(z, T)                   # log softmax(z / T): the 1/T is inside
    if targets is None:
        return -logp[rows, labels], loss_dlogits(z, labels, T)
    return logp[rows, targets], -loss_dlogits(z, targets, T)


def attack_loss(z, labels, loss="ce", T=1.0, targets=None):
    """The APGD objective ``loss`` at logits z: (values (N,), dvalues/dz (N, K))."""
    if loss == "ce":
        return ce_objective(z, labels, T, targets)
    if loss == "dlr":
        return dlr_loss(z, labels, targets)           # no T: DLR is scale-invariant
    raise ValueError(f"APGD's loss must be one of {', '.join(LOSSES)}, got {loss!r}")


# ===== the schedule =====

def checkpoints(steps):
    """The step-size checkpoints w_j = ceil(p_j * steps) of the paper, w_0 = 0 excluded.

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), while
    p_j <= 1. For 100 steps: 22, 41, 57, 70, 80, 87, 93, 99.
    """
    p = [0.0, 0.22]
    while p[-1] <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # a hair below each product so that 0.41 * 100 = 41.000000000000007 rounds up to 41, not 42
    w = sorted({math.ceil(pj * steps - 1e-9) for pj in p[1:] if pj <= 1.0})
    return [wj for wj in w if 0 < wj <= steps]


# ===== projection and step direction =====

def _project(x0, x_new, eps, norm, xp):
    """Onto the eps-ball around x0 (L-infinity box, or L2 ball), then into [0, 1]."""
    if norm == "linf":
        return xp.clip(xp.minimum(xp.maximum(x_new, x0 - eps), x0 + eps), 0, 1)
    d = x_new - x0
    n = xp.sqrt((d * d).reshape(len(d), -1).sum(axis=1))
    shrink = xp.minimum(1, eps / xp.maximum(n, 1e-12))           # only points outside the ball move
    # clipping to [0, 1] afterwards only moves coordinates towards x0 (x0 is in [0, 1]),
    # so the L2 norm can only shrink: the result is still in the ball
    return xp.clip(x0 + d * shrink.reshape(-1, 1, 1, 1), 0, 1)


def _direction(g, norm, xp):
    """sign(g) for L-infinity; g / ||g||_2 for L2. A zero gradient gives a zero step."""
    if norm == "linf":
        return xp.sign(g)
    n = xp.sqrt((g * g).reshape(len(g), -1).sum(axis=1))
    return g / (n.reshape(-1, 1, 1, 1) + g.dtype.type(1e-12))


def _random_start(x0, eps, norm, rng, xp):
    """A random point at distance eps (in the attack's norm), clipped to [0, 1], as the paper's code."""
    if norm == "linf":
        u = rng.uniform(-1, 1, x0.shape)
        u /= np.abs(u).reshape(len(u), -1).max(axis=1).reshape(-1, 1, 1, 1)
    else:
        u = rng.standard_normal(x0.shape)
        u /= np.sqrt((u * u).reshape(len(u), -1).sum(axis=1)).reshape(-1, 1, 1, 1)
    return xp.clip(x0 + xp.asarray(eps * u, dtype=x0.dtype), 0, 1)


def _check(eps, norm, loss, steps, rho, T):
    if norm not in NORMS:
        raise ValueError(f"APGD's norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if loss not in LOSSES:
        raise ValueError(f"APGD's loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not (isinstance(eps, (int, float, np.floating, np.integer)) and not isinstance(eps, bool)
            and eps >= 0 and np.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (0 < rho <= 1):
        raise ValueError(f"rho must lie in (0, 1], got {rho!r}")
    return check_T(T)


# ===== the attack =====

def apgd(model, x, labels, eps, norm="linf", loss="ce", T=1.0, steps=100, targets=None,
         random_start=True, rho=RHO, seed=0, batch_size=100, progress=False):
    """Auto-PGD (APGD-CE / APGD-DLR), L-infinity or L2, untargeted or targeted, batched.

    Parameters
    ----------
    model : Sequential
    x : (N, C, H, W) images in [0, 1]; labels : (N,) int true classes
    eps : float >= 0, the radius of the ball (L-infinity or L2)
    norm : "linf" or "l2"
    loss : "ce" (cross-entropy of softmax(z / T)) or "dlr" (difference-of-logits ratio)
    T : float > 0, the temperature of "ce" (ignored by "dlr")
    steps : int >= 1, the iterations N_iter: ``steps`` backward passes and
        ``steps + 1`` forward passes per image (the last iterate's loss needs no gradient)
    targets : (N,) int target classes, or None (untargeted). Targeted DLR is the
        paper's ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``; it needs 4 classes.
    random_start : start from a random point at distance eps (the paper's code), else from x
    rho : condition 1's threshold (0.75 in the paper)
    seed : for the random start
    batch_size : images attacked together
    progress : show a progress bar over batches and steps

    Returns
    -------
    x_adv : (N, C, H, W) NumPy; result : AttackResult with ``extra``:
        ``loss_trace`` (N, steps + 1) the loss at each iterate x_0 ... x_steps;
        ``best_loss`` (N,) f(x_max); ``first_success_step`` (N,) the first
        iterate that was adversarial (-1: none); ``best_loss_point_adversarial``
        (N,) whether x_max itself is adversarial; ``step_halvings`` (N,);
        ``checkpoints`` the w_j used. All as lists (JSON-able).
    """
    T = _check(eps, norm, loss, steps, rho, T)
    x, labels, targets = prepare(model, x, labels, targets)
    xp = model.xp
    dt = x.dtype.type
    N = len(x)
    rng = np.random.default_rng(seed)
    W = set(checkpoints(steps))
    pred_before = model.predict(x)
    x_adv = x.copy()
    trace = np.zeros((N, steps + 1))
    best_loss = np.zeros(N)
    first_success = np.full(N, -1, dtype=np.int64)
    best_is_adv = np.zeros(N, dtype=bool)
    halvings = np.zeros(N, dtype=np.int64)
    targeted = targets is not None

    def objective_for(yb, tb):
        return lambda z: attack_loss(z, yb, loss, T, tb)

    def reached(z, yb, tb):
        pred = z.argmax(axis=1)
        return (pred == tb) if targeted else (pred != yb)

    bar = tqdm(total=N * steps, desc=f"APGD-{loss.upper()}", unit="img-step", disable=not progress)
    for sl in batches(N, batch_size):
        x0, yb = x[sl], labels[sl]
        tb = targets[sl] if targeted else None
        n = len(x0)
        objective = objective_for(yb, tb)
        eps_dt = dt(eps)

        # ----- x_0 and its gradient -----
        x_cur = _random_start(x0, eps, norm, rng, xp) if random_start else x0.copy()
        g, f, z = objective_gradient(model, x_cur, objective)
        adv = reached(z, yb, tb)
        trace[sl, 0] = to_numpy(f)
        x_max, f_max, g_max = x_cur.copy(), f.copy(), g.copy()
        adv_at_max = adv.copy()
        best_adv_f = xp.where(adv, f, -xp.inf)        # loss of the best adversarial iterate so far
        x_out = xp.where(adv[:, None, None, None], x_cur, x0)
        first = xp.where(adv, 0, -1)

        eta = xp.full((n, 1, 1, 1), dt(2 * eps))       # eta^(0) = 2 eps, one step size per image
        x_prev = x_cur                                  # no momentum at the first step
        f_last = f.copy()                               # loss of the point each step leaves from
        increases = xp.zeros(n, dtype=xp.int64)         # loss-increasing steps since the last checkpoint
        w_last = 0
        f_max_at_last = f_max.copy()
        halved_at_last = xp.zeros(n, dtype=bool)
        n_halved = xp.zeros(n, dtype=xp.int64)

        for k in range(1, steps + 1):
            a = dt(MOMENTUM) if k > 1 else dt(1.0)
            z_step = _project(x0, x_cur + eta * _direction(g, norm, xp), eps_dt, norm, xp)
            x_new = _project(x0, x_cur + a * (z_step - x_cur) + (1 - a) * (x_cur - x_prev), eps_dt, norm, xp)
            x_prev, x_cur = x_cur, x_new
            if k < steps:
                g, f, z = objective_gradient(model, x_cur, objective)
            else:                                       # the last iterate: its loss, no gradient
                z = model.logits(x_cur)
                f, _ = objective(z)
            adv = reached(z, yb, tb)
            trace[sl, k] = to_numpy(f)

            increases += f > f_last
            f_last = f
            better = f > f_max
            x_max = xp.where(better[:, None, None, None], x_cur, x_max)
            g_max = xp.where(better[:, None, None, None], g, g_max)
            f_max = xp.where(better, f, f_max)
            adv_at_max = xp.where(better, adv, adv_at_max)
            better_adv = adv & (f > best_adv_f)
            x_out = xp.where(better_adv[:, None, None, None], x_cur, x_out)
            best_adv_f = xp.where(better_adv, f, best_adv_f)
            first = xp.where(adv & (first < 0), k, first)

            if k in W and k < steps:
                cond1 = increases < rho * (k - w_last)                  # oscillating
                cond2 = ~halved_at_last & (f_max <= f_max_at_last)      # stuck
                halve = cond1 | cond2
                eta = xp.where(halve[:, None, None, None], eta / 2, eta)
                x_cur = xp.where(halve[:, None, None, None], x_max, x_cur)   # restart from the best point
                g = xp.where(halve[:, None, None, None], g_max, g)
                f_last = xp.where(halve, f_max, f_last)
                n_halved += halve
                halved_at_last, f_max_at_last = halve, f_max.copy()
                increases[:] = 0
                w_last = k
            bar.update(n)

        found = best_adv_f > -xp.inf
        x_adv[sl] = xp.where(found[:, None, None, None], x_out, x_max)
        best_loss[sl] = to_numpy(f_max)
        first_success[sl] = to_numpy(first)
        best_is_adv[sl] = to_numpy(adv_at_max)
        halvings[sl] = to_numpy(n_halved)
    bar.close()

    params = {"eps": float(eps), "norm": norm, "loss": loss, "steps": int(steps),
              "random_start": bool(random_start), "rho": float(rho), "momentum": MOMENTUM, "seed": int(seed)}
    extra = {"loss_trace": trace.tolist(), "best_loss": best_loss.tolist(),
             "first_success_step": first_success.tolist(),
             "best_loss_point_adversarial": best_is_adv.tolist(),
             "step_halvings": halvings.tolist(), "checkpoints": sorted(W)}
    full = np.full(N, steps, dtype=np.int64)
    result = make_result(f"apgd-{loss}", "loss" if loss == "ce" else "logits", T, params, model, x, x_adv,
                         labels, targets, pred_before, iterations=full, gradient_evals=full, extra=extra)
    return result.x_adv, result
