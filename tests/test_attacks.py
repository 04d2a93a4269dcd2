"""Attacks, part 1 (no training): input gradients against finite differences in
float64, the log-space magnitudes, FGSM's exact step, the JSMA pair search and
its memory cap, budgets and bad input."""
import math
import tracemalloc

import numpy as np
import pytest

from scratchnet import functional as F
from scratchnet.attacks import fgsm, jsma, pgd, cw_l2
from scratchnet.attacks.common import distortions, L0_TOLERANCE
from scratchnet.attacks.cw import f6
from scratchnet.attacks.magnitudes import float64_copy, log10_loss_grad_norms, log10_probs_jacobian_norms
from scratchnet.attacks.sources import (attack_gradient, jacobian, loss_dlogits, loss_gradient,
                                        objective_gradient, vjps)
from scratchnet.attacks.jsma import saliency_pairs
from scratchnet.kernels.reference import jsma_pair_search as reference_pair_search
from scratchnet.gradcheck import assert_close_gradients, numerical_vjp
from scratchnet.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from scratchnet.losses import softmax_cross_entropy
from scratchnet.model import Sequential

K = 4


def small_conv(dtype=np.float64, seed=0):
    """conv 3x3 (3 filters) - ReLU - max-pool 2 - dense 12 -> 4, on 1x6x6 images."""
    rng = np.random.default_rng(seed)
    return Sequential([Conv2D(1, 3, 3, rng=rng, dtype=dtype, name="conv"), ReLU(name="relu"),
                       MaxPool2D(2, name="pool"), Flatten(name="flat"),
                       Dense(12, K, rng=rng, dtype=dtype, name="dense")])


def images(n=3, seed=1):
    """float64 images with well-separated pixel values (no ties for max-pool, no ReLU kinks within h)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.linspace(0.05, 0.95, 36)).reshape(1, 6, 6) for _ in range(n)])


def fd_of(model, x, fn):
    """Numerical gradient of sum_n fn(logits)[n] w.r.t. x (images are independent)."""
    return numerical_vjp(lambda xx: fn(model.logits(xx)), x.copy(), np.ones(len(x)))


# ===== input gradients equal finite differences (float64) =====

@pytest.mark.parametrize("T", [1.0, 3.0])
def test_loss_gradient_matches_finite_differences(T):
    model, x = small_conv(), images()
    y = np.array([0, 2, 3])
    dx, _ = loss_gradient(model, x.copy(), y, T)

    def per_image_loss(z):
        logp = F.log_softmax(z, T)
        return -logp[np.arange(len(z)), y]
    assert_close_gradients(dx, fd_of(model, x, per_image_loss), tol=1e-7, what=f"loss gradient at T={T}")


@pytest.mark.parametrize("wrt,T", [("probs", 1.0), ("probs", 2.5), ("logits", 1.0)])
def test_jacobian_matches_finite_differences(wrt, T):
    model, x = small_conv(), images(2)
    J, _ = jacobian(model, x.copy(), wrt, T)
    assert J.shape == (2, K, 1, 6, 6)
    for i in range(K):
        def out_i(z, i=i):
            return (F.softmax_forward(z, T)[0] if wrt == "probs" else z)[:, i]
        assert_close_gradients(J[:, i], fd_of(model, x, out_i), tol=1e-7, what=f"{wrt} Jacobian row {i}")


def test_vjps_are_jacobian_contractions_and_jsma_alpha_beta():
    model, x = small_conv(), images(3)
    t = np.array([1, 0, 3])
    e_t = np.eye(K)[t]
    for wrt in ("probs", "logits"):
        J, _ = jacobian(model, x.copy(), wrt, 1.0)
        (alpha, beta), _ = vjps(model, x.copy(), [e_t, 1 - e_t], wrt, 1.0)
        np.testing.assert_allclose(alpha, J[np.arange(3), t], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(beta, J.sum(axis=1) - J[np.arange(3), t], rtol=1e-10, atol=1e-14)
    # on probabilities the classes sum to 1, so beta = -alpha (the JSMA pair condition then
    # reads alpha_p + alpha_q > 0): a fact the test checks, not an assumption of the code
    (alpha, beta), _ = vjps(model, x.copy(), [e_t, 1 - e_t], "probs", 1.0)
    np.testing.assert_allclose(beta, -alpha, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("wrt", ["loss", "probs", "logits"])
@pytest.mark.parametrize("targeted", [False, True])
def test_attack_gradient_matches_finite_differences(wrt, targeted):
    model, x = small_conv(), images(3, seed=4)
    y, t = np.array([0, 1, 2]), np.array([3, 3, 0])
    T = 2.0
    dx, z = attack_gradient(model, x.copy(), y, wrt, T, t if targeted else None)

    def objective(zz):
        cls = t if targeted else y
        n = np.arange(len(zz))
        if wrt == "loss":
            ce = -F.log_softmax(zz, T)[n, cls]
            return -ce if targeted else ce
        if wrt == "probs":
            p = F.softmax_forward(zz, T)[0][n, cls]
            return p if targeted else -p
        other = np.where(np.eye(K)[cls] > 0, -np.inf, zz).max(axis=1)
        return zz[n, cls] - other if targeted else other - zz[n, cls]
    assert_close_gradients(dx, fd_of(model, x, objective), tol=1e-8, what=f"{wrt} objective")


def test_objective_gradient_of_cw_f6_matches_finite_differences():
    model, x = small_conv(), images(3, seed=5)
    t = np.array([3, 0, 1])

    def objective(z):
        f, dZ, _ = f6(z, t, 0.0, True)
        return f, dZ
    dx, values, z = objective_gradient(model, x.copy(), objective)
    assert values.shape == (3,)
    assert_close_gradients(dx, fd_of(model, x, lambda zz: f6(zz, t, 0.0, True)[0]), tol=1e-8, what="f6")


def test_loss_dlogits_is_the_per_image_training_gradient():
    rng = np.random.default_rng(0)
    z, y = rng.standard_normal((5, K)) * 3, np.array([0, 1, 2, 3, 0])
    for T in (1.0, 7.0):
        _, mean_grad = softmax_cross_entropy(z, y, T)
        np.testing.assert_allclose(loss_dlogits(z, y, T), mean_grad * len(z), rtol=1e-12, atol=1e-15)


# ===== log-space magnitudes =====

def _norms(g):
    g = np.abs(g.reshape(len(g), -1))
    return {"l1": g.sum(1), "l2": np.sqrt((g * g).sum(1)), "linf": g.max(1)}


def test_log_space_norms_equal_plain_float64_where_nothing_underflows():
    model, x = small_conv(), images(3)
    y = np.array([0, 2, 3])
    for T in (1.0, 4.0):
        plain = _norms(loss_gradient(model, x.copy(), y, T)[0])
        logs = log10_loss_grad_norms(model, x.copy(), y, T)
        J, _ = jacobian(model, x.copy(), "probs", T)
        rows = log10_probs_jacobian_norms(model, x.copy(), T)
        for k in ("l1", "l2", "linf"):
            np.testing.assert_allclose(logs[k], np.log10(plain[k]), atol=1e-10)
            for i in range(K):
                np.testing.assert_allclose(rows["rows"][k][:, i], np.log10(_norms(J[:, i])[k]), atol=1e-10)
        whole = np.abs(J.reshape(len(J), -1))
        np.testing.assert_allclose(rows["l1"], np.log10(whole.sum(1)), atol=1e-10)
        np.testing.assert_allclose(rows["l2"], np.log10(np.sqrt((whole ** 2).sum(1))), atol=1e-10)
        np.testing.assert_allclose(rows["linf"], np.log10(whole.max(1)), atol=1e-10)


def test_log_space_norms_follow_the_margin_where_float64_underflows():
    """Logits scaled 3000x: margins of thousands, exp(-M) < 1e-308. Plain float64 gives
    exactly 0; log space gives -M / ln 10 + log10 ||backward(e_runner - e_y)||."""
    model, x = small_conv(), images(3)
    model["dense"].params["W"] *= 3000.0
    model["dense"].params["b"] *= 3000.0
    z = model.logits(x.copy())
    y = z.argmax(axis=1)                                   # correctly "classified": saturated
    order = np.sort(z, axis=1)
    M = order[:, -1] - order[:, -2]
    assert np.all(M / math.log(10) > 320), f"margins {M} do not underflow float64"
    assert np.all(loss_gradient(model, x.copy(), y)[0] == 0), "plain float64 should underflow to 0"

    runner = np.where(np.eye(K)[y] > 0, -np.inf, z).argmax(axis=1)
    Jz, _ = jacobian(model, x.copy(), "logits")
    direction = Jz[np.arange(3), runner] - Jz[np.arange(3), y]     # backward(e_runner - e_y)
    predicted = -M / math.log(10) + np.log10(_norms(direction)["l2"])
    logs = log10_loss_grad_norms(model, x.copy(), y)
    np.testing.assert_allclose(logs["l2"], predicted, atol=1e-6)
    np.testing.assert_allclose(logs["log10_factor"], -M / math.log(10), atol=1e-6)
    rows = log10_probs_jacobian_norms(model, x.copy())
    np.testing.assert_allclose(rows["rows"]["l2"][np.arange(3), y], predicted, atol=1e-6)
    assert np.all(np.isfinite(rows["l2"])) and np.all(rows["l2"] < -300)


def test_float64_copy_keeps_the_function():
    m32 = small_conv(np.float32)
    m64 = float64_copy(m32)
    x = images(2)
    assert m64.dtype == np.float64
    np.testing.assert_allclose(m64.logits(x), m32.logits(x.astype(np.float32)), rtol=1e-5, atol=1e-5)


# ===== FGSM: exactly eps * sign of the analytic gradient =====

def linear_model(P=16, seed=0):
    """z = x_flat @ W + b: the input gradient of every objective is known in closed form."""
    rng = np.random.default_rng(seed)
    dense = Dense(P, K, rng=rng, dtype=np.float32, name="dense")
    dense.params["W"] = (rng.uniform(0.2, 1.0, (P, K)) * rng.choice([-1, 1], (P, K))).astype(np.float32)
    return Sequential([Flatten(name="flat"), dense])


@pytest.mark.parametrize("T", [1.0, 5.0])
def test_fgsm_step_is_exactly_eps_times_sign_of_the_analytic_gradient(T):
    model = linear_model()
    W = model["dense.W"].astype(np.float64)
    rng = np.random.default_rng(3)
    x = rng.uniform(0.3, 0.7, (6, 1, 4, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 0, 1])
    t = (y + 2) % K
    eps = 0.125
    z = x.reshape(6, -1).astype(np.float64) @ W
    p = np.exp(z / T - z.max(1, keepdims=True) / T)
    p /= p.sum(1, keepdims=True)
    cases = {  # analytic gradients (N, P) of the objective each attack increases
        ("loss", None): (p - np.eye(K)[y]) @ W.T / T,
        ("loss", "t"): -(p - np.eye(K)[t]) @ W.T / T,
        ("logits", None): (np.eye(K)[np.where(np.eye(K)[y] > 0, -np.inf, z).argmax(1)] - np.eye(K)[y]) @ W.T,
    }
    for (wrt, tgt), g in cases.items():
        x_adv, res = fgsm(model, x, y, eps, targets=t if tgt else None, wrt=wrt, T=T)
        expected = np.clip(x + np.float32(eps) * np.sign(g).reshape(x.shape).astype(np.float32), 0, 1)
        assert np.all(np.sign(g) != 0)
        np.testing.assert_array_equal(x_adv, expected)
        np.testing.assert_allclose(np.abs(x_adv - x), eps, rtol=1e-6)       # every pixel moved by eps
        np.testing.assert_allclose(res.linf, eps, rtol=1e-6)
        assert np.all(res.l0 == 16)


def test_fgsm_and_pgd_clip_to_the_unit_box_and_respect_the_budget():
    model = linear_model()
    rng = np.random.default_rng(0)
    x = rng.choice([0.0, 0.02, 0.5, 0.98, 1.0], (8, 1, 4, 4)).astype(np.float32)
    y = rng.integers(0, K, 8)
    x_adv, res = fgsm(model, x, y, 0.3)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert np.all(res.linf <= 0.3 + 1e-6)
    for start in (False, True):
        x_adv, res = pgd(model, x, y, 0.1, step=0.04, steps=7, random_start=start, seed=1)
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert np.all(np.abs(x_adv - x) <= 0.1 + 1e-6)
        assert np.all(res.iterations <= 7)
    a, _ = pgd(model, x, y, 0.1, steps=3, random_start=True, seed=5)
    b, _ = pgd(model, x, y, 0.1, steps=3, random_start=True, seed=5)
    np.testing.assert_array_equal(a, b)


def test_fgsm_leaves_pixels_with_an_exactly_zero_gradient_alone():
    """sign(0) = 0: where the (masked) gradient is exactly zero, FGSM changes nothing."""
    model = linear_model()
    model["dense"].params["W"] *= 1e4                     # saturates the float32 softmax
    x = np.full((2, 1, 4, 4), 0.5, dtype=np.float32)
    y = model.predict(x)
    g, _ = attack_gradient(model, x, y, "probs")
    assert np.all(g == 0)
    x_adv, res = fgsm(model, x, y, 0.3, wrt="probs")
    np.testing.assert_array_equal(x_adv, x)
    assert not res.success.any()


# ===== JSMA's pair search =====

def brute_force_pair(a, b, dom):
    best, pair = -np.inf, None
    for p in range(len(a)):
        for q in range(len(a)):
            if p == q or not (dom[p] and dom[q]):
                continue
            A, B = a[p] + a[q], b[p] + b[q]
            if A > 0 and B < 0 and A * -B > best:
                best, pair = A * -B, (p, q)
    return pair


def test_saliency_pairs_matches_a_brute_force_search_for_any_chunk():
    rng = np.random.default_rng(0)
    n, P = 7, 12
    a = rng.standard_normal((n, P)).astype(np.float32)
    b = rng.standard_normal((n, P)).astype(np.float32)
    dom = rng.random((n, P)) > 0.2
    b[3] = np.abs(b[3]) + 0.1                            # no pair can have B < 0: empty map
    for chunk in (1, 3, 8):
        p, q, found = saliency_pairs(a, b, dom, pair_chunk=chunk)
        for i in range(n):
            pair = brute_force_pair(a[i], b[i], dom[i])
            if pair is None:
                assert not found[i]
            else:
                assert found[i] and {int(p[i]), int(q[i])} == set(pair)
    assert not found[3]


def test_saliency_pairs_scaling_survives_tiny_float32_gradients():
    """1e-25 * 1e-25 underflows float32; per-image scaling keeps the ranking."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 10)).astype(np.float32)
    b = -a + 0.1 * rng.standard_normal((2, 10)).astype(np.float32)
    dom = np.ones((2, 10), bool)
    p1, q1, f1 = saliency_pairs(a, b, dom)
    p2, q2, f2 = saliency_pairs(a * np.float32(1e-25), b * np.float32(1e-25), dom)
    assert f1.all() and f2.all()
    assert [set(v) for v in zip(p1, q1)] == [set(v) for v in zip(p2, q2)]


def test_saliency_pair_memory_is_bounded_by_the_chunk_not_the_batch():
    """The (P x P) tables exist for pair_chunk images at a time: the peak grows with the
    chunk, not with the number of images (documented: about 8 bytes x P^2 x chunk).
    This is the NumPy / CuPy search (the reference, run on the GPU); the CPU kernel
    forms no tables."""
    rng = np.random.default_rng(0)
    P = 400
    peaks = {}
    for n, chunk in ((4, 2), (32, 2), (32, 8)):
        a = rng.standard_normal((n, P)).astype(np.float32)
        b = -a + 0.1 * rng.standard_normal((n, P)).astype(np.float32)
        dom = np.ones((n, P), bool)
        tracemalloc.start()
        reference_pair_search(a, b, dom, pair_chunk=chunk)
        peaks[n, chunk] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[32, 2] < 1.5 * peaks[4, 2], peaks             # 8x the images, same peak
    for chunk in (2, 8):                                        # documented: ~8 bytes x P^2 x chunk
        assert peaks[32, chunk] < (9 * chunk + 1) * P * P, (chunk, peaks)
    assert peaks[32, 8] > 2.5 * peaks[32, 2], peaks             # the chunk is what costs memory


# ===== bad input =====

def test_bad_arguments_are_clear_value_errors():
    model = linear_model()
    x = np.full((2, 1, 4, 4), 0.5, np.float32)
    y = np.array([0, 1])
    with pytest.raises(ValueError, match="wrt"):
        fgsm(model, x, y, 0.1, wrt="softmax")
    with pytest.raises(ValueError, match="JSMA"):
        jsma(model, x, y, np.array([1, 2]), wrt="loss")
    with pytest.raises(ValueError, match="targeted"):
        jsma(model, x, y, None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fgsm(model, x + 1, y, 0.1)
    with pytest.raises(ValueError, match="labels must have shape"):
        fgsm(model, x, np.array([0, 1, 2]), 0.1)
    with pytest.raises(ValueError, match="must differ"):
        jsma(model, x, y, y)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\]"):
        pgd(model, x, np.array([0, 7]), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        fgsm(model, x, y, 0.1, T=0)
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, -0.1)
    with pytest.raises(ValueError, match="kappa"):
        cw_l2(model, x, y, kappa=-1)
    with pytest.raises(ValueError, match="max_distortion"):
        jsma(model, x, y, np.array([1, 2]), max_distortion=0)


def test_distortions_count_pixels_beyond_half_a_grey_level():
    x = np.zeros((1, 1, 2, 2))
    x_adv = np.array([[[[0.0, L0_TOLERANCE / 2], [0.5, -0.3]]]])
    l0, l2, linf = distortions(x, x_adv)
    assert l0[0] == 2
    np.testing.assert_allclose(l2[0], math.sqrt((L0_TOLERANCE / 2) ** 2 + 0.25 + 0.09))
    np.testing.assert_allclose(linf[0], 0.5)


# ===== diagnostics =====

def test_gradient_diagnostics_per_image_numbers_match_direct_computation():
    from scratchnet.attacks import gradient_diagnostics
    model = small_conv(np.float32)
    x = images(6).astype(np.float32)
    model["dense"].params["W"] *= np.float32(9)   # margins 15-19: some images saturate in float32 (M > ~16.6)
    z = model.logits(x)
    y = np.array([0, 1, 2, 3, 0, 1])
    d = gradient_diagnostics(model, x, y, T=1.0, batch_size=4)
    g, _ = loss_gradient(model, x, y)
    gflat = g.reshape(6, -1).astype(np.float64)
    np.testing.assert_allclose(d["loss_l2"], np.sqrt((gflat ** 2).sum(1)), rtol=1e-12)
    np.testing.assert_allclose(d["loss_l1"], np.abs(gflat).sum(1), rtol=1e-12)
    np.testing.assert_array_equal(d["loss_zero_frac"], (gflat == 0).mean(1))
    np.testing.assert_array_equal(d["loss_all_zero"], (gflat == 0).all(1))
    J, _ = jacobian(model, x, "probs")
    np.testing.assert_array_equal(d["probs_all_zero"], (J.reshape(6, -1) == 0).all(1))
    p = F.softmax_forward(z, 1.0)[0]
    np.testing.assert_array_equal(d["top_prob"], p.max(1))
    np.testing.assert_array_equal(d["saturated"], p.max(1) == 1.0)
    assert d["saturated"].any() and not d["saturated"].all(), d["top_prob"]
    z64 = float64_copy(model).logits(x.astype(np.float64))
    s = np.sort(z64, 1)
    np.testing.assert_allclose(d["margin"], s[:, -1] - s[:, -2], rtol=1e-12)
    np.testing.assert_allclose(d["log10_factor_predicted"], -d["margin"] / math.log(10), rtol=1e-12)
    np.testing.assert_array_equal(d["correct"], z.argmax(1) == y)
    # true sizes: equal to plain float64 where float64 holds them, finite even where float32 is 0
    g64, _ = loss_gradient(float64_copy(model), x.astype(np.float64), y)
    n64 = np.sqrt((g64.reshape(6, -1) ** 2).sum(1))
    np.testing.assert_allclose(d["loss_log10_l2"], np.log10(n64), atol=1e-9)
    assert np.all(np.isfinite(d["probs_log10_l2"]))
    # at a higher T the same model is not saturated: the 1/T rescaling brings the gradient back
    d_hot = gradient_diagnostics(model, x, y, T=60.0)
    assert not d_hot["saturated"].any() and not d_hot["probs_all_zero"].any()
    np.testing.assert_allclose(d_hot["margin"], d["margin"] / 60, rtol=1e-12)


def test_summarize_reports_zeros_median_geometric_mean_and_the_pitfall():
    from scratchnet.attacks.diagnostics import summarize
    s = summarize(np.array([1e-10, 1e-10, 1e-10, 1.0, 0.0]))
    assert s["n"] == 5 and s["fraction_zero"] == 0.2
    assert s["log10_median"] == pytest.approx(-10)
    assert s["log10_geometric_mean"] == -math.inf                     # one exact zero
    assert s["log10_geometric_mean_nonzero"] == pytest.approx(-7.5)   # (-30 + 0) / 4
    assert s["log10_mean_PITFALL"] == pytest.approx(math.log10((1 + 3e-10) / 5))
    # log10 input, with a mask; far below float64's range
    s = summarize(np.array([-400.0, -500.0, 2.0]), mask=np.array([True, True, False]), log10=True)
    assert s["n"] == 2 and s["log10_median"] == pytest.approx(-450)
    assert s["log10_mean_PITFALL"] == pytest.approx(-400 + math.log10((1 + 1e-100) / 2))


def test_learning_the_class_count_keeps_the_layers_backward_caches():
    """``model.n_classes`` reads the weights: checking an attack's input (which needs K)
    between a forward pass and its backward passes must not replace what backward uses."""
    from scratchnet.attacks.common import prepare
    model, x = small_conv(), images(3)
    dz = np.random.default_rng(0).standard_normal((3, K))
    model.logits(x)
    expected = model.backward(dz).copy()
    model.logits(x)
    assert model.n_classes == K
    prepare(model, images(1, seed=9), np.array([1]), np.array([2]))    # one other image, checked
    np.testing.assert_array_equal(model.backward(dz), expected)
