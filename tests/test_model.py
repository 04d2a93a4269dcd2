"""The Sequential model: construction, save/load, bad input, device choice, a short training run."""
import os

import numpy as np
import pytest

from scratchnet import backend
from scratchnet.layers import Conv2D, Dense, MaxPool2D, ReLU
from scratchnet.losses import softmax_cross_entropy
from scratchnet.model import ModelFileError, load, papernot_mnist, save
from scratchnet.optim import SGD, Adam


def test_papernot_architecture_shapes():
    model = papernot_mnist()
    x = np.zeros((3, 1, 28, 28), dtype=np.float32)
    z = model.logits(x)
    assert z.shape == (3, 10) and z.dtype == np.float32
    assert model["conv1.W"].shape == (32, 1, 3, 3)
    assert model["conv4.W"].shape == (64, 64, 3, 3)
    assert model["dense1.W"].shape == (1024, 200)         # y = x @ W + b
    assert model["dense3.W"].shape == (200, 10)
    n_params = sum(v.size for v in model.params.values())
    assert n_params == 320 + 9248 + 18496 + 36928 + 205000 + 40200 + 2010


def test_probabilities_at_T():
    model = papernot_mnist(seed=2)
    x = np.random.default_rng(0).random((4, 1, 28, 28)).astype(np.float32)
    z = model.logits(x)
    for T in (1.0, 7.0):
        p = model.probabilities(x, T)
        e = np.exp((z - z.max(axis=1, keepdims=True)) / T)
        np.testing.assert_allclose(p, e / e.sum(axis=1, keepdims=True), rtol=1e-5)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = papernot_mnist(seed=4)
    path = tmp_path / "m.npz"
    meta = {"recipe": "temperature", "T": 20.0, "test_accuracy": 0.99}
    save(model, path, metadata=meta)
    loaded, got_meta = load(path)
    assert got_meta == meta
    assert loaded.architecture() == model.architecture()
    for name, v in model.params.items():
        assert loaded[name].dtype == v.dtype
        np.testing.assert_array_equal(loaded[name], v)
    x = np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(loaded.logits(x), model.logits(x))
    # the file is a plain npz other tools can read without scratchnet
    with np.load(path) as f:
        assert f["conv1.W"].shape == (32, 1, 3, 3) and f["dense1.W"].shape == (1024, 200)


def test_load_errors(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load(tmp_path / "missing.npz")
    good = tmp_path / "good.npz"
    save(papernot_mnist(), good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(ModelFileError, match="not a complete .npz"):
        load(truncated)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.zeros(3))
    with pytest.raises(ModelFileError, match="not a scratchnet model"):
        load(foreign)
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(ModelFileError):
        load(text)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    save(papernot_mnist(seed=1), path, metadata={"v": 1})
    before = path.read_bytes()

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save(papernot_mnist(seed=2), path, metadata={"v": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]      # no temporary left behind


@pytest.mark.parametrize("layer,x,match", [
    (Conv2D(3, 4, 3), np.zeros((2, 1, 8, 8), np.float32), r"Conv2D.*\(N, 3, H, W\).*\(2, 1, 8, 8\)"),
    (Conv2D(1, 4, 3), np.zeros((1, 8, 8), np.float32), r"4-D input.*\(1, 8, 8\)"),
    (Conv2D(1, 4, 3), np.zeros((1, 1, 8, 8), np.int32), "floating-point.*int32"),
    (Conv2D(1, 4, 5), np.zeros((1, 1, 3, 3), np.float32), "smaller than the 5x5 kernel"),
    (Dense(10, 2), np.zeros((4, 11), np.float32), r"\(N, 10\).*\(4, 11\)"),
    (Dense(10, 2), np.zeros((4, 1, 10), np.float32), "2-D input"),
    (MaxPool2D(2), np.zeros((4, 10), np.float32), "4-D input"),
    (ReLU(), np.zeros(3, np.uint8), "floating-point"),
])
def test_bad_input_names_layer_and_shapes(layer, x, match):
    with pytest.raises(ValueError, match=match) as info:
        layer.forward(x)
    assert layer.name in str(info.value)


def test_model_error_names_the_layer():
    model = papernot_mnist()
    with pytest.raises(ValueError, match=r"conv1: expected .*\(N, 1, H, W\).*got shape \(2, 3, 28, 28\)"):
        model.logits(np.zeros((2, 3, 28, 28), np.float32))


def test_float64_end_to_end():
    model = papernot_mnist(dtype=np.float64)
    x = np.random.default_rng(0).random((2, 1, 28, 28))
    z = model.logits(x)
    _, dz = softmax_cross_entropy(z, np.array([1, 2]))
    dx = model.backward(dz)
    assert z.dtype == dx.dtype == np.float64
    assert all(g.dtype == np.float64 for g in model.grads.values())
    m32 = papernot_mnist(dtype=np.float64).to(dtype=np.float32)
    assert m32.dtype == np.float32


def test_gpu_request_without_gpu_is_a_clear_error(monkeypatch):
    ok, reason = backend.gpu_available()
    if ok:
        pytest.skip("a CUDA device is present; the error path cannot be exercised")
    with pytest.raises(backend.DeviceError, match="GPU was requested"):
        backend.resolve_device("gpu")
    monkeypatch.setenv("SCRATCHNET_DEVICE", "gpu")
    with pytest.raises(backend.DeviceError):
        backend.resolve_device()
    monkeypatch.setenv("SCRATCHNET_DEVICE", "auto")
    assert backend.resolve_device() == "cpu"
    with pytest.raises(ValueError, match="device must be one of"):
        backend.resolve_device("tpu")


def _blobs(n, seed):
    """A small synthetic 10-class image problem: each class lights its own 3x3 patch."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.random((n, 1, 12, 12)).astype(np.float32) * 0.3
    for i, c in enumerate(y):
        r, s = divmod(int(c), 4)
        x[i, 0, 3 * r:3 * r + 3, 3 * s:3 * s + 3] += 0.7
    return x, y


@pytest.mark.parametrize("optimizer", [SGD, Adam])
def test_short_training_run_loss_falls(optimizer):
    from scratchnet.layers import Flatten
    from scratchnet.model import Sequential
    rng = np.random.default_rng(0)
    model = Sequential([Conv2D(1, 8, 3, rng=rng, name="conv"), ReLU(name="relu"), MaxPool2D(2, name="pool"),
                        Flatten(name="flat"), Dense(8 * 5 * 5, 10, rng=rng, name="out")])
    x, y = _blobs(512, 0)
    opt = optimizer(model, lr=0.05 if optimizer is SGD else 1e-2)
    losses = []
    for epoch in range(5):
        for i in range(0, len(x), 64):
            loss, dz = softmax_cross_entropy(model.logits(x[i:i + 64], train=True), y[i:i + 64])
            model.backward(dz)
            opt.step()
            losses.append(loss)
    assert np.mean(losses[-8:]) < 0.25 * np.mean(losses[:8]), (losses[:8], losses[-8:])
    xt, yt = _blobs(256, 1)
    assert (model.predict(xt) == yt).mean() > 0.9
