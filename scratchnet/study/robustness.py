"""Robust accuracy against the training temperature T: every attack, and the worst case per image.

``attack_vs_T`` shows the masked attacks failing as T grows, and the
rescaled ones working again. This study asks the question an evaluation must
answer: what robust accuracy is left when *every* attack is run, as an
AutoAttack-style evaluation does, without being told T?

For each recipe (``temperature``, ``distilled``) and training T of the grid,
deployed at T = 1, on the same first ``n`` test images, at L-infinity eps
0.1, 0.2 and 0.3:

=========  ==================================================================
attack     what it is
=========  ==================================================================
fgsm       FGSM on the cross-entropy at T = 1 (as deployed): masked at high T
pgd        PGD on the cross-entropy at T = 1, random start, step eps / 4
apgd-ce    APGD (Croce and Hein) on the cross-entropy at T = 1, as AutoAttack runs it
apgd-ce-T  APGD on the cross-entropy of softmax(z / T_est), T_est estimated from the
           logits by the rule of ``scratchnet diagnose`` (the training T is not read):
           Carlini and Wagner's rescaling, for an evaluator who is not told T
apgd-dlr   APGD on the DLR loss, unchanged by any rescaling of the logits
square     the Square attack on the logits: random search, no gradient
transfer   APGD-CE examples made once on the standard (T = 1) model of the same
           seed, sent to this one: its gradient is never used
worst      the worst case per image over all seven: an image counts as robust only
           if every attack failed on it (AutoAttack's robust accuracy)
=========  ==================================================================

Robust accuracy is the share of the ``n`` images still classified correctly
after the attack (a misclassified clean image counts as not robust), with a
95 % Wilson interval over the images (``scratchnet.stats.wilson``). With
several seeds the rates are pooled over them (the same images once per
seed), and the worst case is also given seed by seed with a t-interval over
the seeds (``over_seeds``), which carries the spread between trainings.
With ``n`` = 500 the interval's half-width is at most 4.4 points:
two rates ten points apart have disjoint intervals.

Beside the accuracies, an indicator matrix (model x indicator of attack
failure, Pintor et al. 2022; ``scratchnet/attacks/indicators.py``), read on
APGD-CE at T = 1 and on APGD-DLR at every eps. The six indicators are
composed from the runs above rather than by ``indicators.evaluate`` (which
would run every attack again): silent success and incomplete optimization
from the APGD records, transfer failure from the transfer attack, and, once
per model (they do not depend on eps), unavailable gradients, unstable
predictions (``samples`` noise draws) and the unconstrained attack.

Every stored measurement records its run time (``seconds`` in the CSV).
Budgets (attack iterations per image; the full run's defaults are chosen to
finish in a few hours on a 2-core CPU): APGD 50 steps (AutoAttack uses 100),
PGD 20 steps, Square 500 queries (AutoAttack 5000), 20 noise draws for
unstable predictions. ``--quick``: 100 images, APGD 15 steps, PGD 10, Square
60 queries, 10 draws.

What the worst case does with T is the finding, read from the data with its
intervals: the masked attacks' curves climb with T; whether the worst case
stays flat, or the temperature buys some real robustness at small eps, the
verdict printed at the end says, from the intervals and from an exact
McNemar test on the same images (``verdict``).

Usage::

    python experiments/robustness_vs_T.py --quick        # under 10 minutes on 2 CPU cores
    python experiments/robustness_vs_T.py                # the full study

Outputs in ``--out`` (default ``results/robustness_vs_T`` or ``results/robustness_vs_T_quick``):
``robustness_vs_T.csv`` (one row per model, eps and attack), ``robustness_vs_T_indicators.csv``
(one row per model, eps, attack and indicator), ``robustness_vs_T.json`` (both, with the settings),
``robustness_vs_T.png`` (robust accuracy against T) and ``robustness_vs_T_indicators.png``
(the indicator heat map), ``robustness_vs_T_worst.md`` (every model's worst case beside the
masked attack, pooled over the seeds, as a Markdown table: the README's); with several seeds
also ``robustness_vs_T_seeds.md``, the worst case seed by seed as a Markdown table (the README's). Every finished measurement is kept in ``parts/`` and reused by a rerun.
"""
import hashlib
import json
import math
import os
import time

import numpy as np

from ..attacks import apgd, fgsm, indicators, pgd, square_linf
from ..attacks.common import prepare
from ..cli import UsageError, fraction, positive_int
from ..attacks.diagnostics import estimate_temperature, top2_margins
from ..files import atomic_write
from . import common
from ..stats import t_interval, wilson

# The models are grad_vs_T's and attack_vs_T's (same T, training images and epochs): one model cache.
QUICK = {"T": [1, 20, 100], "train_size": 5000, "epochs": 3, "n": 100, "eps": [0.1, 0.2, 0.3],
         "apgd_steps": 15, "pgd_steps": 10, "queries": 60, "samples": 10}
FULL = {"T": common.FULL_T, "train_size": None, "epochs": 5, "n": 500, "eps": [0.1, 0.2, 0.3],
        "apgd_steps": 50, "pgd_steps": 20, "queries": 500, "samples": 20}
# Training one model plus this study's attacks on it, measured on the shared 2-core machine.
SECONDS_PER_MODEL = {"quick": 75, "full": 900}
ATTACK_SEED = 0                      # random starts and Square's search: the same for every model

ATTACKS = ["fgsm", "pgd", "apgd-ce", "apgd-ce-T", "apgd-dlr", "square", "transfer"]
LABELS = {"fgsm": "FGSM, CE at T = 1 (deployed)", "pgd": "PGD, CE at T = 1 (deployed)",
          "apgd-ce": "APGD-CE at T = 1 (deployed)", "apgd-ce-T": "APGD-CE at T_est (estimated)",
          "apgd-dlr": "APGD-DLR", "square": "Square (logits, no gradient)",
          "transfer": "transfer from the T = 1 model", "worst": "worst case per image (all seven)",
          "clean": "clean accuracy"}
INDICATOR_ATTACKS = {"apgd-ce": "ce", "apgd-dlr": "dlr"}        # the runs the indicators read, and their loss
COLUMNS = ["recipe", "T", "seed", "eps", "attack", "label", "attack_T", "n", "n_correct", "n_robust",
           "robust_accuracy", "lo", "hi", "seconds"]
INDICATOR_COLUMNS = ["recipe", "T", "seed", "eps", "attack", "indicator", "n_flagged", "n_applicable",
                     "fraction", "fired"]


# ===== one measurement =====

def key_for(model_key, what, settings, eps=None, **extra):
    """Everything a stored measurement depends on."""
    budget = {"fgsm": {}, "pgd": {"steps": settings["pgd_steps"]}, "apgd-ce": {"steps": settings["apgd_steps"]},
              "apgd-ce-T": {"steps": settings["apgd_steps"]}, "apgd-dlr": {"steps": settings["apgd_steps"]}, "square": {"queries": settings["queries"]},
              "transfer": {"steps": settings["apgd_steps"]}, "clean": {},
              "indicators": {"steps": settings["apgd_steps"], "samples": settings["samples"]}}[what]
    key = {"experiment": "robustness_vs_T", "version": 1, "model": model_key, "what": what, "n": settings["n"],
           "attack_seed": ATTACK_SEED, **budget, **extra}
    if eps is not None:
        key["eps"] = float(eps)
    return key


def flags(a):
    return np.asarray(a, dtype=bool).tolist()


def run_attack(model, attack, x, y, eps, settings, progress):
    """One white-box or black-box attack on one model: per-image robustness, its run time, and for
    APGD at T = 1 the per-image silent-success and incomplete-optimization indicators read on its record."""
    common_args = dict(seed=ATTACK_SEED, progress=progress)
    start = time.perf_counter()
    attack_T = 1.0
    if attack == "fgsm":
        _, r = fgsm(model, x, y, eps, wrt="loss", T=1.0, progress=progress)
    elif attack == "pgd":
        _, r = pgd(model, x, y, eps, step=eps / 4, steps=settings["pgd_steps"], wrt="loss", T=1.0,
                   random_start=True, **common_args)
    elif attack in INDICATOR_ATTACKS:
        _, r = apgd(model, x, y, eps, loss=INDICATOR_ATTACKS[attack], T=1.0, steps=settings["apgd_steps"],
                    **common_args)
    elif attack == "apgd-ce-T":
        attack_T = estimate_temperature(top2_margins(model, x))          # from the logits, not the file
        _, r = apgd(model, x, y, eps, loss="ce", T=attack_T, steps=settings["apgd_steps"], **common_args)
    elif attack == "square":
        _, r = square_linf(model, x, y, eps, queries=settings["queries"], output="logits", **common_args)
        attack_T = None
    else:
        raise ValueError(f"unknown attack {attack!r}")
    if attack == "apgd-dlr":
        attack_T = None                                                   # DLR has no temperature
    out = {"robust": flags(r.initially_correct & ~r.success), "n_correct": int(r.initially_correct.sum()),
           "attack_T": attack_T, "seconds": time.perf_counter() - start}
    if attack in INDICATOR_ATTACKS:
        out["silent_success"] = flags(indicators.silent_success(r.extra["first_success_step"],
                                                                r.extra["best_loss_point_adversarial"]))
        out["incomplete_optimization"] = flags(indicators.incomplete_optimization(r.extra["loss_trace"])[0])
    return out


def model_indicators(model, x, y, settings, progress):
    """The eps-independent indicators of one model, for the cross-entropy at T = 1 and for DLR."""
    start = time.perf_counter()
    xd, yd, _ = prepare(model, x, y)
    out = {}
    for attack, loss in INDICATOR_ATTACKS.items():
        unavailable, _ = indicators.unavailable_gradients(model, xd, yd, loss, 1.0)
        unstable, _ = indicators.unstable_predictions(model, xd, yd, loss, 1.0, samples=settings["samples"],
                                                      seed=ATTACK_SEED)
        unconstrained, _ = indicators.unconstrained_attack_failure(model, x, y, loss, 1.0, "linf",
                                                                   settings["apgd_steps"], progress=progress)
        out[attack] = {"unavailable_gradients": flags(unavailable), "unstable_predictions": flags(unstable),
                       "unconstrained_attack_failure": flags(unconstrained)}
    out["seconds"] = time.perf_counter() - start
    return out


class TransferSource:
    """APGD-CE examples made once per eps on the standard model, kept in ``parts/`` as .npz.

    The same call as ``attacks.transfer`` makes on its source; made once here and
    sent to every model, instead of once per model.
    """

    def __init__(self, folder, model, meta, x, y, settings, progress):
        self.folder, self.model, self.meta = os.path.join(folder, "parts"), model, meta
        self.x, self.y, self.settings, self.progress = x, y, settings, progress
        self.made = {}

    def key(self, eps):
        return key_for(self.meta["key"], "transfer", self.settings, eps, role="source examples")

    def get(self, eps):
        """(x_adv (n, 1, 28, 28), source_fooled (n,) bool) at ``eps``."""
        if eps in self.made:
            return self.made[eps]
        blob = json.dumps(self.key(eps), sort_keys=True)
        path = os.path.join(self.folder, "source-" + hashlib.sha256(blob.encode()).hexdigest()[:16] + ".npz")
        if os.path.exists(path):
            try:
                with np.load(path) as f:
                    if str(f["key"]) == blob:
                        self.made[eps] = (f["x_adv"], f["source_fooled"])
                        return self.made[eps]
            except (OSError, ValueError, KeyError):
                pass                                   # unreadable: make it again
        x_adv, r = apgd(self.model, self.x, self.y, eps, loss="ce", T=1.0, steps=self.settings["apgd_steps"],
                        seed=ATTACK_SEED, progress=self.progress)
        self.made[eps] = (x_adv, np.asarray(r.success))
        with atomic_write(path, "wb", suffix=".npz") as f:
            np.savez_compressed(f, key=np.array(blob), x_adv=x_adv, source_fooled=np.asarray(r.success))
        return self.made[eps]


def run_transfer(model, source, y, eps):
    """The source's examples at eps on ``model``: per-image robustness and whether the source was fooled."""
    x_adv, source_fooled = source.get(eps)
    start = time.perf_counter()
    pred = model.predict(model.xp.asarray(x_adv, dtype=model.dtype))      # NumPy (N,)
    return {"robust": flags(pred == y), "fooled": flags(pred != y), "source_fooled": flags(source_fooled),
            "attack_T": 1.0, "seconds": time.perf_counter() - start}


def measure_model(store, model, meta, source, x, y, settings, progress):
    """Every attack at every eps on one model, and its indicators (through ``store``)."""
    clean = store.get_or_compute(key_for(meta["key"], "clean", settings),
                                 lambda: {"correct": flags(model.predict(model.xp.asarray(x, dtype=model.dtype)) == y)})
    correct = np.asarray(clean["correct"])
    per_model = store.get_or_compute(key_for(meta["key"], "indicators", settings),
                                     lambda: model_indicators(model, x, y, settings, progress))
    results = {}
    for eps in settings["eps"]:
        for attack in ATTACKS:
            key = key_for(meta["key"], attack, settings, eps,
                          **({"source": source.meta["key"]} if attack == "transfer" else {}))
            if attack == "transfer":
                r = store.get_or_compute(key, lambda: run_transfer(model, source, y, eps))
                r = dict(r, robust=flags(correct & np.asarray(r["robust"])))
            else:
                r = store.get_or_compute(key, lambda: run_attack(model, attack, x, y, eps, settings, progress))
            results[(eps, attack)] = r
    return correct, per_model, results


# ===== rows: robust accuracy and the indicator matrix =====

def accuracy_row(recipe, T, seed, eps, attack, robust, correct, result=None):
    robust = np.asarray(robust, dtype=bool)
    k, n = int(robust.sum()), len(robust)
    lo, hi = wilson(k, n)
    result = result or {}
    return {"recipe": recipe, "T": T, "seed": seed, "eps": eps, "attack": attack, "label": LABELS[attack],
            "attack_T": result.get("attack_T"), "n": n, "n_correct": int(np.sum(correct)), "n_robust": k,
            "robust_accuracy": k / n, "lo": lo, "hi": hi, "seconds": result.get("seconds")}


def accuracy_rows(recipe, T, seed, correct, results, settings):
    """Per eps: every attack, then the worst case per image; and the clean accuracy (eps 0).

    Returns
    -------
    rows : list of dicts (``COLUMNS``); worst : {eps: (n,) bool}, the per-image worst case
    """
    rows = [accuracy_row(recipe, T, seed, 0.0, "clean", correct, correct)]
    worst_by_eps = {}
    for eps in settings["eps"]:
        worst = correct.copy()
        for attack in ATTACKS:
            r = results[(eps, attack)]
            robust = np.asarray(r["robust"], dtype=bool)
            worst &= robust
            rows.append(accuracy_row(recipe, T, seed, eps, attack, robust, correct, r))
        rows.append(accuracy_row(recipe, T, seed, eps, "worst", worst, correct))
        worst_by_eps[eps] = worst
    return rows, worst_by_eps


def indicator_rows(recipe, T, seed, correct, per_model, results, settings):
    """The six indicators of the APGD-CE and APGD-DLR runs at every eps, as ``indicators.evaluate`` reads
    them: a failure indicator on the images the attack failed on, and the indicator fires when it flags
    at least ``indicators.MIN_FRACTION`` of the images it applies to."""
    rows = []
    for eps in settings["eps"]:
        tr = results[(eps, "transfer")]
        source_fooled = np.asarray(tr["source_fooled"], dtype=bool)
        transfer_failed = indicators.transfer_failure(source_fooled, tr["fooled"])
        for attack in INDICATOR_ATTACKS:
            r = results[(eps, attack)]
            failed = np.asarray(r["robust"], dtype=bool)           # correct and not fooled
            measured = {**{k: np.asarray(v, dtype=bool) for k, v in per_model[attack].items()},
                        "silent_success": np.asarray(r["silent_success"], dtype=bool),
                        "incomplete_optimization": np.asarray(r["incomplete_optimization"], dtype=bool),
                        "transfer_failure": transfer_failed}
            applicable = {"unavailable_gradients": failed, "unstable_predictions": failed,
                          "silent_success": correct, "incomplete_optimization": failed,
                          "transfer_failure": correct & source_fooled, "unconstrained_attack_failure": correct}
            for k in indicators.INDICATORS:
                n_app, n_flag = int(applicable[k].sum()), int((measured[k] & applicable[k]).sum())
                frac = n_flag / n_app if n_app else math.nan
                rows.append({"recipe": recipe, "T": T, "seed": seed, "eps": eps, "attack": attack, "indicator": k,
                             "n_flagged": n_flag, "n_applicable": n_app, "fraction": frac,
                             "fired": bool(n_flag > 0 and frac >= indicators.MIN_FRACTION)})
    return rows


def pooled(rows, recipe, T, eps, attack):
    """(rate, lo, hi, k, n) pooled over seeds for one point; T = 1 is the standard model."""
    rec = "standard" if T == 1.0 else recipe
    rs = [r for r in rows if r["recipe"] == rec and r["T"] == T and r["eps"] == eps and r["attack"] == attack]
    k, n = sum(r["n_robust"] for r in rs), sum(r["n"] for r in rs)
    if not n:
        return math.nan, math.nan, math.nan, 0, 0
    lo, hi = wilson(k, n)
    return k / n, lo, hi, k, n


def model_list(settings):
    """[(recipe, T)] in table order: the standard model, then each recipe at each T != 1."""
    return [("standard", 1.0)] + [(r, T) for r in settings["recipes"] for T in settings["T"] if T != 1.0]


def images_text(settings):
    """'200 test images', or '200 test images x 3 seeds' when the rates are pooled over seeds."""
    k = len(settings["seeds"])
    return f"{settings['n']} test images" + (f" x {k} seeds" if k > 1 else "")


def over_seeds(rows, settings):
    """The worst case of every model and eps seed by seed, with the mean and its 95 % t-interval
    over the seeds (in %): the spread between trainings, which the pooled interval leaves out.

    Pooled over seeds, each of the ``n`` images counts once per seed, and ``pooled``'s Wilson
    interval treats the copies as independent; this interval is over seeds only.
    """
    models = model_list(settings)
    out = []
    for eps in settings["eps"]:
        for recipe, T in models:
            per_seed = []
            for seed in settings["seeds"]:
                r = next(r for r in rows if r["recipe"] == recipe and r["T"] == T and r["seed"] == seed
                         and r["eps"] == eps and r["attack"] == "worst")
                per_seed.append(100 * r["robust_accuracy"])
            m, lo, hi = t_interval(per_seed)
            out.append({"recipe": recipe, "T": T, "eps": eps, "per_seed": per_seed, "mean": m,
                        "lo": max(lo, 0.0), "hi": min(hi, 100.0)})
    return out


def over_seeds_markdown(seeds_rows, rows):
    """``over_seeds`` as a Markdown table (the README's), with the pooled rate and its Wilson interval."""
    lines = ["| model | eps | seed " + " / ".join(str(s) for s in sorted({r["seed"] for r in rows}))
             + " (%) | mean over seeds [95 % t] | pooled [95 % Wilson] |", "| --- | --- | --- | --- | --- |"]
    for r in seeds_rows:
        rate, lo, hi, k, n = pooled(rows, r["recipe"], r["T"], r["eps"], "worst")
        lines.append(f"| {r['recipe']}, T = {r['T']:g} | {r['eps']:g} | "
                     + " / ".join(f"{v:.1f}" for v in r["per_seed"])
                     + f" | {r['mean']:.1f} [{r['lo']:.1f}, {r['hi']:.1f}] | "
                     f"{100 * rate:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] ({k}/{n}) |")
    return "\n".join(lines)


def worst_markdown(rows, settings):
    """Every model's clean accuracy and, at each eps, the masked attack (APGD-CE at T = 1, as
    deployed) beside the worst case per image with its Wilson interval, as a Markdown table
    (the README's), pooled over the seeds."""
    models = model_list(settings)
    lines = ["| model | clean | " + " | ".join(f"eps {eps:g}: APGD-CE at T=1 / **worst case** [95 %]"
                                               for eps in settings["eps"]) + " |",
             "| --- | --- | " + " | ".join("---" for _ in settings["eps"]) + " |"]
    for recipe, T in models:
        cells = [f"{recipe}, T = {T:g}", f"{100 * pooled(rows, recipe, T, 0.0, 'clean')[0]:.1f}"]
        for eps in settings["eps"]:
            masked = pooled(rows, recipe, T, eps, "apgd-ce")[0]
            rate, lo, hi, _, _ = pooled(rows, recipe, T, eps, "worst")
            cells.append(f"{100 * masked:.1f} / **{100 * rate:.1f}** [{100 * lo:.1f}, {100 * hi:.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ===== figures =====

STYLE = {"fgsm": ("tab:orange", "v-"), "pgd": ("tab:red", "^-"), "apgd-ce": ("tab:purple", "o-"),
         "apgd-ce-T": ("tab:cyan", "X-"),
         "apgd-dlr": ("tab:blue", "s-"), "square": ("tab:green", "D-"), "transfer": ("tab:brown", "P-")}


def plot_accuracy(rows, path, settings):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes, epss, Ts = settings["recipes"], settings["eps"], settings["T"]
    fig, axes = plt.subplots(len(recipes), len(epss), figsize=(4.6 * len(epss), 3.9 * len(recipes) + 0.9),
                             sharey=True, squeeze=False)
    for i, recipe in enumerate(recipes):
        for j, eps in enumerate(epss):
            ax = axes[i, j]
            clean = [100 * pooled(rows, recipe, T, 0.0, "clean")[0] for T in Ts]
            ax.plot(Ts, clean, ":", color="0.55", lw=1.2, label=LABELS["clean"])
            for a, attack in enumerate(ATTACKS):
                c, st = STYLE[attack]
                pts = [pooled(rows, recipe, T, eps, attack) for T in Ts]
                v = np.array([100 * p[0] for p in pts])
                lo, hi = np.array([100 * p[1] for p in pts]), np.array([100 * p[2] for p in pts])
                xs = common.nudge(Ts, a, len(ATTACKS) + 1, factor=1.04)
                ax.errorbar(xs, v, yerr=[v - lo, hi - v], fmt=st, color=c, ms=4, lw=1.1, elinewidth=0.7,
                            capsize=2, alpha=0.85, label=LABELS[attack])
            pts = [pooled(rows, recipe, T, eps, "worst") for T in Ts]
            v = np.array([100 * p[0] for p in pts])
            lo, hi = np.array([100 * p[1] for p in pts]), np.array([100 * p[2] for p in pts])
            ax.fill_between(Ts, lo, hi, color="k", alpha=0.15, lw=0)
            ax.plot(Ts, v, "o-", color="k", lw=3, ms=6, label=LABELS["worst"] + ", 95 % band", zorder=5)
            common.temperature_axis(ax, Ts)
            ax.set_ylim(-3, 103)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{recipe}, L-inf eps = {eps:g}", fontsize=10)
            if j == 0:
                ax.set_ylabel("robust accuracy (%), 95 % Wilson intervals")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8.5, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"Robust accuracy against the training temperature, deployed at T = 1, on {images_text(settings)} "
                 f"(T = 1 is the standard model; {settings['architecture']} network, {settings['epochs']} epochs "
                 f"on {settings['train_size'] or 55000} images)\nAPGD {settings['apgd_steps']} steps, PGD "
                 f"{settings['pgd_steps']} steps, Square {settings['queries']} queries", fontsize=10)
    fig.tight_layout(rect=(0, 0.07 if len(recipes) > 1 else 0.14, 1, 1))
    common.save_figure(fig, path)
    plt.close(fig)


def plot_indicators(ind_rows, path, settings, eps):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = model_list(settings)
    names = list(indicators.INDICATORS)
    fig, axes = plt.subplots(1, len(INDICATOR_ATTACKS), figsize=(6.3 * len(INDICATOR_ATTACKS),
                                                                  1.6 + 0.42 * len(models)), squeeze=False)
    for ax, attack in zip(axes[0], INDICATOR_ATTACKS):
        M = np.full((len(models), len(names)), np.nan)
        fired = np.zeros_like(M, dtype=bool)
        for i, (recipe, T) in enumerate(models):
            for j, k in enumerate(names):
                rs = [r for r in ind_rows if r["recipe"] == recipe and r["T"] == T and r["eps"] == eps
                      and r["attack"] == attack and r["indicator"] == k]
                n_app, n_flag = sum(r["n_applicable"] for r in rs), sum(r["n_flagged"] for r in rs)
                if n_app:
                    M[i, j] = n_flag / n_app
                    fired[i, j] = n_flag > 0 and n_flag / n_app >= indicators.MIN_FRACTION
        cmap = matplotlib.colormaps["Reds"].copy()
        cmap.set_bad("0.85")
        ax.imshow(np.ma.masked_invalid(M), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for i in range(len(models)):
            for j in range(len(names)):
                text = "n/a" if np.isnan(M[i, j]) else f"{100 * M[i, j]:.0f}" + (" *" if fired[i, j] else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8.5,
                        color="white" if M[i, j] > 0.6 else "black", fontweight="bold" if fired[i, j] else None)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([k.replace("_", "\n") for k in names], fontsize=8)
        ax.set_yticks(range(len(models)))
        ax.set_yticklabels([f"{r}, T = {T:g}" for r, T in models], fontsize=8.5)
        ax.set_title(f"{'APGD-CE at T = 1' if attack == 'apgd-ce' else 'APGD-DLR'}", fontsize=10)
    fig.suptitle(f"Indicators of attack failure at L-inf eps = {eps:g}, {images_text(settings)}: % of the images each "
                 f"applies to that it flags\n(* fires: at least {100 * indicators.MIN_FRACTION:.0f} %; grey n/a: "
                 f"no image it applies to; APGD {settings['apgd_steps']} steps)", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)


# ===== the finding, in words =====

def pct(p):
    return f"{100 * p[0]:.1f} % [{100 * p[1]:.1f}, {100 * p[2]:.1f}]"


def mcnemar(robust_a, robust_b):
    """Exact two-sided McNemar test of two models' per-image flags on the *same* images.

    Returns (b, c, p): b images robust under a only, c under b only, and the
    binomial p-value of b against b + c fair coin flips (1 when b + c = 0).
    """
    from scipy.stats import binomtest
    a, b_ = np.asarray(robust_a, dtype=bool), np.asarray(robust_b, dtype=bool)
    b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    return b, c, (1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue))


def paired(worst, recipe, T, eps, seeds):
    """McNemar of a model's worst case against its seed's standard model, discordant pairs pooled over seeds."""
    b = c = 0
    for seed in seeds:
        bi, ci, _ = mcnemar(worst[(recipe, T, seed)][eps], worst[("standard", 1.0, seed)][eps])
        b, c = b + bi, c + ci
    return b, c, (1.0 if b + c == 0 else mcnemar([True] * b + [False] * c, [False] * b + [True] * c)[2])


def verdict(rows, settings, worst):
    """What the worst case does with T, and how far the masked attacks climb.

    Each model's worst case is compared with the standard model's on the same images: the 95 %
    Wilson intervals are printed, and the difference is called resolved when the exact McNemar test
    on the per-image flags (``worst``: {(recipe, T, seed): {eps: (n,) bool}}) gives p < 0.05. The
    paired test uses what the intervals ignore, that the images are the same, so it resolves smaller
    differences; "not resolved" is still not "equal"."""
    lines = []
    Ts = [T for T in settings["T"] if T != 1.0]
    if not Ts:
        return lines
    Tmax = max(Ts)
    for eps in settings["eps"]:
        base = pooled(rows, None, 1.0, eps, "worst")
        lines.append(f"eps {eps:g}: worst case per image on the standard model (T = 1): {pct(base)}")
        for recipe in settings["recipes"]:
            parts, resolved = [], []
            for T in Ts:
                p = pooled(rows, recipe, T, eps, "worst")
                diff = 100 * (p[0] - base[0])
                b, c, pval = paired(worst, recipe, T, eps, settings["seeds"])
                parts.append(f"T = {T:g}: {pct(p)} ({diff:+.1f} points; robust only here {b}, only on the "
                             f"standard model {c}, McNemar p = {pval:.2g})")
                if pval < 0.05:
                    resolved.append((T, diff))
            lines.append(f"  {recipe}: " + "; ".join(parts))
            if resolved:
                more = [f"T = {T:g} ({d:+.1f} points)" for T, d in resolved]
                lines.append(f"  -> {recipe}: the worst case differs from the standard model's (paired test, "
                             f"p < 0.05) at " + ", ".join(more))
            else:
                lines.append(f"  -> {recipe}: no difference from the standard model's worst case resolved at "
                             f"eps {eps:g} (paired test, p >= 0.05 at every T)")
            masked = [pooled(rows, recipe, T, eps, a) for T in (1.0, Tmax) for a in ("fgsm", "apgd-ce")]
            lines.append(f"     masked attacks, T = 1 -> {Tmax:g}: FGSM {100 * masked[0][0]:.1f} -> "
                         f"{100 * masked[2][0]:.1f} %, APGD-CE at T = 1 {100 * masked[1][0]:.1f} -> "
                         f"{100 * masked[3][0]:.1f} % robust")
    return lines


# ===== the script =====

def add_options(parser):
    parser.add_argument("--eps", type=fraction, nargs="+", help="L-infinity budgets, pixels in [0, 1] "
                                                             "(default 0.1 0.2 0.3)")
    parser.add_argument("--steps", type=positive_int, help="APGD iterations, also the transfer source's and the "
                                                  "unconstrained check's (default 50; quick 15)")
    parser.add_argument("--pgd-steps", type=positive_int, help="PGD iterations (default 20; quick 10)")
    parser.add_argument("--queries", type=positive_int, help="Square queries per image (default 500; quick 60)")
    parser.add_argument("--samples", type=positive_int, help="noise draws per image for the unstable-predictions "
                                                    "indicator (default 20; quick 10)")
    parser.add_argument("--indicator-eps", type=fraction,
                        help="the eps of the indicator heat map (default the smallest eps; every eps is in the CSV)")


def study_settings(args, settings):
    """The attack options on top of the common settings (explicit options win, then --quick)."""
    base = QUICK if settings["quick"] else FULL
    s = dict(settings)
    s["eps"] = sorted(set(args.eps or base["eps"]))
    for name, opt in (("apgd_steps", "steps"), ("pgd_steps", "pgd_steps"), ("queries", "queries"),
                      ("samples", "samples")):
        value = getattr(args, opt)                 # each checked as it was parsed (>= 1)
        s[name] = value if value is not None else base[name]
    s["indicator_eps"] = args.indicator_eps if args.indicator_eps is not None else s["eps"][0]
    if s["indicator_eps"] not in s["eps"]:
        raise UsageError(f"--indicator-eps must be one of the measured eps {s['eps']}, got {s['indicator_eps']}")
    return s


def print_tables(rows, ind_rows, settings):
    models = model_list(settings)
    for eps in settings["eps"]:
        print(f"\nrobust accuracy (%) at L-inf eps {eps:g}, {images_text(settings)}; "
              f"worst case with its 95 % Wilson interval")
        table = []
        for recipe, T in models:
            cell = {"model": f"{recipe} T={T:g}", "clean": 100 * pooled(rows, recipe, T, 0.0, "clean")[0]}
            for a in ATTACKS:
                cell[a] = 100 * pooled(rows, recipe, T, eps, a)[0]
            p = pooled(rows, recipe, T, eps, "worst")
            cell["worst"] = f"{100 * p[0]:.1f} [{100 * p[1]:.1f}, {100 * p[2]:.1f}]"
            table.append(cell)
        common.print_table(table, ["model", "clean"] + ATTACKS + ["worst"])
    eps = settings["indicator_eps"]
    print(f"\nindicators of attack failure at eps {eps:g} (% of the images each applies to that it flags; "
          f"* fires), read on APGD-CE at T = 1 | APGD-DLR")
    table = []
    for recipe, T in models:
        cell = {"model": f"{recipe} T={T:g}"}
        for k in indicators.INDICATORS:
            vals = []
            for attack in INDICATOR_ATTACKS:
                rs = [r for r in ind_rows if r["recipe"] == recipe and r["T"] == T and r["eps"] == eps
                      and r["attack"] == attack and r["indicator"] == k]
                n_app, n_flag = sum(r["n_applicable"] for r in rs), sum(r["n_flagged"] for r in rs)
                fired = n_flag > 0 and n_app and n_flag / n_app >= indicators.MIN_FRACTION
                vals.append("n/a" if not n_app else f"{100 * n_flag / n_app:.0f}" + ("*" if fired else ""))
            cell[k] = " | ".join(vals)
        table.append(cell)
    common.print_table(table, ["model"] + list(indicators.INDICATORS),
                       ["model", "unavailable", "unstable", "silent", "incomplete", "transfer", "unconstrained"])


def main():
    parser = common.make_parser(__doc__)
    common.add_common_options(parser, QUICK, FULL)
    add_options(parser)
    args = parser.parse_args()
    settings = study_settings(args, common.settings_from(args, QUICK, FULL))
    out = args.out or os.path.join("results", "robustness_vs_T_quick" if settings["quick"] else "robustness_vs_T")
    common.check_output(out)                  # before any model is trained
    common.announce(settings, "robustness_vs_T", seconds_per_model_quick=SECONDS_PER_MODEL["quick"],
                    seconds_per_model_full=SECONDS_PER_MODEL["full"])
    print(f"attacks at L-inf eps {settings['eps']} on {settings['n']} test images: FGSM and PGD "
          f"({settings['pgd_steps']} steps) on the cross-entropy at T = 1, APGD-CE and APGD-DLR "
          f"({settings['apgd_steps']} steps), Square ({settings['queries']} queries), transfer from the "
          f"standard model; indicators with {settings['samples']} noise draws", flush=True)
    progress = not args.no_progress

    data = common.load_data(args)
    x, y = common.test_subset(data, settings["n"])
    y = y.astype(np.int64)
    store = common.ResultStore(out)
    rows, ind_rows, sources, worst = [], [], {}, {}
    for recipe, T, seed in common.grid(settings):
        model, meta = common.model_for(recipe, T, seed, settings, args, data)
        if recipe == "standard":               # the grid puts each seed's standard model first
            sources[seed] = TransferSource(out, model, meta, x, y, settings, progress)
        print(f"{recipe} T = {T:g} seed {seed}", flush=True)
        correct, per_model, results = measure_model(store, model, meta, sources[seed], x, y, settings, progress)
        new, worst[(recipe, T, seed)] = accuracy_rows(recipe, T, seed, correct, results, settings)
        rows += new
        ind_rows += indicator_rows(recipe, T, seed, correct, per_model, results, settings)

    common.write_csv(os.path.join(out, "robustness_vs_T.csv"), rows, COLUMNS)
    common.write_csv(os.path.join(out, "robustness_vs_T_indicators.csv"), ind_rows, INDICATOR_COLUMNS)
    with atomic_write(os.path.join(out, "robustness_vs_T_worst.md"), "w", suffix=".md") as f:
        f.write(worst_markdown(rows, settings) + "\n")
    seeds_rows = over_seeds(rows, settings) if len(settings["seeds"]) > 1 else []
    if seeds_rows:
        with atomic_write(os.path.join(out, "robustness_vs_T_seeds.md"), "w", suffix=".md") as f:
            f.write(over_seeds_markdown(seeds_rows, rows) + "\n")
    common.write_json(os.path.join(out, "robustness_vs_T.json"),
                      {"settings": settings, "attacks": LABELS, "rows": rows, "indicators": ind_rows,
                       "worst_over_seeds": seeds_rows})
    plot_accuracy(rows, os.path.join(out, "robustness_vs_T.png"), settings)
    plot_indicators(ind_rows, os.path.join(out, "robustness_vs_T_indicators.png"), settings,
                    settings["indicator_eps"])

    print_tables(rows, ind_rows, settings)
    if seeds_rows:
        print(f"\nworst case per seed (%), and its mean over the {len(settings['seeds'])} seeds with a 95 % "
              "t-interval (the pooled Wilson intervals above count the same images once per seed)")
        common.print_table([{"model": f"{r['recipe']} T={r['T']:g}", "eps": f"{r['eps']:g}",
                             "per seed": " / ".join(f"{v:.1f}" for v in r["per_seed"]),
                             "mean [95 % t]": f"{r['mean']:.1f} [{r['lo']:.1f}, {r['hi']:.1f}]"}
                            for r in seeds_rows], ["model", "eps", "per seed", "mean [95 % t]"])
    print()
    for line in verdict(rows, settings, worst):
        print(line)
    print(f"\nwrote {out}/robustness_vs_T.csv, robustness_vs_T_indicators.csv, robustness_vs_T.json, "
          f"robustness_vs_T_worst.md, robustness_vs_T.png, robustness_vs_T_indicators.png"
          + (", robustness_vs_T_seeds.md" if seeds_rows else ""))
    return 0

