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

What is trained for a request: ``recipes.train_recipe``.
"""
import hashlib
import json
import os
import warnings

from . import recipes
from .data import load_mnist
from .files import remove_stale_temporaries
from .model import ModelFileError, load, save
from .training import OPTIMIZERS

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
    T = recipes.check_recipe(recipe, T)
    epochs = recipes.DEFAULT_EPOCHS[recipe] if epochs is None else int(epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
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


def _cached_or_trained(recipe, T, seed, epochs, settings, folder, mnist, device, progress, force,
                       teacher=None):
    """(model, metadata) of one cache entry: read it, or train it and save it.

    ``teacher``: (model, metadata) of the teacher, for a recipe that has one.
    """
    key = model_key(recipe, T, seed, epochs, settings)
    path = os.path.join(folder, key + ".npz")
    checkpoint = os.path.join(folder, key + ".ckpt.npz")

    if os.path.exists(path) and not force:
        try:
            model, meta = load(path, device=device)
        except ModelFileError as e:
            warnings.warn(f"ignoring unreadable cached model ({e}); retraining")
        else:
            if meta.get("training_version") == recipes.TRAINING_VERSION:
                meta["path"] = path
                return model, meta
            warnings.warn(f"ignoring cached model {key}: trained by training version "
                          f"{meta.get('training_version')}, this is version {recipes.TRAINING_VERSION}; retraining")
    if force and os.path.exists(checkpoint):
        os.remove(checkpoint)

    teacher_model, teacher_info = None, None
    if teacher is not None:
        teacher_model, teacher_meta = teacher
        teacher_info = {k: teacher_meta.get(k) for k in ("recipe", "T", "seed", "epochs", "test_accuracy",
                                                         "val_accuracy")}
        teacher_info["key"] = os.path.basename(teacher_meta["path"])
    loop = {k: settings[k] for k in ("batch_size", "optimizer", "lr", "warmup_steps")}
    model, meta = recipes.train_recipe(
        recipe, mnist(), T, teacher=teacher_model, teacher_info=teacher_info, seed=seed, epochs=epochs,
        architecture=settings["architecture"], train_size=settings["train_size"], device=device,
        checkpoint=checkpoint, progress=progress, **loop)
    meta["key"] = key
    save(model, path, meta)          # atomic: a temporary file renamed into place
    if os.path.exists(checkpoint):
        os.remove(checkpoint)
    meta["path"] = path
    return model, meta
