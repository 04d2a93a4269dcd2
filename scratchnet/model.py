"""Sequential: a stack of layers with logits, probabilities at T, and backprop to the input.

A batch flows ``x -> layer 1 -> ... -> logits z``; ``probabilities(x, T)`` is
``softmax(z / T)``. ``backward(dz)`` takes dL/dz back through every layer,
fills each layer's parameter gradients and returns dL/dx, the gradient w.r.t.
the *input image* that every attack is built on.

Saved models are one ``.npz`` file (see ``save`` / ``load`` and the README).
"""
import json
import os

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

    def backward(self, dz, param_grads=True, input_grad=True):
        """Backprop dL/dz (N, K) of the last forward pass; returns dL/dx (N, C, H, W).

        Fills ``layer.grads`` of every layer on the way. May be called several
        times after one forward pass (each call is a vector-Jacobian product).
        ``param_grads=False`` computes only dL/dx, about twice as fast, and
        leaves every ``grads`` empty: what an attack needs.
        ``input_grad=False`` skips dL/dx and returns None: what training needs.
        The first layer then computes only its parameter gradients
        (``need_dx=False``), since no layer below it takes its dx.
        """
        d = dz
        for layer in reversed(self.layers[1:]):
            d = layer.backward(d, param_grads=param_grads)
        first = self.layers[0]
        if input_grad:
            return first.backward(d, param_grads=param_grads)
        first.backward(d, param_grads=param_grads, need_dx=False)
        return None

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
#
# A model file is an uncompressed ``.npz`` (a zip of ``.npy`` arrays) holding
#
#   "__format__"        the string FORMAT
#   "__architecture__"  JSON: a list of {"type", "name", <constructor arguments>}
#   "__metadata__"      JSON: a dict (recipe, T, seed, accuracies, ...)
#   "<layer>.<param>"   every parameter, e.g. "conv1.W" of shape (F, C, KH, KW)
#
# ``load`` trusts nothing in it: every way a file can be damaged or foreign
# ends as one ModelFileError naming the file and the problem, never as a
# TypeError from deep inside the network or, worse, as a model that runs.

# The parameter dtypes a model may have. All parameters share one: the dtype
# decides where the softmax rounds to exactly 1.0 (the saturation the attacks
# run into), so a file that mixes float32 and float64 is rejected rather than
# silently cast; every model ``save`` writes has a single dtype.
PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _non_negative_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _dropout_rate(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


# The constructor arguments each saved layer type carries (what its ``config()``
# writes), with the check its value must pass and what that check means.
LAYER_ARGUMENTS = {
    "Conv2D": {"C": _positive_int, "F": _positive_int, "KH": _positive_int, "KW": _positive_int,
               "stride": _positive_int, "pad": _non_negative_int},
    "MaxPool2D": {"KH": _positive_int, "KW": _positive_int, "stride": _positive_int},
    "Dense": {"D_in": _positive_int, "D_out": _positive_int},
    "ReLU": {}, "Flatten": {},
    "Dropout": {"rate": _dropout_rate},
}
_EXPECTED_VALUE = {_positive_int: "an integer >= 1", _non_negative_int: "an integer >= 0",
                   _dropout_rate: "a number in [0, 1)"}


def parameter_shapes(architecture):
    """The parameter shapes an ``architecture()`` list implies, checking it on the way.

    Nothing is allocated, so a description announcing absurd sizes costs nothing.

    Parameters
    ----------
    architecture : list of dicts as written by ``Sequential.architecture()``

    Returns
    -------
    {"conv1.W": (F, C, KH, KW), "conv1.b": (F,), "dense1.W": (D_in, D_out), ...}

    Raises
    ------
    ValueError saying which layer is malformed and how.
    """
    if not isinstance(architecture, list) or not architecture:
        raise ValueError(f"architecture must be a non-empty list of layers, got {_short(architecture)}")
    shapes, names = {}, set()
    for i, spec in enumerate(architecture):
        if not isinstance(spec, dict):
            raise ValueError(f"architecture layer {i} must be a JSON object, got {_short(spec)}")
        kind, name = spec.get("type"), spec.get("name")
        if not isinstance(kind, str) or kind not in LAYER_ARGUMENTS:
            raise ValueError(f"architecture layer {i}: unknown layer type {_short(kind)}; "
                             f"known: {sorted(LAYER_ARGUMENTS)}")
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"architecture layer {i} ({kind}): the name must be a non-empty string "
                             f"without '.', got {_short(name)}")
        if name in names:
            raise ValueError(f"architecture: two layers are named {name!r}")
        names.add(name)
        arguments = LAYER_ARGUMENTS[kind]
        given = set(spec) - {"type", "name"}
        if given != set(arguments):
            raise ValueError(f"architecture layer {name} ({kind}): expected the arguments {sorted(arguments)}, "
                             f"got {sorted(given)}")
        for arg, ok in arguments.items():
            if not ok(spec[arg]):
                raise ValueError(f"architecture layer {name} ({kind}): {arg} must be {_EXPECTED_VALUE[ok]}, "
                                 f"got {_short(spec[arg])}")
        if kind == "Conv2D":
            shapes[f"{name}.W"] = (spec["F"], spec["C"], spec["KH"], spec["KW"])
            shapes[f"{name}.b"] = (spec["F"],)
        elif kind == "Dense":
            shapes[f"{name}.W"] = (spec["D_in"], spec["D_out"])
            shapes[f"{name}.b"] = (spec["D_out"],)
    return shapes


def check_parameters(params, shapes=None):
    """Check a {name: array} dict of parameters before it is saved or used.

    Every array must be float32 or float64, all of the same dtype, finite
    (a NaN or Inf weight makes every prediction meaningless, and an attack on
    such a model "fails" for no reason), and of the expected shape.

    Parameters
    ----------
    params : {"conv1.W": array, ...}, NumPy arrays
    shapes : {"conv1.W": (F, C, KH, KW), ...} or None to skip the shape check;
        when given, the names must match exactly

    Returns
    -------
    the common dtype. Raises ValueError naming the first offending parameter.
    """
    if shapes is not None and set(params) != set(shapes):
        raise ValueError(f"parameters do not match the architecture (missing {sorted(set(shapes) - set(params))}, "
                         f"unexpected {sorted(set(params) - set(shapes))})")
    dtypes = {}
    for name, value in params.items():
        if not isinstance(value, np.ndarray) or value.dtype not in PARAM_DTYPES:
            found = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise ValueError(f"parameter {name} has dtype {found}; expected float32 or float64 "
                             f"(in the machine's byte order)")
        if shapes is not None and value.shape != tuple(shapes[name]):
            raise ValueError(f"parameter {name} has shape {value.shape}; the architecture says {tuple(shapes[name])}")
        dtypes.setdefault(value.dtype, name)
    if len(dtypes) > 1:
        mixed = ", ".join(f"{dtype} (e.g. {name})" for dtype, name in dtypes.items())
        raise ValueError(f"parameters mix dtypes: {mixed}; a model has one dtype "
                         f"(cast it with model.to(dtype=...) before saving)")
    for name, value in params.items():
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        if bad:
            raise ValueError(f"parameter {name} holds {bad} non-finite value{'s' if bad > 1 else ''} "
                             f"(NaN or Inf) of {value.size}; the model is broken (did its training diverge?)")
    return next(iter(dtypes), np.dtype(np.float32))


def _short(value, limit=60):
    """repr(value), cut to ``limit`` characters: error messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _one_line(text):
    return " ".join(str(text).split())


def save(model, path, metadata=None):
    """Write ``model`` to one ``.npz``: every parameter under its name, plus the
    architecture and free-form metadata as JSON strings.

    The parameters are checked first (``check_parameters``): a model with a
    NaN or Inf weight, or with mixed dtypes, is refused with a ValueError and
    nothing is written. The file is written to a temporary name in the same
    folder and moved into place at the end, so an interrupted save never
    leaves a broken file under ``path`` nor destroys the one already there.
    """
    arrays = {name: to_numpy(v) for name, v in model.params.items()}
    try:
        check_parameters(arrays)
    except ValueError as e:
        raise ValueError(f"refusing to save the model to {os.fspath(path)}: {e}") from None
    arrays["__format__"] = np.array(FORMAT)
    arrays["__architecture__"] = np.array(json.dumps(model.architecture()))
    arrays["__metadata__"] = np.array(json.dumps(metadata or {}))
    save_npz_atomic(path, arrays)


def _read_arrays(path):
    """Every array in the ``.npz`` at ``path``, as {key: NumPy array}; ModelFileError otherwise."""
    if os.path.isdir(path):
        raise ModelFileError(f"model path {path} is a directory, not a model file")
    if not os.path.exists(path):
        raise ModelFileError(f"model file not found: {path}")
    try:
        handle = open(path, "rb")
    except OSError as e:
        raise ModelFileError(f"cannot open model file {path}: {e.strerror or e}") from None
    with handle:
        try:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ModelFileError(f"{path} is not a scratchnet model: it holds a single array, "
                                     f"not an .npz archive")
            with loaded:
                return {key: loaded[key] for key in loaded.files}
        except ModelFileError:
            raise
        except Exception as e:
            # The bytes come from outside: a bad zip header, a failed CRC, a
            # damaged .npy header or an object array all mean one thing here.
            raise ModelFileError(f"cannot read model file {path}: not a complete .npz "
                                 f"({type(e).__name__}: {_one_line(e)})") from None


def _json_entry(arrays, key, path, expected_type):
    """Decode the JSON string stored under ``key``; it must be of ``expected_type``."""
    if key not in arrays:
        raise ModelFileError(f"{path}: damaged model file, the entry {key!r} is missing")
    value = arrays.pop(key)
    if value.shape != () or value.dtype.kind != "U":
        raise ModelFileError(f"{path}: damaged model file, {key!r} must be a JSON string, "
                             f"got a {value.dtype} array of shape {value.shape}")
    try:
        decoded = json.loads(str(value))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: damaged model file, {key!r} is not valid JSON ({e})") from None
    if not isinstance(decoded, expected_type):
        raise ModelFileError(f"{path}: damaged model file, {key!r} must be a JSON "
                             f"{'list' if expected_type is list else 'object'}, got {_short(decoded)}")
    return decoded


def read_metadata(path):
    """The metadata dict of the model file at ``path``, reading nothing else (no weights).

    For listing many files quickly; ``load`` is what checks a model whole.
    Raises ModelFileError for a file that is not a readable scratchnet model.
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("__format__", "__metadata__") if k in f.files}
    except Exception as e:
        raise ModelFileError(f"cannot read model file {path} ({type(e).__name__}: {_one_line(e)})") from None
    tag = arrays.pop("__format__", None)
    if tag is None or tag.shape != () or tag.dtype.kind != "U" or str(tag) != FORMAT:
        raise ModelFileError(f"{path} is not a scratchnet model")
    return _json_entry(arrays, "__metadata__", path, dict)


def load(path, device="cpu"):
    """Rebuild a model saved by ``save``; returns (model, metadata dict).

    The file is checked before anything is built: its format tag, the
    architecture (known layer types, arguments of the right types), the
    parameters (exactly those the architecture implies, of its shapes, one
    float dtype, every value finite).

    Raises
    ------
    ModelFileError, one line naming the file and the problem, for a missing
    file, a directory, a truncated or damaged archive, a foreign file, or a
    model with NaN/Inf/mixed-dtype/misshapen parameters.
    """
    path = os.fspath(path)
    arrays = _read_arrays(path)
    tag = arrays.pop("__format__", None)
    if tag is None or tag.shape != () or tag.dtype.kind != "U" or str(tag) != FORMAT:
        found = "no format tag" if tag is None else _short(str(tag))
        raise ModelFileError(f"{path} is not a scratchnet model (expected format {FORMAT!r}, found {found})")
    architecture = _json_entry(arrays, "__architecture__", path, list)
    metadata = _json_entry(arrays, "__metadata__", path, dict)
    try:
        dtype = check_parameters(arrays, parameter_shapes(architecture))
        model = build(architecture, dtype=dtype)
        model.set_params(arrays)
    except ValueError as e:
        raise ModelFileError(f"{path}: {_one_line(e)}") from None
    return model.to(device), metadata
