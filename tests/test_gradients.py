"""Every backward pass against central differences, in float64.

Each test draws a random ``dy`` and compares ``backward(dy)`` with the
numerical vector-Jacobian product ``d/dx sum(dy * forward(x))`` (and the same
for every parameter). Inputs to ReLU and max pooling are a shuffled linspace,
so no kink or tie lies within h of any input.
"""
import numpy as np
import pytest

from scratchnet import functional as F
from scratchnet.gradcheck import assert_close_gradients, directional_check, numerical_vjp, rel_error
from scratchnet.layers import Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from scratchnet.losses import softmax_cross_entropy
from scratchnet.model import papernot_mnist

TOL = 1e-7


def spread(shape, seed=0, low=-1.0, high=1.0):
    """Distinct, well-separated values in random order (no ties, no kinks near 0)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    values = np.linspace(low, high, n)
    values += (high - low) / (4 * n) * np.sign(values + 1e-300)   # push the middle value off 0
    return rng.permutation(values).reshape(shape)


def check_layer(layer, x, seed=1):
    """VJP check of a layer w.r.t. its input and every parameter."""
    rng = np.random.default_rng(seed)
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    dy_before = dy.copy()
    dx = layer.backward(dy)
    np.testing.assert_array_equal(dy, dy_before, err_msg=f"{layer.name}.backward modified dy")
    assert_close_gradients(dx, numerical_vjp(layer.forward, x, dy), TOL, f"{layer.name} dx", inputs=x)
    for name, p in layer.params.items():
        numeric = numerical_vjp(lambda _: layer.forward(x), p, dy)
        assert_close_gradients(layer.grads[name], numeric, TOL, f"{layer.name} d{name}")


# ===== layers =====

@pytest.mark.parametrize("stride,pad", [(1, 0), (1, 1), (2, 1), (3, 2)])
def test_conv2d(stride, pad):
    layer = Conv2D(3, 4, 3, 2, stride=stride, pad=pad, rng=np.random.default_rng(0), dtype=np.float64)
    layer.params["b"] = np.random.default_rng(5).standard_normal(4)
    check_layer(layer, spread((2, 3, 7, 6)))


@pytest.mark.parametrize("k,stride", [(2, 2), (3, 2), (2, 1), (3, 3)])
def test_maxpool(k, stride):
    check_layer(MaxPool2D(k, stride=stride), spread((2, 3, 7, 8)))


def test_dense():
    layer = Dense(7, 5, rng=np.random.default_rng(0), dtype=np.float64)
    layer.params["b"] = np.random.default_rng(5).standard_normal(5)
    check_layer(layer, spread((4, 7)))


def test_relu():
    check_layer(ReLU(), spread((3, 4, 5)))


def test_relu_of_the_gpu_kernel_table_equals_the_reference():
    """The GPU table takes relu_forward from ``kernels``' generic version (array methods
    only, so it runs on NumPy here); it must equal the reference, NaN and -0.0 included."""
    from scratchnet import kernels
    from scratchnet.kernels import reference
    generic = kernels._generic_kernels(reference.im2col, reference.col2im)
    x = np.concatenate([spread((40,)), [np.nan, -0.0, 0.0, -np.inf, np.inf]])
    y_generic, y_reference = generic["relu_forward"](x), reference.relu_forward(x)
    np.testing.assert_array_equal(y_generic, y_reference)
    np.testing.assert_array_equal(np.signbit(y_generic[:-5]), np.signbit(y_reference[:-5]))


def test_relu_on_the_gpu_equals_the_cpu():
    from scratchnet.backend import gpu_available
    ok, reason = gpu_available()
    if not ok:
        pytest.skip(f"no GPU: {reason}")
    import cupy
    x = spread((2, 3, 5, 7))
    dy = np.random.default_rng(3).standard_normal(x.shape)
    cpu, gpu = ReLU(name="cpu"), ReLU(name="gpu")
    np.testing.assert_array_equal(cupy.asnumpy(gpu.forward(cupy.asarray(x))), cpu.forward(x))
    np.testing.assert_array_equal(cupy.asnumpy(gpu.backward(cupy.asarray(dy))), cpu.backward(dy))


@pytest.mark.parametrize("stride,pad", [(1, 0), (2, 1), (3, 2)])
def test_conv2d_forward_is_the_sum_over_the_kernel_window(stride, pad):
    """y[n, f, i, j] = b[f] + sum_{c, u, v} xpad[n, c, i s + u, j s + v] W[f, c, u, v],
    written as the definition's loops, in float64 (cross-correlation: no kernel flip)."""
    rng = np.random.default_rng(0)
    N, C, H, W_, F_, KH, KW = 2, 3, 7, 6, 4, 3, 2
    x, W, b = rng.standard_normal((N, C, H, W_)), rng.standard_normal((F_, C, KH, KW)), rng.standard_normal(F_)
    y, _ = F.conv2d_forward(x, W, b, stride=stride, pad=pad)
    xpad = np.zeros((N, C, H + 2 * pad, W_ + 2 * pad))
    xpad[:, :, pad:pad + H, pad:pad + W_] = x
    OH, OW = (H + 2 * pad - KH) // stride + 1, (W_ + 2 * pad - KW) // stride + 1
    expected = np.zeros((N, F_, OH, OW))
    for n in range(N):
        for f in range(F_):
            for i in range(OH):
                for j in range(OW):
                    total = b[f]
                    for c in range(C):
                        for u in range(KH):
                            for v in range(KW):
                                total += xpad[n, c, i * stride + u, j * stride + v] * W[f, c, u, v]
                    expected[n, f, i, j] = total
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_flatten():
    check_layer(Flatten(), spread((2, 3, 4, 5)))


def test_dropout_train_mask_and_gradient():
    layer = Dropout(0.5, seed=3)
    x = spread((50, 40))
    y = layer.forward(x, train=True)
    mask = layer.cache["mask"]
    # kept units are scaled by 1 / (1 - rate); about half are dropped
    assert set(np.unique(mask)) == {0.0, 2.0}
    assert 0.4 < (mask == 0).mean() < 0.6
    np.testing.assert_array_equal(y, x * mask)
    dy = np.random.default_rng(0).standard_normal(x.shape)
    np.testing.assert_array_equal(layer.backward(dy), dy * mask)
    # evaluation mode is the identity, forward and backward
    np.testing.assert_array_equal(layer.forward(x, train=False), x)
    np.testing.assert_array_equal(layer.backward(dy), dy)


# ===== softmax at temperature T =====

@pytest.mark.parametrize("T", [1.0, 2.5, 20.0, 100.0])
def test_softmax_at_T(T):
    z = np.random.default_rng(0).standard_normal((4, 10)) * 3
    z[0, :3] = [-1000.0, 1.0, 0.5]                       # extreme logits must not overflow
    dp = np.random.default_rng(1).standard_normal(z.shape)
    p, cache = F.softmax_forward(z, T)
    assert np.all(np.isfinite(p)) and np.allclose(p.sum(axis=1), 1)
    dz = F.softmax_backward(dp, cache)
    numeric = numerical_vjp(lambda z_: F.softmax_forward(z_, T)[0], z, dp)
    assert_close_gradients(dz, numeric, TOL, f"softmax at T={T}")


def test_softmax_gradient_shrinks_with_T_as_predicted():
    """The saturation mechanism, measured: a network trained at T has logits
    about T times larger, z_T = T z_1. Deployed at T = 1, the gradient of the
    top probability w.r.t. the runner-up logit is -p_top p_2, and for a large
    margin m between them p_2 ~ exp(-m), so

        |dp_top/dz_2| at z_T = p_top p_2  ~  exp(-T m),

    so the ratio to the T = 1 network is about exp(-(T - 1) m).

    Measured here in float64, for several margins and temperatures."""
    K = 10
    for m in (0.5, 1.0, 2.0):
        z1 = np.zeros((1, K))
        z1[0, 0] = m                                     # top class 0, margin m over nine equal others
        for T in (2, 5, 10, 20):
            grads = []
            for z in (z1, T * z1):
                p, cache = F.softmax_forward(z, 1.0)      # deployed at T = 1
                dp = np.zeros_like(p)
                dp[0, 0] = 1.0
                grads.append(abs(F.softmax_backward(dp, cache)[0, 1]))
            measured = np.log(grads[1] / grads[0])
            # exact: p_top p_2 with p_2 = 1 / (exp(m) + 9) at scale 1, 1 / (exp(Tm) + 9) at scale T
            predicted = np.log((np.exp(m) + 9) ** 2 / (np.exp(T * m) + 9) ** 2 * np.exp(T * m - m))
            assert abs(measured - predicted) < 1e-9 * max(1, abs(predicted)), (m, T, measured, predicted)
            if T * m >= 10:                               # deep saturation: |grad| = exp(-T m) to within 1 %
                assert abs(np.log(grads[1]) + T * m) < 0.01 * T * m, (m, T, grads[1])


def test_float32_softmax_saturates_to_exactly_one():
    """In float32 a margin of ~17 already rounds the top probability to 1.0,
    and the framework-standard backward then returns exact zeros on that row."""
    z = np.array([[20.0, 0.0, 0.0]], dtype=np.float32)
    p, cache = F.softmax_forward(z, 1.0)
    assert p[0, 0] == np.float32(1.0)
    dp = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    assert F.softmax_backward(dp, cache)[0, 0] == 0.0
    # the same logits at T = 20 (what the training loss saw) are far from saturated
    p20, _ = F.softmax_forward(z, 20.0)
    assert p20[0, 0] < 0.6


# ===== loss =====

@pytest.mark.parametrize("T", [1.0, 3.0, 50.0])
@pytest.mark.parametrize("soft", [False, True])
def test_cross_entropy(T, soft):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5, 10)) * 4
    z[1, 2] = 300.0                                        # a saturated row
    if soft:
        t = rng.random((5, 10))
        t /= t.sum(axis=1, keepdims=True)
    else:
        t = rng.integers(0, 10, 5)
    loss, dz = softmax_cross_entropy(z, t, T)
    numeric = numerical_vjp(lambda z_: np.array(softmax_cross_entropy(z_, t, T)[0]), z, np.array(1.0))
    assert_close_gradients(dz, numeric, TOL, f"cross-entropy T={T} soft={soft}")


def test_cross_entropy_value_and_the_1_over_T():
    z = np.array([[2.0, 0.0, -1.0]])
    for T in (1.0, 4.0):
        loss, dz = softmax_cross_entropy(z, np.array([0]), T)
        s = z / T
        expected = -(s[0, 0] - np.log(np.exp(s).sum()))
        assert abs(loss - expected) < 1e-12
        p = np.exp(s) / np.exp(s).sum()
        np.testing.assert_allclose(dz, (p - [[1, 0, 0]]) / T, rtol=1e-12)


def test_cross_entropy_keeps_the_tiny_saturated_gradient():
    """For a correct, saturated row, dL/dz_y = -sum_{j != y} p_j, not 0."""
    z = np.array([[60.0, 0.0, 0.0]])
    _, dz = softmax_cross_entropy(z, np.array([0]))
    expected = -2 * np.exp(-60.0) / (1 + 2 * np.exp(-60.0))
    assert dz[0, 0] != 0 and abs(dz[0, 0] / expected - 1) < 1e-12


def test_cross_entropy_rejects_bad_targets():
    z = np.zeros((3, 10))
    with pytest.raises(ValueError, match="labels must lie in"):
        softmax_cross_entropy(z, np.array([0, 1, 10]))
    with pytest.raises(ValueError, match="integer class indices"):
        softmax_cross_entropy(z, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="T must be a finite number > 0"):
        softmax_cross_entropy(z, np.array([0, 1, 2]), T=0)
    with pytest.raises(ValueError, match="soft targets"):
        softmax_cross_entropy(z, np.ones((3, 9)) / 9)


# ===== the whole network =====

def test_papernot_network_input_gradient_directional():
    """Directional derivative of the loss of the full network w.r.t. the input image.

    h = 1e-4: the central difference's truncation error (h^2) and rounding
    error (1e-16 / h) are both near 1e-10 there, so float64 supports 1e-8."""
    model = papernot_mnist(seed=0, dtype=np.float64)
    x = np.random.default_rng(0).random((2, 1, 28, 28))
    y = np.array([3, 7])
    for T in (1.0, 10.0):
        def loss_at(x_):
            return softmax_cross_entropy(model.logits(x_), y, T)[0]
        _, dz = softmax_cross_entropy(model.logits(x), y, T)
        dx = model.backward(dz)
        assert dx.shape == x.shape
        err = directional_check(loss_at, x, dx, n_directions=4, h=1e-4)
        assert err < 1e-8, f"T={T}: directional derivative relative error {err:.2e}"
        # the same check on the gradient of the other image swapped in: it must see the difference
        wrong = dx[::-1].copy()
        assert directional_check(loss_at, x, wrong, n_directions=4, h=1e-4) > 1e-2


def test_papernot_network_parameter_gradients_directional():
    model = papernot_mnist(seed=1, dtype=np.float64)
    x = np.random.default_rng(1).random((2, 1, 28, 28))
    y = np.array([1, 4])
    _, dz = softmax_cross_entropy(model.logits(x), y)
    model.backward(dz)
    rng = np.random.default_rng(2)
    for name in ("conv1.W", "conv4.b", "dense1.W", "dense3.b"):
        w = model[name]
        g = model.grads[name].copy()
        v = rng.standard_normal(w.shape)
        v /= np.linalg.norm(v)
        h = 1e-4
        w += h * v
        plus = softmax_cross_entropy(model.logits(x), y)[0]
        w -= 2 * h * v
        minus = softmax_cross_entropy(model.logits(x), y)[0]
        w += h * v
        numeric, analytic = (plus - minus) / (2 * h), float(np.sum(g * v))
        assert rel_error(numeric, analytic) < 1e-8, (name, numeric, analytic)


def test_backward_twice_gives_the_same_vjp():
    """Attacks take several VJPs of one forward pass."""
    model = papernot_mnist(seed=0, dtype=np.float64)
    x = np.random.default_rng(0).random((2, 1, 28, 28))
    z = model.logits(x)
    dz = np.random.default_rng(1).standard_normal(z.shape)
    first = model.backward(dz).copy()
    model.backward(np.ones_like(dz))
    np.testing.assert_array_equal(model.backward(dz), first)
