"""Why did the gradient vanish? Per-image diagnostics of gradient masking.

For each image, ``gradient_diagnostics`` measures the input gradient twice:

* **as deployed** (the model's float32): what an attacker actually gets --
  its L1 / L2 / Linf norms, the fraction of entries that are *exactly* zero,
  whether the whole gradient is zero, and whether the top probability is
  exactly 1.0 (the softmax saturated);
* **its true size** (float64 and log space, see ``magnitudes``): magnitudes far
  below what float32 (about 1e-45) or even float64 (about 1e-308) can hold.

Beside them it reports *why*: the logit margin M (top minus runner-up, of the
logits divided by T) and the suppression it predicts. Every gradient through
the softmax carries a factor p_i (delta_ij - p_j); for a confident image that
is about exp(-M), i.e. log10 factor = -M / ln 10 (``log10_factor_predicted``),
next to the exact log10(1 - p_top) (``log10_factor_measured``).

The prediction has two factors. For a confident image the loss gradient is
about exp(-M) times the gradient of the margin itself, dM/dx (see
``magnitudes``), and training at T grows the logits, so dM/dx grows too:
``margin_grad_log10_l2`` measures it, and ``loss_log10_l2_predicted`` =
-M / ln 10 + log10 ||dM/dx|| is the per-image prediction of the loss
gradient's true size with both factors.

Papernot et al.'s figure is a different quantity: the amplitude of the
adversarial gradient (the Jacobian of the softmax output, what JSMA uses) as
their float32 framework computed it, averaged over test images. Its like
here is ``probs_f32_row_l1`` (the L1 norm of each float32 Jacobian row,
averaged over the K rows, all in float32) summarised by
``float32_plain_mean``: a plain float32 mean over images, beside the fraction
of images whose float32 Jacobian is exactly zero. It cannot go below float32's
smallest number (1.4e-45) and is dominated by the few unsaturated images,
so it is *not* comparable with the float64 log-space sizes above.

Summaries (``summarize``): at a high T most correct images have an exactly
zero float32 gradient, and the few unsaturated ones have *larger* gradients
than at T = 1. A plain mean is dominated by those few and can show no
suppression at all; report the fraction of zeros, the median and the geometric
mean (mean of log10), over correct and misclassified images separately. The
plain mean is included only to show that pitfall.
"""
import math

import numpy as np
from ..progress import tqdm          # a bar on a terminal, a line now and then in a log

from .. import functional as F
from ..backend import to_numpy
from ..functional import check_T, log_one_minus_p, logit_margins
from .common import batches
from .magnitudes import (LN10, float64_copy, log10_loss_grad_norms, log10_margin_grad_norms,
                         log10_probs_jacobian_norms)
from .sources import jacobian, loss_gradient


def _norms(g):
    """L1, L2, Linf per image of a float32 gradient, computed in float64 (squares
    of 1e-25 would underflow in float32), plus exact-zero counts."""
    g = to_numpy(g).reshape(len(g), -1)
    zero = g == 0
    a = np.abs(g.astype(np.float64))
    return {"l1": a.sum(axis=1), "l2": np.sqrt((a * a).sum(axis=1)), "linf": a.max(axis=1),
            "zero_frac": zero.mean(axis=1), "all_zero": zero.all(axis=1)}


def float32_row_l1(J):
    """The float32 amplitude of a Jacobian, per image, all arithmetic in J's dtype.

    Parameters
    ----------
    J : (N, K, C, H, W) or (N, C, H, W) gradients as the model computed them
        (float32 for a deployed model); a 4-D array is one row per image

    Returns
    -------
    (N,) in J's dtype: the L1 norm of each row (sum of |entries| over the
    pixels), averaged over the K rows. Summed in J's own dtype, as a float32
    framework would; exactly 0 only where every entry is exactly 0.
    """
    J = to_numpy(J)
    N = J.shape[0]
    rows = J.reshape(N, 1, -1) if J.ndim == 4 else J.reshape(N, J.shape[1], -1)   # (N, K, pixels)
    l1 = np.abs(rows).sum(axis=2, dtype=J.dtype)             # (N, K), float32 sums
    return l1.mean(axis=1, dtype=J.dtype)                    # (N,), float32 mean over rows


def gradient_diagnostics(model, x, labels, T=1.0, batch_size=100, probs=True, progress=False):
    """Per-image gradient-masking diagnostics, as a dict of NumPy arrays (N,).

    Parameters
    ----------
    model : Sequential (as deployed, normally float32)
    x : (N, C, H, W) images in [0, 1]
    labels : (N,) int true classes
    T : float > 0, the softmax temperature the gradients are taken at: 1 for
        the deployed model, T_train for Carlini and Wagner's rescaling
    probs : also measure the probability Jacobian (K more backward passes in each
        dtype: with it, about 2 x (2 forward + 11 backward) passes per image, some
        9 s per 100 images for Papernot's network on two CPU cores; without it 1 s)

    Returns
    -------
    dict with, per image:

    ``label, pred, correct``
    ``top_prob`` (float32 as deployed), ``saturated`` (top_prob == 1.0 exactly)
    ``margin``: (z_top - z_runner-up) / T, from float64 logits
    ``log10_factor_predicted`` = -margin / ln 10; ``log10_factor_measured`` = log10(1 - p_top)
    ``loss_l1, loss_l2, loss_linf``: norms of d CE / dx in the model's dtype
    ``loss_zero_frac, loss_all_zero``: exact zeros in the model's dtype
    ``loss_log10_l1, loss_log10_l2, loss_log10_linf``: true log10 norms (float64, log space)
    ``loss_log10_factor``: log10 of the softmax factor max_j |p_j - t_j|
    ``loss_f32_l1``: the L1 norm of d CE / dx summed in the model's dtype (``float32_row_l1``)
    ``margin_grad_log10_l2``: true log10 ||dM / dx||_2 of the margin M (float64)
    ``loss_log10_l2_predicted`` = -M / ln 10 + margin_grad_log10_l2: the loss
        gradient's size predicted from the margin and its gradient
    and the same ``probs_*`` for the whole probability Jacobian d softmax(z / T) / dx
    (all K rows; ``probs_f32_row_l1`` is the float32 L1 norm of each row averaged
    over the rows: Papernot et al.'s amplitude), plus ``T`` (a float).
    """
    T = check_T(T)
    xp = model.xp
    x = xp.asarray(to_numpy(x), dtype=model.dtype)
    labels = xp.asarray(to_numpy(labels).astype(np.int64))
    model64 = float64_copy(model)
    parts = []
    for sl in tqdm(batches(len(x), batch_size), desc="gradient diagnostics", disable=not progress):
        xb, yb = x[sl], labels[sl]
        out = {}
        # --- as deployed (the model's own dtype) ---
        g, z = loss_gradient(model, xb, yb, T)
        p, _ = F.softmax_forward(z, T)
        out["pred"] = to_numpy(z.argmax(axis=1))
        out["top_prob"] = to_numpy(p.max(axis=1))
        out.update({f"loss_{k}": v for k, v in _norms(g).items()})
        out["loss_f32_l1"] = float32_row_l1(g)
        if probs:
            J, _ = jacobian(model, xb, "probs", T)
            out.update({f"probs_{k}": v for k, v in _norms(J).items()})
            out["probs_f32_row_l1"] = float32_row_l1(J)
        # --- true magnitudes (float64, log space) ---
        true = log10_loss_grad_norms(model64, xb, yb, T)
        for k in ("l1", "l2", "linf"):
            out[f"loss_log10_{k}"] = to_numpy(true[k])
        out["loss_log10_factor"] = to_numpy(true["log10_factor"])
        z64 = to_numpy(true["logits"])
        out["margin"] = logit_margins(z64 / T)                  # the margin of z / T: the temperature
        logp = F.log_softmax(z64, T)
        out["log10_factor_measured"] = log_one_minus_p(logp, logp.argmax(axis=1)) / LN10
        out["margin_grad_log10_l2"] = to_numpy(log10_margin_grad_norms(model64, xb, T))
        if probs:
            tj = log10_probs_jacobian_norms(model64, xb, T)
            for k in ("l1", "l2", "linf"):
                out[f"probs_log10_{k}"] = to_numpy(tj[k])
        parts.append(out)
    diag = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]} if parts else {}
    diag["label"] = to_numpy(labels)
    diag["correct"] = diag["pred"] == diag["label"]
    diag["saturated"] = diag["top_prob"] == 1.0
    diag["log10_factor_predicted"] = -diag["margin"] / LN10
    # the loss gradient ~ exp(-M) * dM/dx for a confident image (see magnitudes.py)
    diag["loss_log10_l2_predicted"] = diag["log10_factor_predicted"] + diag["margin_grad_log10_l2"]
    diag["T"] = T
    return diag


# ===== summaries =====

def _log10(values):
    with np.errstate(divide="ignore"):
        return np.log10(np.asarray(values, dtype=np.float64))


def summarize(values, mask=None, log10=False):
    """Distribution summary of positive magnitudes (e.g. gradient norms).

    Parameters
    ----------
    values : (N,) magnitudes, or their log10 if ``log10`` (then -inf means exactly 0)
    mask : (N,) bool, which images to include (default all)

    Returns
    -------
    dict: n, fraction_zero, log10_median, log10_geometric_mean (mean of log10:
    -inf as soon as one value is exactly zero), log10_geometric_mean_nonzero,
    and log10_mean_PITFALL (log10 of the plain arithmetic mean: dominated by
    the few largest values, it can hide the suppression entirely).
    """
    lv = np.asarray(values, dtype=np.float64) if log10 else _log10(values)
    if mask is not None:
        lv = lv[np.asarray(mask, dtype=bool)]
    n = len(lv)
    if n == 0:
        nan = float("nan")
        return {"n": 0, "fraction_zero": nan, "log10_median": nan, "log10_geometric_mean": nan,
                "log10_geometric_mean_nonzero": nan, "log10_mean_PITFALL": nan}
    zero = np.isneginf(lv)
    nz = lv[~zero]
    if len(nz):
        top = nz.max()                               # the plain mean, in log space
        log_mean = top + math.log10(np.sum(10.0 ** (nz - top)) / n)
    else:
        log_mean = -math.inf
    return {"n": int(n), "fraction_zero": float(zero.mean()),
            "log10_median": float(np.median(lv)),
            "log10_geometric_mean": float(lv.mean()) if not zero.any() else -math.inf,
            "log10_geometric_mean_nonzero": float(nz.mean()) if len(nz) else -math.inf,
            "log10_mean_PITFALL": float(log_mean)}


def float32_plain_mean(values, mask=None):
    """Papernot et al.'s kind of average: a plain mean over images, in float32.

    Parameters
    ----------
    values : (N,) float32 per-image amplitudes (``loss_f32_l1``, ``probs_f32_row_l1``)
    mask : (N,) bool, which images to include (default all)

    Returns
    -------
    dict: n, mean (the float32 mean, as a Python float), log10_mean (-inf where
    the mean is 0), fraction_zero (images whose float32 amplitude is exactly 0),
    log10_median (-inf once half the images are exactly 0), and
    log10_geometric_mean_nonzero (the mean of log10 over the images whose
    float32 amplitude is not 0: what a histogram of amplitudes on a log axis
    shows of the images float32 has not flushed to zero).

    The mean is accumulated in float32, as a float32 framework does; a mean of
    numbers that are all >= 1.4e-45 or exactly 0 is exactly 0 or >= 1.4e-45 / N.
    """
    v = np.asarray(values)
    if v.dtype != np.float32:
        raise ValueError(f"float32_plain_mean averages float32 amplitudes, got dtype {v.dtype}")
    if mask is not None:
        v = v[np.asarray(mask, dtype=bool)]
    if len(v) == 0:
        nan = float("nan")
        return {"n": 0, "mean": nan, "log10_mean": nan, "fraction_zero": nan, "log10_median": nan,
                "log10_geometric_mean_nonzero": nan}
    mean = float(v.mean(dtype=np.float32))
    median = float(np.median(v))
    nonzero = v[v != 0].astype(np.float64)
    with np.errstate(divide="ignore"):
        return {"n": int(len(v)), "mean": mean, "log10_mean": float(np.log10(mean)),
                "fraction_zero": float((v == 0).mean()), "log10_median": float(np.log10(median)),
                "log10_geometric_mean_nonzero": float(np.log10(nonzero).mean()) if len(nonzero) else -math.inf}


def summarize_by_correctness(diag, key):
    """``summarize`` of diag[key] over correct, misclassified and all images.

    Keys containing "log10" are taken as log10 values; others as magnitudes.
    """
    log10 = "log10" in key
    return {group: summarize(diag[key], mask, log10=log10)
            for group, mask in (("correct", diag["correct"]), ("misclassified", ~diag["correct"]),
                                ("all", None))}


def compare_suppression(diag, ref, key="loss_log10_l2"):
    """Measured and predicted log10 suppression of ``diag`` relative to ``ref`` (e.g. T = 1).

    Over correctly classified images: the measured factor is the difference of
    the geometric means (and of the medians) of the true gradient norms; the
    prediction from the margins is -(mean margin - mean ref margin) / ln 10.
    A negative number means a smaller gradient than the reference.

    The margin alone leaves out the growth of the margin's own gradient with T
    (the logits grow T-fold, and so does dM/dx): ``logit_gradient_growth_log10``
    is the difference of the geometric means of ||dM/dx||, and
    ``predicted_log10_with_logit_growth`` adds it to the margin's prediction.
    """
    a = summarize(diag[key], diag["correct"], log10="log10" in key)
    b = summarize(ref[key], ref["correct"], log10="log10" in key)
    ma, mb = diag["margin"][diag["correct"]], ref["margin"][ref["correct"]]
    growth = (diag["margin_grad_log10_l2"][diag["correct"]].mean()
              - ref["margin_grad_log10_l2"][ref["correct"]].mean())
    from_margin = -(ma.mean() - mb.mean()) / LN10
    return {"measured_log10_geometric_mean": a["log10_geometric_mean"] - b["log10_geometric_mean"],
            "measured_log10_median": a["log10_median"] - b["log10_median"],
            "predicted_log10_from_mean_margin": from_margin,
            "predicted_log10_from_median_margin": -(np.median(ma) - np.median(mb)) / LN10,
            "logit_gradient_growth_log10": float(growth),
            "predicted_log10_with_logit_growth": float(from_margin + growth),
            "mean_margin": float(ma.mean()), "ref_mean_margin": float(mb.mean())}


def report_lines(diag):
    """A short human-readable table of a diagnostics dict (for the command line)."""
    c = diag["correct"]
    lines = [f"gradient diagnostics at T = {diag['T']:g} over {len(c)} images "
             f"({int(c.sum())} correctly classified):",
             f"  top probability exactly 1.0 in float32: {diag['saturated'].mean():.1%} of images",
             f"  logit margin (z_top - z_runner-up) / T: median {np.median(diag['margin']):.3g}, "
             f"mean {diag['margin'].mean():.3g}",
             f"  softmax factor log10(1 - p_top): median measured {np.median(diag['log10_factor_measured']):.3g}, "
             f"predicted from the margin -M/ln10 {np.median(diag['log10_factor_predicted']):.3g}"]
    for what in ("loss", "probs"):
        if f"{what}_l2" not in diag:
            continue
        name = "cross-entropy loss gradient" if what == "loss" else "probability Jacobian"
        lines.append(f"  {name}: exactly zero in float32 for {diag[f'{what}_all_zero'].mean():.1%} of images "
                     f"({diag[f'{what}_zero_frac'].mean():.1%} of entries)")
        for group, s in summarize_by_correctness(diag, f"{what}_log10_l2").items():
            if group == "all" or s["n"] == 0:
                continue
            lines.append(f"    L2 norm, true size (float64), {group} (n={s['n']}): "
                         f"log10 median {s['log10_median']:.3g}, geometric mean {s['log10_geometric_mean']:.3g}, "
                         f"plain mean {s['log10_mean_PITFALL']:.3g} (pitfall: dominated by the largest)")
    return lines


# ===== how much hotter than a standard network? =====

REFERENCE_MARGIN = 10.0     # the median top-two logit margin after rescaling by 1 / T_est


def top2_margins(model, x, batch_size=1000):
    """(N,) float64: the gap between the largest and second-largest logit of each image (T = 1)."""
    out = [to_numpy(logit_margins(model.logits(model.xp.asarray(x[i:i + batch_size], dtype=model.dtype))))
           .astype(np.float64) for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros(0)


def estimate_temperature(margins, reference=REFERENCE_MARGIN):
    """T_est = max(1, median(margins) / reference): the rescaling that brings the median margin to ``reference``.

    A network trained at T and deployed at T = 1 has logits about T times
    larger than a standard one, and its top-two logit margin grows with them.
    T_est is chosen so that the *median* margin over the images, divided by
    T_est, equals ``REFERENCE_MARGIN`` = 10: a softmax with margin 10 gives the
    top class 1 - 4.5e-5, unsaturated in float32, so the cross-entropy
    gradient is non-zero at the median image, and images with up to about 9
    times the median margin stay above float32's smallest normal number
    (exp(-87)). Never below 1: a network whose median margin is already under
    10 is not rescaled. It is an estimate, not the training T (a standard
    network has a median margin of roughly 10 to 15, a T-trained one roughly
    T times that); any value within a factor of a few serves an attack that
    follows only the sign of the gradient, as APGD and PGD do.

    Parameters
    ----------
    margins : (N,) top-two logit margins at T = 1 (``top2_margins``)

    Returns
    -------
    float >= 1. An estimate of how much hotter than a standard network the
    logits are, not the training temperature itself.
    """
    margins = np.asarray(margins, dtype=np.float64)
    if margins.size == 0 or not np.all(np.isfinite(margins)):
        raise ValueError("cannot estimate a temperature: no images, or logits that are not finite")
    return max(1.0, float(np.median(margins)) / reference)
