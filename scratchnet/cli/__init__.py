"""The command line: ``python -m scratchnet {train, evaluate, attack, diagnose, models} ...``.

One module per subcommand (``train.py``, ``evaluate.py``, ``attack.py``,
``diagnose.py``, ``models.py``), each with ``add_parser(sub)`` and ``run(args)``, listed once
in ``build_parser``. This module holds what they share: the argument types that
validate a value as it is parsed (the training settings' types call the
library's own checks, ``training.check_*`` and ``functional.check_T``, so a
value is judged by one rule wherever it comes from), and the one error and
exit-code policy of scratchnet's command lines, which the experiment scripts
use too (``run_script``, ``Parser``):

* a usage error (a bad option or value, or options that do not go together):
  one line on stderr, exit status 2;
* a runtime failure (missing data, an unreadable model, a diverged run):
  one line on stderr, exit status 1;
* interrupted (Ctrl-C): exit status 130; finished models and results are kept.

Never a traceback for any of these. Warnings are one line too
(``warning: ...``), not Python's default two, whose second line repeats the
source line of the call.
"""
import argparse
import math
import os
import sys
import warnings

EXIT_RUNTIME = 1        # the command ran and failed (missing data, unreadable model, diverged training)
EXIT_USAGE = 2          # the command line itself was wrong
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)

EXIT_POLICY = ("exit status: 0 success; 1 the command failed (missing data, an unreadable model, a "
               "diverged run); 2 a usage error (a bad option or value); 130 interrupted (Ctrl-C). "
               "Errors are one line on stderr.")


class UsageError(Exception):
    """The command line was wrong: a bad option, value or combination. Exit status 2.

    ``prog`` is set when argparse found the error: the message then already
    says which program it is about.
    """

    def __init__(self, message, prog=None):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises instead of printing usage and exiting,
    so the error is one line and the exit status follows the policy. The
    experiment scripts build theirs from it too."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)", prog=self.prog)


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
    """A finite number > 0 (a step size, a trade-off constant; temperatures: ``temperature``)."""
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def nonnegative_float(text):
    """A finite number >= 0 (an epsilon budget, a confidence kappa)."""
    return _number(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def fraction(text):
    """A number in (0, 1]."""
    return _number(text, float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")


def _checked(check, text):
    """Run one of the library's checks on the text of an option; its rule becomes argparse's message."""
    from ..training import SettingError
    try:
        return check(text, "value")
    except SettingError as e:
        raise argparse.ArgumentTypeError(f"expected {e.rule}, got {text}") from None


def positive_int(text):
    """An integer >= 1 (epochs, a batch size, a number of images): ``training.check_positive_int``."""
    from ..training import check_positive_int
    return _checked(check_positive_int, text)


def random_seed(text):
    """A random seed, an integer >= 0: ``training.check_seed``."""
    from ..training import check_seed
    return _checked(check_seed, text)


def learning_rate(text):
    """A peak learning rate, finite, > 0 and at most ``training.MAX_LR``: ``training.check_learning_rate``."""
    from ..training import check_learning_rate
    return _checked(check_learning_rate, text)


def temperature(text):
    """A temperature T, a finite number within float32's limits: ``functional.check_T``."""
    from ..functional import check_T
    try:
        return check_T(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def nonnegative_int(text):
    """An integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def output_file(text):
    """A file to write, checked before any slow work: its folder exists and takes a
    file (a real attempt, ``files.check_writable``), and it is not itself a folder."""
    from ..files import check_writable
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name in it")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"output folder does not exist: {folder}")
    try:
        check_writable(folder, "output folder")
    except OSError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
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


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` for the command line: one line, saying where only for
    warnings that are not scratchnet's own (a NumPy RuntimeWarning)."""
    where = "" if category is UserWarning else f" ({category.__name__} at {os.path.basename(filename)}:{lineno})"
    print(f"warning: {message}{where}", file=sys.stderr if file is None else file, flush=True)


def run_guarded(run, prefix, interrupted="interrupted"):
    """Call ``run()``; map its outcome to an exit status by the policy above.

    ``prefix`` starts each error line (``"scratchnet attack: error: "``).
    """
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return int(run() or 0)
    except UsageError as e:
        print(e if e.prog else f"{prefix}{e}", file=sys.stderr)
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
    from .. import __version__
    from ..recipes import TRAINING_VERSION
    from . import attack, diagnose, evaluate, models, train
    commands = (train, evaluate, attack, diagnose, models)          # one module per subcommand
    parser = Parser(prog="scratchnet",
                    description="scratchnet: a convolutional network written by hand, to show that "
                                "defensive distillation is gradient masking.",
                    epilog="Run 'scratchnet COMMAND --help' for the options of each command. " + EXIT_POLICY)
    parser.add_argument("--version", action="version",
                        version=f"scratchnet {__version__} (training version {TRAINING_VERSION})")
    sub = parser.add_subparsers(dest="command", parser_class=Parser,
                                metavar="{" + ",".join(c.__name__.rsplit(".", 1)[1] for c in commands) + "}")
    for command in commands:
        command.add_parser(sub)
    return parser


def main(argv=None):
    """Run the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)   # --help and --version print and exit 0 here
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    if args.command is None:
        build_parser().print_help(sys.stderr)
        return EXIT_USAGE
    return run_guarded(lambda: args.run(args), f"scratchnet {args.command}: error: ",
                       interrupted=f"scratchnet {args.command}: interrupted")
