"""Every fast kernel against its plain reference (kernels/reference.py).

im2col and max pooling are copies and comparisons, so they must match
exactly; col2im adds floating-point numbers in another order, so it gets a
tight tolerance. The GPU implementation runs through the same tests where a
CUDA device is present and is skipped with the reason otherwise. The CPU has
no batch im2col / col2im of its own (its convolutions unfold one image at a
time; see test_kernels_fast.py): the registry hands it the reference ones.
"""
import numpy as np
import pytest

from scratchnet import kernels
from scratchnet.kernels import reference
from scratchnet.backend import gpu_available, to_numpy

from kernel_cases import CONV_CASES, POOL_CASES


@pytest.fixture(params=["cpu", "gpu"])
def impl(request):
    if request.param == "gpu":
        ok, reason = gpu_available()
        if not ok:
            pytest.skip(f"GPU kernels not testable here: {reason}")
        import cupy
        return "gpu", cupy
    return "cpu", np


@pytest.fixture
def gpu_impl():
    ok, reason = gpu_available()
    if not ok:
        pytest.skip(f"GPU kernels not testable here: {reason}")
    import cupy
    return "gpu", cupy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_col2im_match_reference(gpu_impl, case, dtype):
    name, xp = gpu_impl
    N, C, H, W, KH, KW, stride, pad = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    want = reference.im2col(x, KH, KW, stride, pad)
    got = kernels.get("im2col", impl=name)(xp.asarray(x), KH, KW, stride, pad)
    assert got.dtype == dtype
    np.testing.assert_array_equal(to_numpy(got), want)

    cols = rng.standard_normal(want.shape).astype(dtype)
    want_x = reference.col2im(cols, x.shape, KH, KW, stride, pad)
    got_x = kernels.get("col2im", impl=name)(xp.asarray(cols), x.shape, KH, KW, stride, pad)
    assert got_x.shape == x.shape and got_x.dtype == dtype
    np.testing.assert_allclose(to_numpy(got_x), want_x, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("case", CONV_CASES)
def test_col2im_is_the_adjoint_of_im2col(case):
    """<im2col(x), c> == <x, col2im(c)>: the property that makes col2im the right backward."""
    N, C, H, W, KH, KW, stride, pad = case
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, C, H, W))
    cols = reference.im2col(x, KH, KW, stride, pad)
    c = rng.standard_normal(cols.shape)
    lhs = np.sum(cols * c)
    rhs = np.sum(x * reference.col2im(c, x.shape, KH, KW, stride, pad))
    assert abs(lhs - rhs) < 1e-10 * max(1, abs(lhs))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", POOL_CASES)
def test_maxpool_matches_reference(impl, case, dtype):
    name, xp = impl
    N, C, H, W, KH, KW, stride = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    want_y, want_arg = reference.maxpool_forward(x, KH, KW, stride)
    got_y, got_arg = kernels.get("maxpool_forward", impl=name)(xp.asarray(x), KH, KW, stride)
    np.testing.assert_array_equal(to_numpy(got_y), want_y)
    np.testing.assert_array_equal(to_numpy(got_arg), want_arg)

    dy = rng.standard_normal(want_y.shape).astype(dtype)
    want_dx = reference.maxpool_backward(dy, want_arg, x.shape, KH, KW, stride)
    got_dx = kernels.get("maxpool_backward", impl=name)(xp.asarray(dy), xp.asarray(want_arg), x.shape, KH, KW, stride)
    np.testing.assert_allclose(to_numpy(got_dx), want_dx, rtol=1e-6, atol=1e-7)


def test_maxpool_ties_pick_the_first_position(impl):
    name, xp = impl
    x = np.zeros((1, 1, 4, 4), dtype=np.float32)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = 5.0          # a tie inside the first window
    for fn, x_in in ((reference.maxpool_forward, x), (kernels.get("maxpool_forward", impl=name), xp.asarray(x))):
        y, arg = fn(x_in, 2, 2, 2)
        assert int(to_numpy(arg)[0, 0, 0, 0]) == 1    # position (0, 1) comes before (1, 0)
        assert float(to_numpy(y)[0, 0, 0, 0]) == 5.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 3, 7, 9), (1, 2, 2, 2)])
def test_maxpool_2x2_path_matches_reference_with_many_ties(impl, shape, dtype):
    """2x2 windows at stride 2 take the CPU's own paths (``_maxpool_2x2`` and
    ``_maxpool_2x2_backward``); on pixels drawn from three values nearly every window
    has a tie, and every tie must go to the same (first) position as in the reference,
    or the backward pass routes dy elsewhere. The backward path writes every pixel of
    dx, the odd last row and column (in no window) included: it is checked on a dx
    that starts full of NaN."""
    name, xp = impl
    rng = np.random.default_rng(9)
    x = rng.integers(0, 3, shape).astype(dtype)
    want_y, want_arg = reference.maxpool_forward(x, 2, 2, 2)
    got_y, got_arg = kernels.get("maxpool_forward", impl=name)(xp.asarray(x), 2, 2, 2)
    np.testing.assert_array_equal(to_numpy(got_y), want_y)
    np.testing.assert_array_equal(to_numpy(got_arg), want_arg)

    dy = rng.standard_normal(want_y.shape).astype(dtype)
    want_dx = reference.maxpool_backward(dy, want_arg, shape, 2, 2, 2)
    got_dx = kernels.get("maxpool_backward", impl=name)(xp.asarray(dy), xp.asarray(want_arg), shape, 2, 2, 2)
    np.testing.assert_array_equal(to_numpy(got_dx), want_dx)
    if name == "cpu":
        from scratchnet.kernels import cpu
        dx = np.full(shape, np.nan, dtype=dtype)
        cpu._maxpool_backward(dy, want_arg, 2, 2, 2, dx)
        np.testing.assert_array_equal(dx, want_dx)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.get("conv3d")
    with pytest.raises(ValueError, match="unknown kernel implementation"):
        kernels.get("im2col", impl="tpu")


def test_registry_picks_cpu_for_numpy():
    from scratchnet.kernels import cpu
    assert kernels.get("conv2d_forward", np) is cpu.conv2d_forward
    assert kernels.get("maxpool_forward", np) is cpu.maxpool_forward
    # no batch im2col on the CPU: the reference's, which is plain NumPy
    assert kernels.get("im2col", np) is reference.im2col
    assert kernels.get("col2im", np) is reference.col2im
