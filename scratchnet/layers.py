"""Layers: thin classes over ``functional`` that own their parameters.

A layer has

* ``params`` and ``grads``: dicts with the same keys (``"W"``, ``"b"``);
* ``forward(x, train=False)``: checks the input, returns y, keeps a cache;
* ``backward(dy, param_grads=True, need_dx=True)``: returns dx, fills
  ``grads``; never modifies ``dy``. Calling it again after the same forward
  gives the same answer (attacks take several vector-Jacobian products of one
  forward pass). ``param_grads=False`` computes dx only and empties ``grads``:
  an attack needs no parameter gradients, and in a convolution they cost as
  much as dx. ``need_dx=False`` skips dx and returns None: in training the
  first layer's input is the image, which takes no gradient, so its dx would
  be computed for nothing (for the Papernot network's first convolution, a fifth
  of its backward pass);
* ``config()``: the constructor arguments, so a model can be saved and rebuilt.
"""
import numpy as np

from . import functional as F
from .backend import get_array_module


def _check_input(layer, x, ndim, axis=None, size=None, what="(N, C, H, W)"):
    """Raise a ValueError naming the layer, what it expects and what it got."""
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        raise ValueError(f"{layer.name}: expected an array of shape {what}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{layer.name}: expected a {ndim}-D input of shape {what}, got shape {tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise ValueError(f"{layer.name}: expected a floating-point input, got dtype {x.dtype}")
    if axis is not None and x.shape[axis] != size:
        raise ValueError(f"{layer.name}: expected shape {what} with {size} at axis {axis}, got shape {tuple(x.shape)}")


class Layer:
    """Base class: no parameters, identity ``config``."""

    def __init__(self, name=None):
        self.name = name or type(self).__name__
        self.params, self.grads, self.cache = {}, {}, None

    def config(self):
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


# ===== Conv2D =====

class Conv2D(Layer):
    """F filters of size KHxKW over C input channels, stride and zero padding.

    Weights are stored as (F, C, KH, KW), bias as (F,); He initialisation.
    """

    def __init__(self, C, F, KH, KW=None, stride=1, pad=0, rng=None, dtype=np.float32, name=None):
        super().__init__(name)
        KW = KH if KW is None else KW
        self.C, self.F, self.KH, self.KW, self.stride, self.pad = C, F, KH, KW, stride, pad
        rng = rng if rng is not None else np.random.default_rng(0)
        std = np.sqrt(2.0 / (C * KH * KW))
        self.params = {"W": (rng.standard_normal((F, C, KH, KW)) * std).astype(dtype),
                       "b": np.zeros(F, dtype=dtype)}

    def config(self):
        return {"C": self.C, "F": self.F, "KH": self.KH, "KW": self.KW, "stride": self.stride, "pad": self.pad}

    def forward(self, x, train=False):
        _check_input(self, x, 4, axis=1, size=self.C, what=f"(N, {self.C}, H, W)")
        if x.shape[2] + 2 * self.pad < self.KH or x.shape[3] + 2 * self.pad < self.KW:
            raise ValueError(f"{self.name}: image {tuple(x.shape[2:])} (padding {self.pad}) "
                             f"is smaller than the {self.KH}x{self.KW} kernel")
        y, self.cache = F.conv2d_forward(x, self.params["W"], self.params["b"], self.stride, self.pad)
        return y

    def backward(self, dy, param_grads=True, need_dx=True):
        dx, dW, db = F.conv2d_backward(dy, self.cache, param_grads, need_dx)
        self.grads = {"W": dW, "b": db} if param_grads else {}
        return dx


# ===== MaxPool2D =====

class MaxPool2D(Layer):
    """Maximum over KHxKW windows moving by ``stride`` (default: the window size)."""

    def __init__(self, KH=2, KW=None, stride=None, name=None):
        super().__init__(name)
        self.KH = KH
        self.KW = KH if KW is None else KW
        self.stride = self.KH if stride is None else stride

    def config(self):
        return {"KH": self.KH, "KW": self.KW, "stride": self.stride}

    def forward(self, x, train=False):
        _check_input(self, x, 4)
        if x.shape[2] < self.KH or x.shape[3] < self.KW:
            raise ValueError(f"{self.name}: image {tuple(x.shape[2:])} is smaller than the {self.KH}x{self.KW} window")
        y, self.cache = F.maxpool_forward(x, self.KH, self.KW, self.stride)
        return y

    def backward(self, dy, param_grads=True, need_dx=True):
        return F.maxpool_backward(dy, self.cache) if need_dx else None


# ===== Dense =====

class Dense(Layer):
    """y = x @ W + b with W of shape (D_in, D_out); He initialisation."""

    def __init__(self, D_in, D_out, rng=None, dtype=np.float32, name=None):
        super().__init__(name)
        self.D_in, self.D_out = D_in, D_out
        rng = rng if rng is not None else np.random.default_rng(0)
        std = np.sqrt(2.0 / D_in)
        self.params = {"W": (rng.standard_normal((D_in, D_out)) * std).astype(dtype),
                       "b": np.zeros(D_out, dtype=dtype)}

    def config(self):
        return {"D_in": self.D_in, "D_out": self.D_out}

    def forward(self, x, train=False):
        _check_input(self, x, 2, axis=1, size=self.D_in, what=f"(N, {self.D_in})")
        y, self.cache = F.dense_forward(x, self.params["W"], self.params["b"])
        return y

    def backward(self, dy, param_grads=True, need_dx=True):
        dx, dW, db = F.dense_backward(dy, self.cache, param_grads, need_dx)
        self.grads = {"W": dW, "b": db} if param_grads else {}
        return dx


# ===== ReLU, Flatten, Dropout =====

class ReLU(Layer):
    """y = max(x, 0)."""

    def forward(self, x, train=False):
        if getattr(x, "dtype", None) is None or x.dtype.kind != "f":
            raise ValueError(f"{self.name}: expected a floating-point array, got {getattr(x, 'dtype', type(x).__name__)}")
        y, self.cache = F.relu_forward(x)
        return y

    def backward(self, dy, param_grads=True, need_dx=True):
        return F.relu_backward(dy, self.cache) if need_dx else None


class Flatten(Layer):
    """(N, C, H, W) -> (N, C * H * W)."""

    def forward(self, x, train=False):
        if getattr(x, "ndim", 0) < 2:
            raise ValueError(f"{self.name}: expected an input of shape (N, ...), got {getattr(x, 'shape', type(x).__name__)}")
        y, self.cache = F.flatten_forward(x)
        return y

    def backward(self, dy, param_grads=True, need_dx=True):
        return F.flatten_backward(dy, self.cache) if need_dx else None


class Dropout(Layer):
    """Inverted dropout: active only with ``train=True``; the identity at evaluation."""

    def __init__(self, rate=0.5, seed=0, name=None):
        super().__init__(name)
        if not 0 <= rate < 1:
            raise ValueError(f"{self.name}: rate must be in [0, 1), got {rate}")
        self.rate, self.seed, self._rngs = rate, seed, {}

    def config(self):
        return {"rate": self.rate}

    def reseed(self, seed):
        """Restart the mask sequence (for reproducible training)."""
        self.seed, self._rngs = seed, {}

    def forward(self, x, train=False):
        if not train or self.rate == 0:
            self.cache = None
            return x
        xp = get_array_module(x)
        if xp not in self._rngs:            # one generator per array module, created where the data is
            self._rngs[xp] = xp.random.default_rng(self.seed)
        y, self.cache = F.dropout_forward(x, self.rate, self._rngs[xp])
        return y

    def backward(self, dy, param_grads=True, need_dx=True):
        if not need_dx:
            return None
        return dy if self.cache is None else F.dropout_backward(dy, self.cache)


LAYER_TYPES = {cls.__name__: cls for cls in (Conv2D, MaxPool2D, Dense, ReLU, Flatten, Dropout)}
