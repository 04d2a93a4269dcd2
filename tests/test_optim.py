"""The optimisers against their update rules written out by hand, in float64."""
import numpy as np

from scratchnet.optim import SGD, Adam


class Params:
    """The two dicts an optimiser reads: ``params`` (updated in place) and ``grads``."""

    def __init__(self, w):
        self.params = {"w": w}
        self.grads = {}


def test_adam_matches_kingma_and_ba_with_bias_correction():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    w0 = np.array([0.5, -1.0, 2.0])
    grads = [np.array([0.3, -2.0, 1e-3]), np.array([-0.1, 4.0, 2e-3]), np.array([0.2, 0.5, -1e-3])]
    model = Params(w0.copy())
    opt = Adam(model, lr=lr, beta1=b1, beta2=b2, eps=eps)
    w, m, v = w0.copy(), np.zeros(3), np.zeros(3)
    for t, g in enumerate(grads, start=1):
        model.grads = {"w": g}
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(model.params["w"], w, rtol=1e-13, atol=0)
    # the first step is lr * g / |g| per entry whatever the gradient's size: the
    # property that lets Adam train at T = 100 without rescaling the learning rate
    model = Params(w0.copy())
    model.grads = {"w": grads[0]}
    Adam(model, lr=lr).step()
    np.testing.assert_allclose(w0 - model.params["w"], lr * np.sign(grads[0]), rtol=1e-4)


def test_sgd_with_momentum_and_weight_decay_matches_its_rule():
    lr, mu, wd = 0.1, 0.9, 0.01
    w0 = np.array([1.0, -2.0])
    model = Params(w0.copy())
    opt = SGD(model, lr=lr, momentum=mu, weight_decay=wd)
    w, vel = w0.copy(), np.zeros(2)
    for g in (np.array([0.5, 0.25]), np.array([-1.0, 2.0])):
        model.grads = {"w": g}
        opt.step()
        vel = mu * vel - lr * (g + wd * w)
        w = w + vel
        np.testing.assert_allclose(model.params["w"], w, rtol=1e-14)
