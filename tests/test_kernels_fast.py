"""The whole-layer kernels (convolution, ReLU) against their references.

``kernels/cpu.py`` runs a convolution one image per thread, with its own
unfold / fold loops and BLAS products; these tests hold it to
``kernels/reference.py`` (im2col and one big matrix product) on odd shapes,
strides, paddings and batch sizes that do not split evenly over the threads.
The GPU has no conv kernel of its own: it gets the generic composition of its
im2col / col2im with CuPy's matrix product, which is tested here on NumPy
arrays (from the reference im2col / col2im) and, where a CUDA device is
present, on the GPU itself.
"""
import numpy as np
import pytest

import kernels
from kernels import reference
from scratchnet.backend import gpu_available, to_numpy
from scratchnet.losses import softmax_cross_entropy
from scratchnet.model import papernot_mnist

# (N, C, H, W, F, KH, KW, stride, pad)
CONV_CASES = [
    (1, 1, 5, 5, 2, 3, 3, 1, 0),
    (3, 3, 7, 6, 4, 3, 2, 1, 1),     # non-square kernel and image
    (5, 2, 9, 11, 3, 3, 3, 2, 1),    # stride 2 with padding
    (2, 5, 8, 7, 2, 2, 3, 3, 2),     # stride larger than the kernel's height
    (1, 4, 6, 6, 3, 5, 5, 1, 3),     # padding larger than half the kernel: whole rows of zeros
    (7, 1, 28, 28, 4, 3, 3, 1, 0),   # the Papernot network's first layer, odd batch
    (13, 6, 10, 10, 5, 3, 3, 1, 0),  # more images than threads, not a multiple of them
]


@pytest.fixture(params=["cpu", "generic", "gpu"])
def conv_impl(request):
    """(forward, backward, xp) of one implementation of the whole-layer convolution."""
    if request.param == "gpu":
        ok, reason = gpu_available()
        if not ok:
            pytest.skip(f"GPU kernels not testable here: {reason}")
        import cupy
        return kernels.get("conv2d_forward", impl="gpu"), kernels.get("conv2d_backward", impl="gpu"), cupy
    if request.param == "generic":
        generic = kernels._generic_kernels(reference.im2col, reference.col2im)
        return generic["conv2d_forward"], generic["conv2d_backward"], np
    return kernels.get("conv2d_forward", impl="cpu"), kernels.get("conv2d_backward", impl="cpu"), np


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_reference(conv_impl, case, dtype):
    forward, backward, xp = conv_impl
    N, C, H, W, F, KH, KW, stride, pad = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, KH, KW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    rtol, atol = (1e-4, 1e-4) if dtype == np.float32 else (1e-12, 1e-12)

    want_y = reference.conv2d_forward(x, w, b, stride, pad)
    got_y = forward(xp.asarray(x), xp.asarray(w), xp.asarray(b), stride, pad)
    assert got_y.shape == want_y.shape and got_y.dtype == dtype
    np.testing.assert_allclose(to_numpy(got_y), want_y, rtol=rtol, atol=atol)

    dy = rng.standard_normal(want_y.shape).astype(dtype)
    dy_before = dy.copy()
    want = reference.conv2d_backward(dy, x, w, stride, pad)
    got = backward(xp.asarray(dy), xp.asarray(x), xp.asarray(w), stride, pad)
    np.testing.assert_array_equal(dy, dy_before)
    for name, g, r in zip(("dx", "dW", "db"), got, want):
        assert g.shape == r.shape and g.dtype == dtype, name
        np.testing.assert_allclose(to_numpy(g), r, rtol=rtol, atol=atol * N * H * W, err_msg=name)

    dx_only, dW, db = backward(xp.asarray(dy), xp.asarray(x), xp.asarray(w), stride, pad, False)
    assert dW is None and db is None
    np.testing.assert_allclose(to_numpy(dx_only), want[0], rtol=rtol, atol=atol)


def test_conv2d_backward_is_the_adjoint_of_forward():
    """<conv(x), dy> == <x, dx> without bias: the CPU kernel's dx is the exact transpose."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 9, 8))
    w = rng.standard_normal((5, 3, 3, 2))
    conv, conv_back = kernels.get("conv2d_forward", impl="cpu"), kernels.get("conv2d_backward", impl="cpu")
    y = conv(x, w, np.zeros(5), 2, 1)
    dy = rng.standard_normal(y.shape)
    dx, dW, _ = conv_back(dy, x, w, 2, 1)
    assert abs(np.sum(y * dy) - np.sum(x * dx)) < 1e-10 * np.sum(np.abs(y * dy))
    assert abs(np.sum(y * dy) - np.sum(w * dW)) < 1e-10 * np.sum(np.abs(y * dy))   # linear in w too


def test_relu_matches_reference_including_nan_and_infinities():
    x = np.array([[-np.inf, -2.0, -1e-30, 0.0, 1e-30, 3.0, np.inf, np.nan]], dtype=np.float32)
    dy = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, np.nan]], dtype=np.float32)
    generic = kernels._generic_kernels(reference.im2col, reference.col2im)
    want_y = reference.relu_forward(x)
    np.testing.assert_array_equal(want_y, np.array([[0, 0, 0, 0, 1e-30, 3, np.inf, np.nan]], dtype=np.float32))
    want_dx = reference.relu_backward(dy, want_y)
    np.testing.assert_array_equal(want_dx, [[0, 0, 0, 0, 5, 6, 7, np.nan]])
    for name, forward, backward in (("cpu", kernels.get("relu_forward", impl="cpu"), kernels.get("relu_backward", impl="cpu")),
                                    ("generic", generic["relu_forward"], generic["relu_backward"])):
        y = forward(x)
        assert y.dtype == x.dtype, name
        np.testing.assert_array_equal(y, want_y, err_msg=name)
        np.testing.assert_array_equal(backward(dy, y), want_dx, err_msg=name)


@pytest.mark.parametrize("shape", [(1,), (7, 3), (5, 32, 13, 11)])
def test_relu_random_arrays(shape):
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal(shape).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        y = kernels.get("relu_forward", impl="cpu")(x)
        np.testing.assert_array_equal(y, reference.relu_forward(x))
        np.testing.assert_array_equal(kernels.get("relu_backward", impl="cpu")(dy, y), reference.relu_backward(dy, y))


def test_cpu_kernels_keep_blas_on_one_thread():
    """Numba's threads call BLAS; BLAS starting threads of its own would oversubscribe the cores."""
    from kernels import cpu
    threads = cpu.describe_threads()
    assert threads["blas_threads"] == 1, threads
    assert threads["numba_threads"] >= 1


# ===== model: gradients w.r.t. the input only =====

def test_backward_without_param_grads_gives_the_same_dx():
    model = papernot_mnist(seed=0, dtype=np.float64)
    x = np.random.default_rng(0).random((3, 1, 28, 28))
    _, dz = softmax_cross_entropy(model.logits(x), np.array([1, 2, 3]))
    full = model.backward(dz)
    assert model.grads and all(g is not None for g in model.grads.values())
    input_only = model.backward(dz, param_grads=False)
    np.testing.assert_array_equal(input_only, full)
    assert model.grads == {}          # no stale parameter gradients are left behind
    model.backward(dz)                # and the default fills them again
    assert set(model.grads) == set(model.params)
