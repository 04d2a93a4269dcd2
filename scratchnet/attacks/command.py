"""``python -m scratchnet attack MODEL.npz``: attack a saved model and show why it fails or works.

Examples::

    # Papernot's setting: JSMA on the deployed softmax (T = 1)
    python -m scratchnet attack model_T100.npz --attack jsma --wrt probs --T 1
    # Carlini and Wagner's fix on the same model: the logits, or softmax(z / T_train)
    python -m scratchnet attack model_T100.npz --attack jsma --wrt logits
    python -m scratchnet attack model_T100.npz --attack fgsm --wrt loss --T train --eps 0.2

It prints the success rate (over the images the model classified correctly,
with the denominator), the mean distortions of the successful attacks and the
gradient diagnostics (saturation, exact zeros, logit margin, predicted and true
suppression), and on request writes the adversarial images (.npz), a JSON
record and a PNG grid of originals, perturbations and adversarial images.
"""
import json
import math
import os
import sys

import numpy as np

DEFAULT_WRT = {"fgsm": "loss", "pgd": "loss", "jsma": "probs", "cw": "logits"}
ALLOWED_WRT = {"fgsm": ("probs", "logits", "loss"), "pgd": ("probs", "logits", "loss"),
               "jsma": ("probs", "logits"), "cw": ("logits", "probs")}
DEFAULT_TARGET = {"fgsm": "none", "pgd": "none", "jsma": "random", "cw": "none"}


def add_arguments(parser):
    """Add the ``attack`` command's options to an argparse (sub)parser."""
    parser.add_argument("model", metavar="MODEL.npz", help="a model saved by scratchnet")
    parser.add_argument("--attack", choices=("fgsm", "pgd", "jsma", "cw"), default="fgsm",
                        help="the attack (default fgsm)")
    parser.add_argument("--wrt", choices=("probs", "logits", "loss"), default=None,
                        help="what the attack differentiates: probabilities softmax(z/T), logits, or the "
                             "cross-entropy at T (default as in the original papers: fgsm/pgd loss, "
                             "jsma probs, cw logits)")
    parser.add_argument("--T", default="1", metavar="T",
                        help="softmax temperature of the differentiated output: a number (1 = as deployed), "
                             "or 'train' for the model's training temperature (Carlini-Wagner's rescaling)")
    parser.add_argument("--eps", type=float, default=0.1, help="fgsm/pgd: L-infinity budget (default 0.1)")
    parser.add_argument("--step", type=float, default=None, help="pgd: step size (default eps/4)")
    parser.add_argument("--steps", type=int, default=10, help="pgd: number of steps (default 10)")
    parser.add_argument("--random-start", action="store_true", help="pgd: start at a random point of the eps-ball")
    parser.add_argument("--target", default=None,
                        help="none (untargeted), next (label+1), random, all (the 9 other classes per image), "
                             "or a class 0-9 (default: random for jsma, none otherwise)")
    parser.add_argument("--max-distortion", type=float, default=0.145,
                        help="jsma: the most pixels changed, as a fraction (default 0.145)")
    parser.add_argument("--pair-chunk", type=int, default=8,
                        help="jsma: images whose pixel-pair tables exist at once (memory cap, default 8)")
    parser.add_argument("--kappa", type=float, default=0.0, help="cw: confidence (default 0)")
    parser.add_argument("--c", type=float, default=0.1, help="cw: initial trade-off constant (default 0.1)")
    parser.add_argument("--binary-steps", type=int, default=5, help="cw: binary-search rounds over c (default 5)")
    parser.add_argument("--cw-steps", type=int, default=100, help="cw: Adam steps per round (default 100)")
    parser.add_argument("--lr", type=float, default=0.05, help="cw: Adam learning rate (default 0.05)")
    parser.add_argument("--n", type=int, default=100, help="number of test images (default 100)")
    parser.add_argument("--offset", type=int, default=0, help="index of the first test image (default 0)")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="which images (default test)")
    parser.add_argument("--data-dir", default=None, help="folder with the MNIST files")
    parser.add_argument("--batch-size", type=int, default=100, help="images per pass (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="for random targets and pgd's random start")
    parser.add_argument("--device", choices=("cpu", "gpu", "auto"), default=None,
                        help="where to run (default $SCRATCHNET_DEVICE or auto)")
    parser.add_argument("--no-diagnostics", action="store_true", help="skip the gradient diagnostics")
    parser.add_argument("--save", metavar="ADV.npz", default=None,
                        help="write the original and adversarial images, labels, targets and predictions")
    parser.add_argument("--json", metavar="RECORD.json", default=None, help="write the full record as JSON")
    parser.add_argument("--png", metavar="GRID.png", default=None,
                        help="write a grid of originals, perturbations and adversarial images")
    return parser


class CommandError(ValueError):
    """A bad argument: reported as one line on stderr."""


def _check(cond, message):
    if not cond:
        raise CommandError(message)


def _resolve_T(text, metadata):
    if str(text).lower() == "train":
        _check("T" in metadata, "--T train: the model file records no training temperature; give a number")
        return float(metadata["T"])
    try:
        T = float(text)
    except ValueError:
        raise CommandError(f"--T must be a positive number or 'train', got {text!r}") from None
    _check(T > 0 and math.isfinite(T), f"--T must be a positive number, got {text}")
    return T


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
        raise CommandError(f"--target must be none, next, random, all or a class 0-{K - 1}, got {mode!r}") from None
    _check(0 <= cls < K, f"--target class must be in 0-{K - 1}, got {cls}")
    index = np.flatnonzero(labels != cls)                  # an image of class cls has nothing to reach
    return index, np.full(len(index), cls)


def _validate(args):
    _check(args.n >= 1, f"--n must be >= 1, got {args.n}")
    _check(args.offset >= 0, f"--offset must be >= 0, got {args.offset}")
    _check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    _check(args.eps >= 0 and math.isfinite(args.eps), f"--eps must be a number >= 0, got {args.eps}")
    _check(args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    _check(args.step is None or args.step > 0, f"--step must be > 0, got {args.step}")
    _check(0 < args.max_distortion <= 1, f"--max-distortion must be a fraction in (0, 1], got {args.max_distortion}")
    _check(args.pair_chunk >= 1, f"--pair-chunk must be >= 1, got {args.pair_chunk}")
    _check(args.kappa >= 0, f"--kappa must be >= 0, got {args.kappa}")
    _check(args.c > 0, f"--c must be > 0, got {args.c}")
    _check(args.binary_steps >= 1, f"--binary-steps must be >= 1, got {args.binary_steps}")
    _check(args.cw_steps >= 1, f"--cw-steps must be >= 1, got {args.cw_steps}")
    _check(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    wrt = args.wrt or DEFAULT_WRT[args.attack]
    _check(wrt in ALLOWED_WRT[args.attack],
           f"--attack {args.attack} differentiates {' or '.join(ALLOWED_WRT[args.attack])}, not --wrt {wrt}")
    target = (args.target or DEFAULT_TARGET[args.attack]).lower()
    _check(not (args.attack == "jsma" and target == "none"),
           "--attack jsma is targeted: use --target next, random, all or a class")
    for path in (args.save, args.json, args.png):
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            _check(os.path.isdir(folder), f"output folder does not exist: {folder}")
    return wrt, target


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
        for row, (img, cmap, lo, hi, title) in enumerate(panels):
            ax = axes[row, i]
            ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    for row, name in enumerate(("original", "perturbation", "adversarial")):
        axes[row, 0].set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def to_jsonable(o):
    """Plain Python for json.dump: arrays become lists, and NaN / +-inf (a log10 of an
    exactly zero gradient, a rate over no images) become null, which JSON can hold."""
    if isinstance(o, dict):
        return {str(k): to_jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [to_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return to_jsonable(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _execute(args):
    from ..backend import resolve_device
    from ..data import load_mnist
    from ..model import load
    from . import cw_l2, fgsm, jsma, pgd
    from .diagnostics import gradient_diagnostics, report_lines, summarize_by_correctness

    wrt, target_mode = _validate(args)
    device = resolve_device(args.device)
    model, metadata = load(args.model, device=device)
    T = _resolve_T(args.T, metadata)
    data = load_mnist(args.data_dir, progress=False)
    xs, ys = (data.test_x, data.test_y) if args.split == "test" else (data.val_x, data.val_y)
    _check(args.offset < len(xs), f"--offset {args.offset} is past the {len(xs)} {args.split} images")
    x, labels = xs[args.offset:args.offset + args.n], ys[args.offset:args.offset + args.n].astype(np.int64)
    K = int(model.logits(model.xp.asarray(x[:1])).shape[1])
    index, targets = make_targets(labels, target_mode, K, args.seed)
    _check(len(index) > 0, "no image left to attack (every image already has the target class)")
    xa, ya = x[index], labels[index]

    info = ", ".join(f"{k} {metadata[k]}" for k in ("recipe", "T", "test_accuracy") if k in metadata)
    print(f"model {args.model}" + (f" ({info})" if info else "") + f" on {device}")
    print(f"attack {args.attack} on {len(index)} attempts from {len(x)} {args.split} images, "
          f"differentiating {wrt}" + ("" if wrt == "logits" else f" at T = {T:g}") +
          ("" if targets is None else f", targets: {target_mode}"))
    common = dict(wrt=wrt, T=T, batch_size=args.batch_size, progress=True)
    if args.attack == "fgsm":
        x_adv, result = fgsm(model, xa, ya, args.eps, targets=targets, **common)
    elif args.attack == "pgd":
        x_adv, result = pgd(model, xa, ya, args.eps, step=args.step, steps=args.steps, targets=targets,
                            random_start=args.random_start, seed=args.seed, **common)
    elif args.attack == "jsma":
        x_adv, result = jsma(model, xa, ya, targets, max_distortion=args.max_distortion,
                             pair_chunk=args.pair_chunk, **common)
    else:
        x_adv, result = cw_l2(model, xa, ya, targets=targets, kappa=args.kappa, c=args.c,
                              binary_steps=args.binary_steps, steps=args.cw_steps, lr=args.lr, **common)
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
        np.savez_compressed(args.save, x=xa, x_adv=x_adv, labels=ya, image_index=index + args.offset,
                            targets=(targets if targets is not None else np.full(len(index), -1)),
                            pred_before=result.pred_before, pred_after=result.pred_after)
        print(f"wrote {args.save}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_jsonable(record), f, indent=1, allow_nan=False)
        print(f"wrote {args.json}")
    if args.png:
        title = (f"{args.attack} on {os.path.basename(args.model)}, differentiating {wrt}"
                 + ("" if wrt == "logits" else f" at T = {T:g}")
                 + f": success {s['n_success']} / {s['n_correct']} correctly classified")
        save_png(args.png, xa, x_adv, ya, result.pred_before, result.pred_after, targets, title=title)
        print(f"wrote {args.png}")
    return 0


def run(args):
    """Run the attack command; returns the exit code (errors: one line on stderr, code 2)."""
    from ..backend import DeviceError
    from ..data import DataError, DataNotFoundError
    from ..model import ModelFileError
    try:
        return _execute(args)
    except (CommandError, ModelFileError, DataError, DataNotFoundError, DeviceError, ValueError, OSError) as e:
        print(f"scratchnet attack: error: {e}", file=sys.stderr)
        return 2
