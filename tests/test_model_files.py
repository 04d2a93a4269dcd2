"""Model files that must not load: NaN/Inf weights, mixed dtypes, damaged archives, directories.

Every problem ends as one ``ModelFileError`` line naming the file; ``save``
refuses to write a model that ``load`` would reject. A seeded fuzz test
corrupts a saved model in many ways (bytes, keys, shapes, dtypes, JSON) and
checks that nothing but a ModelFileError ever escapes, and that what does
load is a finite, well-formed model.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scratchnet import cli
from scratchnet.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from scratchnet.model import (FORMAT, PARAM_DTYPES, ModelFileError, Sequential, load, parameter_shapes,
                              save)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(seed=0, dtype=np.float32):
    """(N, 1, 8, 8) -> conv 3x3 2 -> 6x6 -> pool 2 -> 3x3 -> 18 -> dense 3: small files, fast loads."""
    rng = np.random.default_rng(seed)
    return Sequential([Conv2D(1, 2, 3, rng=rng, dtype=dtype, name="conv"), ReLU(name="relu"),
                       MaxPool2D(2, name="pool"), Flatten(name="flat"),
                       Dense(18, 3, rng=rng, dtype=dtype, name="out")])


def model_arrays(model, metadata=None):
    """What ``save`` writes, as a dict we can damage before writing it ourselves."""
    arrays = {name: np.array(v) for name, v in model.params.items()}
    arrays["__format__"] = np.array(FORMAT)
    arrays["__architecture__"] = np.array(json.dumps(model.architecture()))
    arrays["__metadata__"] = np.array(json.dumps(metadata or {"recipe": "standard"}))
    return arrays


def write(path, arrays):
    np.savez(path, **arrays)
    return path


def assert_one_line_model_error(path, match=None):
    with pytest.raises(ModelFileError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    if match:
        assert match in message, message
    return message


# ===== NaN and Inf =====

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_weight_is_rejected_naming_file_and_parameter(tmp_path, bad):
    arrays = model_arrays(tiny_model())
    arrays["out.W"][4, 1] = bad
    path = write(tmp_path / "broken.npz", arrays)
    message = assert_one_line_model_error(path, "out.W")
    assert "non-finite" in message and "1 non-finite value " in message


def test_save_refuses_a_model_with_nan_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.npz"
    save(tiny_model(seed=1), path, metadata={"v": 1})
    before = path.read_bytes()
    broken = tiny_model(seed=2)
    broken["conv.b"][0] = np.nan
    with pytest.raises(ValueError, match=r"refusing to save .*m\.npz.*conv\.b.*non-finite"):
        save(broken, path, metadata={"v": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]         # no temporary left behind
    with pytest.raises(ValueError, match="non-finite"):
        save(broken, tmp_path / "new.npz")
    assert not (tmp_path / "new.npz").exists()


def test_evaluate_a_nan_model_is_one_line_not_an_accuracy(tmp_path):
    """The command line, run as a user runs it: a non-zero exit and one line, before any data is read."""
    arrays = model_arrays(tiny_model())
    arrays["conv.W"][:] = np.nan
    path = write(tmp_path / "nan-model.npz", arrays)
    env = dict(os.environ, SCRATCHNET_DATA=str(tmp_path / "no-data"))
    result = subprocess.run([sys.executable, "-m", "scratchnet", "evaluate", str(path), "--no-download"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode != 0
    assert result.stdout == ""                                       # no accuracy is printed
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "nan-model.npz" in result.stderr and "conv.W" in result.stderr and "non-finite" in result.stderr


# ===== one dtype =====

def test_mixed_float_dtypes_are_rejected_on_load_and_on_save(tmp_path):
    arrays = model_arrays(tiny_model())
    arrays["out.b"] = arrays["out.b"].astype(np.float64)
    path = write(tmp_path / "mixed.npz", arrays)
    message = assert_one_line_model_error(path, "mix dtypes")
    assert "float32" in message and "float64" in message and "out.b" in message
    model = tiny_model()
    model["out"].params["b"] = model["out.b"].astype(np.float64)
    with pytest.raises(ValueError, match="mix dtypes"):
        save(model, tmp_path / "mixed-save.npz")
    assert not (tmp_path / "mixed-save.npz").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_single_dtype_model_loads_in_its_dtype(tmp_path, dtype):
    model = tiny_model(dtype=dtype)
    save(model, tmp_path / "m.npz")
    loaded, _ = load(tmp_path / "m.npz")
    assert loaded.dtype == dtype and all(v.dtype == dtype for v in loaded.params.values())


# ===== paths and damaged archives =====

def test_a_directory_is_named_as_a_directory(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    message = assert_one_line_model_error(folder, "is a directory")
    assert "not found" not in message
    assert_one_line_model_error(tmp_path / "absent.npz", "not found")


def _layer(arrays, i, **changes):
    architecture = json.loads(str(arrays["__architecture__"]))
    architecture[i].update(changes)
    arrays["__architecture__"] = np.array(json.dumps(architecture))


def _damage(kind):
    """One named way to damage ``model_arrays(tiny_model())`` in place, and what the error must say."""
    def apply(arrays):
        if kind == "no architecture":
            del arrays["__architecture__"]
        elif kind == "no metadata":
            del arrays["__metadata__"]
        elif kind == "no format":
            del arrays["__format__"]
        elif kind == "format is a number":
            arrays["__format__"] = np.array(1)
        elif kind == "architecture is a dict":
            arrays["__architecture__"] = np.array(json.dumps({"type": "Dense"}))
        elif kind == "architecture is empty":
            arrays["__architecture__"] = np.array("[]")
        elif kind == "architecture is not JSON":
            arrays["__architecture__"] = np.array("[{'type': Conv2D")
        elif kind == "architecture is an int array":
            arrays["__architecture__"] = np.arange(3)
        elif kind == "metadata is a list":
            arrays["__metadata__"] = np.array("[1, 2]")
        elif kind == "layer is a string":
            arrays["__architecture__"] = np.array(json.dumps(["Conv2D"]))
        elif kind == "channels as a string":
            _layer(arrays, 0, C="1")
        elif kind == "channels as a bool":
            _layer(arrays, 0, F=True)
        elif kind == "kernel as a float":
            _layer(arrays, 0, KH=3.0)
        elif kind == "negative padding":
            _layer(arrays, 0, pad=-1)
        elif kind == "unknown layer type":
            _layer(arrays, 1, type="Softplus")
        elif kind == "layer type is a list":
            _layer(arrays, 1, type=["ReLU"])
        elif kind == "name is a number":
            _layer(arrays, 1, name=7)
        elif kind == "duplicate name":
            _layer(arrays, 1, name="conv")
        elif kind == "missing argument":
            architecture = json.loads(str(arrays["__architecture__"]))
            del architecture[4]["D_out"]
            arrays["__architecture__"] = np.array(json.dumps(architecture))
        elif kind == "extra argument":
            _layer(arrays, 2, dilation=2)
        elif kind == "missing parameter":
            del arrays["out.b"]
        elif kind == "extra parameter":
            arrays["out.gamma"] = np.ones(3, np.float32)
        elif kind == "wrong shape":
            arrays["out.W"] = arrays["out.W"].T.copy()
        elif kind == "wrong rank":
            arrays["conv.b"] = arrays["conv.b"][None]
        elif kind == "int weights":
            arrays["out.W"] = arrays["out.W"].astype(np.int32)
        elif kind == "complex weights":
            arrays["out.W"] = arrays["out.W"].astype(np.complex64)
        elif kind == "string weights":
            arrays["out.b"] = np.array(["a", "b", "c"])
        elif kind == "object weights":
            arrays["out.b"] = np.array([1.0, None, "x"], dtype=object)
        elif kind == "size mismatch with architecture":
            _layer(arrays, 4, D_out=4)
        else:
            raise AssertionError(kind)
    return apply


DAMAGE = {
    "no architecture": "'__architecture__' is missing",
    "no metadata": "'__metadata__' is missing",
    "no format": "not a scratchnet model",
    "format is a number": "not a scratchnet model",
    "architecture is a dict": "must be a JSON list",
    "architecture is empty": "non-empty list",
    "architecture is not JSON": "not valid JSON",
    "architecture is an int array": "must be a JSON string",
    "metadata is a list": "must be a JSON object",
    "layer is a string": "must be a JSON object",
    "channels as a string": "C must be an integer >= 1, got '1'",
    "channels as a bool": "F must be an integer >= 1, got True",
    "kernel as a float": "KH must be an integer >= 1, got 3.0",
    "negative padding": "pad must be an integer >= 0",
    "unknown layer type": "unknown layer type 'Softplus'",
    "layer type is a list": "unknown layer type ['ReLU']",
    "name is a number": "the name must be a non-empty string",
    "duplicate name": "two layers are named 'conv'",
    "missing argument": "expected the arguments ['D_in', 'D_out'], got ['D_in']",
    "extra argument": "expected the arguments ['KH', 'KW', 'stride'], got ['KH', 'KW', 'dilation', 'stride']",
    "missing parameter": "missing ['out.b']",
    "extra parameter": "unexpected ['out.gamma']",
    "wrong shape": "out.W has shape (3, 18); the architecture says (18, 3)",
    "wrong rank": "conv.b has shape (1, 2)",
    "int weights": "out.W has dtype int32; expected float32 or float64",
    "complex weights": "out.W has dtype complex64",
    "string weights": "out.b has dtype <U1",
    "object weights": "not a complete .npz",
    "size mismatch with architecture": "the architecture says (18, 4)",
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_each_kind_of_damage_is_one_named_line(tmp_path, kind):
    arrays = model_arrays(tiny_model())
    _damage(kind)(arrays)
    path = write(tmp_path / "damaged.npz", arrays)
    assert_one_line_model_error(path, DAMAGE[kind])


def test_a_single_npy_array_is_not_a_model(tmp_path):
    path = tmp_path / "weights.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    assert_one_line_model_error(path, "single array")


def test_an_empty_file_is_not_a_model(tmp_path):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    assert_one_line_model_error(path, "not a complete .npz")


def test_cli_evaluate_a_directory_is_one_line(tmp_path, capsys):
    status = cli.main(["evaluate", str(tmp_path)])
    err = capsys.readouterr().err
    assert status != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "is a directory" in err and str(tmp_path) in err


# ===== fuzz: nothing but ModelFileError escapes =====

# Corruptions that always leave a model unusable: load must refuse every one.
ALWAYS_FATAL = {"delete key", "reshape", "bad dtype", "non-finite", "mixed dtype", "garble json", "truncate",
                "extra key"}


def _corrupt(rng, arrays, raw):
    """One random corruption. Returns (kind, arrays or None, bytes or None): write the arrays, or the bytes."""
    kinds = ["flip bytes", "truncate", "delete key", "reshape", "bad dtype", "non-finite", "mixed dtype",
             "garble json", "json types", "extra key", "flip array bits"]
    kind = kinds[rng.integers(len(kinds))]
    params = [k for k in arrays if not k.startswith("__")]
    if kind == "flip bytes":
        data = bytearray(raw)
        for i in rng.integers(0, len(data), rng.integers(1, 9)):
            data[i] ^= int(rng.integers(1, 256))
        return kind, None, bytes(data)
    if kind == "truncate":
        return kind, None, raw[:rng.integers(0, len(raw))]
    arrays = dict(arrays)
    if kind == "delete key":
        del arrays[list(arrays)[rng.integers(len(arrays))]]
    elif kind == "reshape":
        name = params[rng.integers(len(params))]
        a = arrays[name]
        choice = rng.integers(3)
        arrays[name] = (a.reshape(-1) if a.ndim > 1 else a[None]) if choice == 0 else \
            np.concatenate([a.reshape(-1), a.reshape(-1)[:1]]) if choice == 1 else a.reshape(-1)[:-1]
    elif kind == "bad dtype":
        name = params[rng.integers(len(params))]
        dtype = [np.int32, np.int64, np.uint8, np.bool_, np.float16, np.complex64, np.complex128, ">f4" if
                 np.little_endian else "<f4", "U8", object][rng.integers(10)]
        arrays[name] = arrays[name].astype(dtype)
    elif kind == "non-finite":
        name = params[rng.integers(len(params))]
        a = arrays[name].copy()
        a.reshape(-1)[rng.integers(a.size)] = [np.nan, np.inf, -np.inf][rng.integers(3)]
        arrays[name] = a
    elif kind == "mixed dtype":
        name = params[rng.integers(len(params))]
        arrays[name] = arrays[name].astype(np.float64)
    elif kind == "garble json":
        key = ["__architecture__", "__metadata__"][rng.integers(2)]
        text = str(arrays[key])
        cut = rng.integers(1, len(text))
        arrays[key] = np.array(text[:cut] + "}{"[rng.integers(2)] + "\x00" + text[cut + 1:])
    elif kind == "json types":
        architecture = json.loads(str(arrays["__architecture__"]))
        junk = [None, "3", 3.5, -1, 0, True, [], {}, 1e300, "Conv2D", 10 ** 30, [2, 2]][rng.integers(12)]
        where = rng.integers(3)
        if where == 0:
            architecture = junk
        elif where == 1:
            layer = architecture[rng.integers(len(architecture))]
            layer[list(layer)[rng.integers(len(layer))]] = junk
        else:
            architecture[rng.integers(len(architecture))] = junk
        arrays["__architecture__"] = np.array(json.dumps(architecture))
    elif kind == "flip array bits":
        # a damaged weight behind a valid CRC: a finite value loads, a NaN or Inf must not
        name = params[rng.integers(len(params))]
        a = arrays[name].copy()
        a.view(np.uint8).reshape(-1)[rng.integers(a.nbytes)] ^= np.uint8(rng.integers(1, 256))
        arrays[name] = a
    elif kind == "extra key":
        arrays[["__extra__", "conv.W2", "out.b.b"][rng.integers(3)]] = np.zeros(2, np.float32)
    return kind, arrays, None


def test_fuzz_corrupted_model_files_raise_only_model_file_error(tmp_path):
    model = tiny_model(seed=3)
    good = tmp_path / "good.npz"
    save(model, good, metadata={"recipe": "temperature", "T": 20.0})
    raw = good.read_bytes()
    arrays = model_arrays(model, {"recipe": "temperature", "T": 20.0})
    rng = np.random.default_rng(2024)
    outcomes = {}
    for trial in range(200):
        kind, damaged, data = _corrupt(rng, arrays, raw)
        path = tmp_path / f"fuzz-{trial}.npz"
        if data is not None:
            path.write_bytes(data)
        else:
            np.savez(path, **damaged)
        try:
            loaded, meta = load(path)
        except ModelFileError as e:
            message = str(e)
            assert str(path) in message and "\n" not in message, (kind, message)
            outcomes.setdefault(kind, []).append("error")
            continue
        # Anything else escaping above fails the test with its traceback. A file that loads
        # must hold a finite, single-dtype model whose parameters fit its architecture.
        assert kind not in ALWAYS_FATAL, (trial, kind)
        shapes = parameter_shapes(loaded.architecture())
        assert {k: v.shape for k, v in loaded.params.items()} == shapes, (trial, kind)
        assert len({v.dtype for v in loaded.params.values()}) == 1 and loaded.dtype in PARAM_DTYPES
        assert all(np.isfinite(v).all() for v in loaded.params.values()), (trial, kind)
        assert isinstance(meta, dict)
        outcomes.setdefault(kind, []).append("loaded")
    # the seeded draw covers every kind of corruption, and most of them are refused
    assert len(outcomes) == 11, sorted(outcomes)
    assert sum(o.count("error") for o in outcomes.values()) > 150, outcomes
