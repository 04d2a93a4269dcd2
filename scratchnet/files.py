"""Saving files so that a failure never costs what was already saved.

Every file scratchnet writes (models, checkpoints, results, figures) goes
through ``atomic_write``: the bytes go to a temporary file ``.tmp-*`` in the
target folder, which is renamed over the final name only once it is complete.
A reader sees the old file or the whole new one, never half of one; a killed
run leaves at most a ``.tmp-*`` file, which ``remove_stale_temporaries``
clears (the model cache calls it when it opens a folder).

JSON here has one convention for the floats JSON cannot hold: ``inf``,
``-inf`` and ``nan`` are written as those strings (a log10 of an exactly zero
gradient is ``-inf``, a rate over no images ``nan``) and ``read_json`` turns
them back into floats, so a stored result reads back as it was computed.

Next: ``model.py`` (``save`` / ``load``) and ``cache.py`` use this module.
"""
import contextlib
import glob
import json
import math
import os
import tempfile
import time

import numpy as np

TMP_PREFIX = ".tmp-"                      # every temporary file of the writer starts with this
PROCESS_START = time.time()               # a temporary file older than this is not ours


def _umask():
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode="wb", suffix=""):
    """Open a temporary file beside ``path``; rename it to ``path`` when the block ends.

    Parameters
    ----------
    path : the final file name (its folder is created if missing)
    mode : "wb" (bytes) or "w" (text, with newline="" so CSV rows stay as written)
    suffix : ending of the temporary name (``.npz``, ``.png``)

    The file gets the permissions a plain ``open`` would give under the
    user's umask (0644 under umask 022), not ``mkstemp``'s private 0600.
    If the block raises, the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=suffix)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):              # only left behind when something failed
            os.remove(tmp)


def remove_stale_temporaries(folder, pattern=TMP_PREFIX + "*"):
    """Delete temporary files a killed writer left in ``folder``; returns their names.

    Only files older than this process are removed: a file written now by
    another running process is younger than us and is left alone.
    """
    removed = []
    for tmp in glob.glob(os.path.join(os.fspath(folder), pattern)):
        try:
            if os.path.getmtime(tmp) < PROCESS_START:
                os.remove(tmp)
                removed.append(os.path.basename(tmp))
        except FileNotFoundError:            # another process cleaned it first
            pass
    return removed


# ===== .npz =====

def save_npz_atomic(path, arrays):
    """``np.savez`` of a {name: array} dict, written atomically (see ``atomic_write``)."""
    with atomic_write(path, "wb", suffix=".npz") as f:
        np.savez(f, **arrays)


# ===== JSON =====

_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def to_jsonable(o):
    """Plain Python for ``json.dump``: arrays become lists, NumPy scalars Python
    numbers, and non-finite floats the strings "inf", "-inf", "nan"."""
    if isinstance(o, dict):
        return {str(k): to_jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [to_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return to_jsonable(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return "nan" if math.isnan(o) else ("inf" if o > 0 else "-inf")
    return o


def from_jsonable(o):
    """Undo ``to_jsonable``'s spelling of non-finite floats."""
    if isinstance(o, dict):
        return {k: from_jsonable(v) for k, v in o.items()}
    if isinstance(o, list):
        return [from_jsonable(v) for v in o]
    if isinstance(o, str) and o in _NON_FINITE:
        return _NON_FINITE[o]
    return o


def write_json(path, obj):
    """Write ``obj`` as strict JSON, atomically (non-finite floats as strings)."""
    with atomic_write(path, "w", suffix=".json") as f:
        json.dump(to_jsonable(obj), f, indent=1, allow_nan=False)


def read_json(path):
    """A JSON file written by ``write_json``, with its non-finite floats restored."""
    with open(path) as f:
        return from_jsonable(json.load(f))
