"""Sequential: a stack of layers with logits, probabilities at T, and backprop to the input.

A batch flows ``x -> layer 1 -> ... -> logits z``; ``probabilities(x, T)`` is
``softmax(z / T)``. ``backward(dz)`` takes dL/dz back through every layer,
fills each layer's parameter gradients and returns dL/dx, the gradient w.r.t.
the *input image* that every attack is built on.

Saved models are one ``.npz`` file (see ``save`` / ``load`` and the README).
"""
import json
import os
import zipfile

import numpy as np

from . import functional as F
from .backend import get_array_module, to_device, to_numpy
from .files import save_npz_atomic
from .layers import LAYER_TYPES, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU

FORMAT = "scratchnet-model-v1"


class ModelFileError(ValueError):
    """A model file is missing, truncated, or not a scratchnet model."""


class Sequential:
    """Layers applied in order; parameters addressed as ``"<layer name>.<param>"``."""

    def __init__(self, layers):
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be unique, got {names}")
        self.layers = list(layers)

    # ----- forward -----

    def logits(self, x, train=False):
        """z = the network's output before any softmax, shape (N, K).

        Parameters
        ----------
        x : (N, C, H, W) images on the model's device
        train : bool, True enables dropout
        """
        for layer in self.layers:
            x = layer.forward(x, train=train)
        return x

    def probabilities(self, x, T=1.0):
        """softmax(logits(x) / T), shape (N, K); a deployed model uses T = 1."""
        p, _ = F.softmax_forward(self.logits(x), T)
        return p

    def predict(self, x, batch_size=1000):
        """Class labels, evaluated in batches; returns a NumPy int array (N,)."""
        return np.concatenate([to_numpy(self.logits(x[i:i + batch_size]).argmax(axis=1))
                               for i in range(0, len(x), batch_size)])

    # ----- backward -----

    def backward(self, dz, param_grads=True):
        """Backprop dL/dz (N, K) of the last forward pass; returns dL/dx (N, C, H, W).

        Fills ``layer.grads`` of every layer on the way. May be called several
        times after one forward pass (each call is a vector-Jacobian product).
        ``param_grads=False`` computes only dL/dx, about twice as fast, and
        leaves every ``grads`` empty: what an attack needs.
        """
        d = dz
        for layer in reversed(self.layers):
            d = layer.backward(d, param_grads=param_grads)
        return d

    # ----- parameters -----

    @property
    def params(self):
        """{"conv1.W": array, ...}: the live parameter arrays, by name."""
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.params.items()}

    @property
    def grads(self):
        """{"conv1.W": array, ...}: the gradients from the last ``backward``."""
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.grads.items()}

    def __getitem__(self, name):
        """A layer by name (``model["conv1"]``) or a parameter (``model["conv1.W"]``)."""
        layer_name, _, key = name.partition(".")
        for layer in self.layers:
            if layer.name == layer_name:
                return layer.params[key] if key else layer
        raise KeyError(f"no layer named {layer_name!r}; layers are {[l.name for l in self.layers]}")

    def set_params(self, params):
        """Replace parameters from a {name: array} dict (shapes must match)."""
        for layer in self.layers:
            for k, old in layer.params.items():
                new = params[f"{layer.name}.{k}"]
                if tuple(new.shape) != tuple(old.shape):
                    raise ValueError(f"parameter {layer.name}.{k}: expected shape {tuple(old.shape)}, got {tuple(new.shape)}")
                layer.params[k] = new

    def to(self, device=None, dtype=None):
        """Move (and optionally cast) every parameter; returns self."""
        for layer in self.layers:
            layer.params = {k: to_device(v, device, dtype) for k, v in layer.params.items()}
            layer.grads = {}
        return self

    @property
    def n_classes(self):
        """K, the number of logits: the width of the last Dense layer.

        Read from the weights, not from a forward pass, so asking never
        overwrites the caches the layers keep for the next ``backward``.
        """
        for layer in reversed(self.layers):
            if isinstance(layer, Dense):
                return int(layer.params["W"].shape[1])
        raise ValueError("this network has no Dense layer to read its number of classes from")

    @property
    def dtype(self):
        return next(iter(self.params.values())).dtype

    @property
    def xp(self):
        """The array module the parameters live in."""
        return get_array_module(next(iter(self.params.values())))

    def architecture(self):
        """A JSON-able list describing the layers (type, name, constructor arguments)."""
        return [{"type": type(l).__name__, "name": l.name, **l.config()} for l in self.layers]

    def __repr__(self):
        return "Sequential(\n" + "\n".join(f"  {l.name}: {l!r}" for l in self.layers) + "\n)"


# ===== the reference network =====

def papernot_mnist(seed=0, dtype=np.float32, dropout=0.5):
    """Papernot et al.'s MNIST network (also Carlini and Wagner's):

    conv 3x3 32, ReLU, conv 3x3 32, ReLU, max-pool 2x2,
    conv 3x3 64, ReLU, conv 3x3 64, ReLU, max-pool 2x2,
    dense 200, ReLU, dropout, dense 200, ReLU, dense 10.

    28x28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4, so the flattened size is 64 * 4 * 4 = 1024.
    """
    rng = np.random.default_rng(seed)
    return Sequential([
        Conv2D(1, 32, 3, rng=rng, dtype=dtype, name="conv1"), ReLU(name="relu1"),
        Conv2D(32, 32, 3, rng=rng, dtype=dtype, name="conv2"), ReLU(name="relu2"),
        MaxPool2D(2, name="pool1"),
        Conv2D(32, 64, 3, rng=rng, dtype=dtype, name="conv3"), ReLU(name="relu3"),
        Conv2D(64, 64, 3, rng=rng, dtype=dtype, name="conv4"), ReLU(name="relu4"),
        MaxPool2D(2, name="pool2"),
        Flatten(name="flatten"),
        Dense(1024, 200, rng=rng, dtype=dtype, name="dense1"), ReLU(name="relu5"),
        Dropout(dropout, seed=seed, name="dropout"),
        Dense(200, 200, rng=rng, dtype=dtype, name="dense2"), ReLU(name="relu6"),
        Dense(200, 10, rng=rng, dtype=dtype, name="dense3"),
    ])


def build(architecture, dtype=np.float32):
    """A freshly initialised Sequential from an ``architecture()`` description."""
    layers = []
    for spec in architecture:
        spec = dict(spec)
        kind = spec.pop("type")
        if kind not in LAYER_TYPES:
            raise ValueError(f"unknown layer type {kind!r}; known: {sorted(LAYER_TYPES)}")
        if kind in ("Conv2D", "Dense"):
            spec["dtype"] = dtype
        layers.append(LAYER_TYPES[kind](**spec))
    return Sequential(layers)


# ===== save / load =====

def save(model, path, metadata=None):
    """Write ``model`` to one ``.npz``: every parameter under its name, plus the
    architecture and free-form metadata as JSON strings.

    The file is written to a temporary name in the same folder and moved into
    place at the end, so an interrupted save never leaves a broken file under
    ``path`` nor destroys the one already there.
    """
    arrays = {name: to_numpy(v) for name, v in model.params.items()}
    arrays["__format__"] = np.array(FORMAT)
    arrays["__architecture__"] = np.array(json.dumps(model.architecture()))
    arrays["__metadata__"] = np.array(json.dumps(metadata or {}))
    save_npz_atomic(path, arrays)


def load(path, device="cpu"):
    """Rebuild a model saved by ``save``; returns (model, metadata dict).

    Raises ModelFileError for a missing, truncated or foreign file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"model file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ModelFileError(f"cannot read model file {path}: not a complete .npz ({e})") from None
    if "__format__" not in arrays or str(arrays["__format__"]) != FORMAT:
        raise ModelFileError(f"{path} is not a scratchnet model (expected format {FORMAT!r}, "
                             f"found {str(arrays.get('__format__', 'no format tag'))!r})")
    try:
        architecture = json.loads(str(arrays.pop("__architecture__")))
        metadata = json.loads(str(arrays.pop("__metadata__")))
    except (KeyError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: damaged architecture or metadata ({e})") from None
    arrays.pop("__format__")
    dtype = next(iter(arrays.values())).dtype if arrays else np.float32
    model = build(architecture, dtype=dtype)
    expected, found = set(model.params), set(arrays)
    if expected != found:
        raise ModelFileError(f"{path}: parameters do not match the architecture "
                             f"(missing {sorted(expected - found)}, unexpected {sorted(found - expected)})")
    try:
        model.set_params(arrays)
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from None
    return model.to(device), metadata
