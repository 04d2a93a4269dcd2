"""JSMA's pixel-pair search: the fused Numba kernel against its reference.

``kernels/reference.py`` holds the specification (the chunked (P x P) tables,
Papernot et al.'s Algorithm 3 with a best score starting at 0); the CPU kernel
skips whole rows of pairs by a bound and scores the rest on the fly. Both must
return the same pair, including which of several equal scores wins and
whether the map is empty, for both formulations (rescaled or raw products),
float32 and float64, any search domain. A plain double loop over all pairs
checks the reference itself.
"""
import zlib

import numpy as np
import pytest

from scratchnet import kernels
from scratchnet.kernels import reference

FORMULATION_RESCALE = {"exact": True, "paper": False}


def brute_force(a, b, dom, rescale):
    """Algorithm 3 as written: every pair p < q, the first strictly larger score wins."""
    if rescale:
        a, b = reference.jsma_pair_scale(a[None], True)[0], reference.jsma_pair_scale(b[None], True)[0]
    best, pair = a.dtype.type(0), None
    for p in range(len(a)):
        for q in range(p + 1, len(a)):
            if not (dom[p] and dom[q]):
                continue
            A, B = a[p] + a[q], b[p] + b[q]      # numpy scalars: sums and products in a's dtype
            if A > 0 and B < 0 and -(A * B) > best:
                best, pair = -(A * B), (p, q)
    return pair


def random_case(rng, n, P, dtype, kind):
    """alpha, beta, domain of one of several kinds of difficulty."""
    if kind == "ties":                           # few distinct values: many equal scores
        a = rng.integers(-3, 4, (n, P)).astype(dtype)
        b = rng.integers(-3, 4, (n, P)).astype(dtype)
    elif kind == "probs-like":                   # beta close to -alpha, as for the probabilities
        a = rng.standard_normal((n, P)).astype(dtype)
        b = -a + dtype(0.1) * rng.standard_normal((n, P)).astype(dtype)
    elif kind == "tiny":                         # raw products underflow float32 (not float64)
        a = (rng.standard_normal((n, P)) * 1e-25).astype(dtype)
        b = (rng.standard_normal((n, P)) * 1e-25).astype(dtype)
    elif kind == "mixed-scale":                  # some images tiny, some normal, some all zero
        scale = rng.choice([1.0, 1e-22, 1e-30, 0.0], size=(n, 1))
        a = (rng.standard_normal((n, P)) * scale).astype(dtype)
        b = (rng.standard_normal((n, P)) * scale).astype(dtype)
    else:
        raise ValueError(kind)
    dom = rng.random((n, P)) > rng.uniform(0, 0.9, (n, 1))   # each image its own domain density
    dom[0] = False                               # an empty domain
    if n > 1:
        dom[1] = False
        dom[1, rng.integers(P)] = True           # a single pixel: no pair
    if n > 2:
        b[2] = np.abs(b[2]) + dtype(0.5)         # B > 0 everywhere: an empty map
    return a, b, dom


def assert_same(got, want, what):
    p, q, found = (np.asarray(v) for v in got)
    p0, q0, f0 = (np.asarray(v) for v in want)
    assert found.dtype == bool and p.dtype.kind == "i", what
    np.testing.assert_array_equal(found, f0, err_msg=f"{what}: found")
    np.testing.assert_array_equal(p, p0, err_msg=f"{what}: p")
    np.testing.assert_array_equal(q, q0, err_msg=f"{what}: q")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("formulation", ["exact", "paper"])
@pytest.mark.parametrize("kind", ["ties", "probs-like", "tiny", "mixed-scale"])
def test_cpu_kernel_matches_the_reference(dtype, formulation, kind):
    rng = np.random.default_rng(zlib.crc32(f"{np.dtype(dtype).name} {formulation} {kind}".encode()))
    rescale = FORMULATION_RESCALE[formulation]
    cpu = kernels.get("jsma_pair_search", np)
    ref = kernels.get("jsma_pair_search", np, impl="reference")
    assert cpu is not ref
    for n, P in ((11, 37), (5, 200), (3, 784)):
        a, b, dom = random_case(rng, n, P, dtype, kind)
        want = ref(a, b, dom, rescale=rescale, pair_chunk=4)
        assert_same(cpu(a, b, dom, rescale=rescale, pair_chunk=4), want, f"{kind} {formulation} n={n} P={P}")
        assert not want[2][0] and not want[2][1]     # the empty and single-pixel domains
        if n > 2:
            assert not want[2][2]                    # B > 0 everywhere
        if n > 3 and kind in ("ties", "probs-like"):
            assert want[2][3:].mean() > 0.5, "the case must exercise found pairs"


@pytest.mark.parametrize("formulation", ["exact", "paper"])
def test_reference_matches_the_published_double_loop(formulation):
    rng = np.random.default_rng(7)
    rescale = FORMULATION_RESCALE[formulation]
    for kind in ("ties", "probs-like", "mixed-scale"):
        a, b, dom = random_case(rng, 9, 23, np.float32, kind)
        p, q, found = reference.jsma_pair_search(a, b, dom, rescale=rescale, pair_chunk=2)
        for i in range(len(a)):
            pair = brute_force(a[i], b[i], dom[i], rescale)
            assert found[i] == (pair is not None), (kind, i)
            if pair is not None:
                assert (int(p[i]), int(q[i])) == pair, (kind, i)     # the same pair, the same order


def test_ties_go_to_the_first_pair_in_row_major_order():
    """Image 0: four equal pixels, every pair scores the same, (0, 1) wins; image 1: the
    same with pixel 0 out of the domain, (1, 2) wins. Image 2: (0, 2) and (1, 2) both
    score 12; the kernel, visiting pixels by decreasing alpha, meets (1, 2) first and
    must still return (0, 2)."""
    a = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 2, 2, 0]], np.float32)
    b = np.array([[-1, -1, -1, -1], [-1, -1, -1, -1], [-2, -1, -2, 2]], np.float32)
    dom = np.ones((3, 4), bool)
    dom[1, 0] = False
    for impl in ("reference", "cpu"):
        p, q, found = kernels.get("jsma_pair_search", np, impl=impl)(a, b, dom, rescale=False)
        assert found.all() and list(p) == [0, 1, 0] and list(q) == [1, 2, 2], impl


@pytest.mark.parametrize("P", [3, 4, 6, 9])
def test_cpu_kernel_matches_the_reference_on_many_small_tied_images(P):
    """Values in {-2, ..., 2}: equal scores everywhere, in every position of the
    kernel's visiting order, and rows whose bound equals the best score so far."""
    rng = np.random.default_rng(P)
    a = rng.integers(-2, 3, (3000, P)).astype(np.float32)
    b = rng.integers(-2, 3, (3000, P)).astype(np.float32)
    dom = rng.random((3000, P)) > 0.1
    for rescale in (True, False):
        want = reference.jsma_pair_search(a, b, dom, rescale=rescale, pair_chunk=500)
        assert 0.2 < want[2].mean() < 1             # both found and empty maps occur
        assert_same(kernels.get("jsma_pair_search", np)(a, b, dom, rescale=rescale), want, f"P={P}")


def test_paper_formulation_loses_pairs_whose_float32_products_underflow():
    """alpha and beta near 1e-25: every product is near 1e-50, below float32's smallest
    number, so the raw search ties at 0 and finds nothing; rescaled, the same gradients
    give the pair they give at ordinary size. In float64 nothing underflows."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 50))
    b = -a + 0.1 * rng.standard_normal((4, 50))
    dom = np.ones((4, 50), bool)
    for impl in ("reference", "cpu"):
        search = kernels.get("jsma_pair_search", np, impl=impl)
        normal = search(a.astype(np.float32), b.astype(np.float32), dom, rescale=False)
        tiny32 = [v * np.float32(1e-25) for v in (a.astype(np.float32), b.astype(np.float32))]
        assert normal[2].all()
        assert not search(*tiny32, dom, rescale=False)[2].any(), impl                 # paper: empty
        assert_same(search(*tiny32, dom, rescale=True), normal, f"{impl} exact, tiny")  # exact: found
        assert search(a * 1e-25, b * 1e-25, dom, rescale=False)[2].all(), impl        # float64: found


def test_the_attack_uses_the_registered_kernel_and_checks_the_formulation():
    from scratchnet.attacks.jsma import saliency_pairs
    rng = np.random.default_rng(5)
    a, b, dom = random_case(rng, 6, 40, np.float32, "probs-like")
    for formulation, rescale in FORMULATION_RESCALE.items():
        assert_same(saliency_pairs(a, b, dom, formulation=formulation),
                    reference.jsma_pair_search(a, b, dom, rescale=rescale), formulation)
    with pytest.raises(ValueError, match="formulation 'exact'.*'paper'.*got 'published'"):
        saliency_pairs(a, b, dom, formulation="published")


def test_gpu_runs_the_reference_on_cupy_arrays():
    from scratchnet.backend import gpu_available, to_numpy
    ok, reason = gpu_available()
    if not ok:
        pytest.skip(f"GPU not testable here: {reason}")
    import cupy
    rng = np.random.default_rng(9)
    a, b, dom = random_case(rng, 7, 300, np.float32, "ties")
    for rescale in (True, False):
        got = kernels.get("jsma_pair_search", cupy)(cupy.asarray(a), cupy.asarray(b), cupy.asarray(dom),
                                                    rescale=rescale)
        assert_same([to_numpy(v) for v in got], reference.jsma_pair_search(a, b, dom, rescale=rescale),
                    f"gpu rescale={rescale}")
