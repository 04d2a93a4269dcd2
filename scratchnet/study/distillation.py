"""Does defensive distillation add anything beyond the temperature?

The seed paper's central claim, tested head-on. At each training temperature
T, two networks are deployed at T = 1:

* ``temperature``: trained with hard labels at T (no teacher);
* ``distilled``: Papernot et al.'s defensive distillation at T (a teacher
  trained as above labels the training set with softmax(z / T), and a student
  is trained at T on those soft labels).

Side by side, with 95 % confidence intervals:

* test accuracy (all 10,000 test images);
* gradient suppression: log10 of the loss gradient's L2 norm relative to the
  T = 1 model (geometric mean over correctly classified images, float64 true
  size), as deployed and rescaled by 1 / T_train (the measurement of
  ``grad_vs_T.py``);
* attack success: JSMA on the deployed softmax and on softmax(z / T_train),
  FGSM on the deployed cross-entropy and at T_train (the attacks of
  ``attack_vs_T.py``);
* the mean logit margin (top logit minus the runner-up, over the correctly
  classified images), which sets the suppression.

Intervals: with several seeds, a t-interval of the mean over seeds (the
seed-to-seed spread of training); with one seed (``--quick``), a Wilson
interval over the images (accuracy, attack success) and none for the
suppression. A single seed's interval ignores the spread between trainings,
so it is narrower than the honest one.

The verdict printed at the end is decided from the intervals: where the two
recipes' intervals overlap, the difference is not resolved by this run. It
judges the defence by the attack measures; the suppression is reported, and
a resolved difference in it named, but it is not a defence measure (a
smaller masked gradient is the masking under test, not robustness).

Measurements already made by ``grad_vs_T.py`` and ``attack_vs_T.py`` (same
model, same settings) are read from their result folders, not recomputed.

Usage::

    python experiments/distillation_vs_temperature.py --quick    # one seed
    python experiments/distillation_vs_temperature.py            # three seeds, Papernot et al.'s
                                                                 # T grid: 51 models

Outputs in ``--out`` (default ``results/distillation_vs_temperature[_quick]``):
``distillation_vs_temperature.csv`` (one row per T and measure, both recipes
side by side), ``distillation_vs_temperature_spread.csv`` (how much each
measure, and the mean logit margin, varies from seed to seed: one row per
recipe, T and measure), ``.json`` (also every per-seed value), ``.md`` (both as
Markdown tables, the README's) and ``.png``.
"""
import math
import os

import numpy as np

from ..cli import UsageError
from . import attack_vs_T, common, grad_vs_T
from ..files import atomic_write
from ..stats import t_interval, wilson

QUICK = {"T": [1, 20, 100], "train_size": 5000, "epochs": 3, "n": grad_vs_T.QUICK["n"], "seeds": [0],
         "n_jsma": attack_vs_T.QUICK["n"]}
FULL = {"T": common.PAPERNOT_T, "train_size": None, "epochs": 5, "n": grad_vs_T.FULL["n"], "seeds": [0, 1, 2],
        "n_jsma": attack_vs_T.FULL["n"]}

DEFAULT_EPS = 0.3                      # the largest FGSM step of attack_vs_T.py (stored results are reused)
SPREAD_COLUMNS = ["recipe", "T", "measure", "unit", "n_seeds", "mean", "sd", "min", "max", "range"]
COLUMNS = ["measure", "T", "temperature_mean", "temperature_lo", "temperature_hi", "distilled_mean",
           "distilled_lo", "distilled_hi", "difference", "intervals_overlap", "interval", "n_seeds",
           "better_defence"]


# ===== confidence intervals =====

def interval(per_seed):
    """(mean, lo, hi, kind) from per-seed dicts {"value", and "k", "n" for proportions}.

    A seed whose rate has no denominator (no correctly classified image to
    attack) has no value and is left out.
    """
    per_seed = [s for s in per_seed if not math.isnan(s["value"])]
    if not per_seed:
        return math.nan, math.nan, math.nan, "none (no value)"
    percent = "k" in per_seed[0]                     # a proportion, in %
    if len(per_seed) >= 2:
        m, lo, hi = t_interval([s["value"] for s in per_seed])
        if percent:
            lo, hi = max(lo, 0.0), min(hi, 100.0)    # a rate stays within [0, 100] %
        return m, lo, hi, f"t over {len(per_seed)} seeds"
    s = per_seed[0]
    if percent:
        lo, hi = wilson(s["k"], s["n"])
        return s["value"], 100 * lo, 100 * hi, "Wilson over images"
    return s["value"], math.nan, math.nan, "none (one seed)"


def overlap(a, b):
    """True / False where both intervals exist, None where one is missing."""
    if any(math.isnan(v) for v in (a[1], a[2], b[1], b[2])):
        return None
    return not (a[2] < b[1] or b[2] < a[1])


# ===== measurements =====

# (name, unit, True where a lower value is the better defence; None: not a defence measure).
# The suppression is not one: a smaller masked gradient hides the attack's
# direction without moving the decision boundary, which is the claim under test.
MEASURES = [
    ("test accuracy", "%", None),
    ("loss-gradient suppression, masked", "log10", None),
    ("loss-gradient suppression, rescaled", "log10", None),
    ("JSMA success, masked", "%", True),
    ("JSMA success, fixed", "%", True),
    ("FGSM success, masked", "%", True),
    ("FGSM success, fixed", "%", True),
    ("mean logit margin", "logit", None),   # top logit minus the runner-up, over correctly classified images
]
MARGIN = MEASURES[-1][0]


def measure_one(model, meta, T, data, settings, att_settings, grad_store, attack_store, progress):
    """Every measure of one model, as {measure: {"value", and "k", "n" for proportions}}."""
    out = {}
    acc = meta["test_accuracy"]
    n_test = len(data.test_y)
    out["test accuracy"] = {"value": 100 * acc, "k": round(acc * n_test), "n": n_test}
    x, y = common.test_subset(data, settings["n"])
    key = grad_vs_T.result_key(meta, settings["n"])
    grad_rows = grad_store.get_or_compute(key, lambda: grad_vs_T.measure(model, x, y, T, progress))
    eps = att_settings["eps"][0]
    # the exact arithmetic only: the question here is the recipes, not the float32 rounding
    rows = attack_vs_T.measure_model(attack_store, model, meta, T, data, att_settings, progress,
                                     attacks=[("jsma", None), ("fgsm", eps)], formulations=("exact",))
    for r in rows:
        name = f"{r['attack'].upper()} success, {r['source']}"
        out[name] = {"value": 100 * r["success_rate"], "k": r["n_success"], "n": r["n_attempts"]}
    return out, grad_rows


def main():
    parser = common.make_parser(__doc__)
    common.add_common_options(parser, QUICK, FULL)
    parser.add_argument("--n-jsma", type=int, help="source images for JSMA, x 9 targets (default 100; quick 20)")
    parser.add_argument("--n-fgsm", type=int, help="test images for FGSM (default 1000; quick 200)")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPS,
                        help=f"FGSM epsilon, L-infinity, pixels in [0, 1] (default {DEFAULT_EPS}: one of "
                             "attack_vs_T.py's, so its results are reused)")
    parser.add_argument("--reuse", nargs="*", metavar="DIR",
                        help="result folders of grad_vs_T.py / attack_vs_T.py to reuse finished measurements "
                             "from (default: their default output folders)")
    args = parser.parse_args()
    settings = common.settings_from(args, QUICK, FULL)
    base = QUICK if settings["quick"] else FULL
    if "temperature" not in settings["recipes"] or "distilled" not in settings["recipes"]:
        raise UsageError("this comparison needs both recipes (--recipes temperature distilled)")
    # the attack settings of attack_vs_T.py, so its stored results are reused
    args.n_cw, args.eps = 0, [args.eps]
    att_settings = attack_vs_T.attack_settings(args, settings)
    att_settings["n"] = args.n_jsma if args.n_jsma is not None else base["n_jsma"]
    if not 1 <= att_settings["n"] <= 10000:
        raise UsageError(f"--n-jsma must be in [1, 10000] test images, got {att_settings['n']}")
    suffix = "_quick" if settings["quick"] else ""
    out = args.out or os.path.join("results", "distillation_vs_temperature" + suffix)
    common.check_output(out)                  # before any model is trained
    reuse = args.reuse if args.reuse is not None else [os.path.join("results", "grad_vs_T" + suffix),
                                                       os.path.join("results", "attack_vs_T" + suffix)]
    # full: about 3.5 min of training and 1 min of measuring per model on both cores (run S made
    # its 26 new models in 85 min as two one-thread processes side by side: 200 s each)
    common.announce(settings, "distillation_vs_temperature", seconds_per_model_quick=60,
                    seconds_per_model_full=300)
    print(f"measures: accuracy; gradient suppression on {settings['n']} test images; JSMA on "
          f"{att_settings['n']} images x 9 targets; FGSM eps = {att_settings['eps'][0]:g} on "
          f"{att_settings['n_fgsm']} images", flush=True)

    data = common.load_data(args)
    grad_store = common.ResultStore(out, also_read=reuse)
    attack_store = common.ResultStore(out, also_read=reuse)
    per_model, grad_rows = {}, []
    for recipe, T, seed in common.grid(settings):
        model, meta = common.model_for(recipe, T, seed, settings, args, data)
        values, g = measure_one(model, meta, T, data, settings, att_settings, grad_store, attack_store,
                                not args.no_progress)
        per_model[(recipe, T, seed)] = values
        grad_rows += [{"recipe": recipe, "T": T, "seed": seed, **r} for r in g]
    grad_vs_T.add_suppression(grad_rows)
    for r in grad_rows:
        if r["quantity"] == "loss":
            measured = per_model[(r["recipe"], r["T"], r["seed"])]
            measured[f"loss-gradient suppression, {r['source']}"] = {"value": r["suppression_log10_geomean"]}
            if r["source"] == "masked":
                measured[MARGIN] = {"value": r["mean_margin"]}

    rows = compare(per_model, settings)
    spread_rows = spread(per_model, settings)
    common.write_csv(os.path.join(out, "distillation_vs_temperature.csv"), rows, COLUMNS)
    common.write_csv(os.path.join(out, "distillation_vs_temperature_spread.csv"), spread_rows, SPREAD_COLUMNS)
    common.write_json(os.path.join(out, "distillation_vs_temperature.json"),
                      {"settings": settings, "attack_settings": att_settings, "rows": rows,
                       "spread": spread_rows,
                       "per_model": [{"recipe": k[0], "T": k[1], "seed": k[2], **v} for k, v in per_model.items()]})
    with atomic_write(os.path.join(out, "distillation_vs_temperature.md"), "w", suffix=".md") as f:
        f.write("\n\n".join(markdown(rows, spread_rows)) + "\n")
    plot(rows, per_model, os.path.join(out, "distillation_vs_temperature.png"), settings, att_settings["eps"][0])

    print("\ntemperature vs distilled, both deployed at T = 1 (mean [95 % interval]); "
          "suppression in log10 relative to the T = 1 model")
    table = [{"measure": r["measure"], "T": r["T"],
              "temperature": fmt_ci(r["temperature_mean"], r["temperature_lo"], r["temperature_hi"]),
              "distilled": fmt_ci(r["distilled_mean"], r["distilled_lo"], r["distilled_hi"]),
              "overlap": {True: "yes", False: "NO", None: "-"}[r["intervals_overlap"]], "interval": r["interval"]}
             for r in rows]
    common.print_table(table, ["measure", "T", "temperature", "distilled", "overlap", "interval"])
    if len(settings["seeds"]) > 1:
        print(f"\nseed-to-seed spread over {len(settings['seeds'])} seeds (sample standard deviation; "
              "range = max - min)")
        common.print_table([{**r, "sd": f"{r['sd']:.3g}", "range": f"{r['range']:.3g}"} for r in spread_rows],
                           ["recipe", "T", "measure", "unit", "mean", "sd", "range"])
    print()
    print(verdict(rows, per_model, settings))
    print(f"\nwrote {out}/distillation_vs_temperature.csv, _spread.csv, .json, .md, .png")
    return 0


def compare(per_model, settings):
    """One row per (measure, T != 1): both recipes' means and intervals, and whether they overlap."""
    rows = []
    for name, unit, lower_better in MEASURES:
        for T in settings["T"]:
            if T == 1.0:
                continue
            row = {"measure": name, "T": T, "n_seeds": len(settings["seeds"])}
            cis = {}
            for recipe in ("temperature", "distilled"):
                per_seed = [per_model[(recipe, T, s)][name] for s in settings["seeds"]]
                m, lo, hi, kind = interval(per_seed)
                cis[recipe] = (m, lo, hi)
                row.update({f"{recipe}_mean": m, f"{recipe}_lo": lo, f"{recipe}_hi": hi})
                row["interval"] = kind
            row["difference"] = cis["distilled"][0] - cis["temperature"][0]
            row["intervals_overlap"] = overlap(cis["temperature"], cis["distilled"])
            if row["intervals_overlap"] is False and lower_better is not None:
                distilled_lower = cis["distilled"][0] < cis["temperature"][0]
                row["better_defence"] = "distilled" if distilled_lower == lower_better else "temperature"
            else:
                row["better_defence"] = "not resolved" if lower_better is not None else "-"
            rows.append(row)
    return rows


def spread(per_model, settings):
    """How much each measure varies between seeds: one row per (recipe, T, measure).

    ``sd`` is the sample standard deviation over the seeds (ddof = 1; NaN with
    one seed), ``range`` the largest minus the smallest value. A seed without
    a value for a measure (no correctly classified image to attack) is left out.
    """
    models = [("standard", 1.0)] + [(r, T) for r in ("temperature", "distilled") for T in settings["T"] if T != 1.0]
    rows = []
    for recipe, T in models:
        for name, unit, _ in MEASURES:
            values = np.array([per_model[(recipe, T, s)][name]["value"] for s in settings["seeds"]], dtype=float)
            values = values[~np.isnan(values)]
            if len(values) == 0:
                continue
            rows.append({"recipe": recipe, "T": T, "measure": name, "unit": unit, "n_seeds": len(values),
                         "mean": float(values.mean()),
                         "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                         "min": float(values.min()), "max": float(values.max()),
                         "range": float(values.max() - values.min())})
    return rows


def markdown(rows, spread_rows):
    """The comparison and the spread as two Markdown tables (the README's, written beside the CSVs).

    Comparison: one row per measure and recipe, one column per T, "mean [lo, hi]", in bold where
    the recipes' intervals do not overlap. Spread: the sample standard deviation over seeds,
    "temperature / distilled" (T = 1: the standard model).
    """
    Ts = sorted({r["T"] for r in rows})

    def number(v, unit):
        if math.isnan(v):
            return "–"
        return f"{v:.2f}" if unit == "%" and abs(v) < 1 else f"{v:.1f}"

    units = {name: unit for name, unit, _ in MEASURES}
    lines = ["| measure | recipe | " + " | ".join(f"T = {T:g}" for T in Ts) + " |",
             "| --- | --- | " + " | ".join("---" for _ in Ts) + " |"]
    for name, unit, _ in MEASURES:
        for recipe in ("temperature", "distilled"):
            cells = []
            for T in Ts:
                r = next(r for r in rows if r["measure"] == name and r["T"] == T)
                m, lo, hi = r[f"{recipe}_mean"], r[f"{recipe}_lo"], r[f"{recipe}_hi"]
                cell = number(m, unit)
                if not math.isnan(lo):
                    cell += f" [{number(lo, unit)}, {number(hi, unit)}]"
                cells.append(f"**{cell}**" if r["intervals_overlap"] is False else cell)
            lines.append(f"| {name} | {recipe} | " + " | ".join(cells) + " |")
    comparison = "\n".join(lines)

    Ts = sorted({r["T"] for r in spread_rows})
    lines = ["| measure (sample sd over seeds) | " + " | ".join(f"T = {T:g}" for T in Ts) + " |",
             "| --- | " + " | ".join("---" for _ in Ts) + " |"]
    for name, unit, _ in MEASURES:
        cells = []
        for T in Ts:
            sds = []
            for recipe in ("standard",) if T == 1.0 else ("temperature", "distilled"):
                r = [r for r in spread_rows if r["measure"] == name and r["T"] == T and r["recipe"] == recipe]
                sds.append(f"{r[0]['sd']:.2g}" if r and not math.isnan(r[0]["sd"]) else "–")
            cells.append(" / ".join(sds))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return comparison, "\n".join(lines)


def fmt_ci(m, lo, hi):
    if math.isnan(lo):
        return f"{m:.3g}"
    return f"{m:.3g} [{lo:.3g}, {hi:.3g}]"


def verdict(rows, per_model, settings):
    """One paragraph, decided from the intervals (nothing here is fixed in advance)."""
    defence = [r for r in rows if r["better_defence"] != "-"]
    judged = [r for r in defence if r["intervals_overlap"] is not None]
    resolved = [r for r in judged if r["intervals_overlap"] is False]
    for_distilled = [r for r in resolved if r["better_defence"] == "distilled"]
    for_temperature = [r for r in resolved if r["better_defence"] == "temperature"]
    unjudged = [r for r in defence if r["intervals_overlap"] is None]
    acc = [r for r in rows if r["measure"] == "test accuracy"]
    acc_diff = [r for r in acc if r["intervals_overlap"] is False]

    def name(r):
        return f"{r['measure']} at T = {r['T']:g} ({r['temperature_mean']:.3g} vs {r['distilled_mean']:.3g})"

    Tmax = max(T for T in settings["T"])
    seeds = settings["seeds"]
    base = np.nanmean([per_model[("standard", 1.0, s)]["JSMA success, masked"]["value"] for s in seeds])
    temp_hi = np.nanmean([per_model[("temperature", Tmax, s)]["JSMA success, masked"]["value"] for s in seeds])
    s = [f"Over {len(judged)} defence measures with an interval on both sides "
         f"({len(seeds)} seed{'s' if len(seeds) > 1 else ''}, {rows[0]['interval'] if len(seeds) > 1 else 'Wilson intervals over images, which leave out the seed-to-seed spread'}), "]
    if not for_distilled:
        s.append(f"distillation is never a resolved better defence than the temperature alone "
                 f"({len(judged) - len(resolved)} overlap")
        s.append(f", {len(for_temperature)} favour the temperature alone: " + "; ".join(map(name, for_temperature))
                 + ")" if for_temperature else ")")
        s.append(". On these numbers distillation adds nothing detectable beyond the temperature: ")
    else:
        s.append(f"distillation is the better defence on {len(for_distilled)}: " + "; ".join(map(name, for_distilled)))
        s.append(f"; the temperature alone on {len(for_temperature)}" +
                 (": " + "; ".join(map(name, for_temperature)) if for_temperature else ""))
        s.append(f"; {len(judged) - len(resolved)} overlap. On these numbers distillation does add something "
                 "beyond the temperature on the measures listed. For scale, ")
    s.append(f"training at T = {Tmax:g} with hard labels alone takes JSMA on the deployed softmax from "
             f"{base:.1f} % (T = 1) to {temp_hi:.1f} %.")
    s.append(f" Each comparison is two 95 % intervals, with no correction for the {len(judged)} made.")
    fixed = [r for r in judged if r["measure"].endswith("fixed")]
    if resolved and fixed and all(r["measure"].endswith("masked") for r in resolved):
        s.append(" Every resolved difference is in an attack on the deployed softmax, whose gradient the "
                 "temperature masks, and none in the attacks on softmax(z / T_train): the recipes differ in "
                 "how much they mask, not in robustness.")
    if unjudged:
        s.append(f" {len(unjudged)} measure(s) have no interval on one side and are not judged ("
                 + ", ".join(f"{r['measure']} at T = {r['T']:g}" for r in unjudged) + "): "
                 + "no correctly classified image to attack.")
    described = [r for r in rows if r["better_defence"] == "-" and r["measure"] != "test accuracy"]
    apart = [r for r in described if r["intervals_overlap"] is False]
    if apart:
        s.append(" The recipes differ beyond the intervals on measures of the masking, not of defence: "
                 + "; ".join(map(name, apart)) + ".")
    if acc_diff:
        s.append(" Test accuracy differs beyond the intervals at " + "; ".join(
            f"T = {r['T']:g} ({r['temperature_mean']:.3g} % temperature vs {r['distilled_mean']:.3g} % distilled)"
            for r in acc_diff) + ".")
    else:
        s.append(" Test accuracy is within the intervals at every T.")
    return "".join(s)


def plot(rows, per_model, path, settings, eps):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m[0] for m in MEASURES]
    cols = 4
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.9 * nrows))
    axes = axes.ravel()
    colors = {"temperature": "tab:blue", "distilled": "tab:red"}
    Ts = [T for T in settings["T"] if T != 1.0]
    for ax, (name, unit, _) in zip(axes, MEASURES):
        ref = np.nanmean([per_model[("standard", 1.0, s)][name]["value"] for s in settings["seeds"]])
        ax.axhline(ref, color="gray", ls=":", label="standard model (T = 1)")
        for i, recipe in enumerate(("temperature", "distilled")):
            rs = [next(r for r in rows if r["measure"] == name and r["T"] == T) for T in Ts]
            m = np.array([r[f"{recipe}_mean"] for r in rs])
            lo = np.array([r[f"{recipe}_lo"] for r in rs])
            hi = np.array([r[f"{recipe}_hi"] for r in rs])
            xs = np.array(Ts) * (1.06 if i else 1 / 1.06)          # side by side, not on top
            has = ~np.isnan(lo)
            ax.plot(xs, m, "o-", color=colors[recipe], label=recipe)
            if has.any():
                ax.errorbar(xs[has], m[has], yerr=[m[has] - lo[has], hi[has] - m[has]], fmt="none",
                            ecolor=colors[recipe], capsize=4)
        common.temperature_axis(ax, Ts)
        ax.set_title(name.replace("FGSM success", f"FGSM success (eps = {eps:g})"), fontsize=10)
        ax.set_ylabel("test accuracy (%)" if name == "test accuracy" else
                      "success rate (% of correctly classified)" if unit == "%" else
                      "top logit - runner-up (logits)" if unit == "logit" else
                      "log10 of gradient norm / T = 1 model's")
        if unit == "logit":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(names):]:
        ax.axis("off")
    fig.text(0.5, 0.01, "masked: softmax at T = 1, as deployed;  rescaled / fixed: softmax(z / T_train);  "
                        "bars: 95 % intervals, none where only one value exists (one seed);  "
                        "dotted line: the standard (T = 1) model", ha="center", fontsize=10)
    axes[0].legend(fontsize=8)
    kind = rows[0]["interval"] if rows else ""
    fig.suptitle(f"Temperature alone vs defensive distillation, deployed at T = 1 "
                 f"(95 % intervals: {kind}; {settings['architecture']} network, {settings['epochs']} epochs "
                 f"on {settings['train_size'] or 55000} images)")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    common.save_figure(fig, path)
    plt.close(fig)

