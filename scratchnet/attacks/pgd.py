"""BIM / PGD: iterated gradient-sign steps inside an L-infinity ball.

Kurakin et al.'s basic iterative method (BIM) and Madry et al.'s projected
gradient descent (PGD, the same with a random start)::

    x_0     = x                     (or x + uniform(-eps, eps) with random_start)
    x_{k+1} = project(x_k + step * sign(grad_x objective(x_k)))

``project`` clips to the box [x - eps, x + eps] and to [0, 1]. The objective
is the one ``sources.attack_dlogits`` tabulates for ``wrt``; the default is
the loss at T = 1, as in the papers. An image stops moving as soon as the
attack succeeds on it, so ``iterations`` is the number of steps it needed.

``formulation`` ("exact" | "paper") picks how the loss gradient is evaluated,
exactly as in ``fgsm``: cancellation-free, or ``softmax - onehot`` in the
model's float32 as frameworks (and the papers) compute it.
"""
import numpy as np
from ..progress import tqdm          # a bar on a terminal, a line now and then in a log

from ..backend import to_numpy
from .common import batches, make_result, prepare
from ..functional import check_T
from .sources import attack_gradient, check_wrt
from ..losses import check_formulation


def pgd(model, x, labels, eps, step=None, steps=10, targets=None, wrt="loss", T=1.0,
        random_start=False, seed=0, batch_size=100, progress=False, formulation="exact"):
    """L-infinity BIM / PGD, batched.

    Parameters
    ----------
    x : (N, C, H, W) images in [0, 1]; labels : (N,) int
    eps : float >= 0, the L-infinity budget
    step : float > 0, the size of each sign step (default eps / 4, at least eps / steps)
    steps : int >= 1, the most steps per image
    targets : (N,) int or None
    wrt, T : what is differentiated (see ``fgsm``)
    random_start : start from a uniform point in the eps-ball (PGD) instead of x (BIM)
    seed : for the random start
    formulation : "exact" (default) or "paper", the loss gradient's (see ``fgsm``)

    Returns
    -------
    x_adv : (N, C, H, W) NumPy; result : AttackResult
    """
    check_wrt(wrt, who="PGD")
    T = check_T(T)
    check_formulation(formulation, "PGD's loss gradient")
    if not (isinstance(eps, (int, float, np.floating)) and eps >= 0 and np.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(steps, (int, np.integer)) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if step is None:
        step = max(eps / 4, eps / steps)
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step!r}")
    x, labels, targets = prepare(model, x, labels, targets)
    xp = model.xp
    dt = x.dtype.type
    rng = np.random.default_rng(seed)
    lo, hi = xp.clip(x - dt(eps), 0, 1), xp.clip(x + dt(eps), 0, 1)  # the box we project onto
    x_adv = x.copy()
    if random_start:
        x_adv = xp.clip(x_adv + xp.asarray(rng.uniform(-eps, eps, x.shape), dtype=x.dtype), lo, hi)
    pred_before = model.predict(x)
    iterations = np.zeros(len(x), dtype=np.int64)
    for sl in tqdm(batches(len(x), batch_size), desc="PGD", disable=not progress):
        idx = np.arange(sl.start, sl.stop)
        for _ in range(steps):
            ix = xp.asarray(idx)
            t = None if targets is None else targets[ix]
            g, z = attack_gradient(model, x_adv[ix], labels[ix], wrt, T, t, formulation)
            pred = z.argmax(axis=1)
            done = to_numpy((pred == t) if targets is not None else (pred != labels[ix]))
            active = ~done                      # images still to move
            if not active.any():
                break
            idx, g = idx[active], g[xp.asarray(active)]
            ix = xp.asarray(idx)
            moved = x_adv[ix] + dt(step) * xp.sign(g)
            x_adv[ix] = xp.minimum(xp.maximum(moved, lo[ix]), hi[ix])   # project
            iterations[idx] += 1
    params = {"eps": float(eps), "step": float(step), "steps": int(steps),
              "random_start": bool(random_start), "seed": int(seed)}
    # One forward + backward pass per loop turn: ``iterations`` sign steps, plus the
    # pass that found success (not needed when all ``steps`` were used).
    gradient_evals = np.minimum(iterations + 1, steps)
    result = make_result("pgd", wrt, T, params, model, x, x_adv, labels, targets, pred_before,
                         iterations=iterations, gradient_evals=gradient_evals, formulation=formulation)
    return result.x_adv, result
