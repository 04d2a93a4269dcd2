"""Numerical gradient checks in float64.

``numerical_vjp`` estimates the vector-Jacobian product ``dy^T (df/dx)`` one
coordinate at a time by central differences; it is exactly what every
``backward(dy)`` claims to compute. ``directional_check`` compares a whole
network's gradient with a single directional derivative, which scales to
inputs too large to probe coordinate by coordinate.
"""
import numpy as np


def rel_error(a, b, floor=1e-12):
    """max |a - b| / max(|a| + |b|, floor): scale-free and symmetric."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a) + np.abs(b)), floor))


def numerical_vjp(f, x, dy, h=1e-6):
    """sum(dy * f(x)) differentiated w.r.t. x by central differences.

    Parameters
    ----------
    f : callable x -> y; it may read ``x`` (modified in place and restored here)
    x : float64 array, the point
    dy : array of f(x)'s shape, the vector of the product

    Returns
    -------
    dx : array of x's shape, dx[i] ~ (sum(dy f(x + h e_i)) - sum(dy f(x - h e_i))) / 2h
    """
    if x.dtype != np.float64:
        raise ValueError(f"numerical gradients need float64 inputs, got {x.dtype}")
    dx = np.zeros_like(x)
    flat, dflat = x.reshape(-1), dx.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = np.sum(dy * f(x))
        flat[i] = old - h
        minus = np.sum(dy * f(x))
        flat[i] = old
        dflat[i] = (plus - minus) / (2 * h)
    return dx


def assert_close_gradients(analytic, numeric, tol=1e-7, what="gradient", inputs=None):
    """Fail with every number on the table when the relative error exceeds tol."""
    err = rel_error(analytic, numeric)
    if not err < tol:
        with np.printoptions(precision=10, threshold=200):
            detail = (f"\ninputs:\n{inputs}" if inputs is not None else "") + \
                     f"\nanalytic:\n{np.asarray(analytic)}\nnumeric:\n{np.asarray(numeric)}"
        raise AssertionError(f"{what}: relative error {err:.3e} >= {tol:.0e}{detail}")
    return err


def directional_check(loss_fn, x, grad, n_directions=3, h=1e-5, seed=0):
    """Compare <grad, v> with (L(x + h v) - L(x - h v)) / 2h along random unit v.

    Returns the largest relative error over the directions.
    """
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(n_directions):
        v = rng.standard_normal(x.shape)
        v /= np.linalg.norm(v)
        numeric = (loss_fn(x + h * v) - loss_fn(x - h * v)) / (2 * h)
        analytic = float(np.sum(grad * v))
        worst = max(worst, abs(numeric - analytic) / max(abs(numeric) + abs(analytic), 1e-12))
    return worst
