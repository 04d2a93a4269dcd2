"""Saving files so that a failure never costs what was already saved.

Every file scratchnet writes (models, checkpoints, results, figures) goes
through ``atomic_write``: the bytes go to a temporary file ``.tmp-*`` in the
target folder, which is renamed over the final name only once it is complete.
A reader sees the old file or the whole new one, never half of one; a killed
run leaves at most a ``.tmp-*`` file, which ``remove_stale_temporaries``
clears (the model cache calls it when it opens a folder).

Before a long run, ``check_writable`` and ``check_free_space`` make sure a
folder can take what the run will write, so a read-only cache or a full disk
is reported before the first epoch, not after it; a write that fails anyway
raises a ``WriteError`` that names the file and the reason (the errno text).
``exclusive_lock`` lets two processes that want the same file take turns.

JSON here has one convention for the floats JSON cannot hold: ``inf``,
``-inf`` and ``nan`` are written as those strings (a log10 of an exactly zero
gradient is ``-inf``, a rate over no images ``nan``) and ``read_json`` turns
them back into floats, so a stored result reads back as it was computed.

Next: ``model.py`` (``save`` / ``load``) and ``cache.py`` use this module.
"""
import contextlib
import errno
import glob
import json
import math
import os
import shutil
import tempfile
import time
import warnings

try:
    import fcntl                          # POSIX; see exclusive_lock
except ImportError:                       # pragma: no cover (Windows)
    fcntl = None

import numpy as np

TMP_PREFIX = ".tmp-"                      # every temporary file of the writer starts with this
PROCESS_START = time.time()               # a temporary file older than this is not ours


class WriteError(OSError):
    """A file or folder scratchnet must write cannot take it. The message names the
    path and the reason (``errno`` keeps the number: ENOSPC, EACCES, EROFS, ...)."""

    def __init__(self, message, errno=None, reason=None):
        super().__init__(message)
        self.errno, self.strerror = errno, reason

    def __str__(self):
        return self.args[0]              # the one-line message, not OSError's "[Errno N] reason"


def _reason(error):
    """The errno text of an OSError ("No space left on device"), else its message."""
    return error.strerror or str(error)


# ===== before a run: can the folder take it? =====

def check_writable(folder, what="folder"):
    """Create ``folder`` if needed, then create and remove a file in it; returns the folder.

    A real attempt, not ``os.access``: it is the only test that sees read-only
    mounts, full disks and the privileges of whoever runs it (root passes any
    permission bits). ``what`` names the folder's role in the message
    ("the model cache folder", "--out").

    Raises
    ------
    WriteError: "<what> <folder> is not writable: <reason>".
    """
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX + "write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise WriteError(f"{what} {folder} is not writable: {_reason(e)}", e.errno, _reason(e)) from None
    return folder


def check_free_space(folder, nbytes, what="folder"):
    """A WriteError unless the file system of ``folder`` has ``nbytes`` free."""
    free = shutil.disk_usage(os.fspath(folder)).free
    if free < nbytes:
        raise WriteError(f"{what} {os.fspath(folder)} has {free / 1e6:.1f} MB free; this run needs about "
                         f"{nbytes / 1e6:.1f} MB there: free some space or choose another folder",
                         errno.ENOSPC, os.strerror(errno.ENOSPC))


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
    If the block raises, the temporary file is removed and ``path`` is untouched;
    an OSError on the way (a full disk, a read-only folder) comes out as a
    ``WriteError`` naming ``path`` and the reason.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=suffix)
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as e:                      # a full disk, a read-only folder, a path under a file...
        raise WriteError(f"could not write {path}: {_reason(e)}", e.errno, _reason(e)) from e
    finally:
        if tmp is not None and os.path.exists(tmp):    # only left behind when something failed
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


# ===== taking turns =====

@contextlib.contextmanager
def exclusive_lock(path, on_wait=None):
    """Hold the lock file ``path`` for the block; wait while another process holds it.

    ``fcntl.flock`` on a file that holds the holder's PID. The kernel releases
    the lock when its holder exits, however it exits, so a lock file left by a
    killed process is taken over at once; the PID is only there to say whom a
    waiting process waits for. ``on_wait(pid)`` is called once, before
    waiting, with that PID (None if unknown). The holder deletes the file
    before releasing it; a process that was waiting on the deleted file
    notices and locks the new one instead. Threads of one process exclude
    each other too (each opens the file anew). Without ``fcntl`` (Windows) the
    block runs unlocked.
    """
    if fcntl is None:                         # pragma: no cover
        yield
        return
    path = os.fspath(path)
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)      # the umask applies
        try:
            waited = _flock(fd, None if waited else on_wait) or waited
        except BaseException as e:
            os.close(fd)
            if isinstance(e, OSError):        # a file system without locks (ENOLCK): run unlocked
                warnings.warn(f"cannot lock {path} ({_reason(e)}): another process asking for the same "
                              f"file may do the same work at the same time")
                yield
                return
            raise                             # Ctrl-C while waiting
        try:
            ours = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            ours = False
        if ours:
            break
        os.close(fd)                          # locked a file its holder had already deleted: again
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)                   # first, so nobody locks a file that is going away
        os.close(fd)                          # releases the lock


def _flock(fd, on_wait):
    """Lock ``fd`` exclusively; if another holds it, call ``on_wait(pid)`` (when given) and wait.
    Returns True when it had to wait."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        if on_wait is not None:
            on_wait(_lock_holder(fd))
        fcntl.flock(fd, fcntl.LOCK_EX)       # blocks; Ctrl-C interrupts it
        return True


def _lock_holder(fd):
    """The PID written in a lock file, or None."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


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


def save_figure(fig, path, dpi=120):
    """Save a matplotlib figure as a PNG, atomically (the old file, or the whole new one)."""
    with atomic_write(path, "wb", suffix=".png") as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
