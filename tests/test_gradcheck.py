"""The checkers checked: every test of a backward pass rests on ``scratchnet.gradcheck``,
so each checker must catch a deliberately wrong gradient, and say by how much.

A checker that always passed (``rel_error`` returning 0, a directional check
that compared the gradient with itself) would let every gradient test pass;
these tests are what fails then.
"""
import numpy as np
import pytest

from scratchnet.gradcheck import assert_close_gradients, directional_check, numerical_vjp, rel_error


def cubic(x):
    """f(x) = x^3 + sin(x), elementwise; f'(x) = 3 x^2 + cos(x)."""
    return x ** 3 + np.sin(x)


def cubic_grad(x):
    return 3 * x ** 2 + np.cos(x)


def test_rel_error_is_the_scaled_largest_difference():
    assert rel_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert rel_error([1.0], [1.1]) == pytest.approx(0.1 / 2.1, rel=1e-12)
    assert rel_error([0.0, 3.0], [1.0, 3.0]) == pytest.approx(1.0 / 6.0, rel=1e-12)
    assert rel_error([-2.0], [2.0]) == pytest.approx(1.0, rel=1e-12)         # the opposite sign: 100 %
    assert rel_error([1e-20], [2e-20]) == pytest.approx(1e-20 / 1e-12)       # the floor keeps noise at 0
    assert rel_error(np.array([1.0, 1.0]), np.array([1.0, 1.0 + 1e-9])) == pytest.approx(0.5e-9, rel=1e-6)


def test_numerical_vjp_equals_a_known_derivative_in_float64():
    x = np.linspace(-1.3, 1.7, 12).reshape(3, 4)
    dy = np.random.default_rng(0).standard_normal(x.shape)
    numeric = numerical_vjp(cubic, x.copy(), dy)
    np.testing.assert_allclose(numeric, dy * cubic_grad(x), rtol=1e-8, atol=1e-9)
    assert rel_error(numeric, dy * cubic_grad(x)) < 1e-9
    with pytest.raises(ValueError, match="float64"):
        numerical_vjp(cubic, x.astype(np.float32), dy)


@pytest.mark.parametrize("mutation, reported", [
    (lambda g: g * 1.001, 4.99e-4),                      # 0.1 % too large everywhere: 0.001 / 2.001
    (lambda g: g + np.where(np.arange(g.size).reshape(g.shape) == 5, 1e-3, 0), 1e-5),  # one entry off
    (lambda g: -g, 1.0),                                 # the wrong sign
    (lambda g: g.T.reshape(g.shape), 1e-2),              # entries in the wrong places
])
def test_assert_close_gradients_catches_a_wrong_backward_and_reports_its_error(mutation, reported):
    x = np.linspace(-1.3, 1.7, 12).reshape(3, 4)
    dy = np.ones_like(x)
    numeric = numerical_vjp(cubic, x.copy(), dy)
    right = cubic_grad(x)
    assert assert_close_gradients(right, numeric, 1e-7) < 1e-9
    wrong = mutation(right)
    err = rel_error(wrong, numeric)
    assert err >= reported
    with pytest.raises(AssertionError) as info:
        assert_close_gradients(wrong, numeric, 1e-7, what="cubic dx", inputs=x)
    message = str(info.value)
    assert message.startswith(f"cubic dx: relative error {err:.3e} >= 1e-07")
    assert "inputs:" in message and "analytic:" in message and "numeric:" in message


def test_directional_check_passes_the_right_gradient_and_catches_wrong_ones():
    x = np.random.default_rng(1).standard_normal((4, 5))

    def loss(x_):
        return float(np.sum(cubic(x_)))

    grad = cubic_grad(x)
    assert directional_check(loss, x, grad, n_directions=4) < 1e-9
    scaled = directional_check(loss, x, 1.01 * grad, n_directions=4)
    assert scaled == pytest.approx(0.01 / 2.01, rel=1e-3)                 # the reported error is the real one
    assert directional_check(loss, x, -grad, n_directions=4) == pytest.approx(1.0, rel=1e-6)
    one_entry = grad.copy()
    one_entry[2, 3] += 1.0
    assert directional_check(loss, x, one_entry, n_directions=4) > 1e-3
    assert directional_check(loss, x, np.zeros_like(grad), n_directions=2) == pytest.approx(1.0, rel=1e-6)


def test_a_wrong_layer_backward_fails_the_layer_check():
    """A Dense layer whose backward forgets the transpose of W: the VJP check fails."""
    from scratchnet.layers import Dense
    from test_gradients import check_layer, spread

    class WrongDense(Dense):
        def backward(self, dy, param_grads=True):
            dx = super().backward(dy, param_grads)
            return dx * 1.0001                             # 0.01 % off: far above float64's noise

    layer = WrongDense(5, 5, rng=np.random.default_rng(0), dtype=np.float64)
    with pytest.raises(AssertionError, match="relative error"):
        check_layer(layer, spread((3, 5)))
    check_layer(Dense(5, 5, rng=np.random.default_rng(0), dtype=np.float64), spread((3, 5)))
