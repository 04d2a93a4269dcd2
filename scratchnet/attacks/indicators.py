"""Indicators of attack failure (Pintor, Demetrio, Sotgiu, Demontis, Carlini, Biggio and
Roli, NeurIPS 2022, arXiv 2106.09947).

A robust accuracy is only as good as the attack behind it. Six checks, each
computed per image on a gradient attack run (APGD here), tell an attack that
*failed* from a model that *resisted*, and each points to a fix:

=============================  ==================================================  ==========================
indicator                      fires (per image) when                              mitigation it points to
=============================  ==================================================  ==========================
unavailable_gradients          the attack loss's input gradient at x is exactly    rescale by 1/T, attack the
                               zero (or not finite) in the model's float dtype     logits, a scale-invariant
                                                                                   loss (DLR), gradient-free
unstable_predictions           the loss moves by more than 10 % (of max(|L|, 1))   average over noise, or a
                               on average under 100 random perturbations of        gradient-free attack
                               +-4/255 per pixel
silent_success                 an iterate of the path was adversarial but the      return the best adversarial
                               highest-loss point is not                           point of the path
incomplete_optimization        the best loss still rose by more than 5 % of its    more steps
                               range over the last 10 steps
transfer_failure               the example fooled the source, not the target       attack the target directly
unconstrained_attack_failure   the same attack with no budget (the whole [0, 1]    change the loss, or a
                               box, started at x) leaves the prediction unchanged  gradient-free attack
=============================  ==================================================  ==========================

Each function below computes one of them for every image. ``evaluate`` runs
the attack and all six checks and returns an ``IndicatorReport``: per-image
flags and measurements, a per-model summary (an indicator *fires* for the
model when at least ``min_fraction`` of the images it applies to are flagged),
and the mitigations of the indicators that fired. It is the one call a
``diagnose`` command needs::

    report = evaluate(model, x, labels, eps=0.3, loss="ce", T=1.0, source=standard_model)
    print("\\n".join(report.lines())); json.dump(report.to_json(), f)

Where the authors' public code fixes a constant, it is adopted: 100 random
perturbations of half-width 4/255 (their ``radius = 8/255``, noise
``(rand - 0.5) * radius``) for unstable predictions; a change of more than
5 % of the min-max normalised best loss over the last 10 steps for incomplete
optimization. Two choices are ours. (1) Their unstable-predictions measure
divides the loss change by |L(x)|; a confident image's cross-entropy is 1e-4
and doubles under any noise, which flagged a quarter of our plain T = 1
network's images. We divide by max(|L(x)|, 1): cross-entropy in nats and DLR
(whose magnitude is at most 1 on a correctly classified image) change by less
than one unit in absolute terms. Their code reports the mean, capped at 1,
and sets no threshold; we flag an image above 0.1. Measured on 100 MNIST
test images of the small test networks: at most 0.05 on the T = 1 network
(cross-entropy or DLR), at most 0.09 for DLR on the T = 100 one; the
cross-entropy at T = 1 of the T = 100 network passes 0.1 on 1 % of the images,
unsaturated ones near the boundary, where the T-fold logits make the loss
truly steep. (2) An indicator
of *failure* is read on the images where the attack failed (initially
correct, not fooled): a successful attack whose loss still climbs is not a
failure to explain.
"""
from dataclasses import dataclass, field

import numpy as np

from ..backend import to_numpy
from .apgd import LOSSES, NORMS, apgd, attack_loss
from .common import batches, prepare
from ..functional import check_T
from .sources import objective_gradient
from .transfer import transfer

INDICATORS = ("unavailable_gradients", "unstable_predictions", "silent_success",
              "incomplete_optimization", "transfer_failure", "unconstrained_attack_failure")

UNSTABLE_SAMPLES = 100          # random perturbations per image (the authors' gamma)
UNSTABLE_RADIUS = 8 / 255       # noise (rand - 0.5) * radius: +-4/255 per pixel (the authors' default)
UNSTABLE_THRESHOLD = 0.1        # mean relative loss change above which an image is flagged (ours)
INCOMPLETE_WINDOW = 10          # the last steps inspected (the authors' value)
INCOMPLETE_THRESHOLD = 0.05     # rise of the normalised best loss over that window (the authors' value)
MIN_FRACTION = 0.1              # an indicator fires for a model when this share of its images is flagged

MITIGATIONS = {
    "unavailable_gradients":
        "the loss gradient is exactly zero at the image (a saturated float32 softmax): rescale the logits "
        "by 1/T (cross-entropy of softmax(z / T_train), if the training temperature is known), attack the "
        "logits (wrt='logits'), or use the scale-invariant DLR loss (apgd(..., loss='dlr')); confirm with "
        "the gradient-free square_linf",
    "unstable_predictions":
        "the loss jumps under small random noise, so one gradient says little about the next step: "
        "average the loss over random perturbations, or use the gradient-free square_linf",
    "silent_success":
        "the path passed through an adversarial point that the highest-loss point lost: return the best "
        "adversarial point of the path (apgd does), or use a loss aligned with misclassification (DLR, "
        "the logit margin)",
    "incomplete_optimization":
        "the best loss was still rising when the attack stopped: more steps (or restarts)",
    "transfer_failure":
        "examples that fool the source do not fool the target: attack the target itself with a "
        "scale-invariant loss (DLR) or the gradient-free square_linf, or pick a source closer to the target",
    "unconstrained_attack_failure":
        "with no budget at all the attack still does not change the prediction, so the attack, not the "
        "model, is failing: change the loss (the logits, DLR, or cross-entropy at 1/T) or use the "
        "gradient-free square_linf",
}

APPLIES_TO = {
    "unavailable_gradients": "images the attack failed on (initially correct, not fooled)",
    "unstable_predictions": "images the attack failed on (initially correct, not fooled)",
    "silent_success": "initially correct images",
    "incomplete_optimization": "images the attack failed on (initially correct, not fooled)",
    "transfer_failure": "images initially correct on the target whose example fooled the source",
    "unconstrained_attack_failure": "initially correct images",
}


# ===== the six indicators, per image =====

def unavailable_gradients(model, x, labels, loss="ce", T=1.0, targets=None, batch_size=100):
    """Unavailable gradients: the attack loss's input gradient at x is exactly zero or not finite.

    Measured: d loss / dx at the clean image x, in the model's own dtype (float32
    as deployed), for the attack's loss at its T. Threshold: exactly zero, the
    only size a sign step (L-infinity) or a normalised step (L2) cannot use.

    Parameters
    ----------
    x : (N, C, H, W) on the model's device; labels, targets : (N,) int (targets may be None)
    loss, T : the attack's loss ("ce" at T, or "dlr")

    Returns
    -------
    flags : (N,) bool; grad_linf : (N,) float64, max |d loss / dx| per image
    """
    xp = model.xp
    grad_linf = np.zeros(len(x))
    finite = np.ones(len(x), dtype=bool)
    for sl in batches(len(x), batch_size):
        t = None if targets is None else targets[sl]
        g, _, _ = objective_gradient(model, x[sl], lambda z: attack_loss(z, labels[sl], loss, T, t))
        flat = g.reshape(len(g), -1)
        finite[sl] = to_numpy(xp.isfinite(flat).all(axis=1))
        grad_linf[sl] = to_numpy(xp.abs(flat).max(axis=1)).astype(np.float64)
    return (grad_linf == 0) | ~finite, grad_linf


def unstable_predictions(model, x, labels, loss="ce", T=1.0, targets=None, samples=UNSTABLE_SAMPLES,
                         radius=UNSTABLE_RADIUS, threshold=UNSTABLE_THRESHOLD, seed=0, batch_size=100):
    """Unstable predictions: the attack loss changes a lot under small random noise.

    Measured: ``samples`` perturbations delta ~ uniform(-radius / 2, radius / 2)
    per pixel (the image clipped to [0, 1]); per image the mean of
    |L(x + delta) - L(x)| / max(|L(x)|, 1), capped at 1. A randomised defence,
    or a loss surface too rough for its gradient to predict a step, moves it;
    a deterministic, smooth network barely does. Threshold: ``threshold``.

    Returns
    -------
    flags : (N,) bool; metric : (N,) float64 in [0, 1]
    """
    rng = np.random.default_rng(seed)
    xp = model.xp
    metric = np.zeros(len(x))
    for sl in batches(len(x), batch_size):
        t = None if targets is None else targets[sl]
        ref = to_numpy(attack_loss(model.logits(x[sl]), labels[sl], loss, T, t)[0]).astype(np.float64)
        scale = np.maximum(np.abs(ref), 1.0)
        total = np.zeros(len(ref))
        for _ in range(samples):
            noise = xp.asarray((rng.random(x[sl].shape) - 0.5) * radius, dtype=x.dtype)
            val = to_numpy(attack_loss(model.logits(xp.clip(x[sl] + noise, 0, 1)), labels[sl], loss, T, t)[0])
            total += np.abs(val.astype(np.float64) - ref)
        metric[sl] = np.minimum(total / samples / scale, 1.0)
    metric = np.nan_to_num(metric, nan=1.0)       # a loss that turns NaN under noise is unstable
    return metric > threshold, metric


def silent_success(first_success_step, best_loss_point_adversarial):
    """Silent success: the attack's path reached an adversarial point, its loss-best point is not one.

    Measured on the attack's own record (``apgd``'s ``extra``): some iterate was
    adversarial (``first_success_step >= 0``) while x_max, the highest-loss
    point that an attack returning "the optimum" would hand back, is not.
    Such an attack reports failure on an image it had fooled.

    Returns
    -------
    flags : (N,) bool
    """
    return (np.asarray(first_success_step) >= 0) & ~np.asarray(best_loss_point_adversarial, dtype=bool)


def incomplete_optimization(loss_trace, window=INCOMPLETE_WINDOW, threshold=INCOMPLETE_THRESHOLD):
    """Incomplete optimization: the best loss was still rising when the attack stopped.

    Measured on the per-image loss trace L_0 ... L_S of the attack (increased):
    the running best, min-max normalised over the trace to [0, 1], rose by
    more than ``threshold`` over the last ``window`` steps (the authors' 5 %
    over 10 steps). A flat trace (a zero gradient never moves) is complete.

    Parameters
    ----------
    loss_trace : (N, S + 1) losses of the iterates

    Returns
    -------
    flags : (N,) bool; metric : (N,) float64, the normalised rise over the window
    """
    tr = np.array(loss_trace, dtype=np.float64)
    bad = ~np.isfinite(tr)
    if bad.any():                                # a non-finite loss is no progress: the row's worst value
        worst = np.where(bad, np.inf, tr).min(axis=1)
        tr[bad] = np.broadcast_to(np.where(np.isfinite(worst), worst, 0.0)[:, None], tr.shape)[bad]
    lo, hi = tr.min(axis=1), tr.max(axis=1)
    best = np.maximum.accumulate(tr, axis=1)     # the running best (the attack increases the loss)
    span = hi - lo
    norm = (best - lo[:, None]) / np.where(span > 0, span, 1.0)[:, None]   # in [0, 1]; 0 for a flat trace
    w = min(window, tr.shape[1] - 1)
    metric = norm[:, -1] - norm[:, -1 - w] if w > 0 else np.zeros(len(tr))
    return metric > threshold, metric


def transfer_failure(source_success, target_success):
    """Transfer failure: the example fooled the source network but not the target.

    Measured: per image, the transfer attack's goal reached on the source and
    not on the target. Threshold: boolean.
    """
    return np.asarray(source_success, dtype=bool) & ~np.asarray(target_success, dtype=bool)


def unconstrained_attack_failure(model, x, labels, loss="ce", T=1.0, norm="linf", steps=100, targets=None,
                                 batch_size=100, progress=False):
    """Unconstrained attack failure: with no budget the attack still does not succeed.

    Measured: the same APGD (loss, T, norm, steps) with a ball that holds the
    whole [0, 1] box (eps = 1 for L-infinity, sqrt(C H W) for L2), started at
    x itself so that only the gradient can move it. A working attack reaches
    100 % here on any non-constant classifier. Threshold: the goal not reached.

    Returns
    -------
    flags : (N,) bool; result : the AttackResult of the unconstrained run
    """
    eps = 1.0 if norm == "linf" else float(np.sqrt(np.prod(x.shape[1:])))
    _, res = apgd(model, x, labels, eps, norm=norm, loss=loss, T=T, steps=steps, targets=targets,
                  random_start=False, batch_size=batch_size, progress=progress)
    return ~res.achieved, res


# ===== everything at once =====

@dataclass
class IndicatorReport:
    """Per-image indicators, the per-model summary and the mitigations of one evaluation.

    Attributes
    ----------
    attack : dict, the summary of the attack evaluated (``AttackResult.summary()``)
    per_image : dict of (N,) NumPy arrays: ``initially_correct``, ``attack_success``
        (goal reached), one boolean per indicator (``transfer_failure`` only with a
        source), and the measurements ``grad_linf``, ``unstable_metric``,
        ``incomplete_metric``, ``unconstrained_success``, ``source_success`` and
        ``transfer_success`` (the transferred example fooled the target)
    summary : {indicator: {"fired", "n_flagged", "n_applicable", "fraction",
        "applies_to", "mitigation"}} (``{"measured": False}`` for transfer
        failure without a source)
    mitigations : [(indicator, what to do)] for the indicators that fired
    settings : the parameters of the evaluation
    runs : summaries of the unconstrained and transfer runs
    """
    attack: dict
    per_image: dict
    summary: dict
    mitigations: list
    settings: dict
    runs: dict = field(default_factory=dict)

    @property
    def fired(self):
        """The indicators that fired for this model, in the table's order."""
        return [k for k in INDICATORS if self.summary[k].get("fired")]

    def lines(self):
        """A human-readable account, one line per indicator and per mitigation."""
        a = self.attack
        at_T = f"T = {a['T']:g}, " if a["params"].get("loss") == "ce" else ""    # DLR has no temperature
        out = [f"attack {a['attack']} ({at_T}eps = {a['params']['eps']:g}): success "
               f"{a['n_success']} / {a['n_correct']} initially correct images"]
        for k in INDICATORS:
            s = self.summary[k]
            if not s.get("measured", True):
                out.append(f"  {k:30s} not measured (no source network)")
                continue
            frac = "n/a" if s["n_applicable"] == 0 else f"{s['fraction']:.0%}"
            out.append(f"  {k:30s} {'FIRES' if s['fired'] else 'quiet':5s}  {s['n_flagged']} / "
                       f"{s['n_applicable']} ({frac}) of the {s['applies_to']}")
        for k, text in self.mitigations:
            out.append(f"  -> {k}: {text}")
        return out

    def to_json(self):
        """A JSON-able dict (per-image arrays as lists)."""
        return {"attack": self.attack, "summary": self.summary, "settings": self.settings, "runs": self.runs,
                "mitigations": [{"indicator": k, "mitigation": t} for k, t in self.mitigations],
                "per_image": {k: np.asarray(v).tolist() for k, v in self.per_image.items()}}


def evaluate(model, x, labels, eps, loss="ce", T=1.0, norm="linf", steps=100, targets=None, source=None,
             source_loss="ce", source_T=1.0, samples=UNSTABLE_SAMPLES, radius=UNSTABLE_RADIUS,
             min_fraction=MIN_FRACTION, seed=0, batch_size=100, progress=False):
    """Run APGD on ``model`` and compute the six indicators of attack failure.

    Parameters
    ----------
    model : Sequential, the network evaluated
    x : (N, C, H, W) images in [0, 1]; labels : (N,) int
    eps : float >= 0, the budget of the attack evaluated
    loss, T, norm, steps, targets : the APGD run under scrutiny (default APGD-CE at
        the deployed T = 1, the masked evaluation)
    source : Sequential or None, a network to transfer from (typically the
        standard T = 1 one); None skips transfer failure
    source_loss, source_T : the APGD loss used on the source
    samples, radius : unstable predictions' random perturbations
    min_fraction : an indicator fires for the model when at least this fraction of
        the images it applies to is flagged (and at least one is)
    seed, batch_size, progress : for the runs

    Returns
    -------
    IndicatorReport
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not 0 <= min_fraction <= 1:
        raise ValueError(f"min_fraction must lie in [0, 1], got {min_fraction!r}")
    T = check_T(T)
    _, res = apgd(model, x, labels, eps, norm=norm, loss=loss, T=T, steps=steps, targets=targets,
                  seed=seed, batch_size=batch_size, progress=progress)
    xd, yd, td = prepare(model, x, labels, targets)
    ok = res.initially_correct
    won = res.achieved
    failed = ok & ~won
    per = {"initially_correct": ok, "attack_success": won}
    per["unavailable_gradients"], per["grad_linf"] = unavailable_gradients(model, xd, yd, loss, T, td, batch_size)
    per["unstable_predictions"], per["unstable_metric"] = unstable_predictions(
        model, xd, yd, loss, T, td, samples=samples, radius=radius, seed=seed, batch_size=batch_size)
    per["silent_success"] = silent_success(res.extra["first_success_step"], res.extra["best_loss_point_adversarial"])
    per["incomplete_optimization"], per["incomplete_metric"] = incomplete_optimization(res.extra["loss_trace"])
    per["unconstrained_attack_failure"], unc = unconstrained_attack_failure(
        model, x, labels, loss, T, norm, steps, targets, batch_size, progress)
    per["unconstrained_success"] = unc.achieved
    runs = {"unconstrained": unc.summary()}
    applicable = {"unavailable_gradients": failed, "unstable_predictions": failed, "silent_success": ok,
                  "incomplete_optimization": failed, "unconstrained_attack_failure": ok}
    if source is not None:
        _, tr = transfer(source, model, x, labels, eps, attack="apgd", loss=source_loss, T=source_T, norm=norm,
                         steps=steps, targets=targets, seed=seed, batch_size=batch_size, progress=progress)
        src_ok = np.asarray(tr.extra["source_success"], dtype=bool)
        per["source_success"] = src_ok
        per["transfer_success"] = tr.achieved            # the transfer attack's own result on the target
        per["transfer_failure"] = transfer_failure(src_ok, tr.achieved)
        applicable["transfer_failure"] = tr.initially_correct & src_ok
        runs["transfer"] = tr.summary()

    summary, mitigations = {}, []
    for k in INDICATORS:
        if k not in applicable:
            summary[k] = {"measured": False, "fired": False, "applies_to": APPLIES_TO[k], "mitigation": MITIGATIONS[k]}
            continue
        app = applicable[k]
        n_app, n_flag = int(app.sum()), int((per[k] & app).sum())
        frac = n_flag / n_app if n_app else float("nan")
        fired = n_flag > 0 and frac >= min_fraction
        summary[k] = {"measured": True, "fired": bool(fired), "n_flagged": n_flag, "n_applicable": n_app,
                      "fraction": frac, "applies_to": APPLIES_TO[k], "mitigation": MITIGATIONS[k]}
        if fired:
            mitigations.append((k, MITIGATIONS[k]))
    settings = {"eps": float(eps), "loss": loss, "T": T, "norm": norm, "steps": int(steps),
                "targeted": targets is not None, "source": source is not None, "source_loss": source_loss,
                "source_T": float(source_T), "samples": int(samples), "radius": float(radius),
                "min_fraction": float(min_fraction), "seed": int(seed),
                "unstable_threshold": UNSTABLE_THRESHOLD, "incomplete_window": INCOMPLETE_WINDOW,
                "incomplete_threshold": INCOMPLETE_THRESHOLD}
    return IndicatorReport(attack=res.summary(), per_image=per, summary=summary, mitigations=mitigations,
                           settings=settings, runs=runs)
