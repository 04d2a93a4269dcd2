"""The model cache: each trained model is kept once and reused by every later request.

Each model is one ``.npz`` (``scratchnet.model.save``) in the cache folder,
named by its recipe, T, seed and epochs, plus a short hash of every other
training setting (architecture, batch size, optimiser, learning rate, warm-up,
training-set size, validation split) and of ``recipes.TRAINING_VERSION``::

    temperature-T20-seed0-ep5-papernot-3f9c0a1b2d.npz

The folder is the ``cache_dir`` argument, else ``$SCRATCHNET_CACHE``, else
``~/.cache/scratchnet/models``.

Safety: the final file is written atomically (``files.py``), so an
interrupted run never leaves a broken model under the final name; opening the
folder removes the ``.tmp-*`` files a killed save left behind. While
training, a checkpoint ``<name>.ckpt.npz`` is written after every epoch;
rerunning the same request resumes from it, and it is deleted once the
finished model is saved. ``force=True`` discards both and retrains. A model
whose metadata records another ``TRAINING_VERSION`` is retrained, never read.

Before training, every setting is checked (``training.check_settings``) and
the folder must take a file (``files.check_writable``), so a bad value or a
read-only cache fails at once, not after an epoch. A run that cannot write
its checkpoint or its model stops with the path and the reason and keeps the
last good checkpoint; one whose loss becomes NaN leaves nothing behind.

Two processes asking for the same model take turns: the one that trains holds
``<name>.lock`` (``files.exclusive_lock``), the other prints one line saying
it waits for that PID, then reads the finished model.

``entries(folder)`` describes what the folder holds (``scratchnet models``).
What is trained for a request: ``recipes.train_recipe``.
"""
import glob
import hashlib
import json
import os
import re
import sys
import warnings

from . import recipes, training
from .data import load_mnist
from .checkpoint import read_progress
from .files import WriteError, check_writable, exclusive_lock, remove_stale_temporaries
from .model import ModelFileError, load, read_metadata, save
from .training import TrainingDivergedError

ENV_VAR = "SCRATCHNET_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "scratchnet", "models")


def cache_dir_path(cache_dir=None):
    """The cache folder: ``cache_dir``, else ``$SCRATCHNET_CACHE``, else ``~/.cache/scratchnet/models``."""
    folder = cache_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR
    return os.path.expanduser(os.fspath(folder))


def model_key(recipe, T, seed, epochs, settings):
    """The file name stem of a model: readable fields plus a hash of all settings
    and of the training code's version."""
    blob = json.dumps({"recipe": recipe, "T": float(T), "seed": int(seed), "epochs": int(epochs),
                       "training_version": recipes.TRAINING_VERSION, **settings}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"{recipe}-T{float(T):g}-seed{int(seed)}-ep{int(epochs)}-{settings['architecture']}-{digest}"


def get_model(recipe, T=1.0, seed=0, epochs=None, *, architecture="papernot", batch_size=128,
              optimizer="adam", lr=None, warmup_steps=None, train_size=None, validation=5000,
              data=None, data_dir=None, cache_dir=None, force=False, device=None, progress=True):
    """A trained, deployed model for (recipe, T, seed, settings): from the cache, or trained now.

    Parameters
    ----------
    recipe : "standard", "temperature" or "distilled"
    T : float > 0, the training temperature (must be 1 for "standard")
    seed : int
    epochs : int (default ``recipes.DEFAULT_EPOCHS[recipe]``)
    architecture, batch_size, optimizer, lr, warmup_steps, train_size : training
        settings (see ``training.train``); all of them are part of the key
    validation : held-out validation images (part of the key)
    data : an already loaded MNIST (else loaded from ``data_dir`` when training is needed)
    cache_dir : the cache folder (see ``cache_dir_path``)
    force : retrain this model even if cached (a distilled model's teacher is
        still taken from the cache)
    device : "cpu", "gpu" or None
    progress : tqdm bars

    Returns
    -------
    (model, metadata). The metadata holds recipe, T, seed, epochs, test and
    validation accuracy, and ``path``, where the model is cached.
    """
    # every setting checked before any work (the same checks as the command line's)
    T = recipes.check_recipe(recipe, T)
    epochs = recipes.DEFAULT_EPOCHS[recipe] if epochs is None else epochs
    checked = training.check_settings(T, epochs, batch_size, seed, optimizer, lr, warmup_steps)
    epochs, batch_size, seed, lr = checked["epochs"], checked["batch_size"], checked["seed"], checked["lr"]
    if train_size is not None:
        train_size = training.check_positive_int(train_size, "train_size")
    if architecture not in recipes.ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(recipes.ARCHITECTURES)}")
    validation_seed = 0
    if data is not None:
        validation, validation_seed = len(data.val_x), data.validation_seed
    settings = {"architecture": architecture, "batch_size": batch_size, "optimizer": optimizer,
                "lr": lr, "warmup_steps": warmup_steps, "train_size": train_size,
                "validation": validation, "validation_seed": validation_seed}
    folder = cache_dir_path(cache_dir)
    if os.path.isdir(folder):
        remove_stale_temporaries(folder)

    loaded = [data]

    def mnist():
        """The data, loaded only once and only if something has to be trained."""
        if loaded[0] is None:
            loaded[0] = load_mnist(data_dir, validation=validation, seed=validation_seed, progress=progress)
        return loaded[0]

    request = dict(T=T, seed=seed, epochs=epochs, settings=settings, folder=folder, mnist=mnist,
                   device=device, progress=progress)
    teacher = None
    if recipe in recipes.TEACHER:
        # The teacher is the model of recipe TEACHER[recipe] at the same T and settings,
        # kept in this cache like any other: trained once, shared by both recipes.
        teacher = _cached_or_trained(recipes.TEACHER[recipe], force=False, **request)
    return _cached_or_trained(recipe, force=force, teacher=teacher, **request)


def _read_cached(path, key, device):
    """(model, metadata) of the finished entry at ``path``, or None (absent, unreadable, or
    trained by another training version: both warned about, neither used)."""
    if not os.path.exists(path):
        return None
    try:
        model, meta = load(path, device=device)
    except ModelFileError as e:
        warnings.warn(f"ignoring unreadable cached model ({e}); retraining")
        return None
    if meta.get("training_version") != recipes.TRAINING_VERSION:
        warnings.warn(f"ignoring cached model {key}: trained by training version "
                      f"{meta.get('training_version')}, this is version {recipes.TRAINING_VERSION}; retraining")
        return None
    meta["path"] = path
    return model, meta


def _stat(path):
    """What identifies the file at ``path`` now (None when there is none)."""
    try:
        st = os.stat(path)
    except OSError:                        # absent, or its folder is not a folder
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def say_waiting(key, pid):
    """The one line a process prints while another trains the model it wants."""
    who = "another process" if pid is None else f"PID {pid}"
    print(f"{key}: waiting for {who}, which is training this model; it is read from the cache when done",
          file=sys.stderr, flush=True)


def _cached_or_trained(recipe, T, seed, epochs, settings, folder, mnist, device, progress, force,
                       teacher=None):
    """(model, metadata) of one cache entry: read it, or train it and save it.

    ``teacher``: (model, metadata) of the teacher, for a recipe that has one.
    """
    key = model_key(recipe, T, seed, epochs, settings)
    path = os.path.join(folder, key + ".npz")
    checkpoint = os.path.join(folder, key + ".ckpt.npz")

    seen = _stat(path)
    if not force:
        found = _read_cached(path, key, device)
        if found is not None:
            return found
    check_writable(folder, "the model cache folder")       # before any training, not after an epoch
    waited = []
    with exclusive_lock(os.path.join(folder, key + ".lock"),
                        on_wait=lambda pid: waited.append(pid) or say_waiting(key, pid)):
        # Another process may have finished this model while we waited for the lock (or just
        # before we took it): read it rather than train it again, even with force.
        if _stat(path) != seen and (waited or not force):
            found = _read_cached(path, key, device)
            if found is not None:
                return found
        return _train_and_save(recipe, T, seed, epochs, settings, key, path, checkpoint, mnist, device,
                               progress, force, teacher)


def _train_and_save(recipe, T, seed, epochs, settings, key, path, checkpoint, mnist, device, progress,
                    force, teacher):
    """Train one entry (resuming from its checkpoint) and save it; the caller holds the lock."""
    if force and os.path.exists(checkpoint):
        os.remove(checkpoint)
    teacher_model, teacher_info = None, None
    if teacher is not None:
        teacher_model, teacher_meta = teacher
        teacher_info = {k: teacher_meta.get(k) for k in ("recipe", "T", "seed", "epochs", "test_accuracy",
                                                         "val_accuracy")}
        teacher_info["key"] = os.path.basename(teacher_meta["path"])
    loop = {k: settings[k] for k in ("batch_size", "optimizer", "lr", "warmup_steps")}
    try:
        model, meta = recipes.train_recipe(
            recipe, mnist(), T, teacher=teacher_model, teacher_info=teacher_info, seed=seed, epochs=epochs,
            architecture=settings["architecture"], train_size=settings["train_size"], device=device,
            checkpoint=checkpoint, progress=progress, **loop)
    except TrainingDivergedError as e:
        # resuming would diverge the same way: keep nothing of this run
        if os.path.exists(checkpoint):
            os.remove(checkpoint)
        raise TrainingDivergedError(f"{e}; nothing was cached") from None
    meta["key"] = key
    try:
        save(model, path, meta)          # atomic: a temporary file renamed into place
    except OSError as e:
        raise WriteError(f"{e}. The trained weights are kept in {checkpoint}: rerun the same command once "
                         f"the folder can take the model, and it is saved without retraining",
                         e.errno, e.strerror) from None
    if os.path.exists(checkpoint):
        os.remove(checkpoint)
    meta["path"] = path
    return model, meta


# ===== what the folder holds =====

ENTRY_NAME = re.compile(r"^(?P<recipe>[a-z]+)-T(?P<T>[^-]+)-seed(?P<seed>\d+)-ep(?P<epochs>\d+)-"
                        r"(?P<architecture>[a-z0-9_]+)-(?P<digest>[0-9a-f]{10})(?P<checkpoint>\.ckpt)?\.npz$")
"""The names ``model_key`` gives (a model ``KEY.npz``, a checkpoint ``KEY.ckpt.npz``): only
files named so are listed or ever removed."""


def entries(folder):
    """What the cache folder holds: one dict per model or checkpoint file named by ``model_key``.

    Each dict: ``name``, ``path``, ``bytes``, ``kind`` ("model" or "checkpoint"),
    the fields of the name (recipe, T, seed, epochs, architecture), and for a
    model its metadata's ``test_accuracy`` and ``training_version`` (None
    when unreadable, with ``error`` saying why); for a checkpoint the epochs
    it holds (``epochs_done``). Sorted by recipe, T, seed, epochs. Other files
    are not listed.
    """
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(os.fspath(folder)), "*.npz"))):
        name = os.path.basename(path)
        match = ENTRY_NAME.match(name)
        if match is None or not os.path.isfile(path):
            continue
        entry = {"name": name, "path": path, "bytes": os.path.getsize(path),
                 "kind": "checkpoint" if match["checkpoint"] else "model", "recipe": match["recipe"],
                 "T": float(match["T"]), "seed": int(match["seed"]), "epochs": int(match["epochs"]),
                 "architecture": match["architecture"], "test_accuracy": None, "training_version": None,
                 "epochs_done": None, "error": None}
        try:
            if entry["kind"] == "model":
                meta = read_metadata(path)
                entry["test_accuracy"] = meta.get("test_accuracy")
                entry["training_version"] = meta.get("training_version")
            else:
                entry["epochs_done"] = read_progress(path)
        except (ModelFileError, OSError, ValueError) as e:
            entry["error"] = " ".join(str(e).split())
        out.append(entry)
    return sorted(out, key=lambda e: (e["recipe"], e["T"], e["seed"], e["epochs"], e["architecture"], e["name"]))
