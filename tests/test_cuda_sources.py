"""The CUDA kernels (kernels/cuda/*.cu, driven by kernels/gpu.py), tested without a GPU.

Two checks that run in CI on a machine with no GPU:

* every ``.cu`` file compiles with ``nvcc`` (skipped, with the reason, where
  nvcc is not on PATH), so a typo in GPU code fails CI;
* the same sources, compiled with g++ and run thread by thread on the CPU
  (tests/cuda_on_cpu.py), give exactly what kernels/reference.py gives, through
  kernels/gpu.py's own wrappers. So a wrong index, a swapped argument or a
  missed element in the GPU code fails CI too.

On a machine with a CUDA device, tests/test_kernels.py runs the real thing
against the same reference.
"""
import glob
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from scratchnet import kernels
from scratchnet.kernels import reference

from cuda_on_cpu import import_gpu_kernels, make_fake_cupy
from kernel_cases import CONV_CASES, POOL_CASES

CUDA_DIR = os.path.join(os.path.dirname(os.path.abspath(kernels.__file__)), "cuda")
SOURCES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))

# the extern "C" entry points kernels/gpu.py looks up, file by file
ENTRY_POINTS = {
    "im2col.cu": ["im2col_f32", "im2col_f64", "col2im_f32", "col2im_f64"],
    "maxpool.cu": ["maxpool_forward_f32", "maxpool_forward_f64",
                   "maxpool_backward_f32", "maxpool_backward_f64"],
}


def _tolerance(dtype):
    """col2im adds in another order than the reference: allow a few roundings."""
    return dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)


# ===== nvcc: the sources compile for the GPU =====

def test_there_are_cuda_sources():
    assert sorted(os.path.basename(s) for s in SOURCES) == sorted(ENTRY_POINTS)


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles_with_nvcc(source, tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH, so the CUDA sources cannot be compiled here")
    ptx = tmp_path / "out.ptx"
    done = subprocess.run(["nvcc", "--ptx", "-Werror", "all-warnings", "-o", str(ptx), source],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"nvcc failed on {source}:\n{done.stderr}"
    entries = re.findall(r"\.entry\s+(\w+)", ptx.read_text())
    assert sorted(entries) == sorted(ENTRY_POINTS[os.path.basename(source)])


# ===== the same sources run on the CPU, through kernels/gpu.py =====

@pytest.fixture(scope="module")
def on_cpu(tmp_path_factory):
    """(gpu, fake): kernels/gpu.py running its CUDA kernels on the CPU, and the fake CuPy under it."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH, so the CUDA kernels cannot be run on the CPU here")
    fake = make_fake_cupy(str(tmp_path_factory.mktemp("cuda_on_cpu")))
    return import_gpu_kernels(fake), fake


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_col2im_match_reference(on_cpu, case, dtype):
    gpu, _ = on_cpu
    N, C, H, W, KH, KW, stride, pad = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    want = reference.im2col(x, KH, KW, stride, pad)
    got = gpu.im2col(x, KH, KW, stride, pad)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)

    cols = rng.standard_normal(want.shape).astype(dtype)
    want_x = reference.col2im(cols, x.shape, KH, KW, stride, pad)
    got_x = gpu.col2im(cols, x.shape, KH, KW, stride, pad)
    assert got_x.shape == x.shape and got_x.dtype == dtype
    np.testing.assert_allclose(got_x, want_x, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", POOL_CASES)
def test_maxpool_matches_reference(on_cpu, case, dtype):
    gpu, _ = on_cpu
    N, C, H, W, KH, KW, stride = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    want_y, want_arg = reference.maxpool_forward(x, KH, KW, stride)
    got_y, got_arg = gpu.maxpool_forward(x, KH, KW, stride)
    assert got_arg.dtype == np.int64
    np.testing.assert_array_equal(got_y, want_y)
    np.testing.assert_array_equal(got_arg, want_arg)

    dy = rng.standard_normal(want_y.shape).astype(dtype)
    want_dx = reference.maxpool_backward(dy, want_arg, x.shape, KH, KW, stride)
    got_dx = gpu.maxpool_backward(dy, got_arg, x.shape, KH, KW, stride)
    np.testing.assert_allclose(got_dx, want_dx, **_tolerance(dtype))


@pytest.mark.parametrize("case", [(2, 2, 7, 7, 3, 3, 2), (1, 3, 6, 5, 2, 3, 1)])
def test_maxpool_ties_pick_the_first_position(on_cpu, case):
    """Values drawn from {0, 1, 2} tie in most windows; the first maximum must win, as in np.argmax."""
    gpu, _ = on_cpu
    N, C, H, W, KH, KW, stride = case
    x = np.random.default_rng(2).integers(0, 3, size=(N, C, H, W)).astype(np.float32)
    want_y, want_arg = reference.maxpool_forward(x, KH, KW, stride)
    got_y, got_arg = gpu.maxpool_forward(x, KH, KW, stride)
    np.testing.assert_array_equal(got_arg, want_arg)
    np.testing.assert_array_equal(got_y, want_y)
    # and the backward pass of overlapping, tied windows sends each dy to that first position
    dy = np.arange(1, want_y.size + 1, dtype=np.float32).reshape(want_y.shape)
    np.testing.assert_array_equal(gpu.maxpool_backward(dy, got_arg, x.shape, KH, KW, stride),
                                  reference.maxpool_backward(dy, want_arg, x.shape, KH, KW, stride))


def test_fewer_threads_than_elements(on_cpu, monkeypatch):
    """A launch capped at 2 blocks of 3 threads: the grid-stride loops must still cover everything
    (on a GPU this is the path for inputs larger than the launch limit)."""
    gpu, _ = on_cpu
    monkeypatch.setattr(gpu, "_THREADS_PER_BLOCK", 3)
    monkeypatch.setattr(gpu, "_MAX_BLOCKS", 2)
    rng = np.random.default_rng(3)
    N, C, H, W, KH, KW, stride, pad = 2, 3, 7, 6, 3, 2, 2, 1
    x = rng.standard_normal((N, C, H, W))
    np.testing.assert_array_equal(gpu.im2col(x, KH, KW, stride, pad), reference.im2col(x, KH, KW, stride, pad))
    cols = rng.standard_normal(reference.im2col(x, KH, KW, stride, pad).shape)
    np.testing.assert_allclose(gpu.col2im(cols, x.shape, KH, KW, stride, pad),
                               reference.col2im(cols, x.shape, KH, KW, stride, pad), rtol=1e-12, atol=1e-14)
    y, arg = gpu.maxpool_forward(x, 3, 3, 2)
    want_y, want_arg = reference.maxpool_forward(x, 3, 3, 2)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(arg, want_arg)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(gpu.maxpool_backward(dy, arg, x.shape, 3, 3, 2),
                               reference.maxpool_backward(dy, want_arg, x.shape, 3, 3, 2), rtol=1e-12, atol=1e-14)


def test_non_contiguous_inputs_and_int32_argmax(on_cpu):
    gpu, _ = on_cpu
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 6, 3, 2)).transpose(3, 2, 1, 0)      # (2, 3, 6, 5), a strided view
    assert not x.flags.c_contiguous
    np.testing.assert_array_equal(gpu.im2col(x, 3, 3, 1, 1), reference.im2col(x, 3, 3, 1, 1))
    y, arg = gpu.maxpool_forward(x, 2, 2, 2)
    np.testing.assert_array_equal(y, reference.maxpool_forward(x, 2, 2, 2)[0])
    dy = rng.standard_normal(y.shape)
    np.testing.assert_array_equal(gpu.maxpool_backward(dy, arg.astype(np.int32), x.shape, 2, 2, 2),
                                  reference.maxpool_backward(dy, arg, x.shape, 2, 2, 2))


def test_empty_batch(on_cpu):
    """N = 0 launches nothing (CUDA refuses a zero-block grid) and returns empty arrays of the right shape."""
    gpu, _ = on_cpu
    x = np.zeros((0, 2, 5, 5), dtype=np.float32)
    assert gpu.im2col(x, 3, 3, 1, 0).shape == reference.im2col(x, 3, 3, 1, 0).shape == (0, 18)
    assert gpu.col2im(np.zeros((0, 18), np.float32), x.shape, 3, 3, 1, 0).shape == x.shape
    y, arg = gpu.maxpool_forward(x, 2, 2, 2)
    assert y.shape == arg.shape == (0, 2, 2, 2)


def test_each_source_is_compiled_once(on_cpu):
    gpu, fake = on_cpu
    x = np.random.default_rng(5).standard_normal((1, 2, 6, 6))
    for _ in range(2):
        for dtype in (np.float32, np.float64):
            xd = x.astype(dtype)
            cols = gpu.im2col(xd, 3, 3, 1, 1)
            gpu.col2im(cols, xd.shape, 3, 3, 1, 1)
            y, arg = gpu.maxpool_forward(xd, 2, 2, 2)
            gpu.maxpool_backward(y, arg, xd.shape, 2, 2, 2)
        # two files (im2col.cu, maxpool.cu), each built the first time it is needed, and never again
        assert len(fake.builds) == 2


def test_bad_inputs_are_clear_errors(on_cpu):
    gpu, _ = on_cpu
    with pytest.raises(ValueError, match="im2col: the GPU kernels take float32 or float64 arrays, got float16"):
        gpu.im2col(np.zeros((1, 1, 4, 4), np.float16), 2, 2, 1, 0)
    with pytest.raises(ValueError, match="maxpool_forward: expected a CuPy array, got builtins.list"):
        gpu.maxpool_forward([[[[1.0]]]], 1, 1, 1)
    with pytest.raises(ValueError, match=r"im2col: expected an \(N, C, H, W\) shape, got \(4, 4\)"):
        gpu.im2col(np.zeros((4, 4), np.float32), 2, 2, 1, 0)
    with pytest.raises(ValueError, match=r"col2im: expected cols of shape \(9, 4\)"):
        gpu.col2im(np.zeros((9, 5), np.float32), (1, 1, 4, 4), 2, 2, 1, 0)
    with pytest.raises(ValueError, match=r"maxpool_backward: expected dy and argmax of shape \(1, 1, 2, 2\)"):
        gpu.maxpool_backward(np.zeros((1, 1, 3, 3), np.float32), np.zeros((1, 1, 3, 3), np.int64), (1, 1, 4, 4), 2, 2, 2)


def test_the_harness_catches_a_wrong_index(tmp_path, monkeypatch):
    """The point of all of the above: swap kh for kw in one line of im2col.cu and the comparison fails."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH, so the CUDA kernels cannot be run on the CPU here")
    with open(os.path.join(CUDA_DIR, "im2col.cu")) as f:
        code = f.read()
    right = "const long long h = oh * stride - pad + kh;"
    assert right in code
    (tmp_path / "im2col.cu").write_text(code.replace(right, right.replace("+ kh", "+ kw")))
    gpu = import_gpu_kernels(make_fake_cupy(str(tmp_path)))
    monkeypatch.setattr(gpu, "_CUDA_DIR", str(tmp_path))
    x = np.random.default_rng(6).standard_normal((1, 2, 6, 6))
    assert not np.array_equal(gpu.im2col(x, 3, 2, 1, 1), reference.im2col(x, 3, 2, 1, 1))
