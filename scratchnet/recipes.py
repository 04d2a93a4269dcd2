"""The study's three recipes, each written out whole: which network learns from
which labels at which temperature, and how it is deployed.

1. ``standard``: hard labels, softmax at T = 1.
2. ``temperature``: hard labels, the loss sees ``softmax(z / T)``; deployed at
   T = 1 (the seed paper's "temperature without distillation").
3. ``distilled``: a teacher trained as in 2 at the same T; the training set
   relabelled with the teacher's ``softmax(z / T)``; a student trained at T on
   those soft labels and deployed at T = 1 (Papernot et al.'s defensive
   distillation).

``train_recipe(recipe, data, T, teacher=...)`` runs one of them. A recipe that
learns from a teacher names the teacher's recipe in ``TEACHER``; the model
cache (``cache.py``) fetches that model first, from the cache or trained, and
passes it in. Every recipe trains through the one loop in ``training.py``.

``TRAINING_VERSION`` is part of every cached model's key and metadata: raise
it whenever a change here or in ``training.py`` changes the weights a
setting produces, and models trained by the older code are retrained rather
than reused.
"""
import time

import numpy as np

from . import functional as F
from . import training
from .layers import Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from .model import Sequential, papernot_mnist

TRAINING_VERSION = 2          # 2: recipes, loop and schedule as in this file and training.py
RECIPES = ("standard", "temperature", "distilled")
TEACHER = {"distilled": "temperature"}      # recipe -> the recipe of its teacher (same T and settings)
DEFAULT_EPOCHS = {recipe: training.DEFAULT_EPOCHS for recipe in RECIPES}


def check_recipe(recipe, T):
    """Validate a (recipe, T) pair; returns T as a float (1.0 for ``standard``)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    T = F.check_T(T)
    if recipe == "standard" and T != 1.0:
        raise ValueError(f"the standard recipe trains at T = 1, got T = {T:g} "
                         f"(use --recipe temperature or distilled for T != 1)")
    return T


# ===== architectures =====

def small_mnist(seed=0, dtype=np.float32, dropout=0.5):
    """A small, fast network for tests and quick experiments:

    conv 3x3 8, ReLU, max-pool 2x2, dense 64, ReLU, dropout, dense 10.

    28x28 -> 26 -> 13, so the flattened size is 8 * 13 * 13 = 1352.
    """
    rng = np.random.default_rng(seed)
    return Sequential([
        Conv2D(1, 8, 3, rng=rng, dtype=dtype, name="conv1"), ReLU(name="relu1"),
        MaxPool2D(2, name="pool1"),
        Flatten(name="flatten"),
        Dense(8 * 13 * 13, 64, rng=rng, dtype=dtype, name="dense1"), ReLU(name="relu2"),
        Dropout(dropout, seed=seed, name="dropout"),
        Dense(64, 10, rng=rng, dtype=dtype, name="dense2"),
    ])


ARCHITECTURES = {"papernot": papernot_mnist, "small": small_mnist}   # papernot_mnist: model.py


def build_model(architecture="papernot", seed=0, device=None):
    """A freshly initialised network of the named architecture, on ``device``."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](seed=seed).to(device)


# ===== the three recipes =====

def _training_set(data, train_size):
    if train_size is None:
        return data.train_x, data.train_y
    if not 0 < int(train_size) <= len(data.train_x):
        raise ValueError(f"train_size must be in [1, {len(data.train_x)}], got {train_size}")
    return data.train_x[:train_size], data.train_y[:train_size]


def _validation_set(data):
    """(val_x, val_y) for per-epoch validation, or None when no images were held out."""
    return (data.val_x, data.val_y) if len(data.val_x) else None


def _deploy(model, data, recipe, T, seed, epochs, history, started, settings, extra=None):
    """Evaluate at T = 1 and assemble the metadata a deployed model carries."""
    from . import __version__
    test = training.evaluate(model, data.test_x, data.test_y, T=1.0)
    val = training.evaluate(model, data.val_x, data.val_y, T=1.0) if len(data.val_x) else None
    seconds = [h["seconds"] for h in history]
    meta = {"recipe": recipe, "T": float(T), "deploy_T": 1.0, "seed": int(seed), "epochs": int(epochs),
            "test_accuracy": test["accuracy"], "val_accuracy": val["accuracy"] if val else None,
            "test_saturated_fraction": test["saturated_fraction"],
            "test_mean_max_probability": test["mean_max_probability"],
            "test_mean_logit_margin": test["mean_logit_margin"],
            "settings": settings, "history": history,
            "seconds_per_epoch": float(np.mean(seconds)) if seconds else None,
            "train_seconds": float(sum(seconds)),      # all epochs, also across a resumed run
            "wall_seconds": time.perf_counter() - started,  # this call: resumed epochs, relabelling, evaluation
            "dtype": test["dtype"], "scratchnet_version": __version__, "training_version": TRAINING_VERSION,
            "cpu_threads": training.cpu_threads(model)}   # the weights depend on it (training.py)
    meta.update(extra or {})
    return meta


def train_standard(data, seed=0, epochs=DEFAULT_EPOCHS["standard"], architecture="papernot",
                   train_size=None, device=None, checkpoint=None, progress=True, **settings):
    """Recipe 1, ``standard``: hard labels, softmax at T = 1, deployed at T = 1.

    Parameters
    ----------
    data : MNIST from ``scratchnet.data.load_mnist``
    seed : int, initialisation, shuffling and dropout
    epochs : int
    architecture : "papernot" (the study's network) or "small" (tests, quick runs)
    train_size : use only the first ``train_size`` training images (None = all)
    device : "cpu", "gpu" or None (``$SCRATCHNET_DEVICE``)
    checkpoint : path to resume from / write after each epoch
    **settings : batch_size, optimizer, lr, warmup_steps (see ``training.train``)

    Returns
    -------
    (model, metadata) with the metadata of ``_deploy``
    """
    started = time.perf_counter()
    x, y = _training_set(data, train_size)
    model = build_model(architecture, seed, device)
    history = training.train(model, x, y, T=1.0, epochs=epochs, seed=seed, val=_validation_set(data),
                    checkpoint=checkpoint, progress=progress, desc="standard", **settings)
    return model, _deploy(model, data, "standard", 1.0, seed, epochs, history, started,
                          {"architecture": architecture, "train_size": len(x), **settings})


def train_temperature(data, T, seed=0, epochs=DEFAULT_EPOCHS["temperature"], architecture="papernot",
                      train_size=None, device=None, checkpoint=None, progress=True, **settings):
    """Recipe 2, ``temperature``: hard labels, the loss sees softmax(z / T); deployed at T = 1.

    The network only ever has to make softmax(z / T) confident, so it learns
    logits about T times larger than a T = 1 network; at T = 1 its softmax
    saturates. Parameters and return value as in ``train_standard``.
    """
    started = time.perf_counter()
    x, y = _training_set(data, train_size)
    model = build_model(architecture, seed, device)
    history = training.train(model, x, y, T=T, epochs=epochs, seed=seed, val=_validation_set(data),
                    checkpoint=checkpoint, progress=progress, desc=f"temperature T={T:g}", **settings)
    return model, _deploy(model, data, "temperature", T, seed, epochs, history, started,
                          {"architecture": architecture, "train_size": len(x), **settings})


def distillation_targets(teacher, x, T, batch_size=1000):
    """The teacher's soft labels: softmax(z_teacher / T) for every image.

    Parameters
    ----------
    teacher : Sequential (trained at T)
    x : (N, C, H, W) images
    T : float > 0, the distillation temperature

    Returns
    -------
    (N, K) float32 NumPy array, rows summing to 1
    """
    z = training.logits_in_batches(teacher, x, batch_size)
    p, _ = F.softmax_forward(z.astype(np.float32), T)     # the teacher speaks at T
    return p


def train_distilled(data, T, teacher, seed=0, epochs=DEFAULT_EPOCHS["distilled"], architecture="papernot",
                    train_size=None, device=None, checkpoint=None, progress=True, teacher_info=None, **settings):
    """Recipe 3, ``distilled`` (defensive distillation, Papernot et al. 2016).

    1. ``teacher``: a network trained as in ``train_temperature`` at the same T
       (``TEACHER["distilled"]``: the cache fetches it, so it is trained once
       and shared with the ``temperature`` recipe);
    2. the training set relabelled with the teacher's softmax(z / T);
    3. a student, initialised with the same seed as the teacher, trained at T
       on those soft labels, so the only difference from the ``temperature``
       model of the same seed is the labels;
    4. the student deployed at T = 1.

    Parameters as in ``train_standard``; ``teacher_info`` is stored in the metadata.
    """
    started = time.perf_counter()
    x, _ = _training_set(data, train_size)
    soft = distillation_targets(teacher, x, T)
    model = build_model(architecture, seed, device)
    history = training.train(model, x, soft, T=T, epochs=epochs, seed=seed, val=_validation_set(data),
                    checkpoint=checkpoint, progress=progress, desc=f"distilled T={T:g}", **settings)
    extra = {"teacher": teacher_info or {}, "teacher_target_mean_max": float(soft.max(axis=1).mean())}
    return model, _deploy(model, data, "distilled", T, seed, epochs, history, started,
                          {"architecture": architecture, "train_size": len(x), **settings}, extra)


def train_recipe(recipe, data, T=1.0, teacher=None, teacher_info=None, **kw):
    """Train one recipe: ``train_standard``, ``train_temperature`` or ``train_distilled``.

    Parameters
    ----------
    recipe : one of ``RECIPES``
    data : MNIST from ``scratchnet.data.load_mnist``
    T : float > 0, the training temperature (1 for ``standard``)
    teacher : the trained model of recipe ``TEACHER[recipe]`` at T, for a recipe that has one
    teacher_info : dict stored in the student's metadata (which teacher it was)
    **kw : seed, epochs, architecture, train_size, device, checkpoint, progress
        and the loop's settings (see ``train_standard``)

    Returns
    -------
    (model, metadata)
    """
    T = check_recipe(recipe, T)
    if recipe in TEACHER and teacher is None:
        raise ValueError(f"the {recipe} recipe learns from a {TEACHER[recipe]} model at T = {T:g}: pass teacher=")
    if recipe == "standard":
        return train_standard(data, **kw)
    if recipe == "temperature":
        return train_temperature(data, T, **kw)
    return train_distilled(data, T, teacher, teacher_info=teacher_info, **kw)
