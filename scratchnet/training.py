"""The training loop: mini-batches, the loss at T, backprop, the optimiser step.

``train(model, x, y, T)`` is the whole loop, written out in one function:
shuffle, take a batch, logits, cross-entropy of ``softmax(z / T)``
(``losses.py``), ``model.backward``, one optimiser step (``optim.py``),
with a warm-up and cosine learning-rate schedule, a progress bar, a check
that the loss stays finite, and a checkpoint after every epoch
(``checkpoint.py``) so an interrupted run resumes. ``evaluate`` measures a
trained model at its deployment temperature.

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
from generators seeded by ``(seed, e)``, so the same seed on the same device,
with the same number of CPU threads, gives the same weights, and a run resumed
from a checkpoint after epoch ``e`` continues exactly as the uninterrupted run
would have. The thread count matters because the convolution kernels sum
the weight gradient over one block of images per thread and then add the
blocks: another count adds the same float32 numbers in another order, so the
weights differ in their last bits after the first step and the training then
drifts to a different, equally good model. The count used is recorded in a
deployed model's metadata (``cpu_threads``; ``NUMBA_NUM_THREADS`` sets it).

Which network is trained on what, at which T (the recipes): ``recipes.py``.
"""
import math
import os
import time

import numpy as np
from . import checkpoint as ckpt
from . import functional as F
from . import progress as P
from .backend import to_device, to_numpy
from .files import check_free_space
from .layers import Dropout
from .functional import logit_margins
from .losses import check_labels, softmax_cross_entropy
from .optim import SGD, Adam

OPTIMIZERS = ("adam", "sgd")
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.01}
DEFAULT_EPOCHS = 5


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; nothing is saved."""


# ===== the settings' limits =====
#
# The one home of the numeric rules for training settings: the loop and the
# model cache check a library caller's values with these, and the command
# line's argument types (``scratchnet/cli/__init__.py``) call the same
# functions, so a value is refused with the same words wherever it comes from.
# The temperature's limits are ``functional.check_T``'s.

MAX_LR = 1.0
"""The largest peak learning rate accepted. Adam moves every weight by about
lr per step (its step m / sqrt(v) is about +-1 per weight), and the weights
start at 0.03 to 0.3 in size: at lr = 1 a step is already several times the
weights themselves and the run cannot settle, and beyond it nothing is
learned, yet nothing turns NaN either, so no later check would stop such a
run. Measured (the small network, 2 epochs on 3,000 images, T = 1): Adam at
lr 1, 10 and 1e6 ends at chance (about 10 %, final loss 2.3 to 3.6e5, never
NaN); SGD reaches 67 % at lr 1 and chance at 10, which is why the limit is 1
and not lower."""


class SettingError(ValueError):
    """A setting outside its rule: ``name`` must be ``rule``, got ``value``."""

    def __init__(self, name, rule, value):
        super().__init__(f"{name} must be {rule}, got {value!r}")
        self.name, self.rule, self.value = name, rule, value


def _number(value, name, kind):
    """``value`` (a number, or the text of one) as a ``kind`` (float or int); a SettingError naming ``name``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = kind(value.strip() if isinstance(value, str) else value)
        if kind is int and not isinstance(value, str) and number != value:
            raise ValueError                         # 2.5 epochs: not silently 2
    except (TypeError, ValueError, OverflowError):
        raise SettingError(name, "an integer" if kind is int else "a number", value) from None
    return number


def check_learning_rate(lr, name="lr"):
    """The peak learning rate as a float; a SettingError unless it is finite, > 0 and <= ``MAX_LR``."""
    value = _number(lr, name, float)
    if not (math.isfinite(value) and 0 < value <= MAX_LR):
        raise SettingError(name, f"a finite number > 0 and at most {MAX_LR:g} (a larger step than the weights "
                                 f"themselves never settles)", lr)
    return value


def check_positive_int(value, name):
    """A count (epochs, a batch size, a number of images) as an int; a SettingError unless it is >= 1."""
    number = _number(value, name, int)
    if number < 1:
        raise SettingError(name, "a positive integer", value)
    return number


def check_seed(seed, name="seed"):
    """A random seed as an int; a SettingError unless it is >= 0 (NumPy's seeds are non-negative)."""
    number = _number(seed, name, int)
    if number < 0:
        raise SettingError(name, "an integer >= 0", seed)
    return number


def check_settings(T=1.0, epochs=DEFAULT_EPOCHS, batch_size=128, seed=0, optimizer="adam", lr=None,
                   warmup_steps=None):
    """Every numeric setting of a training run, checked before any work.

    Returns the values as plain Python numbers (``lr`` and ``warmup_steps``
    stay None when not given). Raises a ValueError naming the first bad one.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    return {"T": F.check_T(T), "epochs": check_positive_int(epochs, "epochs"),
            "batch_size": check_positive_int(batch_size, "batch_size"), "seed": check_seed(seed),
            "optimizer": optimizer, "lr": None if lr is None else check_learning_rate(lr),
            "warmup_steps": None if warmup_steps is None else check_positive_int(warmup_steps, "warmup_steps")}


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


# ===== the training loop =====

def cpu_threads(model):
    """The number of threads the CPU kernels train ``model`` on (Numba's, set by
    ``NUMBA_NUM_THREADS``); None for a model on the GPU."""
    import numba
    return numba.get_num_threads() if _device_of(model) == "cpu" else None


def _device_of(model):
    return "cpu" if model.xp is np else "gpu"


def _reseed_dropout(model, seed):
    for layer in model.layers:
        if isinstance(layer, Dropout):
            layer.reseed(seed)


def _check_training_inputs(model, x, y):
    if getattr(x, "ndim", 0) != 4:
        raise ValueError(f"x must be images of shape (N, C, H, W), got shape {getattr(x, 'shape', type(x).__name__)}")
    if y.ndim != 1 and y.ndim != 2:
        raise ValueError(f"y must be int labels (N,) or soft targets (N, K), got shape {y.shape}")
    if len(y) != len(x):
        raise ValueError(f"x and y must have the same length, got {len(x)} images and {len(y)} targets")
    if y.ndim == 1:
        check_labels(y, len(x), model.n_classes, "hard labels y")


def train(model, x, y, T=1.0, epochs=DEFAULT_EPOCHS, batch_size=128, seed=0,
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
    progress : show progress (``progress.py``): a bar per epoch on a terminal, and
        one line per epoch with loss and accuracy
    desc : label for the progress bars

    Returns
    -------
    history : list of dicts, one per epoch: loss, train_accuracy, val_accuracy, seconds

    Raises
    ------
    ValueError for a bad setting (``check_settings``), before any work;
    TrainingDivergedError when the loss or the weights become NaN or infinite;
    OSError (``files.WriteError``) when the checkpoint folder lacks the room
    for the run, before the first epoch, or a checkpoint cannot be written
    (the last good one is kept).
    """
    checked = check_settings(T, epochs, batch_size, seed, optimizer, lr, warmup_steps)
    T, epochs, batch_size, seed = checked["T"], checked["epochs"], checked["batch_size"], checked["seed"]
    _check_training_inputs(model, x, y)
    lr = DEFAULT_LR[optimizer] if checked["lr"] is None else checked["lr"]
    N = len(x)
    steps_per_epoch = math.ceil(N / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = max(1, total_steps // 10) if warmup_steps is None else checked["warmup_steps"]
    device = _device_of(model)
    opt, lr_factor = make_optimizer(model, optimizer, T)
    settings = {"T": T, "epochs": epochs, "batch_size": batch_size, "seed": seed, "optimizer": optimizer,
                "lr": lr, "warmup_steps": warmup_steps, "N": N, "soft_targets": bool(y.ndim == 2)}

    history, start_epoch = [], 0
    if checkpoint:
        # before the first epoch, not after it: room for two checkpoints (the last good
        # one stays until the next is complete) and the finished model beside them
        check_free_space(os.path.dirname(os.path.abspath(checkpoint)),
                         2 * ckpt.checkpoint_bytes(model, optimizer) + ckpt.checkpoint_bytes(model, None),
                         "the checkpoint folder")
    state = ckpt.load_checkpoint(checkpoint)   # None if absent, damaged (with a warning) or of another run
    if state is not None and state["settings"] == settings and set(state["params"]) == set(model.params):
        model.set_params({k: to_device(v, device) for k, v in state["params"].items()})
        ckpt.restore_optimizer(opt, state["optimizer"], state["optimizer_scalars"], device)
        history, start_epoch = state["history"], state["epoch"]
        if progress:
            P.write(f"{desc}: resuming from {checkpoint} after epoch {start_epoch} of {epochs}")

    hard_labels = y if y.ndim == 1 else y.argmax(axis=1)
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        order = np.random.default_rng(_epoch_seed(seed, epoch)).permutation(N)
        _reseed_dropout(model, _epoch_seed(seed, epoch))
        loss_sum, correct, seen = 0.0, 0, 0
        bar = P.tqdm(range(steps_per_epoch), desc=f"{desc} epoch {epoch + 1}/{epochs}",
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
            model.backward(dz, input_grad=False)           # the images take no gradient
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
            P.write(f"{desc} epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}, "
                       f"train acc {record['train_accuracy']:.4f}"
                       + (f", val acc {record['val_accuracy']:.4f}" if val is not None else "")
                       + f", {record['seconds']:.0f} s")
        if checkpoint:
            ckpt.save_checkpoint(checkpoint, model, opt, epoch + 1, history, settings)
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
