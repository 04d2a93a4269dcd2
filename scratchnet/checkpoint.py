"""Checkpoints: everything needed to resume an interrupted training run.

After every epoch ``training.train`` writes one ``.npz`` with the model's
parameters (``param/<name>``), the optimiser's state (``opt/m/<name>``,
``opt/v/<name>`` for Adam, ``opt/velocity/<name>`` for SGD) and a JSON
``__state__``: the epochs done, their history, the optimiser's step count and
the run's settings. A run resumes from a checkpoint only when its settings
are the same. The file is written atomically (``files.py``), so a run killed
while saving leaves the previous checkpoint whole, and a run that cannot
write the next one (a full disk) stops with the previous one intact.
A damaged checkpoint is never read back: it is reported and ignored.
"""
import json
import os
import warnings
import zipfile

import numpy as np

from .backend import to_device, to_numpy
from .files import save_npz_atomic
from .optim import Adam

OPTIMIZER_SLOTS = {"adam": 2, "sgd": 1, None: 0}      # arrays per parameter: Adam's m and v, SGD's velocity


def checkpoint_bytes(model, optimizer):
    """About how many bytes a checkpoint of ``model`` takes (``optimizer=None``: the bare model file)."""
    params = sum(int(w.nbytes) for w in model.params.values())
    return params * (1 + OPTIMIZER_SLOTS[optimizer])


def optimizer_arrays(opt):
    """The optimiser's state as {"kind/param": array} plus its scalar step count."""
    if isinstance(opt, Adam):
        arrays = {f"m/{k}": v for k, v in opt.m.items()}
        arrays.update({f"v/{k}": v for k, v in opt.v.items()})
        return arrays, {"t": opt.t}
    return {f"velocity/{k}": v for k, v in opt.velocity.items()}, {}


def restore_optimizer(opt, arrays, scalars, device):
    """Put the arrays and scalars of ``optimizer_arrays`` back into ``opt``, on ``device``."""
    for key, value in arrays.items():
        kind, name = key.split("/", 1)
        value = to_device(value, device)
        if kind == "m":
            opt.m[name] = value
        elif kind == "v":
            opt.v[name] = value
        else:
            opt.velocity[name] = value
    if isinstance(opt, Adam):
        opt.t = int(scalars.get("t", 0))


def save_checkpoint(path, model, opt, epoch, history, settings):
    """Atomically write parameters, optimiser state and progress after ``epoch`` epochs."""
    arrays = {f"param/{k}": to_numpy(v) for k, v in model.params.items()}
    opt_arrays, scalars = optimizer_arrays(opt)
    arrays.update({f"opt/{k}": to_numpy(v) for k, v in opt_arrays.items()})
    state = {"epoch": epoch, "history": history, "settings": settings, "optimizer_scalars": scalars}
    arrays["__state__"] = np.array(json.dumps(state))
    save_npz_atomic(path, arrays)


def read_progress(path):
    """How many epochs the checkpoint at ``path`` holds, reading only its JSON state."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return int(json.loads(str(f["__state__"]))["epoch"])
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, TypeError) as e:
        raise ValueError(f"unreadable checkpoint {path} ({type(e).__name__})") from None


def load_checkpoint(path):
    """The checkpoint at ``path`` as a dict, or None if there is none.

    A file that cannot be read whole (truncated, damaged, not a checkpoint) is
    never used: a warning names it and None is returned, so training starts
    from the beginning and overwrites it.
    """
    if not path or not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        state = json.loads(str(arrays.pop("__state__")))
        epoch = int(state["epoch"])
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, TypeError) as e:
        warnings.warn(f"ignoring unreadable checkpoint {path} ({type(e).__name__}: {' '.join(str(e).split())}); "
                      f"training from the first epoch")
        return None
    state["epoch"] = epoch
    state["params"] = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    state["optimizer"] = {k[len("opt/"):]: v for k, v in arrays.items() if k.startswith("opt/")}
    return state
