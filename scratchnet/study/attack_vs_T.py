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

JSMA is Papernot's setting: targeted at each of the 9 other classes of every
source image, increasing pixels (theta = +1), at most 14.5 % of the pixels
changed. FGSM is untargeted, at a few epsilons. C&W L2 is targeted at one
random other class, on a smaller sample (it takes hundreds of gradient steps).

Success is counted over the images the model classified correctly before the
attack, and the denominator is printed beside every rate (for JSMA it is
9 x the correctly classified source images).

Usage::

    python experiments/attack_vs_T.py --quick        # under 10 minutes on 2 CPU cores
    python experiments/attack_vs_T.py                # the full study

Outputs in ``--out`` (default ``results/attack_vs_T`` or ``results/attack_vs_T_quick``):
``attack_vs_T.csv``, ``attack_vs_T.json``, ``attack_vs_T.png`` (success rate
against T) and ``attack_vs_T_distortion.png`` (mean distortion of the
successful attacks).
"""
import math
import os

import numpy as np

from ..attacks import cw_l2, fgsm, jsma
from ..cli import UsageError
from . import common

# The models are grad_vs_T's (same T, training images and epochs), so the two
# scripts share one model cache. ``n`` is the JSMA source images (x 9 targets).
QUICK = {"T": [1, 20, 100], "train_size": 5000, "epochs": 3, "n": 20, "n_fgsm": 200, "n_cw": 10,
         "eps": [0.1, 0.2, 0.3], "cw_binary_steps": 5, "cw_steps": 100}
FULL = {"T": common.FULL_T, "train_size": None, "epochs": 5, "n": 100, "n_fgsm": 1000, "n_cw": 100,
        "eps": [0.05, 0.1, 0.2, 0.3], "cw_binary_steps": 5, "cw_steps": 100}
JSMA_MAX_DISTORTION = 0.145            # Papernot et al.: at most 14.5 % of the pixels
CW_TARGET_SEED = 1234                  # the random target class of each C&W image

PAPERNOT_JSMA = (95.89, 0.45)          # % success at T = 1 and at T = 100 (unverified, see SCIENCE.md)
SEED_PAPER_FACTOR_AT_20 = 10           # "about 10x fewer successes at T = 20"
CW_WITH_FIX = 100.0                    # % success on distilled networks (Carlini and Wagner's abstract)

SOURCES = {"masked": "the deployed softmax at T = 1 (what Papernot et al. attacked)",
           "fixed": "softmax(z / T_train) for JSMA and FGSM, the logits for C&W (Carlini and Wagner)"}
COLUMNS = ["attack", "eps", "recipe", "T", "seed", "source", "wrt", "attack_T", "n_images", "n_correct",
           "n_attempts", "n_success", "success_rate", "untargeted_success_rate", "mean_l0_successful",
           "mean_l0_percent_successful", "mean_l2_successful", "mean_linf_successful",
           "mean_iterations_successful", "empty_saliency", "params"]


# ===== one measurement =====

def gradient_source(attack, source, T):
    """(wrt, T) an attack differentiates for a source and a training temperature."""
    if source == "masked":
        return ("loss" if attack == "fgsm" else "probs"), 1.0
    if attack == "cw":
        return "logits", 1.0                   # C&W's own attack: f6 on the logits, T plays no role
    return ("loss" if attack == "fgsm" else "probs"), T      # the 1 / T_train rescaling


def attack_key(model_key, attack, source, T, settings, eps=None):
    """Everything an attack result depends on (so another script can reuse it)."""
    wrt, attack_T = gradient_source(attack, source, T)
    key = {"experiment": "attack_vs_T", "version": 1, "model": model_key, "attack": attack,
           "wrt": wrt, "attack_T": attack_T}
    if attack == "jsma":
        key.update(n=settings["n"], max_distortion=JSMA_MAX_DISTORTION)
    elif attack == "fgsm":
        key.update(n=settings["n_fgsm"], eps=float(eps))
    else:
        key.update(n=settings["n_cw"], binary_steps=settings["cw_binary_steps"], steps=settings["cw_steps"],
                   target_seed=CW_TARGET_SEED)
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


def run_attack(model, attack, source, T, data, settings, progress, eps=None):
    """Run one attack on one model; a JSON-able summary (AttackResult.summary() plus counts)."""
    wrt, attack_T = gradient_source(attack, source, T)
    if attack == "jsma":
        x, y = common.test_subset(data, settings["n"])
        xs, ys, ts = jsma_all_targets(x, y)
        _, res = jsma(model, xs, ys, ts, wrt=wrt, T=attack_T, theta=1.0,
                      max_distortion=JSMA_MAX_DISTORTION, progress=progress)
    elif attack == "fgsm":
        x, y = common.test_subset(data, settings["n_fgsm"])
        _, res = fgsm(model, x, y, eps, wrt=wrt, T=attack_T, progress=progress)
    else:
        x, y = common.test_subset(data, settings["n_cw"])
        _, res = cw_l2(model, x, y, cw_targets(y), wrt=wrt, T=attack_T, binary_steps=settings["cw_binary_steps"],
                       steps=settings["cw_steps"], progress=progress)
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


def attack_plan(settings):
    """[(attack, eps)] in the order they run: JSMA, FGSM at each epsilon, C&W."""
    plan = [("jsma", None)] + [("fgsm", e) for e in settings["eps"]]
    return plan + ([("cw", None)] if settings["n_cw"] > 0 else [])


def measure_model(store, model, meta, T, data, settings, progress, attacks=None):
    """Every (attack, source) on one model, through ``store`` (finished ones are reused)."""
    rows = []
    for attack, eps in attacks or attack_plan(settings):
        for source in SOURCES:
            if T == 1.0 and source == "fixed" and attack != "cw":
                # at T_train = 1 the rescaled softmax *is* the deployed one: reuse, do not rerun
                r = dict(next(r for r in rows if r["attack"] == attack and r["eps"] == eps and r["source"] == "masked"))
                r["source"] = "fixed"
                rows.append(r)
                continue
            key = attack_key(meta["key"], attack, source, T, settings, eps)
            r = store.get_or_compute(key, lambda: run_attack(model, attack, source, T, data, settings, progress, eps))
            rows.append({"attack": attack, "eps": eps, "source": source, **r})
    for r in rows:
        r["n_attempts"] = r["n_correct"]          # for JSMA: 9 targets x correctly classified sources
    return rows


# ===== output =====

def label(attack, eps=None):
    if attack == "jsma":
        return "JSMA (9 targets per image, <= 14.5 % pixels)"
    if attack == "fgsm":
        return f"FGSM eps = {eps:g}"
    return "C&W L2 (one random target; masked = f6 on the probabilities)"


def series(rows, attack, eps, recipe, source, key):
    """(Ts, values averaged over seeds) for one line; T = 1 is the standard model."""
    Ts = sorted({r["T"] for r in rows})
    out = []
    for T in Ts:
        rec = "standard" if T == 1.0 else recipe
        vals = [r[key] for r in rows if r["recipe"] == rec and r["T"] == T and r["attack"] == attack
                and r["eps"] == eps and r["source"] == source]
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        out.append(float(np.mean(vals)) if vals else math.nan)
    return Ts, out


STYLE = {("temperature", "masked"): ("tab:blue", "o-"), ("temperature", "fixed"): ("tab:blue", "s--"),
         ("distilled", "masked"): ("tab:red", "o-"), ("distilled", "fixed"): ("tab:red", "s--")}
SOURCE_LABEL = {"masked": "masked (softmax at T = 1)", "fixed": "fixed (rescaled / logits)"}


def plot_success(rows, path, settings):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = attack_plan(settings)
    fig, axes = plt.subplots(1, len(plan), figsize=(4.3 * len(plan), 4.6), sharey=True)
    lines = [(recipe, source) for recipe in settings["recipes"] for source in SOURCES]
    axes = np.atleast_1d(axes)
    for ax, (attack, eps) in zip(axes, plan):
        for i, (recipe, source) in enumerate(lines):
            c, st = STYLE[(recipe, source)]
            Ts, v = series(rows, attack, eps, recipe, source, "success_rate")
            ax.plot(common.nudge(Ts, i, len(lines)), [100 * x for x in v], st, color=c,
                    alpha=1 if source == "masked" else 0.75, label=f"{recipe}, {SOURCE_LABEL[source]}")
        n = sum(r["n_attempts"] for r in rows if r["attack"] == attack and r["eps"] == eps
                and r["recipe"] == "standard" and r["source"] == "masked")
        ax.set_title(f"{label(attack, eps)}\n({n} attempts on the T = 1 model)", fontsize=10)
        common.temperature_axis(ax, Ts)
        ax.set_ylim(-3, 103)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("attack success rate (% of correctly classified)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(lines), fontsize=9, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"Attack success against the training temperature, deployed at T = 1 "
                 f"({settings['architecture']} network, {settings['epochs']} epochs on "
                 f"{settings['train_size'] or 55000} images; T = 1 is the standard model, shared by both recipes)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    common.save_figure(fig, path)
    plt.close(fig)


def plot_distortion(rows, path, settings):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("jsma", None, "mean_l0_percent_successful", "% of pixels changed (L0)")]
    if settings["n_cw"] > 0:
        panels.append(("cw", None, "mean_l2_successful", "L2 distance (pixels in [0, 1])"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6))
    lines = [(recipe, source) for recipe in settings["recipes"] for source in SOURCES]
    for ax, (attack, eps, key, unit) in zip(np.atleast_1d(axes), panels):
        for i, (recipe, source) in enumerate(lines):
            c, st = STYLE[(recipe, source)]
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
    return f"{100 * r['success_rate']:.1f} % ({r['n_success']}/{r['n_attempts']})"


def verdict(rows, settings):
    """Plain sentences: what we measured, beside the seed paper, Papernot et al. and C&W."""
    def get(attack, recipe, T, source, eps=None):
        rec = "standard" if T == 1.0 else recipe
        rs = [r for r in rows if r["attack"] == attack and r["recipe"] == rec and r["T"] == T
              and r["source"] == source and r["eps"] == eps]
        if not rs:
            return None
        n_s, n_a = sum(r["n_success"] for r in rs), sum(r["n_attempts"] for r in rs)
        return (n_s / n_a if n_a else math.nan), n_s, n_a

    lines = []
    Ts = [T for T in settings["T"] if T != 1.0]
    Tmax = max(Ts) if Ts else None
    base = get("jsma", None, 1.0, "masked")
    for recipe in settings["recipes"]:
        for T in Ts:
            m, f = get("jsma", recipe, T, "masked"), get("jsma", recipe, T, "fixed")
            ratio = (base[0] / m[0]) if m[0] > 0 else math.inf
            lines.append(f"JSMA {recipe} T={T:g}: {100 * m[0]:.1f} % ({m[1]}/{m[2]}) on the masked softmax "
                         f"(T = 1 model: {100 * base[0]:.1f} %, {'no success left' if ratio == math.inf else f'{ratio:.1f}x fewer'}); "
                         f"with softmax(z / {T:g}): {100 * f[0]:.1f} % ({f[1]}/{f[2]})")
    if 20.0 in Ts:
        m = [get("jsma", r, 20.0, "masked") for r in settings["recipes"]]
        rate = sum(x[1] for x in m) / max(1, sum(x[2] for x in m))
        lines.append(f"Seed paper: about {SEED_PAPER_FACTOR_AT_20}x fewer successes at T = 20. We measure "
                     f"{100 * base[0]:.1f} % -> {100 * rate:.1f} % (JSMA, masked, both recipes pooled): "
                     + ("no success left" if rate == 0 else f"{base[0] / rate:.1f}x fewer") + ".")
    if Tmax is not None:
        d = get("jsma", "distilled", Tmax, "masked") if "distilled" in settings["recipes"] else None
        if d:
            lines.append(f"Papernot et al.: JSMA {PAPERNOT_JSMA[0]} % -> {PAPERNOT_JSMA[1]} % at T = 100 (distilled). "
                         f"We measure {100 * base[0]:.1f} % -> {100 * d[0]:.1f} % at T = {Tmax:g} "
                         f"({d[1]}/{d[2]} attempts).")
    if settings["n_cw"] > 0 and Tmax is not None:
        parts = []
        for recipe in settings["recipes"]:
            f, m = get("cw", recipe, Tmax, "fixed"), get("cw", recipe, Tmax, "masked")
            parts.append(f"{recipe} T={Tmax:g}: {100 * f[0]:.0f} % ({f[1]}/{f[2]}) on the logits vs "
                         f"{100 * m[0]:.0f} % ({m[1]}/{m[2]}) on the masked softmax")
        lines.append(f"Carlini and Wagner: about {CW_WITH_FIX:.0f} % with the fix. We measure (C&W L2, "
                     f"{settings['cw_binary_steps']} x {settings['cw_steps']} steps): " + "; ".join(parts) + ".")
    return lines


def add_options(parser):
    parser.add_argument("--n-fgsm", type=int, help="test images for FGSM (default 1000; quick 200)")
    parser.add_argument("--n-cw", type=int, help="test images for C&W L2, 0 to skip it (default 100; quick 10)")
    parser.add_argument("--eps", type=float, nargs="+", help="FGSM epsilons, L-infinity, pixels in [0, 1] "
                                                             "(default 0.05 0.1 0.2 0.3; quick 0.1 0.2 0.3)")


def attack_settings(args, settings):
    """The attack options on top of the common settings (explicit options win, then --quick)."""
    base = QUICK if settings["quick"] else FULL
    s = dict(settings)
    s["n_fgsm"] = args.n_fgsm if args.n_fgsm is not None else base["n_fgsm"]
    s["n_cw"] = args.n_cw if args.n_cw is not None else base["n_cw"]
    s["eps"] = sorted(set(args.eps or base["eps"]))
    s["cw_binary_steps"], s["cw_steps"] = base["cw_binary_steps"], base["cw_steps"]
    if not 1 <= s["n_fgsm"] <= 10000:
        raise UsageError(f"--n-fgsm must be in [1, 10000] test images, got {s['n_fgsm']}")
    if not 0 <= s["n_cw"] <= 10000:
        raise UsageError(f"--n-cw must be in [0, 10000] test images, got {s['n_cw']}")
    if any(not (0 < e <= 1) for e in s["eps"]):
        raise UsageError(f"every --eps must be in (0, 1] (pixels lie in [0, 1]), got {args.eps}")
    return s


def main():
    parser = common.make_parser(__doc__)
    common.add_common_options(parser, QUICK)
    add_options(parser)
    args = parser.parse_args()
    settings = attack_settings(args, common.settings_from(args, QUICK, FULL))
    out = args.out or os.path.join("results", "attack_vs_T_quick" if settings["quick"] else "attack_vs_T")
    common.check_output(out)                  # before any model is trained
    common.announce(settings, "attack_vs_T", seconds_per_model_quick=60, seconds_per_model_full=480)
    print(f"attacks: JSMA on {settings['n']} images x 9 targets, FGSM on {settings['n_fgsm']} images at eps "
          f"{settings['eps']}, C&W L2 on {settings['n_cw']} images; each masked and fixed", flush=True)

    data = common.load_data(args)
    store = common.ResultStore(out)
    rows = []
    for recipe, T, seed in common.grid(settings):
        model, meta = common.model_for(recipe, T, seed, settings, args, data)
        for r in measure_model(store, model, meta, T, data, settings, not args.no_progress):
            rows.append({"recipe": recipe, "T": T, "seed": seed, **r})

    common.write_csv(os.path.join(out, "attack_vs_T.csv"), rows, COLUMNS)
    common.write_json(os.path.join(out, "attack_vs_T.json"), {"settings": settings, "rows": rows, "sources": SOURCES})
    plot_success(rows, os.path.join(out, "attack_vs_T.png"), settings)
    plot_distortion(rows, os.path.join(out, "attack_vs_T_distortion.png"), settings)

    print("\nattack success rate over correctly classified images (successes / attempts); "
          "masked = softmax at T = 1 as deployed, fixed = softmax(z / T_train) or logits")
    table = []
    for attack, eps in attack_plan(settings):
        for recipe, T, seed in common.grid(settings):
            cell = {"attack": label(attack, eps).split(" (")[0], "recipe": recipe, "T": T, "seed": seed}
            for source in SOURCES:
                r = next(r for r in rows if r["attack"] == attack and r["eps"] == eps and r["recipe"] == recipe
                         and r["T"] == T and r["seed"] == seed and r["source"] == source)
                cell[source] = pct(r)
                cell[f"{source}_dist"] = (r["mean_l0_percent_successful"] if attack == "jsma"
                                          else r["mean_l2_successful"])
            table.append(cell)
    common.print_table(table, ["attack", "recipe", "T", "seed", "masked", "fixed", "masked_dist", "fixed_dist"],
                       ["attack", "recipe", "T", "seed", "masked", "fixed", "dist masked", "dist fixed"])
    print("(dist: mean over successful attacks; JSMA: % of pixels changed, FGSM and C&W: L2 distance)\n")
    for line in verdict(rows, settings):
        print(line)
    print(f"\nwrote {out}/attack_vs_T.csv, attack_vs_T.json, attack_vs_T.png, attack_vs_T_distortion.png")
    return 0

