"""What the studies share: options, the model grid, result files.

Each study (``grad_vs_T``, ``attack_vs_T``, ``distillation``, ``saturation``, ``robustness``)
is a module of this package with a ``main()``; the scripts a user runs,
``experiments/NAME.py``, only call it through ``scratchnet.cli.run_script``.

* ``make_parser``, ``add_common_options`` / ``settings_from``: ``--quick``,
  ``--T``, ``--seeds``, ``--epochs``, ``--train-size``, ``--n``, data, cache
  and output folders, each value checked as it is parsed by the command
  line's argument types (``scratchnet/cli``), with one-line errors; an absent
  option means the default, never a zero;
* ``check_output``: the results folder takes files, checked before any work;
* ``models_for``: the (recipe, T) grid, trained on demand through
  ``scratchnet.cache.get_model`` (the ``standard`` model is the T = 1 point of
  every recipe; a distilled model's teacher is the temperature model at T);
* ``ResultStore``: one JSON per finished measurement, so a rerun after an
  interruption reuses every finished model *and* result;
* ``write_csv`` / ``write_json`` / ``save_figure``: through the one atomic
  writer (``scratchnet/files.py``), so a failed run never leaves a
  half-written result.
"""
import argparse
import csv
import hashlib
import json
import math
import os

import numpy as np

from ..cache import get_model
from ..cli import Parser, UsageError, positive_int, random_seed, temperature
from ..data import load_mnist
from ..files import atomic_write, check_writable, read_json, save_figure, write_json  # noqa: F401  (write_json, save_figure: the studies' writers)

FULL_T = [1, 2, 5, 10, 20, 50, 100]
PAPERNOT_T = [1, 2, 5, 10, 20, 30, 40, 50, 100]    # Papernot et al.'s grid: the three-seed comparison's
RECIPES = ["temperature", "distilled"]


def make_parser(doc):
    """The parser of a study's script: the first paragraph of ``doc`` as its description,
    and the command line's one-line usage errors (exit status 2)."""
    return Parser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_options(parser, quick, full):
    """Options every study shares. ``quick`` and ``full`` hold the study's ``--quick`` and full defaults."""
    parser.add_argument("--quick", action="store_true",
                        help=f"a small configuration that finishes in minutes: T in {quick['T']}, "
                             f"{quick['train_size']} training images, {quick['epochs']} epochs, "
                             f"{quick['n']} test images")
    parser.add_argument("--T", type=temperature, nargs="+", metavar="T",
                        help=f"training temperatures, from 1e-6 to 1e6 (default {full['T']}; T = 1 is the "
                             f"standard model)")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, help=f"recipes to compare (default {RECIPES})")
    parser.add_argument("--seeds", type=random_seed, nargs="+",
                        help=f"training seeds, >= 0 (default {' '.join(map(str, full.get('seeds', [0])))})")
    parser.add_argument("--epochs", type=positive_int,
                        help=f"training epochs per model, >= 1 (default {full['epochs']}; quick {quick['epochs']})")
    parser.add_argument("--train-size", type=positive_int,
                        help=f"use only the first N training images (default all 55,000; quick {quick['train_size']:,})")
    parser.add_argument("--n", type=positive_int,
                        help=f"test images to measure, >= 1 (default {full['n']}; quick {quick['n']})")
    parser.add_argument("--architecture", choices=["papernot", "small"], default="papernot",
                        help="network to train (default: papernot, the study's network)")
    parser.add_argument("--data-dir", help="folder with the MNIST .gz files (default: $SCRATCHNET_DATA, "
                                           "then ~/.cache/scratchnet/mnist, downloading if missing)")
    parser.add_argument("--cache-dir", help="trained-model cache (default: $SCRATCHNET_CACHE, "
                                            "then ~/.cache/scratchnet/models)")
    parser.add_argument("--out", help="folder for the CSV, JSON and PNG results")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress (default: bars on a terminal, a line now and then in a log)")


def _given(value, default):
    """An option's value, or ``default`` when the option was not given (None), never when it is 0."""
    return default if value is None else value


def settings_from(args, quick, full):
    """The run's settings: explicit options win, then --quick, then the full defaults.

    Single values were checked while parsing (``add_common_options``); this
    checks the ranges that depend on MNIST's sizes.
    """
    base = quick if args.quick else full
    s = {
        "T": sorted(set(float(t) for t in _given(args.T, base["T"]))),
        "recipes": _given(args.recipes, RECIPES),
        "seeds": _given(args.seeds, base.get("seeds", [0])),
        "epochs": _given(args.epochs, base["epochs"]),
        "train_size": _given(args.train_size, base["train_size"]),
        "n": _given(args.n, base["n"]),
        "architecture": args.architecture,
        "quick": bool(args.quick),
    }
    if 1.0 not in s["T"]:
        s["T"] = [1.0] + s["T"]              # the standard model is the reference of every factor
    if s["n"] < 1 or s["n"] > 10000:
        raise UsageError(f"--n must be in [1, 10000] test images, got {s['n']}")
    if s["train_size"] is not None and not 1 <= s["train_size"] <= 55000:
        raise UsageError(f"--train-size must be in [1, 55000], got {s['train_size']}")
    return s


# ===== models =====

def grid(settings):
    """[(recipe, T, seed)] to evaluate: the standard model once per seed, then each recipe at each T != 1."""
    out = []
    for seed in settings["seeds"]:
        out.append(("standard", 1.0, seed))
        out += [(r, T, seed) for r in settings["recipes"] for T in settings["T"] if T != 1.0]
    return out


def check_output(out):
    """Make sure the results folder ``out`` takes files, before any model is trained."""
    check_writable(out, "the results folder (--out)")
    return out


def model_for(recipe, T, seed, settings, args, data):
    """A trained model from the cache, training it (with progress bars) if missing."""
    return get_model(recipe, T, seed, settings["epochs"], architecture=settings["architecture"],
                     train_size=settings["train_size"], data=data, cache_dir=args.cache_dir,
                     progress=not args.no_progress)


def load_data(args):
    return load_mnist(args.data_dir, progress=not args.no_progress)


def test_subset(data, n, seed=0):
    """The first n test images (fixed, so every model is measured on the same ones)."""
    return data.test_x[:n], data.test_y[:n]


def count_models(settings):
    """How many models the grid needs, counting distilled models' teachers."""
    n = len(grid(settings))
    if "distilled" in settings["recipes"] and "temperature" not in settings["recipes"]:
        n += (len(settings["T"]) - 1) * len(settings["seeds"])      # the teachers
    return n


def announce(settings, name, seconds_per_model_quick, seconds_per_model_full):
    """Print what will run and how long it should take from an empty cache on a 2-core CPU.

    ``seconds_per_model_*``: training one model plus this script's measurements on
    it, as measured on the project's quiet 2-core machine (a full model trains in
    2 min 41 s, and grad_vs_T --quick trains and measures its five models in 85 s,
    with this round's kernels; the other studies' figures date from earlier, slower
    rounds, and err long).
    """
    n_models = count_models(settings)
    per = seconds_per_model_quick if settings["quick"] else seconds_per_model_full
    print(f"{name}: {n_models} models (recipes {settings['recipes']}, T {fmt_T(settings['T'])}, "
          f"seeds {settings['seeds']}), {settings['epochs']} epochs on "
          f"{settings['train_size'] or 55000} images, measured on {settings['n']} test images.")
    print(f"expected time from an empty model cache on a 2-core CPU: about {n_models * per / 60:.0f} min "
          f"(cached models and results are reused)", flush=True)


def fmt_T(Ts):
    return "{" + ", ".join(f"{t:g}" for t in Ts) + "}"


# ===== results =====

class ResultStore:
    """One JSON file per finished measurement, keyed by everything it depends on."""

    def __init__(self, folder, also_read=()):
        """``also_read``: other experiments' result folders, searched (read-only) for the
        same key before computing: a key names everything a result depends on, so a
        measurement one script finished is reused by another."""
        self.folder = os.path.join(folder, "parts")
        self.also_read = [os.path.join(f, "parts") for f in also_read]
        os.makedirs(self.folder, exist_ok=True)

    @staticmethod
    def _name(key):
        blob = json.dumps(key, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16] + ".json"

    def _path(self, key):
        return os.path.join(self.folder, self._name(key))

    @staticmethod
    def _read(path, key):
        if os.path.exists(path):
            try:
                stored = read_json(path)
                if stored.get("key") == json.loads(json.dumps(key, default=str)):
                    return stored
            except (OSError, json.JSONDecodeError):
                pass                          # unreadable: compute again
        return None

    def get_or_compute(self, key, compute):
        """The stored result for ``key``, or ``compute()`` stored for next time."""
        path = self._path(key)
        for p in [path] + [os.path.join(f, self._name(key)) for f in self.also_read]:
            stored = self._read(p, key)
            if stored is not None:
                return stored["result"]
        result = compute()
        write_json(path, {"key": key, "result": result})
        return result


def write_csv(path, rows, columns):
    """Atomically write a list of dicts as CSV with the given column order."""
    with atomic_write(path, "w", suffix=".csv") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(row.get(k)) for k in columns})


def _fmt(v):
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return v


def print_table(rows, columns, headers=None):
    """A plain fixed-width table on stdout."""
    headers = headers or columns
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def _cell(v):
    if v is None:
        return "-"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isinf(v):
            return "-inf" if v < 0 else "inf"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.3g}"
    return str(v)


def temperature_axis(ax, Ts):
    """A log-scale x axis of training temperatures, ticked at the Ts studied (1, 20, 100, not 10^1)."""
    ax.set_xscale("log")
    ax.set_xticks(list(Ts))
    # a tick less than a third of a decade from the last labelled one keeps no label (30, 40, 50)
    labelled, last = [], None
    for t in Ts:
        show = last is None or math.log10(t / last) >= 0.3 or t == Ts[-1]
        labelled.append(f"{t:g}" if show else "")
        last = t if show else last
    ax.set_xticklabels(labelled)
    ax.minorticks_off()
    ax.set_xlabel("training temperature T (log scale)")


def nudge(Ts, i, n, factor=1.05):
    """x positions of line i of n, spread a little around each T so overlapping lines stay visible."""
    return [t * factor ** (i - (n - 1) / 2) for t in Ts]
