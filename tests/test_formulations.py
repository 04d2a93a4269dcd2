"""The published arithmetic beside the exact one (``formulation="paper" | "exact"``).

* FGSM / PGD: the "paper" loss gradient is ``softmax(z / T) - onehot`` in the
  model's float32, as frameworks compute it. It equals that expression
  bit for bit, and it differs from the cancellation-free gradient exactly
  where the softmax saturates (p_y rounds to 1.0 while another p_j is not 0).
* JSMA: the "paper" pair search multiplies the raw float32 gradients. At a
  temperature where those products underflow it finds no pair on images where
  the rescaled ("exact") search still does; at T = 1 the two agree.

The networks are the small float32 ones of tests/test_attacks.py, untrained
(no data needed); a small softmax temperature T stands in for the large
logits of a network trained hot: softmax(z / T) saturates the same way.
"""
import numpy as np
import pytest

from scratchnet import functional as F
from scratchnet.attacks import cw_l2, fgsm, jsma, pgd
from scratchnet.attacks.sources import attack_gradient, input_backward, loss_dlogits, vjps
from scratchnet.losses import one_hot
from scratchnet.attacks.jsma import saliency_pairs
from scratchnet.losses import cross_entropy_dlogits, softmax_minus_onehot_dlogits
from test_attacks import images, small_conv

F32_ULP_OF_1 = 2.0 ** -23


def float32_setting(n=40):
    model = small_conv(np.float32, seed=0)
    x = images(n, seed=1).astype(np.float32)
    y = model.predict(x)                  # the model's own classes: every image starts correct
    return model, x, y


# ===== the loss gradient: softmax - onehot in float32 =====

def independent_softmax_minus_onehot(z, y, T):
    """What a framework computes, written out here in float32: (exp(s - max s) / sum - onehot) / T."""
    s = z / np.float32(T)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    t = np.zeros_like(p)
    t[np.arange(len(y)), y] = 1
    return (p - t) / np.float32(T)


def designed_logits(T):
    """float32 logits whose margin (label minus the others) runs from 0 to 200 times T:
    unsaturated rows, saturated rows (p_y == 1.0 in float32, the others tiny but
    representable), and rows where every other p_j underflows too."""
    margins = [0.0, 1.0, 3.0, 6.0, 9.0, 20.0, 30.0, 60.0, 90.0, 120.0, 200.0, -5.0, -40.0]
    z = np.zeros((len(margins), 4), np.float32)
    z[:, 1] = np.float32(T) * np.asarray(margins, np.float32)     # label 1; the rival classes at 0
    z[:, 2] = np.float32(T) * np.float32(-0.5)
    return z, np.ones(len(margins), np.int64)


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_paper_loss_gradient_is_softmax_minus_onehot_in_float32(T):
    z, y = designed_logits(T)
    got = loss_dlogits(z, y, T, formulation="paper")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, independent_softmax_minus_onehot(z, y, T))


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_paper_and_exact_differ_exactly_where_the_softmax_saturates(T):
    z, y = designed_logits(T)
    paper = loss_dlogits(z, y, T, formulation="paper")
    exact = loss_dlogits(z, y, T)                     # the default
    p, _ = F.softmax_forward(z, T)
    others = np.delete(p, 1, axis=1)
    saturated = (p[:, 1] == 1.0) & (others > 0).any(axis=1)
    assert saturated.sum() >= 4 and (~saturated).sum() >= 4          # both kinds are present
    differs = ~np.isclose(paper, exact, rtol=1e-3, atol=0).all(axis=1)
    np.testing.assert_array_equal(differs, saturated)
    # saturated: the label's entry is exactly 0 instead of -sum_{j != y} p_j / T
    assert (paper[saturated, 1] == 0).all() and (exact[saturated, 1] < 0).all()
    # elsewhere the two differ by a few float32 roundings of 1 at most, and only at the label
    assert np.abs(paper[~saturated, 1] - exact[~saturated, 1]).max() <= 4 * F32_ULP_OF_1 / T
    np.testing.assert_allclose(np.delete(paper, 1, axis=1), np.delete(exact, 1, axis=1), rtol=1e-5, atol=0)


def test_the_soft_target_function_matches_the_exact_one_away_from_saturation():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 5)).astype(np.float32)
    t = rng.dirichlet(np.ones(5), 6).astype(np.float32)
    np.testing.assert_allclose(softmax_minus_onehot_dlogits(z, t, 2.0),
                               cross_entropy_dlogits(F.log_softmax(z, 2.0), t, 2.0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("T", [1.0, 0.05])
def test_fgsm_paper_steps_along_the_sign_of_the_framework_gradient(T):
    model, x, y = float32_setting()
    eps = 0.1
    z = model.logits(x)
    dx = input_backward(model, independent_softmax_minus_onehot(z, y, T))   # the framework's gradient
    want = np.clip(x + np.float32(eps) * np.sign(dx), 0, 1)
    g, _ = attack_gradient(model, x, y, "loss", T, formulation="paper")
    np.testing.assert_array_equal(g, dx)
    x_adv, res = fgsm(model, x, y, eps, T=T, formulation="paper")
    np.testing.assert_array_equal(x_adv, want)
    assert res.formulation == "paper" and res.summary()["formulation"] == "paper"
    assert res.to_json()["summary"]["formulation"] == "paper"


def test_fgsm_formulations_part_only_on_saturated_images():
    """T = 1: nothing saturates and the steps are identical. T = 0.1: every image whose
    float32 p_y is 1.0 gets another step, and no image with 1 - p_y above 1e-5 does."""
    model, x, y = float32_setting()
    a, ra = fgsm(model, x, y, 0.1, T=1.0)
    b, rb = fgsm(model, x, y, 0.1, T=1.0, formulation="paper")
    np.testing.assert_array_equal(a, b)
    assert ra.formulation == "exact"
    T = 0.1
    a, _ = fgsm(model, x, y, 0.1, T=T)
    b, _ = fgsm(model, x, y, 0.1, T=T, formulation="paper")
    differs = (a != b).reshape(len(x), -1).any(axis=1)
    z = model.logits(x)
    saturated = F.softmax_forward(z, T)[0][np.arange(len(x)), y] == 1.0
    one_minus_py = -np.expm1(F.log_softmax(z.astype(np.float64), T)[np.arange(len(x)), y])
    assert 10 <= saturated.sum() < len(x)
    assert differs[saturated].all()
    assert (one_minus_py[differs] < 1e-5).all()


def test_pgd_passes_the_formulation_to_its_loss_gradient():
    """One BIM step of size eps is FGSM, formulation included (on images it attacks)."""
    model, x, y = float32_setting()
    T = 0.05                                          # every image saturated: the formulations part
    for formulation in ("exact", "paper"):
        x_f, _ = fgsm(model, x, y, 0.1, T=T, formulation=formulation)
        x_p, res = pgd(model, x, y, 0.1, step=0.1, steps=1, T=T, formulation=formulation)
        np.testing.assert_array_equal(x_p, x_f)
        assert res.formulation == formulation
    assert not np.array_equal(fgsm(model, x, y, 0.1, T=T)[0], fgsm(model, x, y, 0.1, T=T, formulation="paper")[0])


# ===== JSMA: the published products underflow =====

def first_iteration_pairs(model, x, y, t, T, formulation):
    """alpha, beta of the first JSMA iteration and the pairs they give."""
    e_t = one_hot(t, 4, np, np.float32)
    (alpha, beta), _ = vjps(model, x, [e_t, 1 - e_t], "probs", T)
    alpha, beta = alpha.reshape(len(x), -1), beta.reshape(len(x), -1)
    dom = x.reshape(len(x), -1) < 1
    return alpha, beta, saliency_pairs(alpha, beta, dom, formulation=formulation)


def test_jsma_formulations_agree_at_T_1():
    model, x, y = float32_setting()
    t = (y + 1) % 4
    alpha, beta, (p1, q1, f1) = first_iteration_pairs(model, x, y, t, 1.0, "exact")
    _, _, (p2, q2, f2) = first_iteration_pairs(model, x, y, t, 1.0, "paper")
    assert f1.all()
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(q1, q2)
    a, ra = jsma(model, x, y, t, max_distortion=0.5)
    b, rb = jsma(model, x, y, t, max_distortion=0.5, formulation="paper")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ra.iterations, rb.iterations)
    assert ra.iterations.sum() > len(x)               # pairs were chosen and moved, several per image
    assert (ra.formulation, rb.formulation) == ("exact", "paper")
    assert rb.summary()["formulation"] == "paper"


def test_jsma_paper_finds_no_pair_where_float32_products_underflow():
    """At T = 0.03 the target's probability is about exp(-60): alpha and beta are near
    1e-25, their products near 1e-50 round to 0 in float32, every score ties at 0 and
    the published search stops. The rescaled search still ranks the same gradients."""
    model, x, y = float32_setting()
    t = (y + 1) % 4
    T = 0.03
    alpha, beta, (pe, qe, fe) = first_iteration_pairs(model, x, y, t, T, "exact")
    _, _, (pp, qp, fp) = first_iteration_pairs(model, x, y, t, T, "paper")
    lost = fe & ~fp
    assert lost.sum() >= 10, (fe.sum(), fp.sum())
    assert not (fp & ~fe).any()                       # the paper search never finds more
    rows = np.flatnonzero(lost)
    A = alpha[rows, pe[rows]] + alpha[rows, qe[rows]]     # the exact search's pair, raw float32 sums
    B = beta[rows, pe[rows]] + beta[rows, qe[rows]]
    assert (A > 0).all() and (B < 0).all()            # admissible, and the gradients are not zero ...
    assert (-(A * B) == 0).all()                      # ... but the float32 score underflows to 0
    assert (-(A.astype(np.float64) * B.astype(np.float64)) > 0).all()
    # the whole attack: the published search gives up on each such image at once, and
    # sooner or later on every image; the rescaled one keeps going on most
    _, re = jsma(model, x, y, t, T=T, max_distortion=0.5)
    _, rp = jsma(model, x, y, t, T=T, max_distortion=0.5, formulation="paper")
    assert (rp.iterations[lost] == 0).all() and rp.extra["empty_saliency"] == len(x)
    assert (re.iterations[lost] > 0).all() and re.extra["empty_saliency"] < len(x) - 10


# ===== bad input and the records =====

def test_an_unknown_formulation_is_a_clear_value_error():
    model, x, y = float32_setting(2)
    t = (y + 1) % 4
    msg = "formulation 'exact' .* or 'paper' .*got 'framework'"
    for call in (lambda: fgsm(model, x, y, 0.1, formulation="framework"),
                 lambda: pgd(model, x, y, 0.1, formulation="framework"),
                 lambda: jsma(model, x, y, t, formulation="framework"),
                 lambda: loss_dlogits(model.logits(x), y, formulation="framework")):
        with pytest.raises(ValueError, match=msg):
            call()


def test_an_attack_with_one_formulation_records_none():
    model, x, y = float32_setting(2)
    _, res = cw_l2(model, x, y, binary_steps=1, steps=2)
    assert res.formulation is None and res.summary()["formulation"] is None
