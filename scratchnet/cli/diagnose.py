"""``python -m scratchnet diagnose MODEL.npz``: robust, or are its gradients masked?

Examples::

    python -m scratchnet diagnose model_T100.npz                       # eps 0.3, 100 test images
    python -m scratchnet diagnose model_T100.npz --eps 0.1 --n 500 --json d.json --png d.png
    python -m scratchnet diagnose model_T100.npz --source standard.npz  # adds a transfer attack

What it does, in order, on the same test images:

1. **The cheap attack**: APGD with the cross-entropy of the deployed softmax
   (T = 1), the first thing an evaluation runs. The six indicators of attack
   failure (``scratchnet/attacks/indicators.py``, Pintor et al. 2022) are read
   on it: they say whether the attack *failed* rather than the model resisting.
2. **The mitigations**, each a real attack run, reported as robust accuracy:

   * APGD-DLR: the difference-of-logits-ratio loss, which no rescaling of the
     logits can saturate (``attacks/dlr.py``);
   * APGD-CE on softmax(z / T_est): the cross-entropy again, with the logits
     divided by an *estimated* temperature (below). The model's training T is
     never read: the diagnosis works on any scratchnet model;
   * Square on the logits: random search, no gradient at all (``attacks/square.py``);
   * transfer: examples crafted by APGD-CE on ``--source`` (a model whose
     gradients work, e.g. a standard T = 1 network), sent to this one.

3. **The worst case per image** over all of them (AutoAttack's robust
   accuracy: an image counts as robust only if *every* attack failed on it),
   the ``gradient_masking`` decision and a one-line verdict.

The estimated temperature is ``attacks.diagnostics.estimate_temperature``
(T_est = max(1, median top-two logit margin / 10)); its docstring says why.

``gradient_masking`` is true when either

* the cheap attack's robust accuracy is at least ``MASKING_GAP`` = 10
  percentage points above the worst case per image over the adaptive attacks
  (the mitigations), and their 95 % Wilson intervals do not overlap; or
* the unavailable-gradients indicator flags more than half (``MOST``) of the
  correctly classified images (the loss gradient at the image is exactly zero
  where the cheap attack failed).

The robust accuracy to report is the worst case, with its interval.
"""
import math
import os

import numpy as np

from . import (UsageError, data_options, device_option, nonnegative_float, nonnegative_int, output_file,
               positive_int)
from ..attacks.diagnostics import REFERENCE_MARGIN, estimate_temperature, top2_margins
from ..stats import wilson

MASKING_GAP = 0.10          # the cheap attack's robust accuracy this far above the adaptive ones: masking
MOST = 0.5                  # unavailable gradients on more than this share of the correct images: masking

MASKING_RULE = (f"gradient_masking is true when the cheap attack's robust accuracy is at least "
                f"{100 * MASKING_GAP:.0f} points above the worst case per image over the adaptive attacks "
                f"and their 95 % Wilson intervals do not overlap, or when the unavailable-gradients indicator "
                f"flags more than {100 * MOST:.0f} % of the correctly classified images")
T_EST_RULE = (f"T_est = max(1, median top-two logit margin / {REFERENCE_MARGIN:g}), so that the median "
              f"rescaled margin is {REFERENCE_MARGIN:g} (unsaturated in float32); an estimate, the model's "
              f"training T is never read")

# which mitigation answers which indicator (the table's last column)
ANSWERED_BY = {
    "unavailable_gradients": "APGD-DLR, CE at 1/T_est, Square",
    "unstable_predictions": "Square",
    "silent_success": "APGD-DLR (APGD already returns its best adversarial point)",
    "incomplete_optimization": "more steps (--steps)",
    "transfer_failure": "APGD-DLR, Square (attack this model itself)",
    "unconstrained_attack_failure": "APGD-DLR, CE at 1/T_est, Square",
}
WHAT_IT_MEANS = {
    "unavailable_gradients": "the loss gradient at the image is exactly zero",
    "unstable_predictions": "the loss jumps under tiny random noise",
    "silent_success": "the attack passed an adversarial point and lost it",
    "incomplete_optimization": "the loss was still rising when the attack stopped",
    "transfer_failure": "fooled the source model, not this one",
    "unconstrained_attack_failure": "fails even with no budget at all",
}

DESCRIPTION = (
    "Is a saved model robust, or does it only mask its gradients? Runs a cheap attack (APGD-CE at T = 1, "
    "as deployed) and the six indicators of attack failure on it, then the attacks those indicators point "
    "to (APGD-DLR; APGD-CE on the logits divided by an estimated temperature; Square on the logits, "
    "gradient-free; transfer from --source), all on the same test images, and prints the robust accuracy "
    "of each with its 95 % Wilson interval, the worst case per image over all of them, and a verdict. "
    "The temperature: " + T_EST_RULE + ". " + MASKING_RULE + ".")


def add_parser(sub):
    """Register ``diagnose`` and its options."""
    p = sub.add_parser("diagnose", help="indicators of attack failure, the mitigations, the worst-case "
                                        "robust accuracy, and whether the gradients are masked",
                       description=DESCRIPTION)
    p.add_argument("model", metavar="MODEL.npz", help="a model saved by scratchnet (any recipe and T)")
    p.add_argument("--eps", type=nonnegative_float, default=0.3,
                   help="L-infinity budget, pixels in [0, 1] (default 0.3, MNIST's usual one)")
    p.add_argument("--n", type=positive_int, default=100, help="number of test images (default 100)")
    p.add_argument("--offset", type=nonnegative_int, default=0, help="index of the first test image (default 0)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which images (default test)")
    p.add_argument("--loss", choices=("ce", "dlr"), default="ce",
                   help="loss of the cheap attack the indicators read: ce (cross-entropy at T = 1, as "
                        "deployed; the default) or dlr")
    p.add_argument("--steps", type=positive_int, default=50,
                   help="iterations of every APGD run: the cheap attack, its unconstrained check, the "
                        "mitigations and the transfer source (default 50)")
    p.add_argument("--queries", type=positive_int, default=1000,
                   help="Square attack: most queries per image (default 1000)")
    p.add_argument("--samples", type=positive_int, default=100,
                   help="random perturbations per image for the unstable-predictions indicator (default 100)")
    p.add_argument("--source", metavar="SOURCE.npz", default=None,
                   help="a model to craft transfer attacks on (e.g. a standard T = 1 network); adds the "
                        "transfer attack and the transfer-failure indicator")
    data_options(p)
    p.add_argument("--batch-size", type=positive_int, default=100, help="images per pass (default 100)")
    p.add_argument("--seed", type=int, default=0, help="for the random starts and the Square attack (default 0)")
    device_option(p, "run")
    p.add_argument("--json", metavar="PATH", type=output_file, default=None,
                   help="write every number as JSON (top level: gradient_masking true|false)")
    p.add_argument("--png", metavar="PATH", type=output_file, default=None,
                   help="write a figure: robust accuracy per attack (Wilson intervals) and indicator fractions")
    p.set_defaults(run=run)
    return p


# ===== the pieces, each testable on its own =====

def robust_accuracy(robust):
    """A robust-accuracy record of per-image flags (N,): count, rate and its 95 % Wilson interval."""
    robust = np.asarray(robust, dtype=bool)
    k, n = int(robust.sum()), int(len(robust))
    lo, hi = wilson(k, n)
    return {"n_robust": k, "n": n, "robust_accuracy": k / n if n else math.nan, "interval": [lo, hi]}


def masking_decision(cheap, adaptive, n_unavailable, n_correct):
    """Apply the rule of ``MASKING_RULE``; returns (gradient_masking, [reasons in words]).

    Parameters
    ----------
    cheap, adaptive : ``robust_accuracy`` records of the cheap attack and of the
        worst case over the adaptive attacks
    n_unavailable : images flagged by the unavailable-gradients indicator
    n_correct : images classified correctly before any attack
    """
    reasons = []
    gap = cheap["robust_accuracy"] - adaptive["robust_accuracy"]
    if gap >= MASKING_GAP and cheap["interval"][0] > adaptive["interval"][1]:
        reasons.append(f"the cheap attack leaves {100 * cheap['robust_accuracy']:.0f} % robust, the adaptive "
                       f"attacks {100 * adaptive['robust_accuracy']:.0f} % ({100 * gap:.0f} points lower, "
                       f"95 % intervals apart)")
    if n_correct and n_unavailable / n_correct > MOST:
        reasons.append(f"the loss gradient is exactly zero at {n_unavailable} of the {n_correct} correctly "
                       f"classified images")
    return bool(reasons), reasons


def verdict_line(masking, reasons, worst, cheap, adaptive, eps):
    """One line a newcomer can act on."""
    w = (f"{100 * worst['robust_accuracy']:.1f} % [{100 * worst['interval'][0]:.1f}, "
         f"{100 * worst['interval'][1]:.1f}]")
    if masking:
        return (f"verdict: GRADIENT MASKING: {reasons[0]}. The cheap attack's number is not a robustness "
                f"measure; the robust accuracy at eps {eps:g} is the worst case, {w}.")
    return (f"verdict: no gradient masking detected: the cheap attack ({100 * cheap['robust_accuracy']:.1f} %) "
            f"and the adaptive attacks ({100 * adaptive['robust_accuracy']:.1f} %) agree; robust accuracy at "
            f"eps {eps:g}, worst case over all attacks: {w}.")


# ===== the command =====

def run(args):
    """Run the diagnosis (errors and exit codes: ``scratchnet.cli``)."""
    from ..attacks import apgd, indicators, square_linf
    from ..backend import resolve_device
    from ..data import load_mnist
    from ..files import write_json
    from ..model import load

    if args.eps > 1:
        raise UsageError(f"--eps must be at most 1 (pixels lie in [0, 1]), got {args.eps:g}")
    device = resolve_device(args.device)
    model, metadata = load(args.model, device=device)    # first: a bad file fails before any slow work
    source = None
    if args.source:
        source, _ = load(args.source, device=device)
        if source.n_classes != model.n_classes:
            raise ValueError(f"--source {args.source} has {source.n_classes} classes, the model {model.n_classes}")
    data = load_mnist(args.data_dir, download=not args.no_download, progress=False)
    xs, ys = (data.test_x, data.test_y) if args.split == "test" else (data.val_x, data.val_y)
    if args.offset >= len(xs):
        raise UsageError(f"--offset {args.offset} is past the {len(xs)} {args.split} images")
    x, labels = xs[args.offset:args.offset + args.n], ys[args.offset:args.offset + args.n].astype(np.int64)
    n = len(x)
    common = dict(batch_size=args.batch_size, seed=args.seed, progress=True)

    margins = top2_margins(model, x, args.batch_size)
    T_est = estimate_temperature(margins)
    recorded = (f"; the file records training T = {metadata['T']:g}, not used"
                if isinstance(metadata.get("T"), (int, float)) else "")
    print(f"model {args.model} on {device}: {n} {args.split} images from {args.offset}, "
          f"L-infinity eps {args.eps:g}" + (f"; transfer source {args.source}" if args.source else ""))
    print(f"estimated temperature T_est = {T_est:.3g} (median top-two logit margin {np.median(margins):.3g}, "
          f"divided by {REFERENCE_MARGIN:g}, floored at 1{recorded})", flush=True)

    # ----- 1. the cheap attack and the indicators read on it -----
    cheap_name = "APGD-CE at T = 1" if args.loss == "ce" else "APGD-DLR"
    report = indicators.evaluate(model, x, labels, args.eps, loss=args.loss, T=1.0, steps=args.steps,
                                 source=source, samples=args.samples, **common)
    per = report.per_image
    correct = np.asarray(per["initially_correct"], dtype=bool)
    deployed = " (as deployed)" if args.loss == "ce" else ""
    runs = [{"name": "cheap", "label": f"cheap: {cheap_name}{deployed}, {args.steps} steps", "role": "cheap",
             "short": "cheap:\n" + cheap_name.replace(" at", "\nat"),
             "robust": correct & ~np.asarray(per["attack_success"], dtype=bool), "summary": report.attack}]

    # ----- 2. the mitigations, each an attack on the same images -----
    def add(name, label, short, result):
        runs.append({"name": name, "label": label, "short": short, "role": "mitigation",
                     "robust": correct & ~result.success, "summary": result.summary()})

    if args.loss != "dlr":
        _, r = apgd(model, x, labels, args.eps, loss="dlr", steps=args.steps, **common)
        add("apgd-dlr", f"APGD-DLR (scale-invariant loss), {args.steps} steps", "APGD-DLR", r)
    else:                                   # the cheap attack already was APGD-DLR: the same run
        runs.append(dict(runs[0], name="apgd-dlr", role="mitigation", short="APGD-DLR",
                         label=f"APGD-DLR (the cheap attack itself), {args.steps} steps"))
    _, r = apgd(model, x, labels, args.eps, loss="ce", T=T_est, steps=args.steps, **common)
    add("apgd-ce-rescaled", f"APGD-CE on softmax(z / {T_est:.3g}), T estimated, {args.steps} steps",
        f"APGD-CE at\nT_est = {T_est:.3g}", r)
    _, r = square_linf(model, x, labels, args.eps, queries=args.queries, output="logits", **common)
    add("square", f"Square on the logits (no gradient), {args.queries} queries", "Square\n(logits)", r)
    if source is not None:
        ok = correct & np.asarray(per["transfer_success"], dtype=bool)
        runs.append({"name": "transfer", "label": "transfer from the --source model (APGD-CE at T = 1 there)",
                     "role": "mitigation",
                     "short": "transfer",
                     "robust": correct & ~ok, "summary": report.runs["transfer"]})

    # ----- 3. the worst case per image, the rule, the verdict -----
    so_far = np.ones(n, dtype=bool)
    for run_ in runs:
        so_far &= run_["robust"]
        run_["record"] = robust_accuracy(run_["robust"])
        run_["worst_so_far"] = robust_accuracy(so_far)
    worst = robust_accuracy(so_far)
    adaptive_flags = np.logical_and.reduce([r_["robust"] for r_ in runs if r_["role"] == "mitigation"])
    adaptive = robust_accuracy(adaptive_flags)
    cheap = runs[0]["record"]
    unavailable = report.summary["unavailable_gradients"]
    masking, reasons = masking_decision(cheap, adaptive, unavailable["n_flagged"], int(correct.sum()))
    verdict = verdict_line(masking, reasons, worst, cheap, adaptive, args.eps)
    clean = robust_accuracy(correct)

    print("\n" + "\n".join(indicator_lines(report, cheap_name)))
    print("\n" + "\n".join(accuracy_lines(runs, clean, worst, args.eps, n)))
    print(f"\ngradient_masking: {'true' if masking else 'false'}"
          + "".join(f"\n  because {r}" for r in reasons) + f"\n  (the rule: {MASKING_RULE})")
    print(verdict)

    record = {
        "gradient_masking": masking, "gradient_masking_reasons": reasons, "gradient_masking_rule": MASKING_RULE,
        "verdict": verdict, "model": os.path.abspath(args.model), "model_metadata_not_used": metadata,
        "settings": {"eps": args.eps, "norm": "linf", "n": n, "offset": args.offset, "split": args.split,
                     "loss": args.loss, "steps": args.steps, "queries": args.queries, "samples": args.samples,
                     "seed": args.seed, "source": os.path.abspath(args.source) if args.source else None},
        "estimated_T": {"T_est": T_est, "median_margin": float(np.median(margins)),
                        "reference_margin": REFERENCE_MARGIN, "rule": T_EST_RULE},
        "clean": clean,
        "attacks": [{"name": r_["name"], "label": r_["label"], "short": r_["short"], "role": r_["role"],
                     **r_["record"],
                     "worst_case_so_far": r_["worst_so_far"], "summary": r_["summary"]} for r_ in runs],
        "worst_case": dict(worst, over=[r_["name"] for r_ in runs]),
        "adaptive_worst_case": dict(adaptive, over=[r_["name"] for r_ in runs if r_["role"] == "mitigation"]),
        "indicators": report.to_json(),
        "per_image": {"labels": labels.tolist(), "margin": margins.tolist(), "initially_correct": correct.tolist(),
                      **{f"robust_{r_['name']}": r_["robust"].tolist() for r_ in runs},
                      "robust_worst_case": so_far.tolist()},
    }
    if args.json:
        write_json(args.json, record)
        print(f"wrote {args.json}")
    if args.png:
        save_png(args.png, record, title=f"{os.path.basename(args.model)}: L-inf eps {args.eps:g}, {n} images; "
                                         f"gradient_masking = {'true' if masking else 'false'}")
        print(f"wrote {args.png}")
    return 0


# ===== what it prints =====

def _pct(rec):
    lo, hi = rec["interval"]
    return f"{100 * rec['robust_accuracy']:5.1f} % [{100 * lo:5.1f}, {100 * hi:5.1f}]"


def indicator_lines(report, cheap_name):
    """The indicators of attack failure as a table: flagged share, fires or not, what answers it."""
    from ..attacks.indicators import INDICATORS
    out = [f"Indicators of attack failure, read on the cheap attack ({cheap_name}; Pintor et al. 2022). "
           f"An indicator FIRES when it flags at least {100 * report.settings['min_fraction']:.0f} % of the "
           f"images it applies to:",
           f"  {'indicator':30s} {'flagged':>20s}  {'':5s}  {'what it means':52s}  answered below by"]
    for k in INDICATORS:
        s = report.summary[k]
        if not s.get("measured", True):
            out.append(f"  {k:30s} {'not measured':>20s}  {'':5s}  {'(no --source model)':52s}")
            continue
        frac = "n/a" if s["n_applicable"] == 0 else f"{100 * s['fraction']:.0f} %"
        flagged = f"{s['n_flagged']} / {s['n_applicable']} ({frac})"
        out.append(f"  {k:30s} {flagged:>20s}  {'FIRES' if s['fired'] else 'quiet':5s}  "
                   f"{WHAT_IT_MEANS[k]:52s}  {ANSWERED_BY[k]}")
    return out


def accuracy_lines(runs, clean, worst, eps, n):
    """Robust accuracy of each attack and of the worst case so far, with 95 % Wilson intervals."""
    width = max(len(r["label"]) for r in runs) + 2
    out = [f"Robust accuracy at L-infinity eps {eps:g} on {n} images: the share still classified correctly "
           f"(95 % Wilson interval). 'worst so far' counts an image as robust only if every attack up to that "
           f"row failed on it.",
           f"  {'attack':{width}s}  {'robust accuracy':>24s}  {'worst so far':>12s}",
           f"  {'none (clean accuracy)':{width}s}  {_pct(clean):>24s}"]
    for i, r in enumerate(runs):
        label = r["label"] if i == 0 else "+ " + r["label"]
        out.append(f"  {label:{width}s}  {_pct(r['record']):>24s}  "
                   f"{100 * r['worst_so_far']['robust_accuracy']:10.1f} %")
    out.append(f"  {'worst case per image over all attacks':{width}s}  {_pct(worst):>24s}")
    return out


def save_png(path, record, title=None):
    """Left: robust accuracy per attack and the worst case (bars, Wilson intervals). Right: indicator fractions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..attacks.indicators import INDICATORS
    from ..files import save_figure

    bars = [("clean\n(no attack)", record["clean"], "0.7")]
    colours = {"cheap": "tab:red", "mitigation": "tab:blue"}
    for a in record["attacks"]:
        bars.append((a["short"], a, colours[a["role"]]))
    bars.append(("worst case\nper image", record["worst_case"], "black"))

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.25, 1]})
    xs = np.arange(len(bars))
    vals = np.array([100 * b[1]["robust_accuracy"] for b in bars])
    lo = np.array([100 * b[1]["interval"][0] for b in bars])
    hi = np.array([100 * b[1]["interval"][1] for b in bars])
    ax.bar(xs, vals, color=[b[2] for b in bars], alpha=0.85)
    ax.errorbar(xs, vals, yerr=[vals - lo, hi - vals], fmt="none", ecolor="k", capsize=4, lw=1)
    for xi, v, h in zip(xs, vals, hi):
        ax.text(xi, h + 1.5, f"{v:.0f} %", ha="center", va="bottom", fontsize=8)      # above the interval
    ax.set_xticks(xs)
    ax.set_xticklabels([b[0] for b in bars], fontsize=8)
    ax.set_ylim(0, 108)
    ax.set_ylabel("robust accuracy (%), 95 % Wilson interval")
    ax.set_title(f"robust accuracy at L-inf eps {record['settings']['eps']:g} "
                 f"(red: cheap attack, blue: mitigations)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)

    summ = record["indicators"]["summary"]
    names = [k for k in INDICATORS if summ[k].get("measured", True)]
    fr = [100 * (summ[k]["fraction"] if summ[k]["n_applicable"] else 0.0) for k in names]
    ys = np.arange(len(names))[::-1]
    bx.barh(ys, fr, color=["tab:red" if summ[k]["fired"] else "tab:gray" for k in names])
    thr = 100 * record["indicators"]["settings"]["min_fraction"]
    bx.axvline(thr, color="k", ls="--", lw=1)
    bx.text(thr + 1, ys[0] + 0.45, f"fires at {thr:.0f} %", fontsize=8)
    for y, k, f in zip(ys, names, fr):
        s = summ[k]
        text = f"{s['n_flagged']} / {s['n_applicable']}" + (" FIRES" if s["fired"] else "")
        inside = f > 60                                   # long bars carry their label inside, in white
        bx.text(f - 1.5 if inside else f + 1.5, y, text, va="center", ha="right" if inside else "left",
                color="white" if inside else "black", fontsize=8)
    bx.set_yticks(ys)
    bx.set_yticklabels([k.replace("_", " ") for k in names], fontsize=9)
    bx.set_xlim(0, 100)
    bx.set_xlabel("images flagged (% of the images each indicator applies to)")
    bx.set_title("indicators of attack failure on the cheap attack", fontsize=10)
    bx.grid(True, axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
