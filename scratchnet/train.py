"""The training loop and the three recipes of the study.

Recipes (each a function below):

1. ``train_standard``: hard labels, softmax at T = 1.
2. ``train_temperature``: hard labels, the loss sees ``softmax(z / T)``;
   deployed at T = 1 (the seed paper's "temperature without distillation").
3. ``train_distilled``: a teacher trained as in 2; the training set relabelled
   with the teacher's ``softmax(z / T)``; a student trained at T on those soft
   labels and deployed at T = 1 (Papernot et al.'s defensive distillation).

Optimisation
------------
The loss gradient w.r.t. the logits is ``(p - t) / T``: at T = 100 it is 100
times smaller than at T = 1, and plain SGD at a T = 1 learning rate sits at
chance for epochs. The default optimiser is therefore **Adam** (lr 1e-3),
whose step size does not depend on the gradient's scale, with a linear
warm-up over the first 10 % of the steps and a cosine decay to zero. The
alternative ``optimizer="sgd"`` is SGD with momentum 0.9 whose learning rate
is multiplied by T, which undoes the 1/T.

Reproducibility: the shuffling and the dropout masks of epoch ``e`` are drawn
from generators seeded by ``(seed, e)``, so the same seed on the same device
gives the same weights, and a run resumed from a checkpoint after epoch ``e``
continues exactly as the uninterrupted run would have.
"""
import json
import math
import os
import time
import zipfile

import numpy as np
from tqdm.auto import tqdm

from . import functional as F
from .backend import to_device, to_numpy
from .layers import Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from .losses import softmax_cross_entropy
from .model import Sequential, papernot_mnist, save_npz_atomic
from .optim import SGD, Adam

RECIPES = ("standard", "temperature", "distilled")
OPTIMIZERS = ("adam", "sgd")
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.01}
DEFAULT_EPOCHS = {"standard": 5, "temperature": 5, "distilled": 5}


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; nothing is saved."""


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


ARCHITECTURES = {"papernot": papernot_mnist, "small": small_mnist}


def build_model(architecture="papernot", seed=0, device=None):
    """A freshly initialised network of the named architecture, on ``device``."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](seed=seed).to(device)


# ===== learning-rate schedule =====

def learning_rate(step, total_steps, base_lr, warmup_steps):
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay to 0.

    Parameters
    ----------
    step : int, 0-based index of the optimiser step
    total_steps : int, steps in the whole run
    base_lr : float, the peak learning rate
    warmup_steps : int >= 1
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _epoch_seed(seed, epoch):
    """An integer seed for epoch ``epoch`` of run ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def make_optimizer(model, optimizer, T):
    """The optimiser object, and the factor its learning rate is multiplied by.

    Adam's steps do not scale with the gradient, so it needs no correction.
    SGD's do: the loss gradient carries 1 / T, so SGD's rate is multiplied by T.
    """
    if optimizer == "adam":
        return Adam(model), 1.0
    if optimizer == "sgd":
        return SGD(model, momentum=0.9), float(T)
    raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")


# ===== checkpoints (for resuming an interrupted run) =====

def _optimizer_arrays(opt):
    """The optimiser's state as {"kind/param": array} plus its scalar step count."""
    if isinstance(opt, Adam):
        arrays = {f"m/{k}": v for k, v in opt.m.items()}
        arrays.update({f"v/{k}": v for k, v in opt.v.items()})
        return arrays, {"t": opt.t}
    return {f"velocity/{k}": v for k, v in opt.velocity.items()}, {}


def _restore_optimizer(opt, arrays, scalars, device):
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
    opt_arrays, scalars = _optimizer_arrays(opt)
    arrays.update({f"opt/{k}": to_numpy(v) for k, v in opt_arrays.items()})
    state = {"epoch": epoch, "history": history, "settings": settings, "optimizer_scalars": scalars}
    arrays["__state__"] = np.array(json.dumps(state))
    save_npz_atomic(path, arrays)


def load_checkpoint(path):
    """The checkpoint at ``path`` as a dict, or None if absent or unreadable."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        state = json.loads(str(arrays.pop("__state__")))
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError):
        return None
    state["params"] = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    state["optimizer"] = {k[len("opt/"):]: v for k, v in arrays.items() if k.startswith("opt/")}
    return state


# ===== the training loop =====

def _device_of(model):
    return "cpu" if model.xp is np else "gpu"


def _reseed_dropout(model, seed):
    for layer in model.layers:
        if isinstance(layer, Dropout):
            layer.reseed(seed)


def _check_training_inputs(x, y, T, epochs, batch_size, optimizer):
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
        raise ValueError(f"temperature T must be a finite number > 0, got {T!r}")
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if getattr(x, "ndim", 0) != 4:
        raise ValueError(f"x must be images of shape (N, C, H, W), got shape {getattr(x, 'shape', type(x).__name__)}")
    if y.ndim == 1:
        if y.dtype.kind not in "iu":
            raise ValueError(f"hard labels y must be integers of shape ({len(x)},), got dtype {y.dtype}")
    elif y.ndim != 2:
        raise ValueError(f"y must be int labels (N,) or soft targets (N, K), got shape {y.shape}")
    if len(y) != len(x):
        raise ValueError(f"x and y must have the same length, got {len(x)} images and {len(y)} targets")


def train(model, x, y, T=1.0, epochs=DEFAULT_EPOCHS["standard"], batch_size=128, seed=0,
          optimizer="adam", lr=None, warmup_steps=None, val=None, checkpoint=None,
          progress=True, desc="train"):
    """Train ``model`` in place with mini-batch cross-entropy at temperature T.

    Parameters
    ----------
    model : Sequential, on the device training should run on
    x : (N, C, H, W) float images (NumPy; batches are moved to the model's device)
    y : (N,) int labels, or (N, K) soft targets (rows summing to 1)
    T : float > 0, the training temperature: the loss sees softmax(z / T)
    epochs, batch_size : ints
    seed : int, seeds the shuffling and the dropout masks
    optimizer : "adam" or "sgd" (see the module docstring)
    lr : peak learning rate (default ``DEFAULT_LR[optimizer]``; SGD's is then multiplied by T)
    warmup_steps : linear warm-up length (default: 10 % of all steps)
    val : optional (x_val, y_val) for a validation accuracy after each epoch
    checkpoint : optional path; written after every epoch, and a matching one
        is resumed from (a checkpoint from different settings is ignored)
    progress : show a tqdm bar per epoch with loss and accuracy
    desc : label for the progress bars

    Returns
    -------
    history : list of dicts, one per epoch: loss, train_accuracy, val_accuracy, seconds

    Raises
    ------
    TrainingDivergedError when the loss or the weights become NaN or infinite.
    """
    _check_training_inputs(x, y, T, epochs, batch_size, optimizer)
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    N = len(x)
    steps_per_epoch = math.ceil(N / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = max(1, total_steps // 10) if warmup_steps is None else max(1, int(warmup_steps))
    device = _device_of(model)
    opt, lr_factor = make_optimizer(model, optimizer, T)
    settings = {"T": T, "epochs": epochs, "batch_size": batch_size, "seed": seed, "optimizer": optimizer,
                "lr": lr, "warmup_steps": warmup_steps, "N": N, "soft_targets": bool(y.ndim == 2)}

    history, start_epoch = [], 0
    state = load_checkpoint(checkpoint)
    if state is not None and state["settings"] == settings and set(state["params"]) == set(model.params):
        model.set_params({k: to_device(v, device) for k, v in state["params"].items()})
        _restore_optimizer(opt, state["optimizer"], state["optimizer_scalars"], device)
        history, start_epoch = state["history"], state["epoch"]
        if progress:
            tqdm.write(f"{desc}: resuming from {checkpoint} after epoch {start_epoch}")

    hard_labels = y if y.ndim == 1 else y.argmax(axis=1)
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        order = np.random.default_rng(_epoch_seed(seed, epoch)).permutation(N)
        _reseed_dropout(model, _epoch_seed(seed, epoch))
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} epoch {epoch + 1}/{epochs}",
                   disable=not progress, leave=False, unit="batch")
        for i in bar:
            idx = order[i * batch_size:(i + 1) * batch_size]
            xb, yb = to_device(x[idx], device), to_device(y[idx], device)
            opt.lr = learning_rate(epoch * steps_per_epoch + i, total_steps, lr, warmup_steps) * lr_factor

            z = model.logits(xb, train=True)
            loss, dz = softmax_cross_entropy(z, yb, T)     # the loss sees softmax(z / T)
            if not math.isfinite(loss):
                raise TrainingDivergedError(
                    f"{desc}: the loss became {loss} at epoch {epoch + 1}, batch {i + 1} "
                    f"(T={T}, optimizer={optimizer}, lr={opt.lr:.3g}); lower the learning rate")
            model.backward(dz)
            opt.step()

            loss_sum += loss * len(idx)
            correct += int((to_numpy(z.argmax(axis=1)) == hard_labels[idx]).sum())
            seen += len(idx)
            if i % 10 == 0 or i == steps_per_epoch - 1:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        bar.close()

        for name, w in model.params.items():
            if not bool(model.xp.isfinite(w).all()):
                raise TrainingDivergedError(f"{desc}: parameter {name} became NaN or infinite in epoch {epoch + 1}")
        record = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_accuracy": correct / seen,
                  "seconds": time.perf_counter() - started}
        if val is not None:
            record["val_accuracy"] = accuracy(model, *val)
        history.append(record)
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}, "
                       f"train acc {record['train_accuracy']:.4f}"
                       + (f", val acc {record['val_accuracy']:.4f}" if val is not None else "")
                       + f", {record['seconds']:.0f} s")
        if checkpoint:
            save_checkpoint(checkpoint, model, opt, epoch + 1, history, settings)
    return history


# ===== evaluation =====

def logits_in_batches(model, x, batch_size=1000):
    """z for every image, evaluated without dropout; NumPy (N, K) in the model's dtype."""
    device = _device_of(model)
    return np.concatenate([to_numpy(model.logits(to_device(x[i:i + batch_size], device)))
                           for i in range(0, len(x), batch_size)])


def accuracy(model, x, y, batch_size=1000):
    """Fraction of images whose arg-max logit is the label ``y`` (N,)."""
    return float((logits_in_batches(model, x, batch_size).argmax(axis=1) == to_numpy(y)).mean())


def logit_margins(z):
    """Top logit minus the runner-up, per row of z (N, K) -> (N,)."""
    top2 = np.sort(z, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def evaluate(model, x, y, T=1.0, batch_size=1000):
    """How a deployed model behaves on labelled images.

    Parameters
    ----------
    x : (N, C, H, W) images;  y : (N,) int labels
    T : the deployment temperature (1 for every recipe)

    Returns
    -------
    dict with accuracy, n, confusion (K x K counts, rows = true class,
    columns = predicted), mean_max_probability, saturated_fraction (the
    fraction of images whose top probability is exactly 1.0 in the model's
    dtype, e.g. float32: the softmax has rounded and its gradient vanishes),
    and mean_logit_margin.
    """
    z = logits_in_batches(model, x, batch_size)
    p, _ = F.softmax_forward(z, T)                 # in the model's own dtype, as deployed
    pred = z.argmax(axis=1)
    y = to_numpy(y)
    K = z.shape[1]
    confusion = np.zeros((K, K), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    top = p.max(axis=1)
    return {"n": int(len(y)), "accuracy": float((pred == y).mean()), "confusion": confusion.tolist(),
            "mean_max_probability": float(top.mean(dtype=np.float64)),
            "saturated_fraction": float((top == 1.0).mean()),
            "mean_logit_margin": float(logit_margins(z).mean(dtype=np.float64)), "T": float(T),
            "dtype": str(z.dtype)}


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
    test = evaluate(model, data.test_x, data.test_y, T=1.0)
    val = evaluate(model, data.val_x, data.val_y, T=1.0) if len(data.val_x) else None
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
            "dtype": test["dtype"], "scratchnet_version": __version__}
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
    **settings : batch_size, optimizer, lr, warmup_steps (see ``train``)

    Returns
    -------
    (model, metadata) with the metadata of ``_deploy``
    """
    started = time.perf_counter()
    x, y = _training_set(data, train_size)
    model = build_model(architecture, seed, device)
    history = train(model, x, y, T=1.0, epochs=epochs, seed=seed, val=_validation_set(data),
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
    history = train(model, x, y, T=T, epochs=epochs, seed=seed, val=_validation_set(data),
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
    z = logits_in_batches(teacher, x, batch_size)
    p, _ = F.softmax_forward(z.astype(np.float32), T)     # the teacher speaks at T
    return p


def train_distilled(data, T, teacher, seed=0, epochs=DEFAULT_EPOCHS["distilled"], architecture="papernot",
                    train_size=None, device=None, checkpoint=None, progress=True, teacher_info=None, **settings):
    """Recipe 3, ``distilled`` (defensive distillation, Papernot et al. 2016).

    1. ``teacher``: a network trained as in ``train_temperature`` at the same T
       (``scratchnet.cache.get_model`` fetches it from the cache, so it is
       trained once and shared with the ``temperature`` recipe);
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
    history = train(model, x, soft, T=T, epochs=epochs, seed=seed, val=_validation_set(data),
                    checkpoint=checkpoint, progress=progress, desc=f"distilled T={T:g}", **settings)
    extra = {"teacher": teacher_info or {}, "teacher_target_mean_max": float(soft.max(axis=1).mean())}
    return model, _deploy(model, data, "distilled", T, seed, epochs, history, started,
                          {"architecture": architecture, "train_size": len(x), **settings}, extra)
