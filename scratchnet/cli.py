"""The command line: ``python -m scratchnet {train, evaluate, attack} ...``.

Errors (a bad option, missing data, an unreadable model) are printed as one
line on stderr with a non-zero exit status, never as a traceback.
"""
import argparse
import importlib
import math
import os
import sys

import numpy as np

EXIT_ERROR = 1        # the command ran and failed (missing data, unreadable model, diverged training)
EXIT_USAGE = 2        # the command line itself was wrong


class CommandLineError(Exception):
    """A usage error found by the parser; carries the one-line message."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises instead of printing usage and exiting,
    so ``main`` can print it as one line."""

    def error(self, message):
        raise CommandLineError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def positive_float(text):
    """argparse type: a finite number > 0 (for the temperature T)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"T must be a finite number > 0, got {text}")
    return value


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# ===== train =====

def _add_train(sub):
    from .recipes import ARCHITECTURES, DEFAULT_EPOCHS, RECIPES
    from .training import DEFAULT_LR, OPTIMIZERS
    p = sub.add_parser(
        "train", help="train a model with one of the three recipes (or fetch it from the cache)",
        description="Train a model with one of the study's recipes and deploy it at T = 1. "
                    "Trained models are cached by recipe, T, seed and every training setting, "
                    "so asking again returns the cached model unless --force is given.")
    p.add_argument("--recipe", required=True, choices=RECIPES,
                   help="standard: hard labels at T = 1; temperature: hard labels, loss on softmax(z / T); "
                        "distilled: a temperature-T teacher's softmax(z / T) as soft labels for a student trained at T")
    p.add_argument("--T", type=positive_float, default=None,
                   help="training temperature, > 0 (default 1; required to be 1 for standard)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"epochs (default {DEFAULT_EPOCHS['standard']} for every recipe)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and dropout (default 0)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the four MNIST .gz files (default $SCRATCHNET_DATA, then ~/.cache/scratchnet/mnist)")
    p.add_argument("--no-download", action="store_true", help="never download missing MNIST files")
    p.add_argument("--out", default=None, help="also write the deployed model to this .npz path")
    p.add_argument("--cache-dir", default=None,
                   help="model cache folder (default $SCRATCHNET_CACHE, then ~/.cache/scratchnet/models)")
    p.add_argument("--force", action="store_true", help="retrain even if the model is cached")
    p.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="papernot",
                   help="papernot: the study's network (default); small: a fast one for quick checks")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="adam (default; warm-up + cosine decay) or sgd (momentum 0.9, learning rate multiplied by T)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default {DEFAULT_LR['adam']} for adam, {DEFAULT_LR['sgd']} x T for sgd)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="mini-batch size (default 128)")
    p.add_argument("--train-size", type=positive_int, default=None,
                   help="use only the first N training images (default: all 55,000 after the validation split)")
    p.add_argument("--device", choices=("cpu", "gpu", "auto"), default=None,
                   help="where to train (default $SCRATCHNET_DEVICE, else auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_train)


def run_train(args):
    from .cache import get_model
    from .recipes import check_recipe
    from .data import load_mnist
    from .model import save
    if args.recipe != "standard" and args.T is None:
        raise ValueError(f"--recipe {args.recipe} needs a temperature: add --T (e.g. --T 20)")
    T = check_recipe(args.recipe, 1.0 if args.T is None else args.T)   # before any slow work
    data = load_mnist(args.data_dir, download=not args.no_download, progress=not args.quiet)
    model, meta = get_model(args.recipe, T, args.seed, args.epochs, architecture=args.architecture,
                            batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                            train_size=args.train_size, data=data, cache_dir=args.cache_dir,
                            force=args.force, device=args.device, progress=not args.quiet)
    print(f"{meta['recipe']} model, trained at T = {meta['T']:g}, seed {meta['seed']}, {meta['epochs']} epochs: "
          f"test accuracy {100 * meta['test_accuracy']:.2f} %"
          + ("" if meta.get("val_accuracy") is None else f", validation accuracy {100 * meta['val_accuracy']:.2f} %"))
    print(f"at T = 1, {100 * meta['test_saturated_fraction']:.1f} % of test images have a top probability "
          f"of exactly 1.0 (mean logit margin {meta['test_mean_logit_margin']:.1f})")
    print(f"cached at {meta['path']}")
    if args.out:
        meta = {k: v for k, v in meta.items() if k != "path"}
        save(model, args.out, meta)
        print(f"written to {args.out}")
    return 0


# ===== evaluate =====

def _add_evaluate(sub):
    p = sub.add_parser(
        "evaluate", help="test accuracy and softmax saturation of a saved model",
        description="Evaluate a saved model on the 10,000 MNIST test images at T = 1: accuracy, "
                    "confusion counts, the mean top probability, and the fraction of images whose "
                    "top probability is exactly 1.0 in the model's dtype (float32).")
    p.add_argument("model", metavar="MODEL.npz", help="a model .npz written by 'scratchnet train'")
    p.add_argument("--T", type=positive_float, default=1.0, help="deployment temperature (default 1)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the four MNIST .gz files (default $SCRATCHNET_DATA, then ~/.cache/scratchnet/mnist)")
    p.add_argument("--no-download", action="store_true", help="never download missing MNIST files")
    p.add_argument("--device", choices=("cpu", "gpu", "auto"), default=None,
                   help="where to evaluate (default $SCRATCHNET_DEVICE, else auto)")
    p.set_defaults(run=run_evaluate)


def format_confusion(confusion):
    """The confusion counts as an aligned text table (rows: true class, columns: predicted)."""
    confusion = np.asarray(confusion)
    K = len(confusion)
    width = max(5, len(str(confusion.max())) + 1)
    lines = ["true\\pred" + "".join(f"{k:>{width}}" for k in range(K))]
    lines += [f"{i:>9}" + "".join(f"{c:>{width}}" for c in row) for i, row in enumerate(confusion)]
    return "\n".join(lines)


def run_evaluate(args):
    from .data import load_mnist
    from .model import load
    from .training import evaluate
    model, meta = load(args.model, device=args.device)   # first, so a bad file fails before any data work
    data = load_mnist(args.data_dir, download=not args.no_download, validation=0)
    result = evaluate(model, data.test_x, data.test_y, T=args.T)
    if meta.get("recipe"):
        print(f"model: {meta['recipe']}, trained at T = {meta.get('T', 1):g}, seed {meta.get('seed')}, "
              f"{meta.get('epochs')} epochs")
    print(f"test accuracy: {100 * result['accuracy']:.2f} % ({round(result['accuracy'] * result['n'])} / {result['n']})")
    print(f"at T = {args.T:g} ({result['dtype']}): mean top probability {result['mean_max_probability']:.6f}; "
          f"top probability exactly 1.0 for {100 * result['saturated_fraction']:.2f} % of the images; "
          f"mean logit margin {result['mean_logit_margin']:.2f}")
    print("confusion counts:")
    print(format_confusion(result["confusion"]))
    return 0


# ===== attack (lives in scratchnet/attacks/command.py) =====

def _add_attack(sub):
    """Register ``attack``; its options come from scratchnet.attacks.command when present."""
    try:
        command = importlib.import_module("scratchnet.attacks.command")
    except Exception as e:                     # missing or broken: say so when the command is used
        reason = f"{type(e).__name__}: {e}"
        p = sub.add_parser("attack", help="attack a model (unavailable in this installation)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(run=lambda args: _attack_missing(reason))
        return
    p = sub.add_parser("attack", help="craft adversarial examples against a saved model",
                       description="Craft adversarial examples against a saved model.")
    command.add_arguments(p)
    p.set_defaults(run=command.run)


def _attack_missing(reason):
    raise RuntimeError(f"the attack command is not available: scratchnet.attacks.command could not be "
                       f"imported ({reason})")


# ===== entry point =====

def build_parser():
    parser = _Parser(prog="scratchnet",
                     description="scratchnet: a convolutional network written by hand, to show that "
                                 "defensive distillation is gradient masking.",
                     epilog="Run 'scratchnet COMMAND --help' for the options of each command.")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,attack}", parser_class=_Parser)
    _add_train(sub)
    _add_evaluate(sub)
    _add_attack(sub)
    return parser


def main(argv=None):
    """Run the command line; returns the exit status."""
    from .backend import DeviceError
    from .data import DataError, DataNotFoundError
    from .model import ModelFileError
    from .training import TrainingDivergedError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except CommandLineError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"scratchnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, and keep Python's
        # final flush of stdout from failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (DataError, DataNotFoundError, ModelFileError, DeviceError, TrainingDivergedError,
            ValueError, OSError, RuntimeError) as e:
        print(f"scratchnet {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
