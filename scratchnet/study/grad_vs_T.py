"""How the input gradient vanishes as the training temperature T grows.

For each training temperature T and each recipe (``temperature``: hard labels
at T; ``distilled``: defensive distillation at T), deployed at T = 1, this
measures on the same test images:

* the gradient an attacker gets *as deployed* (float32, softmax at T = 1):
  the fraction of images whose top probability is exactly 1.0, and the
  fraction whose whole input gradient is exactly zero;
* its *true* size, computed in float64 and in log space (so magnitudes below
  float32's 1e-45, and even float64's 1e-308, are seen, not flushed to zero):
  median and geometric mean of the L1 / L2 norm over correctly classified
  images, and separately over misclassified ones;
* the logit margin and the suppression it predicts, log10 factor
  = -(margin_T - margin_1) / ln 10, next to the measured one; and the same
  prediction with the growth of the margin's own gradient added (the loss
  gradient of a confident image is about exp(-M) * dM/dx, and training at T
  grows dM/dx with the logits): + log10(||dM/dx||_T / ||dM/dx||_1);
* Papernot et al.'s kind of statistic, for comparison with their "10^30":
  the float32 gradient as the deployed model computes it (for the
  probability Jacobian, the L1 norm of each row averaged over the rows),
  averaged over *all* test images with a plain mean, in float32. It cannot
  see below float32's 1.4e-45, and it is dominated by the few images that are
  not saturated; it is a different quantity from the float64 sizes above and
  is compared only with its like;
* the same gradients with the logits rescaled by 1 / T_train (softmax(z / T),
  Carlini and Wagner's fix), which should show no suppression.

Two gradients are measured: of the cross-entropy loss (what FGSM/PGD use) and
the whole probability Jacobian d softmax / dx (what JSMA uses).

The headline factor is a ratio of medians / geometric means of the float64
sizes over correctly classified images. A plain mean is dominated by the few
unsaturated images, whose gradient is *larger* at high T, and can show no
suppression at all: ``log10_l2_mean_PITFALL`` (the arithmetic mean of the
float32 L2 norms over the correctly classified images) is printed only as a
warning of that pitfall.

Usage::

    python experiments/grad_vs_T.py --quick          # about 10 minutes on 2 CPU cores
    python experiments/grad_vs_T.py                  # the full study (see the README for its time)

Outputs in ``--out`` (default ``results/grad_vs_T`` or ``results/grad_vs_T_quick``):
``grad_vs_T.csv``, ``grad_vs_T.json`` and ``grad_vs_T.png``.
"""
import math
import os

import numpy as np

from ..attacks.diagnostics import float32_plain_mean, gradient_diagnostics, summarize
from ..attacks.magnitudes import LN10
from . import common

QUICK = {"T": [1, 20, 100], "train_size": 5000, "epochs": 3, "n": 200}
FULL = {"T": common.FULL_T, "train_size": None, "epochs": 5, "n": 1000}
SEED_PAPER_LOG10_AT_20 = -10.0        # "a factor of about 1e10 at T = 20" (the seed paper's abstract)
PAPERNOT_LOG10_AT_100 = -30.0         # "reduced by a factor of 10^30" (Papernot et al.'s abstract, distilled T = 100)
QUANTITIES = {"loss": "cross-entropy loss gradient", "probs": "probability Jacobian"}
SOURCES = {"masked": "softmax at T = 1, as deployed", "rescaled": "softmax(z / T_train), C&W's fix"}

COLUMNS = ["recipe", "T", "seed", "source", "quantity", "n", "accuracy", "n_correct", "n_misclassified",
           "saturated_fraction", "zero_gradient_fraction", "zero_entry_fraction",
           "mean_margin", "median_margin",
           "log10_l2_median", "log10_l2_geomean", "log10_l1_median", "log10_l1_geomean",
           "log10_l2_mean_PITFALL", "log10_l2_median_misclassified", "log10_l2_geomean_misclassified",
           "margin_grad_log10_l2_geomean",
           "suppression_log10_median", "suppression_log10_geomean",
           "predicted_log10_from_mean_margin", "predicted_log10_from_median_margin",
           "logit_gradient_growth_log10", "predicted_log10_with_logit_growth",
           "suppression_log10_mean_PITFALL",
           "float32_l1_mean_all", "float32_log10_l1_mean_all", "float32_log10_l1_median_all",
           "float32_log10_l1_geomean_nonzero_all", "float32_suppression_log10_mean_all",
           "float32_suppression_log10_geomean_nonzero_all"]
# float32_* (Papernot et al.'s kind): the float32 L1 norm per image (for the probability
# Jacobian: of each row, averaged over the rows), then a plain float32 mean or median over
# all n images, or a geometric mean over the images whose float32 norm is not exactly 0;
# the exact-zero fraction is zero_gradient_fraction (also over all images).
FLOAT32_KEY = {"loss": "loss_f32_l1", "probs": "probs_f32_row_l1"}


def result_key(meta, n):
    """Everything one model's measurement depends on (``distillation.py`` reuses it)."""
    return {"experiment": "grad_vs_T", "version": 2, "model": meta["key"], "n": n}


def measure(model, x, y, T, progress):
    """Summaries of the input gradient of one model, masked (T = 1) and rescaled (T_train)."""
    diags = {"masked": gradient_diagnostics(model, x, y, T=1.0, progress=progress)}
    # at T = 1 the rescaled gradient is the masked one: do not measure it twice
    diags["rescaled"] = diags["masked"] if T == 1.0 else gradient_diagnostics(model, x, y, T=T, progress=progress)
    rows = []
    for source, d in diags.items():
        correct, wrong = d["correct"], ~d["correct"]
        for q in QUANTITIES:
            l2, l1 = summarize(d[f"{q}_log10_l2"], correct, log10=True), summarize(d[f"{q}_log10_l1"], correct, log10=True)
            l2_wrong = summarize(d[f"{q}_log10_l2"], wrong, log10=True)
            f32 = float32_plain_mean(d[FLOAT32_KEY[q]])                 # all images, as Papernot et al.
            rows.append({
                "source": source, "quantity": q, "n": len(correct),
                "accuracy": float(correct.mean()), "n_correct": int(correct.sum()), "n_misclassified": int(wrong.sum()),
                "saturated_fraction": float(d["saturated"].mean()),
                "zero_gradient_fraction": float(d[f"{q}_all_zero"].mean()),
                "zero_entry_fraction": float(d[f"{q}_zero_frac"].mean()),
                # margins over the correctly classified images, like the norms they predict
                "mean_margin": float(d["margin"][correct].mean()) if correct.any() else math.nan,
                "median_margin": float(np.median(d["margin"][correct])) if correct.any() else math.nan,
                "log10_l2_median": l2["log10_median"], "log10_l2_geomean": l2["log10_geometric_mean"],
                "log10_l1_median": l1["log10_median"], "log10_l1_geomean": l1["log10_geometric_mean"],
                "log10_l2_mean_PITFALL": summarize(d[f"{q}_l2"], correct)["log10_mean_PITFALL"],
                "log10_l2_median_misclassified": l2_wrong["log10_median"],
                "log10_l2_geomean_misclassified": l2_wrong["log10_geometric_mean"],
                # the gradient of the margin itself, geometric mean over the correct images
                "margin_grad_log10_l2_geomean": (float(d["margin_grad_log10_l2"][correct].mean())
                                                 if correct.any() else math.nan),
                "float32_l1_mean_all": f32["mean"], "float32_log10_l1_mean_all": f32["log10_mean"],
                "float32_log10_l1_median_all": f32["log10_median"],
                "float32_log10_l1_geomean_nonzero_all": f32["log10_geometric_mean_nonzero"],
            })
    return rows


def add_suppression(rows):
    """Each row's log10 factor relative to the standard (T = 1) model of the same seed."""
    ref = {(r["seed"], r["quantity"]): r for r in rows if r["recipe"] == "standard" and r["source"] == "masked"}
    for r in rows:
        b = ref[(r["seed"], r["quantity"])]
        r["suppression_log10_median"] = r["log10_l2_median"] - b["log10_l2_median"]
        r["suppression_log10_geomean"] = r["log10_l2_geomean"] - b["log10_l2_geomean"]
        r["suppression_log10_mean_PITFALL"] = r["log10_l2_mean_PITFALL"] - b["log10_l2_mean_PITFALL"]
        # every gradient through the softmax carries ~exp(-margin): the margin predicts the factor
        r["predicted_log10_from_mean_margin"] = -(r["mean_margin"] - b["mean_margin"]) / LN10
        r["predicted_log10_from_median_margin"] = -(r["median_margin"] - b["median_margin"]) / LN10
        # ... times dM/dx, which grows with the logits: the part the margin alone leaves out
        r["logit_gradient_growth_log10"] = r["margin_grad_log10_l2_geomean"] - b["margin_grad_log10_l2_geomean"]
        r["predicted_log10_with_logit_growth"] = (r["predicted_log10_from_mean_margin"]
                                                  + r["logit_gradient_growth_log10"])
        # Papernot et al.'s kind: the ratio of two float32 plain means over all images
        r["float32_suppression_log10_mean_all"] = r["float32_log10_l1_mean_all"] - b["float32_log10_l1_mean_all"]
        r["float32_suppression_log10_geomean_nonzero_all"] = (r["float32_log10_l1_geomean_nonzero_all"]
                                                              - b["float32_log10_l1_geomean_nonzero_all"])


def mean_over_seeds(rows, recipe, source, quantity, key):
    """(Ts, values averaged over seeds) for one line of the figure; T = 1 is the standard model."""
    Ts = sorted({r["T"] for r in rows})
    out = []
    for T in Ts:
        rec = "standard" if T == 1.0 else recipe
        vals = [r[key] for r in rows if r["recipe"] == rec and r["T"] == T
                and r["source"] == source and r["quantity"] == quantity]
        out.append(float(np.mean(vals)) if vals else math.nan)
    return Ts, out


def plot(rows, path, settings):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"temperature": "tab:blue", "distilled": "tab:red"}
    n_lines = len(settings["recipes"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6))
    for ax, q in zip(axes[:2], QUANTITIES):
        for i, recipe in enumerate(settings["recipes"]):
            c = colors[recipe]
            Ts, masked = mean_over_seeds(rows, recipe, "masked", q, "log10_l2_geomean")
            _, rescaled = mean_over_seeds(rows, recipe, "rescaled", q, "log10_l2_geomean")
            _, pred = mean_over_seeds(rows, recipe, "masked", q, "predicted_log10_from_mean_margin")
            _, pred_g = mean_over_seeds(rows, recipe, "masked", q, "predicted_log10_with_logit_growth")
            x = common.nudge(Ts, i, n_lines)
            ax.plot(x, masked, "o-", color=c, label=f"{recipe}: at T = 1, as deployed (masked)")
            ax.plot(x, rescaled, "s--", color=c, alpha=0.7, label=f"{recipe}: softmax(z / T_train) (C&W rescaled)")
            ax.plot(x, [masked[0] + p for p in pred], "x:", color=c, alpha=0.8, ms=9,
                    label=f"{recipe}: predicted from logit margin")
            ax.plot(x, [masked[0] + p for p in pred_g], "+", color=c, alpha=0.8, ms=11,
                    label=f"{recipe}: predicted from margin and its gradient's growth")
        common.temperature_axis(ax, Ts)
        ax.set_ylabel("log10 of input-gradient L2 norm (geometric mean\nover correctly classified images, float64)")
        ax.set_title(f"{QUANTITIES[q]}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower left")
    ax = axes[2]
    for i, recipe in enumerate(settings["recipes"]):
        c = colors[recipe]
        Ts, sat = mean_over_seeds(rows, recipe, "masked", "loss", "saturated_fraction")
        _, zero = mean_over_seeds(rows, recipe, "masked", "loss", "zero_gradient_fraction")
        _, zero_p = mean_over_seeds(rows, recipe, "masked", "probs", "zero_gradient_fraction")
        x = common.nudge(Ts, i, n_lines)
        ax.plot(x, [100 * s for s in sat], "o-", color=c, label=f"{recipe}: top probability == 1.0")
        ax.plot(x, [100 * z for z in zero], "s--", color=c, alpha=0.7, label=f"{recipe}: loss gradient exactly 0")
        ax.plot(x, [100 * z for z in zero_p], "^:", color=c, alpha=0.7,
                label=f"{recipe}: probability Jacobian exactly 0")
    common.temperature_axis(ax, Ts)
    ax.set_ylim(-3, 103)
    ax.set_ylabel("% of test images (float32, deployed at T = 1)")
    ax.set_title("float32 saturation and exact-zero gradients")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5)
    fig.suptitle(f"The input gradient vanishes as the training temperature grows "
                 f"({settings['n']} MNIST test images, {settings['architecture']} network, "
                 f"{settings['epochs']} epochs on {settings['train_size'] or 55000} images)\n"
                 f"the T = 1 point of both recipes is the standard model; the two recipes' points are "
                 f"drawn 5 % apart in T so that lines which coincide stay visible", fontsize=11)
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)


def verdict(rows, settings):
    """Plain sentences stating what was measured, next to the seed paper's number."""
    lines = []
    for recipe in settings["recipes"]:
        for r in rows:
            if r["recipe"] == recipe and r["source"] == "masked" and r["quantity"] == "loss" and r["seed"] == settings["seeds"][0]:
                resc = next(s for s in rows if s["recipe"] == recipe and s["T"] == r["T"] and s["seed"] == r["seed"]
                            and s["source"] == "rescaled" and s["quantity"] == "loss")
                lines.append(
                    f"{recipe} T={r['T']:g}: loss gradient 10^{r['suppression_log10_geomean']:.1f} times the T = 1 "
                    f"model's (geometric mean; median 10^{r['suppression_log10_median']:.1f}), predicted from the "
                    f"margin 10^{r['predicted_log10_from_mean_margin']:.1f}, with its gradient's growth "
                    f"10^{r['predicted_log10_with_logit_growth']:.1f}; {100 * r['zero_gradient_fraction']:.0f} % "
                    f"of images have an exactly-zero float32 gradient; rescaled by 1/T: "
                    f"10^{resc['suppression_log10_geomean']:.1f}; plain mean of float32 norms (pitfall): "
                    f"10^{r['suppression_log10_mean_PITFALL']:.1f}")
    at20 = [r for r in rows if r["T"] == 20.0 and r["source"] == "masked" and r["quantity"] == "loss"]
    if at20:
        f = np.mean([r["suppression_log10_geomean"] for r in at20])
        lines.append(f"At T = 20 we measure a suppression of 10^{f:.1f} (mean over recipes and seeds of the "
                     f"geometric-mean ratio); the seed paper reports about 10^{SEED_PAPER_LOG10_AT_20:.0f}. "
                     f"The factor follows the logit margin, which grows with T and with training length.")
    top = max(r["T"] for r in rows)
    pap = [r for r in rows if r["T"] == top and r["recipe"] == "distilled" and r["source"] == "masked"
           and r["quantity"] == "probs"]
    if pap and top > 1:
        f32 = np.mean([r["float32_suppression_log10_mean_all"] for r in pap])
        f32_nz = np.mean([r["float32_suppression_log10_geomean_nonzero_all"] for r in pap])
        true = np.mean([r["suppression_log10_geomean"] for r in pap])
        zero = np.mean([r["zero_gradient_fraction"] for r in pap])
        lines.append(f"Papernot et al. report adversarial gradients about 10^{-PAPERNOT_LOG10_AT_100:.0f} smaller "
                     f"(distilled, T = 100). Like for like (the float32 probability Jacobian as the deployed model "
                     f"computes it, plain mean over all {pap[0]['n']} images) distilled T = {top:g} gives "
                     f"10^{f32:.1f}, with {100 * zero:.0f} % of the images exactly 0 in float32 (geometric mean "
                     f"of the others: 10^{f32_nz:.1f}); its true size "
                     f"(float64, geometric mean over correct images) is 10^{true:.1f}. The two are different "
                     f"statistics: the float32 mean is bounded by float32's range and set by the unsaturated few.")
    return lines


def main():
    parser = common.make_parser(__doc__)
    common.add_common_options(parser, QUICK, FULL)
    args = parser.parse_args()
    settings = common.settings_from(args, QUICK, FULL)
    out = args.out or os.path.join("results", "grad_vs_T_quick" if settings["quick"] else "grad_vs_T")
    common.check_output(out)                  # before any model is trained
    # measured on the quiet 2-core machine: --quick from an empty cache in 85 s for its 5 models;
    # a full model trains in 2 min 41 s, and its gradients on 1,000 images take seconds
    common.announce(settings, "grad_vs_T", seconds_per_model_quick=20, seconds_per_model_full=180)

    data = common.load_data(args)
    x, y = common.test_subset(data, settings["n"])
    store = common.ResultStore(out)
    rows = []
    for recipe, T, seed in common.grid(settings):
        model, meta = common.model_for(recipe, T, seed, settings, args, data)
        print(f"{recipe} T={T:g} seed {seed}: test accuracy {meta['test_accuracy']:.2%}", flush=True)
        key = result_key(meta, settings["n"])
        for row in store.get_or_compute(key, lambda: measure(model, x, y, T, not args.no_progress)):
            rows.append({"recipe": recipe, "T": T, "seed": seed, **row})
    add_suppression(rows)

    common.write_csv(os.path.join(out, "grad_vs_T.csv"), rows, COLUMNS)
    common.write_json(os.path.join(out, "grad_vs_T.json"), {"settings": settings, "rows": rows,
                                                            "sources": SOURCES, "quantities": QUANTITIES})
    plot(rows, os.path.join(out, "grad_vs_T.png"), settings)

    print("\nlog10 suppression of the loss gradient's L2 norm relative to the T = 1 model "
          "(correctly classified images; float64 true size)")
    shown = [r for r in rows if r["quantity"] == "loss" and r["source"] == "masked"]
    for r in shown:
        r["rescaled"] = next(s["suppression_log10_geomean"] for s in rows if s["quantity"] == "loss"
                             and s["source"] == "rescaled" and s["recipe"] == r["recipe"] and s["T"] == r["T"]
                             and s["seed"] == r["seed"])
    common.print_table(shown, ["recipe", "T", "seed", "accuracy", "saturated_fraction", "zero_gradient_fraction",
                               "mean_margin", "suppression_log10_geomean", "suppression_log10_median",
                               "predicted_log10_from_mean_margin", "logit_gradient_growth_log10",
                               "predicted_log10_with_logit_growth", "rescaled", "suppression_log10_mean_PITFALL"],
                       ["recipe", "T", "seed", "acc", "p==1.0", "grad==0", "margin", "geo-mean", "median",
                        "pred(margin)", "dM/dx growth", "pred(both)", "rescaled", "mean(pitfall)"])
    print("(acc: over the measured images; grad==0: all images; everything else over the correctly "
          "classified ones; mean(pitfall): arithmetic mean of the float32 norms)")
    print("\nPapernot et al.'s kind of statistic: float32 gradient L1 norm (probability Jacobian: per row, "
          "averaged over the rows), plain float32 mean over all images, log10, and its ratio to the T = 1 model's")
    shown_f32 = [r for r in rows if r["source"] == "masked"]
    common.print_table(shown_f32, ["recipe", "T", "seed", "quantity", "zero_gradient_fraction",
                                   "float32_log10_l1_mean_all", "float32_log10_l1_median_all",
                                   "float32_suppression_log10_mean_all",
                                   "float32_suppression_log10_geomean_nonzero_all", "suppression_log10_geomean"],
                       ["recipe", "T", "seed", "gradient", "exactly 0", "log10 f32 mean", "log10 f32 median",
                        "f32 mean / T=1's", "f32 geo-mean of non-0 / T=1's", "true geo-mean / T=1's"])
    print()
    for line in verdict(rows, settings):
        print(line)
    print(f"\nwrote {out}/grad_vs_T.csv, grad_vs_T.json, grad_vs_T.png")
    return 0

