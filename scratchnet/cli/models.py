"""``scratchnet models``: what the model cache holds, and removing entries from it.

    python -m scratchnet models                       # = models list
    python -m scratchnet models remove 'temperature-T100-*'        # shows what would go
    python -m scratchnet models remove 'temperature-T100-*' --yes  # removes it
    python -m scratchnet models remove --all --yes

Only files the cache itself names (``cache.ENTRY_NAME``: ``KEY.npz`` models and
``KEY.ckpt.npz`` checkpoints) directly inside the cache folder are listed or
removed; a pattern is matched against those file names, never used as a path.
The cache and its naming: ``scratchnet/cache.py``.
"""
import argparse
import fnmatch
import os

from . import UsageError


def add_parser(sub):
    """Register ``models`` with its actions ``list`` and ``remove``."""
    p = sub.add_parser("models", help="list the cached models, or remove some",
                       description="List the trained models in the cache (recipe, T, seed, test accuracy, size, "
                                   "path) and the checkpoints of unfinished runs, or remove some of them.")
    _cache_option(p, None)
    actions = p.add_subparsers(dest="action", metavar="{list,remove}", parser_class=type(p))
    _cache_option(actions.add_parser("list", help="list the cached models and unfinished runs (the default)"))
    remove = actions.add_parser(
        "remove", help="remove cached models and checkpoints by name pattern",
        description="Remove cached models and checkpoints whose file names match a pattern "
                    "(shell-style: * and ?). Without --yes, only shows what would be removed.")
    remove.add_argument("patterns", nargs="*", metavar="PATTERN",
                        help="file-name pattern, e.g. 'temperature-T100-*' (quote it from the shell)")
    remove.add_argument("--all", action="store_true", help="every model and checkpoint in the cache")
    remove.add_argument("--yes", action="store_true", help="really remove them")
    _cache_option(remove)
    p.set_defaults(run=run)


def _cache_option(parser, default=argparse.SUPPRESS):
    """``--cache-dir``, before or after the action (an action's own copy only sets it when given)."""
    parser.add_argument("--cache-dir", default=default,
                        help="model cache folder (default $SCRATCHNET_CACHE, then ~/.cache/scratchnet/models)")


def _size(nbytes):
    return f"{nbytes / 1e6:.1f} MB"


def _row(entry):
    """The columns of one entry in the listing."""
    if entry["kind"] == "model":
        acc = entry["test_accuracy"]
        status = "-" if acc is None else f"{100 * acc:.2f} %"
    else:
        done = entry["epochs_done"]
        status = "?" if done is None else f"{done}/{entry['epochs']} epochs"
    return [entry["recipe"], f"{entry['T']:g}", str(entry["seed"]), str(entry["epochs"]),
            entry["architecture"], status, _size(entry["bytes"]), entry["path"]]


def _notes(entry):
    from ..recipes import TRAINING_VERSION
    if entry["error"]:
        return f"    unreadable: {entry['error']}"
    version = entry["training_version"]
    if entry["kind"] == "model" and version != TRAINING_VERSION:
        return (f"    trained by training version {version}, this is {TRAINING_VERSION}: "
                f"never reused (retrained when asked for)")
    return None


def _table(entries, headers):
    rows = [_row(e) for e in entries]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for entry, row in zip(entries, rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        note = _notes(entry)
        if note:
            lines.append(note)
    return lines


def list_entries(folder, entries):
    """The listing printed by ``models list``, as lines."""
    models = [e for e in entries if e["kind"] == "model"]
    checkpoints = [e for e in entries if e["kind"] == "checkpoint"]
    total = sum(e["bytes"] for e in entries)
    lines = [f"model cache {folder}: {len(models)} model(s), {len(checkpoints)} unfinished run(s), {_size(total)}"]
    if models:
        lines += _table(models, ["recipe", "T", "seed", "epochs", "network", "test acc.", "size", "path"])
    if checkpoints:
        lines.append("unfinished runs (a checkpoint; asking for the same model again resumes it):")
        lines += _table(checkpoints, ["recipe", "T", "seed", "epochs", "network", "done", "size", "path"])
    return lines


def _matching(folder, entries, patterns, everything):
    """The entries to remove: all of them, or those whose name matches a pattern."""
    if everything:
        return entries
    chosen = []
    for pattern in patterns:
        name = pattern
        if os.sep in pattern or "/" in pattern:
            # a path copied from the listing is fine, as long as it is in the cache folder itself
            if os.path.realpath(os.path.dirname(os.path.abspath(pattern))) != os.path.realpath(folder):
                raise UsageError(f"{pattern!r} is not in the cache folder {folder}: a PATTERN is matched "
                                 f"against the file names there (e.g. 'temperature-T100-*')")
            name = os.path.basename(pattern)
        hits = [e for e in entries if fnmatch.fnmatchcase(e["name"], name)]
        if not hits:
            raise FileNotFoundError(f"no cached model or checkpoint in {folder} matches {pattern!r} "
                                    f"(see: scratchnet models list)")
        chosen += [e for e in hits if e not in chosen]
    return chosen


def run(args):
    """List, or remove from, the model cache."""
    from ..cache import cache_dir_path, entries
    folder = cache_dir_path(args.cache_dir)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"the model cache folder {folder} is not a folder")
    found = entries(folder) if os.path.isdir(folder) else []

    if args.action in (None, "list"):
        print("\n".join(list_entries(folder, found)))
        return 0

    if args.all == bool(args.patterns):
        raise UsageError("models remove: give PATTERN(s) or --all (not both)")
    chosen = _matching(folder, found, args.patterns, args.all)
    if not chosen:
        print(f"model cache {folder} is empty: nothing to remove")
        return 0
    total = _size(sum(e["bytes"] for e in chosen))
    if not args.yes:
        for e in chosen:
            print(f"would remove {e['path']}")
        raise UsageError(f"nothing removed: add --yes to remove these {len(chosen)} file(s), {total}")
    for e in chosen:
        os.remove(e["path"])
        print(f"removed {e['path']}")
    print(f"removed {len(chosen)} file(s), {total}, from {folder}")
    return 0
