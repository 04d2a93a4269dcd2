"""Attack success rate against the training temperature T, masked and with the fix.

For each training temperature T and each recipe (``temperature``: hard labels
at T; ``distilled``: defensive distillation at T), deployed at T = 1, three
attacks run on the same test images, each pointed at two gradient sources:

* **masked**: the saturated softmax as deployed (T = 1), what Papernot et al.
  measured. At a high T its float32 gradient is mostly exactly zero;
* **the fix** (Carlini and Wagner): the logits, or the softmax rescaled to
  softmax(z / T_train). The gradient is back.

=======  =====================================  ====================================
attack   masked                                 fixed
=======  =====================================  ====================================
JSMA     probabilities softmax(z), T = 1        probabilities softmax(z / T_train)
FGSM     cross-entropy of softmax(z), T = 1     cross-entropy of softmax(z / T_train)
C&W L2   f6 on probabilities softmax(z), T = 1  f6 on the logits (their attack)
=======  =====================================  ====================================

JSMA and FGSM each run in both **formulations** of their arithmetic (the
gradients are the same; see ``attacks/jsma.py`` and ``attacks/fgsm.py``):

* ``exact``: JSMA's pair scores rescaled so that float32 products of tiny
  gradients do not underflow, the cross-entropy gradient without the 1 - p
  cancellation. A failure means the gradient really is zero.
* ``paper``: the published float32 arithmetic (Papernot et al.'s Algorithm 3
  on the raw products; softmax - onehot). The like-for-like reproduction of
  the published success rates.

JSMA is Papernot's setting: targeted at each of the 9 other classes of every
source image, increasing pixels (theta = +1), at most 14.5 % of the pixels
changed. FGSM is untargeted, at a few epsilons. C&W L2 is targeted at one
random other class, on a smaller sample (it takes hundreds of gradient steps;
``--cw-paper-budget`` runs Carlini and Wagner's own budget instead).

Success is counted over the images the model classified correctly before the
attack, and the denominator is printed beside every rate (for JSMA it is
9 x the correctly classified source images). Every rate has a 95 % Wilson
interval, and every "N x fewer successes than the T = 1 model" a 95 % Katz
interval (``scratchnet.stats``).

Usage::

    python experiments/attack_vs_T.py --quick        # 5 minutes on 2 busy CPU cores, models cached
    python experiments/attack_vs_T.py                # the full study

Outputs in ``--out`` (default ``results/attack_vs_T`` or ``results/attack_vs_T_quick``):
``attack_vs_T.csv`` (one row per model, attack, source and formulation),
``attack_vs_T_ratios.csv`` (each rate against the T = 1 model's),
``attack_vs_T.json`` (both, and the settings), ``attack_vs_T.png`` (success
rate against T) and ``attack_vs_T_distortion.png`` (mean distortion of the
successful attacks).
"""
import math
import os

import numpy as np

from ..attacks import cw_l2, fgsm, jsma
from ..attacks.cw import PAPER_BUDGET
from ..cli import UsageError
from ..stats import ratio_interval, wilson
from . import common

# The models are grad_vs_T's (same T, training images and epochs), so the two
# scripts share one model cache. ``n`` is the JSMA source images (x 9 targets).
CW_DEFAULT_BUDGET = {"binary_steps": 5, "steps": 100, "lr": 0.05, "c": 0.1, "abort_early": False}
QUICK = {"T": [1, 20, 100], "train_size": 5000, "epochs": 3, "n": 20, "n_fgsm": 200, "n_cw": 10,
         "eps": [0.1, 0.2, 0.3]}
FULL = {"T": common.FULL_T, "train_size": None, "epochs": 5, "n": 100, "n_fgsm": 1000, "n_cw": 100,
        "eps": [0.05, 0.1, 0.2, 0.3]}
JSMA_MAX_DISTORTION = 0.145            # Papernot et al.: at most 14.5 % of the pixels
CW_TARGET_SEED = 1234                  # the random target class of each C&W image

PAPERNOT_JSMA = (95.89, 0.45)          # % success at T = 1 and at T = 100 (unverified, see SCIENCE.md)
SEED_PAPER_FACTOR_AT_20 = 10           # "about 10x fewer successes at T = 20"
CW_WITH_FIX = 100.0                    # % success on distilled networks (Carlini and Wagner's abstract)

SOURCES = {"masked": "the deployed softmax at T = 1 (what Papernot et al. attacked)",
           "fixed": "softmax(z / T_train) for JSMA and FGSM, the logits for C&W (Carlini and Wagner)"}
FORMULATIONS = {"exact": "rescaled JSMA pair scores; the cross-entropy gradient without cancellation",
                "paper": "the published float32 arithmetic: JSMA's raw products, softmax - onehot"}
WITH_FORMULATION = ("jsma", "fgsm")    # C&W's f6 has one arithmetic: its rows have formulation None
COLUMNS = ["attack", "eps", "recipe", "T", "seed", "source", "formulation", "wrt", "attack_T", "n_images",
           "n_correct", "n_attempts", "n_success", "success_rate", "success_lo", "success_hi",
           "untargeted_success_rate", "mean_l0_successful", "mean_l0_percent_successful", "mean_l2_successful",
           "mean_linf_successful", "mean_iterations_successful", "empty_saliency", "params"]
RATIO_COLUMNS = ["attack", "eps", "recipe", "T", "seed", "source", "formulation", "base_success",
                 "base_attempts", "n_success", "n_attempts", "fewer", "fewer_lo", "fewer_hi", "zero_corrected"]


# ===== one measurement =====

def gradient_source(attack, source, T):
    """(wrt, T) an attack differentiates for a source and a training temperature."""
    if source == "masked":
        return ("loss" if attack == "fgsm" else "probs"), 1.0
    if attack == "cw":
        return "logits", 1.0                   # C&W's own attack: f6 on the logits, T plays no role
    return ("loss" if attack == "fgsm" else "probs"), T      # the 1 / T_train rescaling


def attack_key(model_key, attack, source, T, settings, eps=None, formulation=None):
    """Everything an attack result depends on (so another script can reuse it)."""
    wrt, attack_T = gradient_source(attack, source, T)
    key = {"experiment": "attack_vs_T", "version": 2, "model": model_key, "attack": attack,
           "wrt": wrt, "attack_T": attack_T, "formulation": formulation}
    if attack == "jsma":
        key.update(n=settings["n"], max_distortion=JSMA_MAX_DISTORTION)
    elif attack == "fgsm":
        key.update(n=settings["n_fgsm"], eps=float(eps))
    else:
        key.update(n=settings["n_cw"], target_seed=CW_TARGET_SEED, **settings["cw"])
    return key


def jsma_all_targets(x, y):
    """Each source image repeated once per other class: (9N images, labels, targets)."""
    K = 10
    shifts = np.arange(1, K)                                  # target = (label + s) mod K
    xs = np.repeat(x, K - 1, axis=0)
    ys = np.repeat(y, K - 1)
    ts = (ys + np.tile(shifts, len(y))) % K
    return xs, ys.astype(np.int64), ts.astype(np.int64)


def cw_targets(y):
    """One random other class per image (fixed seed, the same for every model)."""
    rng = np.random.default_rng(CW_TARGET_SEED)
    return ((y + rng.integers(1, 10, size=len(y))) % 10).astype(np.int64)


def run_attack(model, attack, source, T, data, settings, progress, eps=None, formulation=None):
    """Run one attack on one model; a JSON-able summary (AttackResult.summary() plus counts)."""
    wrt, attack_T = gradient_source(attack, source, T)
    if attack == "jsma":
        x, y = common.test_subset(data, settings["n"])
        xs, ys, ts = jsma_all_targets(x, y)
        _, res = jsma(model, xs, ys, ts, wrt=wrt, T=attack_T, theta=1.0,
                      max_distortion=JSMA_MAX_DISTORTION, progress=progress, formulation=formulation)
    elif attack == "fgsm":
        x, y = common.test_subset(data, settings["n_fgsm"])
        _, res = fgsm(model, x, y, eps, wrt=wrt, T=attack_T, progress=progress, formulation=formulation)
    else:
        x, y = common.test_subset(data, settings["n_cw"])
        _, res = cw_l2(model, x, y, cw_targets(y), wrt=wrt, T=attack_T, progress=progress, **settings["cw"])
    s = res.summary()
    pixels = int(np.prod(x.shape[1:]))
    return {"wrt": wrt, "attack_T": attack_T, "n_images": s["n_images"], "n_correct": s["n_correct"],
            "n_success": s["n_success"], "success_rate": s["success_rate"],
            "untargeted_success_rate": s["untargeted_success_rate"],
            "mean_l0_successful": s["mean_l0_successful"],
            "mean_l0_percent_successful": 100 * s["mean_l0_successful"] / pixels,
            "mean_l2_successful": s["mean_l2_successful"], "mean_linf_successful": s["mean_linf_successful"],
            "mean_iterations_successful": s["mean_iterations_successful"],
            "empty_saliency": res.extra.get("empty_saliency"), "params": s["params"], "note": s["note"]}


ATTACKS = ("jsma", "fgsm", "cw")


def attack_plan(settings):
    """[(attack, eps)] in the order they run: JSMA, FGSM at each epsilon, C&W (those in
    ``settings["attacks"]``, default all)."""
    chosen = settings.get("attacks", ATTACKS)
    plan = ([("jsma", None)] if "jsma" in chosen else []) + \
        ([("fgsm", e) for e in settings["eps"]] if "fgsm" in chosen else [])
    return plan + ([("cw", None)] if settings["n_cw"] > 0 and "cw" in chosen else [])


def formulations_of(attack, formulations):
    """The formulations an attack runs in: C&W has one arithmetic only (None)."""
    return formulations if attack in WITH_FORMULATION else (None,)


def with_interval(row):
    """Add the 95 % Wilson interval of the success rate (NaN where nothing was attempted)."""
    if row["n_attempts"] > 0:
        row["success_lo"], row["success_hi"] = wilson(int(row["n_success"]), int(row["n_attempts"]))
    else:
        row["success_lo"] = row["success_hi"] = math.nan
    return row


def measure_model(store, model, meta, T, data, settings, progress, attacks=None, formulations=tuple(FORMULATIONS)):
    """Every (attack, formulation, source) on one model, through ``store`` (finished ones are reused)."""
    rows = []
    for attack, eps in attacks or attack_plan(settings):
        for formulation in formulations_of(attack, formulations):
            for source in SOURCES:
                if T == 1.0 and source == "fixed" and attack != "cw":
                    # at T_train = 1 the rescaled softmax *is* the deployed one: reuse, do not rerun
                    r = dict(next(r for r in rows if r["attack"] == attack and r["eps"] == eps
                                  and r["formulation"] == formulation and r["source"] == "masked"))
                    r["source"] = "fixed"
                    rows.append(r)
                    continue
                key = attack_key(meta["key"], attack, source, T, settings, eps, formulation)
                r = store.get_or_compute(key, lambda: run_attack(model, attack, source, T, data, settings,
                                                                 progress, eps, formulation))
                rows.append({"attack": attack, "eps": eps, "source": source, "formulation": formulation, **r})
    for r in rows:
        r["n_attempts"] = r["n_correct"]          # for JSMA: 9 targets x correctly classified sources
        with_interval(r)
    return rows


def ratio_rows(rows):
    """Each model's success against the standard (T = 1) model's: "N x fewer", with its interval.

    ``fewer`` = (k_1 / n_1) / (k_T / n_T), the T = 1 model's rate over this
    model's, same attack, source, formulation and seed; ``fewer_lo`` and
    ``fewer_hi`` its 95 % Katz interval. Where a count is 0 (no success
    left), 0.5 is added to every cell (``zero_corrected``): the ratio is then
    a finite stand-in and ``fewer_lo`` the bound that matters ("at least").
    """
    out = []
    for r in rows:
        if r["recipe"] == "standard":
            continue
        base = next((b for b in rows if b["recipe"] == "standard" and b["seed"] == r["seed"]
                     and b["attack"] == r["attack"] and b["eps"] == r["eps"] and b["source"] == r["source"]
                     and b["formulation"] == r["formulation"]), None)
        if base is None or base["n_attempts"] == 0 or r["n_attempts"] == 0:
            continue
        k1, n1, k2, n2 = base["n_success"], base["n_attempts"], r["n_success"], r["n_attempts"]
        ratio, lo, hi = ratio_interval(k1, n1, k2, n2)
        out.append({**{c: r[c] for c in ("attack", "eps", "recipe", "T", "seed", "source", "formulation")},
                    "base_success": k1, "base_attempts": n1, "n_success": k2, "n_attempts": n2,
                    "fewer": ratio, "fewer_lo": lo, "fewer_hi": hi,
                    "zero_corrected": 0 in (k1, n1 - k1, k2, n2 - k2)})
    return out


# ===== output =====

def label(attack, eps=None):
    if attack == "jsma":
        return "JSMA (9 targets per image, <= 14.5 % pixels)"
    if attack == "fgsm":
        return f"FGSM eps = {eps:g}"
    return "C&W L2 (one random target; masked = f6 on the probabilities)"


def series(rows, attack, eps, recipe, source, key, formulation="exact"):
    """(Ts, values averaged over seeds) for one line; T = 1 is the standard model."""
    formulation = formulation if attack in WITH_FORMULATION else None
    Ts = sorted({r["T"] for r in rows})
    out = []
    for T in Ts:
        rec = "standard" if T == 1.0 else recipe
        vals = [r[key] for r in rows if r["recipe"] == rec and r["T"] == T and r["attack"] == attack
                and r["eps"] == eps and r["source"] == source and r["formulation"] == formulation]
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        out.append(float(np.mean(vals)) if vals else math.nan)
    return Ts, out


def pooled(rows, attack, recipe, T, source, eps=None, formulation="exact"):
    """(rate, lo, hi, successes, attempts) pooled over seeds (and over recipes if ``recipe`` is a
    list); None where no such row exists."""
    formulation = formulation if attack in WITH_FORMULATION else None
    recipes = ["standard"] if T == 1.0 else (recipe if isinstance(recipe, list) else [recipe])
    rs = [r for r in rows if r["attack"] == attack and r["recipe"] in recipes and r["T"] == T
          and r["source"] == source and r["eps"] == eps and r["formulation"] == formulation]
    if not rs:
        return None
    k, n = sum(r["n_success"] for r in rs), sum(r["n_attempts"] for r in rs)
    if n == 0:
        return math.nan, math.nan, math.nan, 0, 0
    lo, hi = wilson(int(k), int(n))
    return k / n, lo, hi, int(k), int(n)


STYLE = {("temperature", "masked", "exact"): ("tab:blue", "o-"), ("temperature", "fixed", "exact"): ("tab:blue", "s--"),
         ("distilled", "masked", "exact"): ("tab:red", "o-"), ("distilled", "fixed", "exact"): ("tab:red", "s--"),
         ("temperature", "masked", "paper"): ("tab:cyan", "^:"), ("distilled", "masked", "paper"): ("tab:orange", "^:")}
SOURCE_LABEL = {"masked": "masked (softmax at T = 1)", "fixed": "fixed (rescaled / logits)"}


def plot_success(rows, path, settings):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = attack_plan(settings)
    fig, axes = plt.subplots(1, len(plan), figsize=(4.3 * len(plan), 4.8), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (attack, eps) in zip(axes, plan):
        lines = [(recipe, source, "exact") for recipe in settings["recipes"] for source in SOURCES]
        if attack in WITH_FORMULATION:
            lines += [(recipe, "masked", "paper") for recipe in settings["recipes"]]
        for i, (recipe, source, formulation) in enumerate(lines):
            c, st = STYLE[(recipe, source, formulation)]
            Ts = sorted({r["T"] for r in rows})
            pts = [pooled(rows, attack, recipe, T, source, eps, formulation) for T in Ts]
            keep = [j for j, p in enumerate(pts) if p is not None and not math.isnan(p[0])]
            xs = np.array(common.nudge(Ts, i, len(lines)))[keep]
            rate = np.array([100 * pts[j][0] for j in keep])
            lo = np.array([100 * pts[j][1] for j in keep])
            hi = np.array([100 * pts[j][2] for j in keep])
            name = f"{recipe}, {SOURCE_LABEL[source]}" + (", paper arithmetic" if formulation == "paper" else "")
            ax.plot(xs, rate, st, color=c, alpha=1 if source == "masked" else 0.75, label=name)
            ax.errorbar(xs, rate, yerr=[rate - lo, hi - rate], fmt="none", ecolor=c, capsize=3, alpha=0.8)
        n = sum(r["n_attempts"] for r in rows if r["attack"] == attack and r["eps"] == eps
                and r["recipe"] == "standard" and r["source"] == "masked"
                and r["formulation"] == (None if attack == "cw" else "exact"))
        ax.set_title(f"{label(attack, eps)}\n({n} attempts on the T = 1 model)", fontsize=10)
        common.temperature_axis(ax, Ts)
        ax.set_ylim(-3, 103)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("attack success rate (% of correctly classified)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, -0.06))
    fig.suptitle(f"Attack success against the training temperature, deployed at T = 1, with 95 % Wilson "
                 f"intervals ({settings['architecture']} network, {settings['epochs']} epochs on "
                 f"{settings['train_size'] or 55000} images; T = 1 is the standard model, shared by both recipes)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    common.save_figure(fig, path)
    plt.close(fig)


def plot_distortion(rows, path, settings):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = attack_plan(settings)
    panels = [("jsma", None, "mean_l0_percent_successful", "% of pixels changed (L0)")] if ("jsma", None) in plan else []
    if ("cw", None) in plan:
        panels.append(("cw", None, "mean_l2_successful", "L2 distance (pixels in [0, 1])"))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6))
    lines = [(recipe, source) for recipe in settings["recipes"] for source in SOURCES]
    for ax, (attack, eps, key, unit) in zip(np.atleast_1d(axes), panels):
        for i, (recipe, source) in enumerate(lines):
            c, st = STYLE[(recipe, source, "exact")]
            Ts, v = series(rows, attack, eps, recipe, source, key)
            ax.plot(common.nudge(Ts, i, len(lines)), v, st, color=c, alpha=1 if source == "masked" else 0.75,
                    label=f"{recipe}, {SOURCE_LABEL[source]}")
        ax.set_title(f"{label(attack, eps)}:\nmean distortion of the successful attacks only (no point where "
                     "none succeeded;\nwhere few succeed, they are the easy images)", fontsize=10)
        common.temperature_axis(ax, Ts)
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5)
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)


def pct(r):
    """'12.3 % [10.1, 14.9] (45/366)': a rate, its 95 % Wilson interval and its counts."""
    if r["n_attempts"] == 0:
        return "- (0/0)"
    return (f"{100 * r['success_rate']:.1f} % [{100 * r['success_lo']:.1f}, {100 * r['success_hi']:.1f}] "
            f"({r['n_success']}/{r['n_attempts']})")


def fmt_rate(p):
    """A pooled (rate, lo, hi, k, n) as text."""
    if p is None or p[4] == 0:
        return "no attempt"
    return f"{100 * p[0]:.1f} % [{100 * p[1]:.1f}, {100 * p[2]:.1f}] ({p[3]}/{p[4]})"


def fmt_fewer(base, p):
    """"N x fewer [lo, hi]" of a pooled rate against the T = 1 model's pooled rate."""
    if base is None or p is None or base[4] == 0 or p[4] == 0:
        return "no ratio"
    ratio, lo, hi = ratio_interval(base[3], base[4], p[3], p[4])
    if p[3] == 0:
        return f"no success left: at least {lo:.0f}x fewer at 95 %"
    return f"{ratio:.1f}x fewer [95 %: {lo:.1f}, {hi:.1f}]"


def verdict(rows, settings):
    """Plain sentences: what we measured, beside the seed paper, Papernot et al. and C&W."""
    lines = []
    Ts = [T for T in settings["T"] if T != 1.0]
    Tmax = max(Ts) if Ts else None
    if not any(r["attack"] == "jsma" for r in rows):
        Ts = []                                   # no JSMA run: only the C&W sentence below
    for formulation in FORMULATIONS if Ts else ():
        base = pooled(rows, "jsma", None, 1.0, "masked", formulation=formulation)
        for recipe in settings["recipes"]:
            for T in Ts:
                m = pooled(rows, "jsma", recipe, T, "masked", formulation=formulation)
                f = pooled(rows, "jsma", recipe, T, "fixed", formulation=formulation)
                lines.append(f"JSMA ({formulation}) {recipe} T={T:g}: {fmt_rate(m)} on the masked softmax "
                             f"(T = 1 model: {fmt_rate(base)}; {fmt_fewer(base, m)}); "
                             f"with softmax(z / {T:g}): {fmt_rate(f)}")
    if 20.0 in Ts:
        for formulation in FORMULATIONS:
            base = pooled(rows, "jsma", None, 1.0, "masked", formulation=formulation)
            m = pooled(rows, "jsma", list(settings["recipes"]), 20.0, "masked", formulation=formulation)
            lines.append(f"Seed paper: about {SEED_PAPER_FACTOR_AT_20}x fewer successes at T = 20. We measure "
                         f"(JSMA, masked, {formulation} arithmetic, both recipes pooled) {fmt_rate(base)} -> "
                         f"{fmt_rate(m)}: {fmt_fewer(base, m)}.")
    if Ts and "distilled" in settings["recipes"]:
        for formulation in FORMULATIONS:
            base = pooled(rows, "jsma", None, 1.0, "masked", formulation=formulation)
            d = pooled(rows, "jsma", "distilled", Tmax, "masked", formulation=formulation)
            lines.append(f"Papernot et al.: JSMA {PAPERNOT_JSMA[0]} % -> {PAPERNOT_JSMA[1]} % at T = 100 "
                         f"(distilled). We measure ({formulation} arithmetic) {fmt_rate(base)} -> {fmt_rate(d)} "
                         f"at T = {Tmax:g}.")
    if any(r["attack"] == "cw" for r in rows) and Tmax is not None:
        parts = []
        for recipe in settings["recipes"]:
            f, m = pooled(rows, "cw", recipe, Tmax, "fixed"), pooled(rows, "cw", recipe, Tmax, "masked")
            _, l2 = series(rows, "cw", None, recipe, "fixed", "mean_l2_successful")
            parts.append(f"{recipe} T={Tmax:g}: {fmt_rate(f)} on the logits (mean L2 of the successful ones "
                         f"{l2[-1]:.2f}) vs {fmt_rate(m)} on the masked softmax")
        _, l2 = series(rows, "cw", None, "standard", "fixed", "mean_l2_successful")
        parts.append(f"the standard model: {fmt_rate(pooled(rows, 'cw', None, 1.0, 'fixed'))}, mean L2 {l2[0]:.2f}")
        b = settings["cw"]
        lines.append(f"Carlini and Wagner: about {CW_WITH_FIX:.0f} % with the fix. We measure (C&W L2, "
                     f"{b['binary_steps']} x {b['steps']} steps at lr {b['lr']:g}"
                     f"{', early abort' if b['abort_early'] else ''}): " + "; ".join(parts) + ".")
    return lines


def add_options(parser):
    parser.add_argument("--n-fgsm", type=int, help="test images for FGSM (default 1000; quick 200)")
    parser.add_argument("--n-cw", type=int, help="test images for C&W L2, 0 to skip it (default 100; quick 10)")
    parser.add_argument("--eps", type=float, nargs="+", help="FGSM epsilons, L-infinity, pixels in [0, 1] "
                                                             "(default 0.05 0.1 0.2 0.3; quick 0.1 0.2 0.3)")
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS,
                        help="which attacks to run (default all three; e.g. --attacks cw with --cw-paper-budget)")
    parser.add_argument("--cw-paper-budget", action="store_true",
                        help="C&W L2 with Carlini and Wagner's budget (9 binary-search rounds, up to 10,000 "
                             "Adam steps at lr 0.01, initial c 1e-3, early abort) instead of 5 x 100 steps at "
                             "lr 0.05, initial c 0.1; minutes per image on a CPU, so use a small --n-cw")


def attack_settings(args, settings):
    """The attack options on top of the common settings (explicit options win, then --quick)."""
    base = QUICK if settings["quick"] else FULL
    s = dict(settings)
    s["n_fgsm"] = args.n_fgsm if args.n_fgsm is not None else base["n_fgsm"]
    s["n_cw"] = args.n_cw if args.n_cw is not None else base["n_cw"]
    s["eps"] = sorted(set(args.eps or base["eps"]))
    s["cw"] = dict(PAPER_BUDGET if getattr(args, "cw_paper_budget", False) else CW_DEFAULT_BUDGET)
    s["attacks"] = [a for a in ATTACKS if a in (getattr(args, "attacks", None) or ATTACKS)]
    if not 1 <= s["n_fgsm"] <= 10000:
        raise UsageError(f"--n-fgsm must be in [1, 10000] test images, got {s['n_fgsm']}")
    if not 0 <= s["n_cw"] <= 10000:
        raise UsageError(f"--n-cw must be in [0, 10000] test images, got {s['n_cw']}")
    if any(not (0 < e <= 1) for e in s["eps"]):
        raise UsageError(f"every --eps must be in (0, 1] (pixels lie in [0, 1]), got {args.eps}")
    if s["attacks"] == ["cw"] and s["n_cw"] == 0:
        raise UsageError("--attacks cw with --n-cw 0 runs nothing: give --n-cw >= 1")
    return s


def main():
    parser = common.make_parser(__doc__)
    common.add_common_options(parser, QUICK, FULL)
    add_options(parser)
    args = parser.parse_args()
    settings = attack_settings(args, common.settings_from(args, QUICK, FULL))
    out = args.out or os.path.join("results", "attack_vs_T_quick" if settings["quick"] else "attack_vs_T")
    common.check_output(out)                  # before any model is trained
    common.announce(settings, "attack_vs_T", seconds_per_model_quick=120, seconds_per_model_full=900)
    b = settings["cw"]
    print(f"attacks: JSMA on {settings['n']} images x 9 targets, FGSM on {settings['n_fgsm']} images at eps "
          f"{settings['eps']}, each masked and fixed, in the exact and the paper arithmetic; C&W L2 on "
          f"{settings['n_cw']} images ({b['binary_steps']} x {b['steps']} steps, lr {b['lr']:g}, "
          f"initial c {b['c']:g}{', early abort' if b['abort_early'] else ''}), masked and fixed", flush=True)

    data = common.load_data(args)
    store = common.ResultStore(out)
    rows = []
    for recipe, T, seed in common.grid(settings):
        model, meta = common.model_for(recipe, T, seed, settings, args, data)
        for r in measure_model(store, model, meta, T, data, settings, not args.no_progress):
            rows.append({"recipe": recipe, "T": T, "seed": seed, **r})
    ratios = ratio_rows(rows)

    common.write_csv(os.path.join(out, "attack_vs_T.csv"), rows, COLUMNS)
    common.write_csv(os.path.join(out, "attack_vs_T_ratios.csv"), ratios, RATIO_COLUMNS)
    common.write_json(os.path.join(out, "attack_vs_T.json"), {"settings": settings, "rows": rows, "ratios": ratios,
                                                              "sources": SOURCES, "formulations": FORMULATIONS})
    plot_success(rows, os.path.join(out, "attack_vs_T.png"), settings)
    plot_distortion(rows, os.path.join(out, "attack_vs_T_distortion.png"), settings)

    print("\nattack success rate over correctly classified images, % [95 % Wilson interval] (successes / attempts); "
          "masked = softmax at T = 1 as deployed, fixed = softmax(z / T_train) or logits")
    table = []
    for attack, eps in attack_plan(settings):
        for formulation in formulations_of(attack, tuple(FORMULATIONS)):
            for recipe, T, seed in common.grid(settings):
                cell = {"attack": label(attack, eps).split(" (")[0], "formulation": formulation or "-",
                        "recipe": recipe, "T": T, "seed": seed}
                for source in SOURCES:
                    r = next(r for r in rows if r["attack"] == attack and r["eps"] == eps
                             and r["formulation"] == formulation and r["recipe"] == recipe
                             and r["T"] == T and r["seed"] == seed and r["source"] == source)
                    cell[source] = pct(r)
                    cell[f"{source}_dist"] = (r["mean_l0_percent_successful"] if attack == "jsma"
                                              else r["mean_l2_successful"])
                table.append(cell)
    common.print_table(table, ["attack", "formulation", "recipe", "T", "seed", "masked", "fixed", "masked_dist",
                               "fixed_dist"],
                       ["attack", "arithmetic", "recipe", "T", "seed", "masked", "fixed", "dist masked",
                        "dist fixed"])
    print("(dist: mean over successful attacks; JSMA: % of pixels changed, FGSM and C&W: L2 distance)\n")
    print("success of the T = 1 model over each model's, same attack, source and arithmetic "
          "(95 % Katz interval; 0.5 added to every cell where a count is 0)")
    common.print_table([{**r, "fewer": f"{r['fewer']:.3g} [{r['fewer_lo']:.3g}, {r['fewer_hi']:.3g}]"
                         + (" (a count is 0: +0.5 in every cell)" if r["zero_corrected"] else ""),
                         "counts": f"{r['base_success']}/{r['base_attempts']} vs {r['n_success']}/{r['n_attempts']}",
                         "formulation": r["formulation"] or "-", "eps": "-" if r["eps"] is None else r["eps"]}
                        for r in ratios if r["source"] == "masked"],
                       ["attack", "eps", "formulation", "recipe", "T", "seed", "counts", "fewer"],
                       ["attack", "eps", "arithmetic", "recipe", "T", "seed", "T = 1 vs T", "x fewer [95 %]"])
    print()
    for line in verdict(rows, settings):
        print(line)
    print(f"\nwrote {out}/attack_vs_T.csv, attack_vs_T_ratios.csv, attack_vs_T.json, attack_vs_T.png, "
          f"attack_vs_T_distortion.png")
    return 0
