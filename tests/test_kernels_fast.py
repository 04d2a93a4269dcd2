"""The whole-layer kernels (convolution, ReLU) against their references.

``kernels/cpu.py`` runs a convolution by Winograd F(2x2, 3x3) (3x3 filters,
stride 1, at least ``WINOGRAD_MIN_CHANNELS`` input channels), by direct loops
(the forward pass of 3x3 filters at stride 1 on at most ``DIRECT_MAX_CHANNELS``
channels) or by im2col one image per thread; these tests hold all three to ``kernels/reference.py``
(im2col and one big matrix product) on odd shapes, strides, paddings and batch
sizes that do not split evenly over the threads or into the Winograd kernels'
chunks of images, in float32 and float64. The Winograd algorithm itself has a
plain NumPy version in ``kernels/reference.py``, checked here against the
im2col reference too. The GPU has no conv kernel of its own: it gets the
generic composition of its im2col / col2im with CuPy's matrix product, which is
tested here on NumPy arrays (from the reference im2col / col2im) and, where a
CUDA device is present, on the GPU itself.
"""
import numpy as np
import pytest

from scratchnet import kernels
from scratchnet.kernels import reference
from scratchnet.backend import gpu_available, to_numpy
from scratchnet.losses import softmax_cross_entropy
from scratchnet.model import papernot_mnist

# (N, C, H, W, F, KH, KW, stride, pad)
CONV_CASES = [
    (1, 1, 5, 5, 2, 3, 3, 1, 0),     # 3x3, stride 1, C <= DIRECT_MAX_CHANNELS (2): direct forward on the CPU
    (5, 2, 7, 9, 3, 3, 3, 1, 1),     # ... two channels, padding 1, odd sizes
    (3, 1, 4, 4, 2, 3, 3, 1, 3),     # ... padding 3: whole rows and columns of zeros
    (3, 3, 7, 6, 4, 3, 2, 1, 1),     # non-square kernel and image
    (5, 2, 9, 11, 3, 3, 3, 2, 1),    # stride 2 with padding
    (2, 5, 8, 7, 2, 2, 3, 3, 2),     # stride larger than the kernel's height
    (1, 4, 6, 6, 3, 5, 5, 1, 3),     # padding larger than half the kernel: whole rows of zeros
    (7, 1, 28, 28, 4, 3, 3, 1, 0),   # the Papernot network's first layer, odd batch
    (13, 6, 10, 10, 5, 3, 3, 1, 0),  # more images than threads, not a multiple of them
    # 3x3, stride 1, C >= WINOGRAD_MIN_CHANNELS (16): Winograd on the CPU
    (3, 16, 7, 9, 5, 3, 3, 1, 1),    # odd output sizes (7 x 9): half-used last tiles
    (5, 16, 5, 6, 3, 3, 3, 1, 2),    # padding 2
    (2, 17, 4, 4, 2, 3, 3, 1, 3),    # padding 3: tiles of nothing but zeros
    (2, 16, 3, 3, 2, 3, 3, 1, 0),    # a 1x1 output: one tile, three quarters outside
    (9, 32, 12, 12, 64, 3, 3, 1, 0), # the network's third layer; 9 images split into chunks unevenly
    (3, 32, 26, 26, 32, 3, 3, 1, 0), # the network's second layer
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

    # need_dx=False (a first layer in training): no dx, the same parameter gradients
    no_dx, dW, db = backward(xp.asarray(dy), xp.asarray(x), xp.asarray(w), stride, pad, True, False)
    assert no_dx is None
    for name, g, r in (("dW", dW, want[1]), ("db", db, want[2])):
        np.testing.assert_allclose(to_numpy(g), r, rtol=rtol, atol=atol * N * H * W, err_msg=name)


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


# ===== Winograd F(2x2, 3x3) =====

def _winograd_case(N, C, H, W, F, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, C, H, W)).astype(dtype), rng.standard_normal((F, C, 3, 3)).astype(dtype),
            rng.standard_normal(F).astype(dtype))


def test_cpu_sends_the_papernot_layers_to_the_intended_algorithm():
    from scratchnet.kernels import cpu
    model = papernot_mnist(seed=0)
    uses = [cpu._winograd_applies(model[f"conv{i}.W"], 1, 0) for i in (1, 2, 3, 4)]
    assert uses == [False, True, True, True]          # one input channel: not Winograd; the rest: Winograd
    assert cpu._direct_applies(model["conv1.W"], 1)   # ... but direct loops forward (im2col backward)
    assert not cpu._direct_applies(np.zeros((4, 2, 3, 3)), 2)          # stride 2
    assert not cpu._direct_applies(np.zeros((4, 3, 3, 3)), 1)          # three channels: im2col
    assert not cpu._winograd_applies(np.zeros((4, 32, 3, 3)), 2, 1)    # stride 2
    assert not cpu._winograd_applies(np.zeros((4, 32, 5, 5)), 1, 2)    # 5x5
    assert not cpu._winograd_applies(np.zeros((4, 8, 3, 3)), 1, 1)     # too few channels to pay off


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 7, 8, 4, 0), (3, 2, 9, 6, 3, 1), (2, 1, 5, 5, 2, 2), (1, 2, 3, 4, 2, 3),
                                   (4, 6, 12, 12, 5, 0)])
def test_reference_winograd_is_the_convolution(shape, dtype):
    """The NumPy Winograd (the algorithm's specification) equals the im2col convolution."""
    N, C, H, W, F, pad = shape
    x, w, b = _winograd_case(N, C, H, W, F, dtype)
    rtol, atol = (1e-5, 1e-5) if dtype == np.float32 else (1e-12, 1e-12)
    y = reference.winograd_conv3x3_forward(x, w, b, pad)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, reference.conv2d_forward(x, w, b, 1, pad), rtol=rtol, atol=atol)
    dy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
    for name, got, want in zip(("dx", "dW", "db"), reference.winograd_conv3x3_backward(dy, x, w, pad),
                               reference.conv2d_backward(dy, x, w, 1, pad)):
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * N * H * W, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(5, 1, 6, 7, 3, 1), (3, 3, 9, 9, 2, 0), (0, 4, 8, 8, 2, 1)])
def test_cpu_winograd_kernels_match_the_reference_algorithm(shape, dtype):
    """Called directly, the CPU Winograd kernels take any channel count (even the first
    layer's one) and an empty batch."""
    from scratchnet.kernels import cpu
    N, C, H, W, F, pad = shape
    x, w, b = _winograd_case(N, C, H, W, F, dtype)
    rtol, atol = (1e-4, 1e-4) if dtype == np.float32 else (1e-12, 1e-12)
    y = cpu.winograd_conv2d_forward(x, w, b, pad)
    np.testing.assert_allclose(y, reference.winograd_conv3x3_forward(x, w, b, pad), rtol=rtol, atol=atol)
    dy = np.random.default_rng(2).standard_normal(y.shape).astype(dtype)
    got = cpu.winograd_conv2d_backward(dy, x, w, pad)
    want = reference.winograd_conv3x3_backward(dy, x, w, pad)
    for name, g, r in zip(("dx", "dW", "db"), got, want):
        assert g.shape == r.shape and g.dtype == dtype, name
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol * max(N, 1) * H * W, err_msg=name)


def test_cpu_direct_forward_matches_the_reference():
    """Called directly, the direct loops take any channel count and padding (beyond the
    layers conv2d_forward sends them), and an empty batch."""
    from scratchnet.kernels import cpu
    for N, C, H, W, F, pad in [(5, 1, 28, 28, 4, 0), (3, 5, 7, 9, 3, 1), (4, 3, 5, 6, 2, 2), (2, 1, 3, 3, 2, 0),
                               (0, 2, 5, 5, 2, 1)]:
        for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-13)):
            x, w, b = _winograd_case(N, C, H, W, F, dtype)
            y = cpu.direct_conv2d_forward(x, w, b, pad)
            assert y.dtype == dtype
            np.testing.assert_allclose(y, reference.conv2d_forward(x, w, b, 1, pad), rtol=tol, atol=tol,
                                       err_msg=f"{(N, C, H, W, F, pad)}, {np.dtype(dtype).name}")


def test_winograd_chunks_of_images_give_the_same_result(monkeypatch):
    """A thread takes several images per chunk; chunks of 1, 3 (10 images: a short last
    chunk) and 10 images all give the reference's numbers."""
    from scratchnet.kernels import cpu
    x, w, b = _winograd_case(10, 16, 10, 10, 6, np.float64)
    assert cpu._winograd_applies(w, 1, 0)
    dy = np.random.default_rng(3).standard_normal((10, 6, 8, 8))
    want_y = reference.conv2d_forward(x, w, b, 1, 0)
    want = reference.conv2d_backward(dy, x, w, 1, 0)
    for images in (1, 3, 10):
        monkeypatch.setattr(cpu, "_chunk", lambda N, *sizes: images)
        np.testing.assert_allclose(cpu.conv2d_forward(x, w, b, 1, 0), want_y, rtol=1e-12, atol=1e-12)
        for g, r in zip(cpu.conv2d_backward(dy, x, w, 1, 0), want):
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-11)
        dx_only, dW, db = cpu.conv2d_backward(dy, x, w, 1, 0, False)
        assert dW is None and db is None
        np.testing.assert_allclose(dx_only, want[0], rtol=1e-12, atol=1e-11)


def test_winograd_chunk_size_fits_the_budget():
    from scratchnet.kernels import cpu
    assert cpu._chunk(128, 32, 32, 12, 12, 4) == 1            # the second layer: one image per chunk
    assert 2 <= cpu._chunk(128, 64, 64, 4, 4, 4) <= 8         # the fourth: several
    assert cpu._chunk(3, 64, 64, 4, 4, 4) <= 3                # never more than the batch
    assert cpu._chunk(0, 64, 64, 4, 4, 4) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("F, C", [(32, 32), (64, 32), (3, 5), (1, 1)])
def test_cpu_filter_transforms_match_the_reference(F, C, dtype):
    """U = G g G^T and its adjoint G^T dU G: the CPU loops against the reference's einsums,
    in both layouts the products use (U[ab] and U[ab]^T). float32 is the same rounding
    of float64 sums, so it agrees to the bit."""
    from scratchnet.kernels import cpu
    rng = np.random.default_rng(8)
    w = rng.standard_normal((F, C, 3, 3)).astype(dtype)
    dU = rng.standard_normal((4, 4, F, C)).astype(dtype)
    want_U = reference.winograd_filters(w).reshape(16, F, C)
    want_dW = reference.winograd_filters_adjoint(dU, dtype)
    U, UT = cpu.winograd_filters(w), cpu.winograd_filters(w, transposed=True)
    dW = cpu.winograd_filters_adjoint(dU.reshape(16, F, C), dtype)
    assert U.dtype == UT.dtype == dW.dtype == dtype
    assert U.shape == (16, F, C) and UT.shape == (16, C, F) and dW.shape == (F, C, 3, 3)
    np.testing.assert_array_equal(UT, U.transpose(0, 2, 1))
    if dtype == np.float32:
        np.testing.assert_array_equal(U, want_U)
        np.testing.assert_array_equal(dW, want_dW)
    else:
        np.testing.assert_allclose(U, want_U, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(dW, want_dW, rtol=1e-14, atol=1e-14)


def test_winograd_backward_is_the_adjoint_of_forward():
    """<conv(x), dy> == <x, dx> and == <W, dW> (no bias) through the Winograd kernels."""
    from scratchnet.kernels import cpu
    x, w, _ = _winograd_case(6, 16, 9, 8, 4, np.float64, seed=4)
    y = cpu.conv2d_forward(x, w, np.zeros(4), 1, 1)
    dy = np.random.default_rng(5).standard_normal(y.shape)
    dx, dW, _ = cpu.conv2d_backward(dy, x, w, 1, 1)
    assert cpu._winograd_applies(w, 1, 1)
    assert abs(np.sum(y * dy) - np.sum(x * dx)) < 1e-10 * np.sum(np.abs(y * dy))
    assert abs(np.sum(y * dy) - np.sum(w * dW)) < 1e-10 * np.sum(np.abs(y * dy))


def test_winograd_gradients_are_the_same_numbers_every_run():
    """dW and db are sums over the batch; they are added in a fixed order, so two runs agree
    to the last bit (what makes training reproducible)."""
    from scratchnet.kernels import cpu
    x, w, _ = _winograd_case(37, 16, 12, 12, 8, np.float32, seed=6)
    assert cpu._winograd_applies(w, 1, 0)
    dy = np.random.default_rng(7).standard_normal((37, 8, 10, 10)).astype(np.float32)
    first = cpu.conv2d_backward(dy, x, w, 1, 0)
    for _ in range(3):
        for a, b in zip(first, cpu.conv2d_backward(dy, x, w, 1, 0)):
            np.testing.assert_array_equal(a, b)


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
    from scratchnet.kernels import cpu
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


def test_backward_without_input_grad_gives_the_same_param_grads(monkeypatch):
    """Training's ``input_grad=False``: every parameter gradient as with the default,
    None for dL/dx, and the first convolution's kernel asked for no dx at all."""
    from scratchnet import functional
    model = papernot_mnist(seed=0, dtype=np.float64)
    x = np.random.default_rng(0).random((3, 1, 28, 28))
    _, dz = softmax_cross_entropy(model.logits(x), np.array([1, 2, 3]))
    model.backward(dz)
    want = {k: v.copy() for k, v in model.grads.items()}

    asked = []                        # need_dx of every convolution's backward, in call order
    conv2d_backward = functional.conv2d_backward

    def recording(dy, cache, param_grads=True, need_dx=True):
        asked.append(need_dx)
        return conv2d_backward(dy, cache, param_grads, need_dx)

    monkeypatch.setattr(functional, "conv2d_backward", recording)
    assert model.backward(dz, input_grad=False) is None
    assert asked == [True, True, True, False]          # conv4, conv3, conv2 pass dx on; conv1 does not
    assert set(model.grads) == set(want)
    for k in want:
        np.testing.assert_array_equal(model.grads[k], want[k], err_msg=k)


def test_dense_first_layer_without_input_grad():
    """need_dx=False on a Dense layer (a network that starts with one): no dx,
    the same dW and db as with dx."""
    from scratchnet.layers import Dense, ReLU
    from scratchnet.model import Sequential
    rng = np.random.default_rng(1)
    model = Sequential([Dense(6, 5, rng=rng, dtype=np.float64, name="d1"), ReLU(name="r1"),
                        Dense(5, 3, rng=rng, dtype=np.float64, name="d2")])
    _, dz = softmax_cross_entropy(model.logits(rng.standard_normal((4, 6))), np.array([0, 1, 2, 1]))
    dx = model.backward(dz)
    want = {k: v.copy() for k, v in model.grads.items()}
    assert dx.shape == (4, 6)
    assert model.backward(dz, input_grad=False) is None
    for k in want:
        np.testing.assert_array_equal(model.grads[k], want[k], err_msg=k)
