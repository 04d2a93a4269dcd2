"""``python -m scratchnet attack MODEL.npz``: attack a saved model and show why it fails or works.

Examples::

    # Papernot's setting: JSMA on the deployed softmax (T = 1)
    python -m scratchnet attack model_T100.npz --attack jsma --wrt probs --T 1
    # Carlini and Wagner's fix on the same model: the logits, or softmax(z / T_train)
    python -m scratchnet attack model_T100.npz --attack jsma --wrt logits
    python -m scratchnet attack model_T100.npz --attack fgsm --wrt loss --T train --eps 0.2
    # the published float32 arithmetic (JSMA's raw products, softmax - onehot) instead of the exact one
    python -m scratchnet attack model_T100.npz --attack jsma --formulation paper

Where to read on: the attacks are ``scratchnet/attacks/`` (``jsma.py`` and
the gradient sources it differentiates, ``sources.py``), the diagnostics
``scratchnet/attacks/diagnostics.py``.

It prints the success rate (over the images the model classified correctly,
with the denominator), the mean distortions of the successful attacks and the
gradient diagnostics (saturation, exact zeros, logit margin, predicted and true
suppression), and on request writes the adversarial images (.npz), a JSON
record and a PNG grid of originals, perturbations and adversarial images.
"""
import argparse
import os

import numpy as np

from . import (UsageError, data_options, device_option, fraction, nonnegative_float, nonnegative_int,
               output_file, positive_float, positive_int, random_seed, temperature)

DEFAULT_WRT = {"fgsm": "loss", "pgd": "loss", "jsma": "probs", "cw": "logits"}
ALLOWED_WRT = {"fgsm": ("probs", "logits", "loss"), "pgd": ("probs", "logits", "loss"),
               "jsma": ("probs", "logits"), "cw": ("logits", "probs")}
DEFAULT_TARGET = {"fgsm": "none", "pgd": "none", "jsma": "random", "cw": "none"}
FORMULATIONS = ("exact", "paper")
WITH_FORMULATION = ("fgsm", "pgd", "jsma")     # C&W's f6 on the logits has one arithmetic only


def add_parser(sub):
    """Register ``attack`` and its options."""
    parser = sub.add_parser("attack", help="craft adversarial examples against a saved model",
                            description="Craft adversarial examples against a saved model, and measure "
                                        "why the gradient they follow vanishes or not.")
    parser.add_argument("model", metavar="MODEL.npz", help="a model saved by scratchnet")
    parser.add_argument("--attack", choices=("fgsm", "pgd", "jsma", "cw"), default="fgsm",
                        help="the attack (default fgsm)")
    parser.add_argument("--wrt", choices=("probs", "logits", "loss"), default=None,
                        help="what the attack differentiates: probabilities softmax(z/T), logits, or the "
                             "cross-entropy at T (default as in the original papers: fgsm/pgd loss, "
                             "jsma probs, cw logits)")
    parser.add_argument("--T", type=temperature_or_train, default=1.0, metavar="T",
                        help="softmax temperature of the differentiated output: a number (1 = as deployed), "
                             "or 'train' for the model's training temperature (Carlini-Wagner's rescaling)")
    parser.add_argument("--formulation", choices=FORMULATIONS, default=None,
                        help="jsma, fgsm and pgd only: 'exact' (default: JSMA's pair scores rescaled so "
                             "float32 products do not underflow, the cross-entropy gradient without the "
                             "1 - p cancellation) or 'paper' (the published float32 arithmetic: JSMA's raw "
                             "products, softmax - onehot); an error with --attack cw")
    parser.add_argument("--eps", type=nonnegative_float, default=0.1, help="fgsm/pgd: L-infinity budget (default 0.1)")
    parser.add_argument("--step", type=positive_float, default=None, help="pgd: step size (default eps/4)")
    parser.add_argument("--steps", type=positive_int, default=10, help="pgd: number of steps (default 10)")
    parser.add_argument("--random-start", action="store_true", help="pgd: start at a random point of the eps-ball")
    parser.add_argument("--target", default=None,
                        help="none (untargeted), next (label+1), random, all (the 9 other classes per image), "
                             "or a class 0-9 (default: random for jsma, none otherwise)")
    parser.add_argument("--max-distortion", type=fraction, default=0.145,
                        help="jsma: the most pixels changed, as a fraction (default 0.145)")
    parser.add_argument("--pair-chunk", type=positive_int, default=8,
                        help="jsma: images whose pixel-pair tables exist at once (memory cap, default 8)")
    parser.add_argument("--kappa", type=nonnegative_float, default=0.0, help="cw: confidence (default 0)")
    parser.add_argument("--c", type=positive_float, default=0.1, help="cw: initial trade-off constant (default 0.1)")
    parser.add_argument("--binary-steps", type=positive_int, default=5, help="cw: binary-search rounds over c (default 5)")
    parser.add_argument("--cw-steps", type=positive_int, default=100, help="cw: Adam steps per round (default 100)")
    parser.add_argument("--lr", type=positive_float, default=0.05, help="cw: Adam learning rate (default 0.05)")
    parser.add_argument("--abort-early", action="store_true",
                        help="cw: end a round once its loss stops falling (Carlini and Wagner's early abort)")
    parser.add_argument("--n", type=positive_int, default=100, help="number of test images (default 100)")
    parser.add_argument("--offset", type=nonnegative_int, default=0, help="index of the first test image (default 0)")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="which images (default test)")
    data_options(parser)
    parser.add_argument("--batch-size", type=positive_int, default=100, help="images per pass (default 100)")
    parser.add_argument("--seed", type=random_seed, default=0, help="for random targets and pgd's random start")
    device_option(parser, "run")
    parser.add_argument("--no-diagnostics", action="store_true", help="skip the gradient diagnostics")
    parser.add_argument("--save", metavar="ADV.npz", type=output_file, default=None,
                        help="write the original and adversarial images, labels, targets and predictions")
    parser.add_argument("--json", metavar="RECORD.json", type=output_file, default=None, help="write the full record as JSON")
    parser.add_argument("--png", metavar="GRID.png", type=output_file, default=None,
                        help="write a grid of originals, perturbations and adversarial images")
    parser.set_defaults(run=run)
    return parser


def temperature_or_train(text):
    """argparse type for ``--T``: a temperature (``temperature``), or "train" (the model's training T)."""
    if str(text).lower() == "train":
        return "train"
    from ..functional import T_MAX, T_MIN
    try:
        return temperature(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0 or 'train', got {text!r} (a number from "
                                         f"{T_MIN:g} to {T_MAX:g}: what float32 softmax(z / T) can resolve)") from None


def _check(cond, message):
    if not cond:
        raise UsageError(message)


def _resolve_T(T, metadata):
    """The number ``--T`` stands for: itself, or the training T recorded in the model file."""
    if T != "train":
        return T
    _check("T" in metadata, "--T train: the model file records no training temperature; give a number")
    return float(metadata["T"])


def make_targets(labels, mode, K=10, seed=0):
    """Image indices and target classes for a target mode.

    Returns
    -------
    index : (M,) int, which images are attacked (repeated for mode 'all')
    targets : (M,) int or None (untargeted)
    """
    labels = np.asarray(labels)
    N = len(labels)
    if mode == "none":
        return np.arange(N), None
    if mode == "next":
        return np.arange(N), (labels + 1) % K
    if mode == "random":
        shift = np.random.default_rng(seed).integers(1, K, size=N)   # never the label itself
        return np.arange(N), (labels + shift) % K
    if mode == "all":
        index = np.repeat(np.arange(N), K - 1)
        shift = np.tile(np.arange(1, K), N)
        return index, (labels[index] + shift) % K
    try:
        cls = int(mode)
    except ValueError:
        raise UsageError(f"--target must be none, next, random, all or a class 0-{K - 1}, got {mode!r}") from None
    _check(0 <= cls < K, f"--target class must be in 0-{K - 1}, got {cls}")
    index = np.flatnonzero(labels != cls)                  # an image of class cls has nothing to reach
    return index, np.full(len(index), cls)


def _validate(args):
    """The checks that need more than one option; single values were checked while parsing."""
    wrt = args.wrt or DEFAULT_WRT[args.attack]
    _check(wrt in ALLOWED_WRT[args.attack],
           f"--attack {args.attack} differentiates {' or '.join(ALLOWED_WRT[args.attack])}, not --wrt {wrt}")
    target = (args.target or DEFAULT_TARGET[args.attack]).lower()
    _check(not (args.attack == "jsma" and target == "none"),
           "--attack jsma is targeted: use --target next, random, all or a class")
    _check(args.formulation is None or args.attack in WITH_FORMULATION,
           f"--formulation applies to --attack {', '.join(WITH_FORMULATION)}; --attack {args.attack} "
           "has one arithmetic only, leave --formulation out")
    formulation = args.formulation or "exact"
    return wrt, target, formulation


def save_png(path, x, x_adv, labels, pred_before, pred_after, targets=None, max_images=10, title=None):
    """A 3-row grid: originals, perturbations (x_adv - x, white = 0), adversarial images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = min(max_images, len(x))
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n + 0.8, 4.6), squeeze=False)
    for i in range(n):
        delta = x_adv[i, 0] - x[i, 0]
        lim = max(float(np.abs(delta).max()), 1e-12)
        panels = ((x[i, 0], "gray", 0, 1, f"label {labels[i]}\npred {pred_before[i]}"),
                  (delta, "seismic", -lim, lim, f"|d|max {lim:.2f}"),
                  (x_adv[i, 0], "gray", 0, 1,
                   f"pred {pred_after[i]}" + ("" if targets is None else f"\ntarget {targets[i]}")))
        for row, (img, cmap, lo, hi, caption) in enumerate(panels):
            ax = axes[row, i]
            ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(caption, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    for row, name in enumerate(("original", "perturbation", "adversarial")):
        axes[row, 0].set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    from ..files import save_figure
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def run(args):
    """Run the attack command (errors and exit codes: ``scratchnet.cli``)."""
    from ..attacks import cw_l2, fgsm, jsma, pgd
    from ..attacks.diagnostics import gradient_diagnostics, report_lines, summarize_by_correctness
    from ..backend import resolve_device
    from ..data import load_mnist
    from ..files import atomic_write, write_json
    from ..model import load

    wrt, target_mode, formulation = _validate(args)
    device = resolve_device(args.device)
    model, metadata = load(args.model, device=device)
    T = _resolve_T(args.T, metadata)
    data = load_mnist(args.data_dir, download=not args.no_download, progress=False)
    xs, ys = (data.test_x, data.test_y) if args.split == "test" else (data.val_x, data.val_y)
    _check(args.offset < len(xs), f"--offset {args.offset} is past the {len(xs)} {args.split} images")
    x, labels = xs[args.offset:args.offset + args.n], ys[args.offset:args.offset + args.n].astype(np.int64)
    index, targets = make_targets(labels, target_mode, model.n_classes, args.seed)
    _check(len(index) > 0, "no image left to attack (every image already has the target class)")
    xa, ya = x[index], labels[index]

    info = ", ".join(f"{k} {metadata[k]}" for k in ("recipe", "T", "test_accuracy") if k in metadata)
    print(f"model {args.model}" + (f" ({info})" if info else "") + f" on {device}")
    print(f"attack {args.attack} on {len(index)} attempts from {len(x)} {args.split} images, "
          f"differentiating {wrt}" + ("" if wrt == "logits" else f" at T = {T:g}") +
          ("" if targets is None else f", targets: {target_mode}") +
          (f", formulation {formulation}" if args.attack in WITH_FORMULATION else ""))
    common = dict(wrt=wrt, T=T, batch_size=args.batch_size, progress=True)
    if args.attack == "fgsm":
        x_adv, result = fgsm(model, xa, ya, args.eps, targets=targets, formulation=formulation, **common)
    elif args.attack == "pgd":
        x_adv, result = pgd(model, xa, ya, args.eps, step=args.step, steps=args.steps, targets=targets,
                            random_start=args.random_start, seed=args.seed, formulation=formulation, **common)
    elif args.attack == "jsma":
        x_adv, result = jsma(model, xa, ya, targets, max_distortion=args.max_distortion,
                             pair_chunk=args.pair_chunk, formulation=formulation, **common)
    else:
        x_adv, result = cw_l2(model, xa, ya, targets=targets, kappa=args.kappa, c=args.c,
                              binary_steps=args.binary_steps, steps=args.cw_steps, lr=args.lr,
                              abort_early=args.abort_early, **common)
    s = result.summary()
    print(f"success rate {s['success_rate']:.1%}  ({s['note']})")
    if targets is not None:
        print(f"untargeted success (any wrong class) {s['untargeted_success_rate']:.1%}")
    print(f"mean distortion of successful attacks: L0 {s['mean_l0_successful']:.1f} pixels, "
          f"L2 {s['mean_l2_successful']:.3f}, Linf {s['mean_linf_successful']:.3f}; "
          f"mean iterations {s['mean_iterations_successful']:.1f}")
    if "empty_saliency" in result.extra:
        print(f"JSMA stopped with an empty saliency map (no usable gradient) on "
              f"{result.extra['empty_saliency']} of {len(index)} attempts")

    record = {"model": os.path.abspath(args.model), "model_metadata": metadata, "split": args.split,
              "offset": args.offset, **result.to_json()}
    if not args.no_diagnostics:
        diag = gradient_diagnostics(model, x, labels, T=T, batch_size=args.batch_size, progress=True)
        print("\n".join(report_lines(diag)))
        record["diagnostics"] = {
            "T": T, "fraction_saturated": float(diag["saturated"].mean()),
            "fraction_loss_gradient_zero": float(diag["loss_all_zero"].mean()),
            "fraction_probs_jacobian_zero": float(diag["probs_all_zero"].mean()),
            "mean_margin": float(diag["margin"].mean()), "median_margin": float(np.median(diag["margin"])),
            "loss_log10_l2": summarize_by_correctness(diag, "loss_log10_l2"),
            "probs_log10_l2": summarize_by_correctness(diag, "probs_log10_l2"),
            "per_image": {k: diag[k] for k in ("margin", "top_prob", "loss_log10_l2", "probs_log10_l2",
                                               "loss_all_zero", "probs_all_zero", "log10_factor_predicted",
                                               "log10_factor_measured")}}
    if args.save:
        with atomic_write(args.save, "wb", suffix=".npz") as f:
            np.savez_compressed(f, x=xa, x_adv=x_adv, labels=ya, image_index=index + args.offset,
                                targets=(targets if targets is not None else np.full(len(index), -1)),
                                pred_before=result.pred_before, pred_after=result.pred_after)
        print(f"wrote {args.save}")
    if args.json:
        write_json(args.json, record)
        print(f"wrote {args.json}")
    if args.png:
        title = (f"{args.attack} on {os.path.basename(args.model)}, differentiating {wrt}"
                 + ("" if wrt == "logits" else f" at T = {T:g}")
                 + f": success {s['n_success']} / {s['n_correct']} correctly classified")
        save_png(args.png, xa, x_adv, ya, result.pred_before, result.pred_after, targets, title=title)
        print(f"wrote {args.png}")
    return 0
