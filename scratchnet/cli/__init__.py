"""The command line: ``python -m scratchnet {train, evaluate, attack, diagnose} ...``.

One module per subcommand (``train.py``, ``evaluate.py``, ``attack.py``, ``diagnose.py``),
each with ``add_parser(sub)`` and ``run(args)``. This module holds what they
share: the argument types that validate a value as it is parsed, and the one
error and exit-code policy of scratchnet's command lines, which the
experiment scripts use too (``run_script``):

* a usage error (a bad option or value, or options that do not go together):
  one line on stderr, exit status 2;
* a runtime failure (missing data, an unreadable model, a diverged run):
  one line on stderr, exit status 1;
* interrupted (Ctrl-C): exit status 130; finished models and results are kept.

Never a traceback for any of these.
"""
import argparse
import math
import os
import sys

EXIT_RUNTIME = 1        # the command ran and failed (missing data, unreadable model, diverged training)
EXIT_USAGE = 2          # the command line itself was wrong
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)

EXIT_POLICY = ("exit status: 0 success; 1 the command failed (missing data, an unreadable model, a "
               "diverged run); 2 a usage error (a bad option or value); 130 interrupted (Ctrl-C). "
               "Errors are one line on stderr.")


class UsageError(Exception):
    """The command line was wrong: a bad option, value or combination. Exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises instead of printing usage and exiting,
    so the error is one line and the exit status follows the policy."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


# ===== argument types: a value is checked as it is parsed =====

def _number(text, kind, ok, expected):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_float(text):
    """A finite number > 0 (a temperature T, a learning rate, a step)."""
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def nonnegative_float(text):
    """A finite number >= 0 (an epsilon budget, a confidence kappa)."""
    return _number(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def fraction(text):
    """A number in (0, 1]."""
    return _number(text, float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")


def positive_int(text):
    """An integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text):
    """An integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def output_file(text):
    """A path to write to, whose folder exists (checked before any slow work)."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"output folder does not exist: {folder}")
    return text


def data_options(parser):
    """``--data-dir`` and ``--no-download``, as every command that reads MNIST has them."""
    parser.add_argument("--data-dir", default=None,
                        help="folder with the four MNIST .gz files (default $SCRATCHNET_DATA, "
                             "then ~/.cache/scratchnet/mnist)")
    parser.add_argument("--no-download", action="store_true", help="never download missing MNIST files")


def device_option(parser, what):
    """``--device cpu|gpu|auto``."""
    parser.add_argument("--device", choices=("cpu", "gpu", "auto"), default=None,
                        help=f"where to {what} (default $SCRATCHNET_DEVICE, else auto)")


# ===== the one error policy =====

def _runtime_errors():
    """The failures a command reports as one line (exit 1) rather than a traceback."""
    from ..backend import DeviceError
    from ..data import DataError, DataNotFoundError
    from ..model import ModelFileError
    from ..training import TrainingDivergedError
    return (DataError, DataNotFoundError, ModelFileError, DeviceError, TrainingDivergedError,
            ValueError, OSError, RuntimeError)


def run_guarded(run, prefix, interrupted="interrupted"):
    """Call ``run()``; map its outcome to an exit status by the policy above.

    ``prefix`` starts each error line (``"scratchnet attack: error: "``).
    """
    try:
        return int(run() or 0)
    except UsageError as e:
        print(f"{prefix}{e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, and keep Python's
        # final flush of stdout from failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except _runtime_errors() as e:
        print(f"{prefix}{e}", file=sys.stderr)
        return EXIT_RUNTIME


def run_script(main):
    """Entry point of an experiment script: ``sys.exit`` with the policy's status."""
    sys.exit(run_guarded(main, "error: ",
                         interrupted="interrupted: finished models and results are kept; rerun to resume"))


# ===== entry point =====

def build_parser():
    from . import attack, diagnose, evaluate, train
    parser = _Parser(prog="scratchnet",
                     description="scratchnet: a convolutional network written by hand, to show that "
                                 "defensive distillation is gradient masking.",
                     epilog="Run 'scratchnet COMMAND --help' for the options of each command. " + EXIT_POLICY)
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,attack,diagnose}", parser_class=_Parser)
    for command in (train, evaluate, attack, diagnose):
        command.add_parser(sub)
    return parser


def main(argv=None):
    """Run the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    if args.command is None:
        build_parser().print_help(sys.stderr)
        return EXIT_USAGE
    return run_guarded(lambda: args.run(args), f"scratchnet {args.command}: error: ",
                       interrupted=f"scratchnet {args.command}: interrupted")
