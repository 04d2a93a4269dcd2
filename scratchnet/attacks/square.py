"""The Square attack, L-infinity (Andriushchenko, Croce, Flammarion and Hein, ECCV 2020).

"Square Attack: a query-efficient black-box adversarial attack via random
search", arXiv 1912.00049, Algorithm 1 with the L-infinity proposal. It only
*queries* the model's scores, never its gradient::

    x_best = clip(x + eps * vertical stripes of random sign)      # the first query
    repeat:
        pick a random s x s window (per image); set the perturbation inside it to
        +eps or -eps (one random sign per channel)
        x_new = clip(x + new perturbation, 0, 1)                   # one query
        keep x_new if the margin loss went down

The window side s = sqrt(p * H * W) shrinks as p follows the paper's schedule
(p_init halved after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000
queries, rescaled to the query budget as in the authors' code). Every
proposal is a vertex of the eps-box, where the L-infinity optimum tends to lie.

The margin loss (minimised; the image is adversarial once it is below 0)::

    untargeted:  L = s_y - max_{j != y} s_j
    targeted:    L = max_{j != t} s_j - s_t

with the scores s = the logits (``output="logits"``, the default), or the
deployed probabilities softmax(z / T) (``output="probs"``). ``model.backward``
is never called, so no masking of the *gradient* can stop this attack. A
masking of the *scores* can: a float32 softmax saturated to exactly 1.0 and 0
gives the same margin, 1, for every proposal near the image, and the random
search has nothing to compare. (Returning log-probabilities instead would be
the logit margin divided by T, as good as the logits.)

Images the model already misclassifies are not attacked (no queries), nor is
anything at eps = 0.
"""
import math

import numpy as np
from ..progress import tqdm          # a bar on a terminal, a line now and then in a log

from .. import functional as F
from ..backend import get_array_module, to_numpy
from .common import batches, make_result, prepare
from ..functional import check_T
from ..losses import one_hot

OUTPUTS = ("logits", "probs")
# queries after which p is halved, for a budget of 10,000 (rescaled to the budget)
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init, it, queries):
    """The fraction p of the image a square covers at iteration ``it`` (the paper's schedule)."""
    it = int(it / queries * 10000)               # the schedule is written for 10,000 queries
    halvings = sum(it > b for b in P_SCHEDULE)
    return p_init / 2 ** halvings


def margin_loss(scores, labels, targets=None):
    """The margin the Square attack minimises, per image (N,); below 0 means adversarial.

    Parameters
    ----------
    scores : (N, K) logits or probabilities
    labels : (N,) int true classes; targets : (N,) int or None
    """
    xp = get_array_module(scores)
    cls = labels if targets is None else targets
    e = one_hot(cls, scores.shape[1], xp, scores.dtype)
    s_cls = scores[xp.arange(len(scores)), cls]
    s_other = xp.where(e > 0, -xp.inf, scores).max(axis=1)     # the best class other than cls
    return (s_cls - s_other) if targets is None else (s_other - s_cls)


def square_linf(model, x, labels, eps, queries=1000, p_init=0.8, targets=None, output="logits", T=1.0,
                seed=0, batch_size=100, progress=False):
    """Square attack in the L-infinity ball, batched; score-based, no gradients.

    Parameters
    ----------
    model : Sequential (only ``model.logits`` is called)
    x : (N, C, H, W) images in [0, 1]; labels : (N,) int true classes
    eps : float >= 0, the L-infinity budget
    queries : int >= 1, the most queries (forward passes) per image, the first
        being the striped starting point
    p_init : float in (0, 1], the starting fraction of pixels a square covers
        (0.8, AutoAttack's value; the paper tuned 0.05 for ImageNet)
    targets : (N,) int or None
    output : "logits" (default) or "probs" (softmax(z / T), the deployed scores)
    T : float > 0, the temperature of "probs"
    seed : the random search is reproducible from it
    batch_size : images queried together

    Returns
    -------
    x_adv : (N, C, H, W) NumPy; result : AttackResult with ``iterations`` =
        ``extra["queries"]`` = queries used per image (0 for images
        misclassified from the start), ``gradient_evals`` = 0, and
        ``extra["final_margin"]`` (the margin loss of x_adv; None where no query was made).
    """
    if not (isinstance(eps, (int, float, np.floating, np.integer)) and not isinstance(eps, bool)
            and eps >= 0 and np.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(queries, (int, np.integer)) and not isinstance(queries, bool) and queries >= 1):
        raise ValueError(f"queries must be an integer >= 1, got {queries!r}")
    if not (0 < p_init <= 1):
        raise ValueError(f"p_init must lie in (0, 1], got {p_init!r}")
    if output not in OUTPUTS:
        raise ValueError(f"the Square attack reads the scores of one of {', '.join(OUTPUTS)} (output=...), "
                         f"got {output!r}")
    T = check_T(T)
    x, labels, targets = prepare(model, x, labels, targets)
    xp = model.xp
    dt = x.dtype.type
    N, C, H, W = x.shape
    rng = np.random.default_rng(seed)
    targeted = targets is not None

    def query(xq, yq, tq):
        """One forward pass: (margin (n,), reached (n,) bool). Never a backward pass."""
        z = model.logits(xq)
        scores = F.softmax_forward(z, T)[0] if output == "probs" else z   # softmax(z / T) or z
        pred = z.argmax(axis=1)
        return margin_loss(scores, yq, tq), (pred == tq) if targeted else (pred != yq)

    pred_before = model.predict(x)
    x_adv = x.copy()
    n_queries = np.zeros(N, dtype=np.int64)
    final_margin = np.full(N, np.nan)
    bar = tqdm(total=N, desc="Square", unit="img", disable=not progress)
    for sl in batches(N, batch_size):
        idx = np.arange(sl.start, sl.stop)
        ix = xp.asarray(idx)
        yb = labels[ix]
        tb = targets[ix] if targeted else None
        start_ok = to_numpy((xp.asarray(pred_before[idx]) == tb) if targeted
                            else (xp.asarray(pred_before[idx]) != yb))
        todo = idx[~start_ok]                       # already adversarial: nothing to do, no query
        if len(todo) == 0 or eps == 0:
            bar.update(len(idx))
            continue
        it = xp.asarray(todo)
        x0 = x[it]
        y_t = labels[it]
        t_t = targets[it] if targeted else None
        # ----- the first query: vertical stripes of +-eps (one sign per channel and column) -----
        stripes = rng.choice([-1.0, 1.0], size=(len(todo), C, 1, W))
        x_best = xp.clip(x0 + xp.asarray(eps * stripes, dtype=x.dtype), 0, 1)
        loss_min, done = query(x_best, y_t, t_t)
        used = np.ones(len(todo), dtype=np.int64)
        rows, cols = xp.arange(H), xp.arange(W)
        for i in range(1, queries):
            active = np.flatnonzero(~to_numpy(done))
            if len(active) == 0:
                break
            a = xp.asarray(active)
            xa, xb_a = x0[a], x_best[a]
            n = len(active)
            p = p_selection(p_init, i - 1, queries)
            s = max(min(int(round(math.sqrt(p * H * W))), H - 1, W - 1), 1)   # the square's side
            # one random window per image
            vh = xp.asarray(rng.integers(0, H - s + 1, n))
            vw = xp.asarray(rng.integers(0, W - s + 1, n))
            in_h = (rows[None, :] >= vh[:, None]) & (rows[None, :] < vh[:, None] + s)   # (n, H)
            in_w = (cols[None, :] >= vw[:, None]) & (cols[None, :] < vw[:, None] + s)   # (n, W)
            window = (in_h[:, :, None] & in_w[:, None, :])[:, None, :, :]              # (n, 1, H, W)
            delta = xb_a - xa
            x_new = xb_a
            pending = np.ones(n, dtype=bool)
            # a proposal that changes nothing (the window already holds that sign) wastes a
            # query: draw the signs again for those images, as the authors' code does
            for _ in range(20):
                signs = xp.asarray(rng.choice([-1.0, 1.0], size=(n, C, 1, 1)), dtype=x.dtype)
                prop = xp.clip(xa + xp.where(window, dt(eps) * signs, delta), 0, 1)
                p_dev = xp.asarray(pending)[:, None, None, None]
                x_new = xp.where(p_dev, prop, x_new)
                same = to_numpy((xp.abs(x_new - xb_a) * window).reshape(n, -1).max(axis=1) < 1e-7)
                pending = pending & same
                if not pending.any():
                    break
            margin, hit = query(x_new, y_t[a], None if t_t is None else t_t[a])
            used[active] += 1
            improved = (margin < loss_min[a]) | hit
            x_best[a] = xp.where(improved[:, None, None, None], x_new, xb_a)
            loss_min[a] = xp.where(improved, margin, loss_min[a])
            done[a] = done[a] | hit
        x_adv[it] = x_best
        n_queries[todo] = used
        final_margin[todo] = to_numpy(loss_min).astype(np.float64)
        bar.update(len(idx))
    bar.close()

    params = {"eps": float(eps), "queries": int(queries), "p_init": float(p_init), "output": output,
              "seed": int(seed)}
    extra = {"queries": n_queries.tolist(),
             "final_margin": [None if np.isnan(m) else float(m) for m in final_margin]}   # None: not attacked
    result = make_result("square", output, T, params, model, x, x_adv, labels, targets, pred_before,
                         iterations=n_queries, gradient_evals=np.zeros(N, dtype=np.int64), extra=extra)
    return result.x_adv, result
