"""The small MNIST networks several test modules attack: a 784-64-10 MLP trained in
about a second at T = 1 and at T = 100 (fixed seeds), and the images it gets right.

The fixtures built on them (``mnist``, ``model_T1``, ``model_hot``) live in
``conftest.py`` with session scope, so each network is trained once per run.
"""
import numpy as np

from scratchnet.layers import Dense, Flatten, ReLU
from scratchnet.losses import softmax_cross_entropy
from scratchnet.model import Sequential
from scratchnet.optim import Adam

N_TRAIN = 4000
T_HIGH = 100.0


def small_mlp(seed=0):
    """784 - 64 - ReLU - 10: small and fast; the masking does not need convolutions."""
    rng = np.random.default_rng(seed)
    return Sequential([Flatten(name="flat"), Dense(784, 64, rng=rng, name="dense1"), ReLU(name="relu1"),
                       Dense(64, 10, rng=rng, name="dense2")])


def train(data, T, epochs, lr):
    """Adam on the first N_TRAIN training images, cross-entropy of softmax(z / T)."""
    model, rng = small_mlp(), np.random.default_rng(0)
    opt = Adam(model, lr=lr)
    x, y = data.train_x[:N_TRAIN], data.train_y[:N_TRAIN]
    for _ in range(epochs):
        perm = rng.permutation(N_TRAIN)
        for i in range(0, N_TRAIN, 100):
            b = perm[i:i + 100]
            _, dz = softmax_cross_entropy(model.logits(x[b], train=True), y[b], T)
            model.backward(dz)
            opt.step()
    return model


def correct_images(model, data, n, start=0):
    """The first n test images (from start) the model classifies correctly."""
    x, y = data.test_x[start:start + 5 * n], data.test_y[start:start + 5 * n].astype(np.int64)
    ok = model.predict(x) == y
    return x[ok][:n], y[ok][:n]
