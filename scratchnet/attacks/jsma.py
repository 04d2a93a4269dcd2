"""JSMA: the Jacobian-based saliency map attack (Papernot et al., arXiv 1511.07528).

The attack used in the defensive-distillation paper: targeted, *increasing*
pixels (theta = +1), two pixels at a time, until the model predicts the target
or a maximum distortion (default 14.5 % of the pixels) is reached.

One iteration, for an image x and target class t:

1. Two vector-Jacobian products of one forward pass (no full 10-class Jacobian):
   ``alpha = d F_t / dx`` (the target's gradient) and
   ``beta = d sum_{j != t} F_j / dx`` (the other classes' summed gradient),
   where F is the output named by ``wrt``: the probabilities softmax(z / T)
   (``"probs"``, the default: what Papernot et al. attacked, at the deployed
   T = 1) or the logits (``"logits"``, Carlini and Wagner's JSMA-Z).
2. The saliency map over pixel *pairs* (p, q) still in the search domain:
   with A = alpha_p + alpha_q and B = beta_p + beta_q, a pair qualifies when
   A > 0 (raising both pixels helps the target) and B < 0 (and hurts the
   others); the chosen pair maximises A * |B|.
3. Both pixels go up by theta (clipped at 1) and, at the maximum, leave the domain.

A peer library's JSMA scores pixels by the target's gradient alone; that is
not the published attack. Here both terms are used.

On a network trained at a high T and deployed at T = 1, ``wrt="probs"`` gives
alpha = beta = 0 exactly in float32 for most images: no pair qualifies, and the
attack stops with an empty saliency map. That is gradient masking, and
``extra["empty_saliency"]`` counts it.

Two formulations of the pair scores (the gradients alpha and beta are the
same in both; only the arithmetic of step 2 differs):

``formulation="exact"`` (default)
    alpha and beta are first divided, per image, by their largest |entry|.
    A positive factor changes no condition and no argmax, but products of tiny
    float32 gradients (1e-25 * 1e-25 = 1e-50, below float32's smallest
    number, 1.4e-45) no longer underflow to 0. It exists to find every pair
    the gradient really ranks, so that a failure means the gradient is zero,
    not that float32 rounded a product away.
``formulation="paper"``
    Papernot et al.'s Algorithm 3 as published and as the common float32
    implementations compute it: the products A * |B| of the raw gradients, in
    the model's dtype, kept only when strictly above the starting best of 0.
    Where every admissible product underflows, all scores tie at 0, no pair is
    chosen and the search ends (counted in ``empty_saliency``). (Some float32
    implementations take the argmax of that all-zero table instead: pixel 0
    paired with itself, so it raises the first pixel and then stalls until its
    iteration cap; the same failure, one pixel apart.) It exists to reproduce
    the published attack's success rates like for like.

The two choose the same pairs unless products underflow (or two scores are so
close that the rescaling's rounding reorders them), so they part exactly on
partly saturated models: alpha and beta tiny but not yet 0.

The pair search is the kernel ``jsma_pair_search`` behind ``kernels.get``:
``kernels/reference.py`` is the specification, run on the GPU as it is, and
on the CPU a fused Numba version scores each pair on the fly.

Memory: the NumPy / CuPy search forms (P x P) pair scores per image (P = 784
pixels for MNIST: 614,656 pairs), for at most ``pair_chunk`` images at once
(default 8), so its peak is about 8 bytes x P^2 x pair_chunk (the float32
tables A and B): 40 MB measured at the default, whatever the batch size
(tests/test_attacks.py checks the bound with tracemalloc). The CPU kernel
forms no tables: O(P) per thread.

Speed (experiments/bench_attacks.py: Papernot's network briefly trained, run
to success or cap, 26.6 iterations on average; a 2-core CPU shared with other
jobs, load average 3 to 4): 0.03 to 0.05 s per image with the Numba pair
search against 0.09 to 0.17 s with the NumPy one. On that network's real
alpha and beta the search takes 0.03 to 0.06 ms per image and iteration
against 1.9 ms (35 to 68 times less; "paper" prunes less than "exact"), well
below the 1.1 to 1.2 ms of the two vector-Jacobian products, which now
dominate.
"""
import math

import numpy as np
from ..progress import tqdm          # a bar on a terminal, a line now and then in a log

from .. import kernels
from ..backend import get_array_module, to_numpy
from ..losses import check_formulation
from .common import batches, make_result, prepare
from ..functional import check_T
from ..losses import one_hot
from .sources import check_wrt, vjps

DEFAULT_PAIR_CHUNK = kernels.reference.JSMA_PAIR_CHUNK


def saliency_pairs(alpha, beta, domain, pair_chunk=DEFAULT_PAIR_CHUNK, formulation="exact"):
    """The best pixel pair of each image under the increasing-pixel saliency map.

    Parameters
    ----------
    alpha : (n, P) target-class gradient per pixel
    beta : (n, P) summed gradient of the other classes per pixel
    domain : (n, P) bool, pixels that may still be increased
    pair_chunk : images whose (P x P) pair tables exist at one time (the
        NumPy / CuPy search; the CPU kernel forms no tables)
    formulation : "exact" (alpha and beta rescaled per image first) or "paper"
        (the raw products in the gradients' dtype); see the module docstring

    Returns
    -------
    p, q : (n,) int pixel indices (p < q; 0 where not found);  found : (n,) bool,
        False where no pair has A > 0, B < 0 and a score A * |B| > 0 (the
        saliency map is empty)

    The search itself is the kernel ``jsma_pair_search`` (``kernels/reference.py``
    is its specification; on the CPU a fused Numba version runs).
    """
    check_formulation(formulation, "JSMA's saliency map")
    search = kernels.get("jsma_pair_search", get_array_module(alpha))
    return search(alpha, beta, domain, rescale=(formulation == "exact"), pair_chunk=pair_chunk)


def jsma(model, x, labels, targets, wrt="probs", T=1.0, theta=1.0, max_distortion=0.145,
         batch_size=100, pair_chunk=DEFAULT_PAIR_CHUNK, progress=False, formulation="exact"):
    """Targeted JSMA with increasing pixels, batched, bounded memory.

    Parameters
    ----------
    model : Sequential
    x : (N, C, H, W) images in [0, 1]
    labels : (N,) int true classes (to report untargeted success)
    targets : (N,) int target classes (each differs from its label)
    wrt : "probs" (default: the deployed softmax, as Papernot et al.) or "logits"
    T : float > 0, the temperature of "probs" (T = 1 is the deployed model;
        T = T_train is Carlini and Wagner's rescaling)
    theta : float in (0, 1], how much a chosen pixel increases (+1: to the maximum)
    max_distortion : float in (0, 1], the most pixels changed, as a fraction of all
        pixels (0.145 in the distillation paper): at most floor(fraction * P / 2)
        pair iterations, so never more than floor(fraction * P) pixels
    batch_size : images per forward/backward pass
    pair_chunk : images whose (P x P) pair tables exist at once (the memory cap of
        the NumPy / CuPy search; the CPU kernel forms no tables)
    formulation : "exact" (default) or "paper": how pair scores are computed (see
        the module docstring); the gradients alpha and beta are the same in both

    Returns
    -------
    x_adv : (N, C, H, W) NumPy; result : AttackResult, with ``extra["empty_saliency"]``
        the number of images where the attack stopped because no pair qualified
    """
    check_wrt(wrt, ("probs", "logits"), "JSMA (it needs the class outputs' Jacobian)")
    T = check_T(T)
    check_formulation(formulation, "JSMA's saliency map")
    if not 0 < theta <= 1:
        raise ValueError(f"theta must be in (0, 1] (JSMA here only increases pixels), got {theta!r}")
    if not 0 < max_distortion <= 1:
        raise ValueError(f"max_distortion is a fraction of the pixels in (0, 1], got {max_distortion!r}")
    if not (isinstance(pair_chunk, (int, np.integer)) and pair_chunk >= 1):
        raise ValueError(f"pair_chunk must be an integer >= 1, got {pair_chunk!r}")
    if targets is None:
        raise ValueError("JSMA is a targeted attack: give one target class per image")
    x, labels, targets = prepare(model, x, labels, targets)
    xp = model.xp
    N = len(x)
    P = int(np.prod(x.shape[1:]))
    max_iters = int(math.floor(max_distortion * P / 2))   # two pixels per iteration
    x_adv = x.copy()
    pred_before = xp.asarray(model.predict(x))
    iterations = np.zeros(N, dtype=np.int64)
    empty = np.zeros(N, dtype=bool)
    K = model.n_classes                                    # number of classes
    with tqdm(total=N, desc="JSMA", disable=not progress) as bar:
        for sl in batches(N, batch_size):
            idx = np.arange(sl.start, sl.stop)
            flat = x_adv.reshape(N, P)                       # a view: updates land in x_adv
            domain = flat[xp.asarray(idx)] < 1               # pixels that can still increase
            while len(idx):
                ix = xp.asarray(idx)
                t = targets[ix]
                e_t = one_hot(t, K, xp, x.dtype)
                # alpha = d F_t/dx and beta = d sum_{j != t} F_j/dx: two VJPs of one forward
                (alpha, beta), z = vjps(model, x_adv[ix], [e_t, 1 - e_t], wrt, T)
                reached = to_numpy(z.argmax(axis=1) == t)
                capped = iterations[idx] >= max_iters
                go = ~(reached | capped)
                p, q, found = saliency_pairs(alpha.reshape(len(idx), P)[xp.asarray(go)],
                                             beta.reshape(len(idx), P)[xp.asarray(go)],
                                             domain[xp.asarray(go)], pair_chunk, formulation)
                found = to_numpy(found)
                empty[idx[go][~found]] = True                # stalled: nothing salient left
                move = np.flatnonzero(go)[found]             # positions within idx
                rows = xp.asarray(idx[move])
                mv = xp.asarray(move)
                p, q = p[xp.asarray(found)], q[xp.asarray(found)]
                for pix in (p, q):
                    flat[rows, pix] = xp.minimum(flat[rows, pix] + x.dtype.type(theta), 1)
                    domain[mv, pix] = flat[rows, pix] < 1    # at the maximum: leave the domain
                iterations[idx[move]] += 1
                keep = np.zeros(len(idx), dtype=bool)
                keep[move] = True
                bar.update(int((~keep).sum()))
                idx, domain = idx[keep], domain[xp.asarray(keep)]
    params = {"theta": float(theta), "max_distortion": float(max_distortion),
              "max_iterations": max_iters, "pair_chunk": int(pair_chunk)}
    # each iteration: one forward pass and two backward passes (alpha and beta), plus
    # the last pass whose forward found the target reached (or the cap, or no pair)
    result = make_result("jsma", wrt, T, params, model, x, x_adv, labels, targets, pred_before,
                         iterations=iterations, gradient_evals=2 * (iterations + 1),
                         extra={"empty_saliency": int(empty.sum())}, formulation=formulation)
    return result.x_adv, result
