"""A cache of trained models, so experiments reuse a model instead of retraining it.

Each model is one ``.npz`` (``scratchnet.model.save``) in the cache folder,
named by its recipe, T, seed and epochs, plus a short hash of every other
training setting (architecture, batch size, optimiser, learning rate, warm-up,
training-set size, validation split)::

    temperature-T20-seed0-ep5-papernot-3f9c0a1b2d.npz

The folder is the ``cache_dir`` argument, else ``$SCRATCHNET_CACHE``, else
``~/.cache/scratchnet/models``.

Safety: the final file is written to a temporary name and renamed into place,
so an interrupted run never leaves a broken model under the final name. While
training, a checkpoint ``<name>.ckpt.npz`` is written (atomically) after every
epoch; rerunning the same request resumes from it, and it is deleted once the
finished model is saved. ``force=True`` discards both and retrains.
"""
import hashlib
import json
import math
import os
import warnings

from . import train as recipes
from .data import load_mnist
from .model import ModelFileError, load, save

ENV_VAR = "SCRATCHNET_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "scratchnet", "models")


def cache_dir_path(cache_dir=None):
    """The cache folder: ``cache_dir``, else ``$SCRATCHNET_CACHE``, else ``~/.cache/scratchnet/models``."""
    folder = cache_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR
    return os.path.expanduser(os.fspath(folder))


def check_recipe(recipe, T):
    """Validate a (recipe, T) pair; returns T as a float (1.0 for ``standard``)."""
    if recipe not in recipes.RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(recipes.RECIPES)}")
    try:
        T = float(T)
    except (TypeError, ValueError):
        raise ValueError(f"temperature T must be a number > 0, got {T!r}") from None
    if not math.isfinite(T) or T <= 0:
        raise ValueError(f"temperature T must be a finite number > 0, got {T!r}")
    if recipe == "standard" and T != 1.0:
        raise ValueError(f"the standard recipe trains at T = 1, got T = {T:g} "
                         f"(use --recipe temperature or distilled for T != 1)")
    return T


def model_key(recipe, T, seed, epochs, settings):
    """The file name stem of a model: readable fields plus a hash of all settings."""
    blob = json.dumps({"recipe": recipe, "T": float(T), "seed": int(seed), "epochs": int(epochs), **settings},
                      sort_keys=True)
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
    epochs : int (default ``scratchnet.train.DEFAULT_EPOCHS[recipe]``)
    architecture, batch_size, optimizer, lr, warmup_steps, train_size : training
        settings (see ``scratchnet.train.train``); all of them are part of the key
    validation : held-out validation images (part of the key)
    data : an already loaded MNIST (else loaded from ``data_dir``)
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
    T = check_recipe(recipe, T)
    epochs = recipes.DEFAULT_EPOCHS[recipe] if epochs is None else int(epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs}")
    if optimizer not in recipes.OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {recipes.OPTIMIZERS}")
    if architecture not in recipes.ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(recipes.ARCHITECTURES)}")
    validation_seed = 0
    if data is not None:
        validation, validation_seed = len(data.val_x), data.validation_seed
    settings = {"architecture": architecture, "batch_size": batch_size, "optimizer": optimizer,
                "lr": lr, "warmup_steps": warmup_steps, "train_size": train_size,
                "validation": validation, "validation_seed": validation_seed}
    folder = cache_dir_path(cache_dir)
    key = model_key(recipe, T, seed, epochs, settings)
    path = os.path.join(folder, key + ".npz")
    checkpoint = os.path.join(folder, key + ".ckpt.npz")

    if os.path.exists(path) and not force:
        try:
            model, meta = load(path, device=device)
            meta["path"] = path
            return model, meta
        except ModelFileError as e:
            warnings.warn(f"ignoring unreadable cached model ({e}); retraining")
    if force and os.path.exists(checkpoint):
        os.remove(checkpoint)

    if data is None:
        data = load_mnist(data_dir, validation=validation, seed=validation_seed, progress=progress)
    common = dict(seed=seed, epochs=epochs, architecture=architecture, train_size=train_size, device=device,
                  checkpoint=checkpoint, progress=progress, batch_size=batch_size, optimizer=optimizer,
                  lr=lr, warmup_steps=warmup_steps)
    if recipe == "standard":
        model, meta = recipes.train_standard(data, **common)
    elif recipe == "temperature":
        model, meta = recipes.train_temperature(data, T, **common)
    else:
        # The teacher is the temperature model at the same T and settings, fetched
        # through this same cache: trained once, shared by both recipes.
        teacher, teacher_meta = get_model(
            "temperature", T, seed, epochs, architecture=architecture, batch_size=batch_size,
            optimizer=optimizer, lr=lr, warmup_steps=warmup_steps, train_size=train_size,
            data=data, cache_dir=folder, device=device, progress=progress)
        info = {k: teacher_meta.get(k) for k in ("recipe", "T", "seed", "epochs", "test_accuracy", "val_accuracy")}
        info["key"] = os.path.basename(teacher_meta["path"])
        model, meta = recipes.train_distilled(data, T, teacher, teacher_info=info, **common)
    meta["key"] = key
    save(model, path, meta)          # atomic: a temporary file renamed into place
    if os.path.exists(checkpoint):
        os.remove(checkpoint)
    meta["path"] = path
    return model, meta
