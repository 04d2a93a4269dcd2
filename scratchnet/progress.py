"""Progress that helps a person at a terminal and does not flood a log.

On a terminal, ``tqdm`` gives a bar that redraws one line in place. Written
anywhere else (a file, a pipe, a CI log) every redraw becomes a line of its
own, thousands per training run. So:

* ``tqdm(...)``: the real tqdm bar when the bar's stream is a terminal (or in
  a notebook); otherwise no bar, only a plain line every ``LOG_EVERY``
  seconds for a loop that runs that long, and a last line when it ends;
* ``write(line)``: a line that does not break a bar being drawn (the training
  loop's one line per epoch goes through it).

Every loop in scratchnet that shows progress (training, the MNIST download,
the attacks, the gradient diagnostics) takes its bar from here, so the choice
is made in this one place.
"""
import sys
import time

from tqdm import std as _std
from tqdm.auto import tqdm as _auto_tqdm
from tqdm.autonotebook import tqdm as _notebook_or_std

LOG_EVERY = 60.0          # seconds between two progress lines when the output is not a terminal

# inside Jupyter tqdm draws a widget: not a terminal, but no flood either
_NOTEBOOK = _notebook_or_std is not _std.tqdm


def on_terminal(stream=None):
    """True when ``stream`` (default: stderr, where bars go) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):        # no isatty, or a closed stream
        return False


def tqdm(iterable=None, desc=None, total=None, disable=False, unit="it", file=None, **kwargs):
    """A progress bar over ``iterable`` (or updated by hand, with ``total``).

    Takes tqdm's arguments. Returns a real ``tqdm`` bar on a terminal or in a
    notebook, a ``LogProgress`` (a line every ``LOG_EVERY`` seconds)
    elsewhere, and a silent tqdm when ``disable`` is true.
    """
    if disable or _NOTEBOOK or on_terminal(file):
        return _auto_tqdm(iterable, desc=desc, total=total, disable=disable, unit=unit, file=file, **kwargs)
    return LogProgress(iterable, desc=desc, total=total, unit=unit, file=file,
                       unit_scale=kwargs.get("unit_scale", False))


def write(line, file=None):
    """Print one line (to stdout by default) without breaking a bar being drawn."""
    if on_terminal(file if file is not None else sys.stdout) or _NOTEBOOK:
        _auto_tqdm.write(line, file=file)
    else:
        print(line, file=file if file is not None else sys.stdout, flush=True)


class LogProgress:
    """Progress for a log: a plain line at most every ``LOG_EVERY`` seconds, never a bar.

    Offers the part of tqdm's interface scratchnet uses: iteration,
    ``update``, ``set_postfix``, ``set_description``, ``close`` and use as a
    context manager. A loop shorter than ``LOG_EVERY`` prints nothing.
    """

    def __init__(self, iterable=None, desc=None, total=None, unit="it", file=None, unit_scale=False):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit = iterable, desc or "", total, unit
        self.file, self.unit_scale = file, unit_scale
        self.n, self.postfix, self.lines = 0, "", 0
        self.started = self.last = time.monotonic()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self):
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _count(self, n):
        return _std.tqdm.format_sizeof(n) if self.unit_scale else f"{n:g}"

    def _line(self, final=False):
        elapsed = _std.tqdm.format_interval(time.monotonic() - self.started)
        if self.total:
            done = f"{self._count(self.n)}/{self._count(self.total)} {self.unit} ({100 * self.n / self.total:.0f} %)"
        else:
            done = f"{self._count(self.n)} {self.unit}"
        state = "done" if final else "at"
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc + ': ' if self.desc else ''}{state} {done}{postfix}, {elapsed} elapsed",
              file=self.file if self.file is not None else sys.stderr, flush=True)
        self.lines += 1

    def update(self, n=1):
        """Count ``n`` more units; print a line if ``LOG_EVERY`` seconds have passed since the last."""
        self.n += n
        now = time.monotonic()
        if now - self.last >= LOG_EVERY:
            self.last = now
            self._line()

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        """Values shown at the end of the next line (``loss=0.41``)."""
        values = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def set_description(self, desc=None, refresh=True):
        self.desc = desc or ""

    def refresh(self):
        pass

    def close(self):
        """A last line, only for a loop that already printed some (a short one stays silent)."""
        if not self.closed and self.lines:
            self._line(final=True)
        self.closed = True
