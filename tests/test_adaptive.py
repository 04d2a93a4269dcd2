"""The adaptive evaluation, part 1 (no training, no data): the DLR loss and its
gradient in float64, its invariance to the scale of the logits, APGD's schedule
and ball, the masking in its purest form (a saturated softmax stops APGD-CE and
not APGD-DLR), the Square attack's queries (and never a backward pass), the
indicators of attack failure on synthetic records, and bad arguments."""
import json

import numpy as np
import pytest

from scratchnet.attacks import apgd, square_linf, transfer
from scratchnet.attacks import indicators
from scratchnet.attacks.apgd import attack_loss, checkpoints
from scratchnet.attacks.dlr import dlr_loss
from scratchnet.attacks.sources import objective_gradient
from scratchnet.attacks.square import margin_loss, p_selection
from scratchnet.gradcheck import assert_close_gradients, numerical_vjp
from scratchnet.layers import Dense, Flatten, ReLU
from scratchnet.model import Sequential

K = 6


def small_net(dtype=np.float64, seed=0, K=K, scale=1.0):
    """36 - 12 - ReLU - K on 1x6x6 images; ``scale`` multiplies the last layer (the logits)."""
    rng = np.random.default_rng(seed)
    model = Sequential([Flatten(name="flat"), Dense(36, 12, rng=rng, dtype=dtype, name="d1"), ReLU(name="r1"),
                        Dense(12, K, rng=rng, dtype=dtype, name="d2")])
    model["d2"].params["W"] = model["d2"].params["W"] * dtype(scale)
    model["d2"].params["b"] = model["d2"].params["b"] * dtype(scale)
    return model


def images(n=4, seed=1, dtype=np.float64):
    """Images with well-separated pixel values (no ReLU kink within the finite-difference step)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.linspace(0.05, 0.95, 36)).reshape(1, 6, 6) for _ in range(n)]).astype(dtype)


def spread_logits(n, K, seed=0, step=0.7):
    """Logits with no two values within ``step`` of each other in a row (no sorting tie within h)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.arange(K) * step) + rng.normal() for _ in range(n)])


# ===== DLR: values, gradient (float64), invariance =====

@pytest.mark.parametrize("targeted", [False, True])
def test_dlr_gradient_matches_finite_differences(targeted):
    z = spread_logits(6, 7, seed=3)
    top = z.argmax(axis=1)
    # rows 0-2: the label is the top class (correct); rows 3-5: it is not (misclassified)
    y = np.array([top[0], top[1], top[2], (top[3] + 1) % 7, (top[4] + 2) % 7, (top[5] + 3) % 7])
    t = (y + 4) % 7 if targeted else None
    values, dz = dlr_loss(z, y, t)
    numeric = numerical_vjp(lambda zz: dlr_loss(zz, y, t)[0], z.copy(), np.ones(len(z)))
    assert_close_gradients(dz, numeric, tol=1e-7, what=f"{'targeted ' if targeted else ''}DLR gradient", inputs=z)
    # the sign convention: DLR > 0 exactly when the attack's goal is met
    s = np.sort(z, axis=1)[:, ::-1]
    n = np.arange(len(z))
    if targeted:
        expect = -(z[n, y] - z[n, t]) / (s[:, 0] - (s[:, 2] + s[:, 3]) / 2)
    else:
        other = np.where(np.eye(7)[y] > 0, -np.inf, z).max(axis=1)
        expect = -(z[n, y] - other) / (s[:, 0] - s[:, 2])
        assert np.all(values[:3] < 0) and np.all(values[3:] > 0)
    np.testing.assert_allclose(values, expect, rtol=1e-12)


def test_dlr_through_the_network_matches_finite_differences():
    model, x = small_net(), images(3)
    y = np.array([0, 3, 5])
    for t in (None, np.array([1, 1, 2])):
        dx, values, _ = objective_gradient(model, x.copy(), lambda z: dlr_loss(z, y, t))
        numeric = numerical_vjp(lambda xx: dlr_loss(model.logits(xx), y, t)[0], x.copy(), np.ones(3))
        assert_close_gradients(dx, numeric, tol=1e-6, what="DLR input gradient")


@pytest.mark.parametrize("a", [1e-2, 3.0, 100.0])
def test_dlr_is_invariant_to_shifting_and_scaling_the_logits_and_cross_entropy_is_not(a):
    z = spread_logits(5, K, seed=7)
    y = np.array([0, 1, 2, 3, 4])
    b = np.random.default_rng(0).normal(size=(5, 1)) * 50          # one shift per image
    v, dz = dlr_loss(z, y)
    v2, dz2 = dlr_loss(a * z + b, y)
    np.testing.assert_allclose(v2, v, rtol=1e-9)                    # the T-fold logits: same loss
    np.testing.assert_allclose(dz2 * a, dz, rtol=1e-9, atol=1e-15)  # gradient w.r.t. z scales as 1/a
    ce, _ = attack_loss(z, y, "ce")
    ce2, _ = attack_loss(a * z + b, y, "ce")
    assert np.max(np.abs(ce2 - ce)) > 1e-3                           # cross-entropy sees the scale


def test_dlr_needs_enough_classes():
    with pytest.raises(ValueError, match="at least 3 classes"):
        dlr_loss(np.zeros((2, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="targeted DLR loss needs at least 4 classes"):
        dlr_loss(np.zeros((2, 3)), np.array([0, 1]), np.array([1, 2]))


# ===== APGD =====

def test_apgd_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (the next, 1.05, is past the end)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1000) == [220, 410, 570, 700, 800, 870, 930, 990]
    assert checkpoints(1) == [1]


def _device_model(xp, **kw):
    model = small_net(dtype=np.float32, **kw)
    return model.to("cpu" if xp is np else "gpu")


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.4)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("targeted", [False, True])
def test_apgd_stays_in_its_ball_and_records_its_path(xp, norm, eps, loss, targeted):
    model = _device_model(xp)
    x = images(8, dtype=np.float32)
    y = model.predict(xp.asarray(x))
    t = (y + 1) % K if targeted else None
    x_adv, res = apgd(model, x, y, eps, norm=norm, loss=loss, steps=12, targets=t, seed=3, batch_size=5)
    assert isinstance(x_adv, np.ndarray) and x_adv.min() >= 0 and x_adv.max() <= 1
    d = (x_adv.astype(np.float64) - x).reshape(8, -1)
    size = np.abs(d).max(axis=1) if norm == "linf" else np.sqrt((d * d).sum(axis=1))
    assert np.all(size <= eps * (1 + 1e-5) + 1e-6), size
    trace = np.array(res.extra["loss_trace"])
    assert trace.shape == (8, 13)
    np.testing.assert_allclose(res.extra["best_loss"], trace.max(axis=1), rtol=1e-6)
    assert np.all(res.iterations == 12) and np.all(res.gradient_evals == 12)
    first = np.array(res.extra["first_success_step"])
    assert np.all(res.achieved[first >= 0])                # found along the path: returned
    assert np.all(first[res.achieved & res.initially_correct] >= 0)
    json.dumps(res.to_json())                               # the record is JSON-able


def test_apgd_ce_cannot_move_on_a_saturated_softmax_and_dlr_can():
    """The masking in its purest form: logits 1000 times too large, as a network
    trained at T = 1000 has. float32 p is exactly one-hot, the CE gradient exactly 0."""
    model = small_net(dtype=np.float32, scale=1000.0)
    x = images(6, dtype=np.float32)
    y = model.predict(x)
    p = model.probabilities(x)
    assert np.all(p.max(axis=1) == 1.0)                     # saturated
    x_ce, r_ce = apgd(model, x, y, 0.2, loss="ce", steps=10, random_start=False)
    np.testing.assert_array_equal(x_ce, x)                  # sign(0) = 0: not one pixel moved
    assert r_ce.summary()["success_rate"] == 0.0
    assert np.all(np.array(r_ce.extra["loss_trace"]) == 0)  # the loss is exactly 0 all along ...
    assert np.all(np.array(r_ce.extra["step_halvings"]) >= 1)   # ... so APGD halved its step
    x_dlr, r_dlr = apgd(model, x, y, 0.2, loss="dlr", steps=10, random_start=False)
    assert np.all(np.abs(x_dlr - x).reshape(6, -1).max(axis=1) > 0.1)   # DLR moves every image
    assert r_dlr.summary()["success_rate"] > r_ce.summary()["success_rate"]
    # Carlini and Wagner's rescaling: the cross-entropy at T = 1000 moves too
    x_T, _ = apgd(model, x, y, 0.2, loss="ce", T=1000.0, steps=10, random_start=False)
    assert np.all(np.abs(x_T - x).reshape(6, -1).max(axis=1) > 0.1)


def test_apgd_batching_does_not_change_the_result():
    model = small_net(dtype=np.float32)
    x = images(7, dtype=np.float32)
    y = model.predict(x)
    a, ra = apgd(model, x, y, 0.05, steps=8, random_start=False, batch_size=7)
    b, rb = apgd(model, x, y, 0.05, steps=8, random_start=False, batch_size=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ra.extra["loss_trace"], rb.extra["loss_trace"])


# ===== Square =====

def test_square_never_calls_backward_counts_queries_and_stays_in_the_box(xp):
    model = _device_model(xp, seed=2)

    def no_backward(*args, **kwargs):
        raise AssertionError("the Square attack called model.backward")
    model.backward = no_backward
    x = images(10, dtype=np.float32)
    y = model.predict(xp.asarray(x))
    y[:2] = (y[:2] + 1) % K                                 # two images misclassified from the start
    x_adv, res = square_linf(model, x, y, 0.1, queries=40, seed=1, batch_size=4)
    q = np.array(res.extra["queries"])
    assert np.all(q[:2] == 0) and np.all(x_adv[:2] == x[:2])   # no attack, no query
    assert np.all((q[2:] >= 1) & (q[2:] <= 40))
    assert np.all(q[2:][~res.success[2:]] == 40)             # a failed image used the whole budget
    np.testing.assert_array_equal(res.iterations, q)
    assert np.all(res.gradient_evals == 0)
    assert np.abs(x_adv.astype(np.float64) - x).max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    again, res2 = square_linf(model, x, y, 0.1, queries=40, seed=1, batch_size=4)
    np.testing.assert_array_equal(x_adv, again)              # reproducible from its seed


def test_square_schedule_and_margin():
    assert p_selection(0.8, 0, 10000) == 0.8 and p_selection(0.8, 10, 10000) == 0.8
    assert p_selection(0.8, 11, 10000) == 0.4 and p_selection(0.8, 8001, 10000) == 0.8 / 512
    assert p_selection(0.8, 2, 1000) == 0.4                  # rescaled: query 2 of 1000 = 20 of 10,000
    s = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    np.testing.assert_allclose(margin_loss(s, np.array([0, 0])), [1.0, -5.0])
    np.testing.assert_allclose(margin_loss(s, np.array([0, 0]), np.array([2, 1])), [1.0, -4.0])


# ===== indicators on synthetic records =====

def test_incomplete_optimization_reads_the_end_of_the_trace():
    steps = np.arange(31, dtype=np.float64)
    traces = np.stack([
        steps,                                    # still rising linearly: incomplete
        np.minimum(steps, 10),                    # converged by step 10: complete
        np.zeros(31),                             # flat (a zero gradient): complete
        np.r_[np.zeros(29), 1.0, 1.0],            # a late jump: incomplete
        np.r_[steps[:19], 18 - steps[:12]],       # rose to step 18, then fell: the best is older than 10 steps
    ])
    flags, metric = indicators.incomplete_optimization(traces)
    np.testing.assert_array_equal(flags, [True, False, False, True, False])
    np.testing.assert_allclose(metric[[0, 1, 2]], [10 / 30, 0, 0])


def test_silent_success_and_transfer_failure_truth_tables():
    np.testing.assert_array_equal(
        indicators.silent_success([-1, 3, 3, 0], [False, False, True, True]), [False, True, False, False])
    np.testing.assert_array_equal(
        indicators.transfer_failure([True, True, False, False], [True, False, True, False]),
        [False, True, False, False])


class NoisyLogits:
    """A randomised 'defence': fresh Gaussian noise on the logits at every query."""

    def __init__(self, model, sigma, seed=0):
        self.model, self.sigma, self.rng = model, sigma, np.random.default_rng(seed)
        self.xp, self.dtype = model.xp, model.dtype

    def logits(self, x, train=False):
        z = self.model.logits(x)
        return z + self.sigma * self.rng.standard_normal(z.shape).astype(z.dtype)


def test_unstable_predictions_fire_on_a_randomised_model_only():
    model = small_net(dtype=np.float32, seed=4)
    x = images(6, dtype=np.float32)
    y = model.predict(x)
    flags, metric = indicators.unstable_predictions(model, x, y, samples=30)
    assert not flags.any() and metric.max() < 0.02, metric
    flags, metric = indicators.unstable_predictions(NoisyLogits(model, 3.0), x, y, samples=30)
    assert flags.all() and metric.min() > 0.5, metric


def test_indicators_on_a_saturated_net_fire_and_name_the_mitigations():
    model = small_net(dtype=np.float32, scale=1000.0)
    x = images(6, dtype=np.float32)
    y = model.predict(x)
    flags, g = indicators.unavailable_gradients(model, x, y, "ce")
    assert flags.all() and np.all(g == 0)
    flags, g = indicators.unavailable_gradients(model, x, y, "dlr")
    assert not flags.any() and np.all(g > 0)
    rep = indicators.evaluate(model, x, y, 0.1, loss="ce", steps=10, samples=10)
    assert {"unavailable_gradients", "unconstrained_attack_failure"} <= set(rep.fired)
    assert not rep.summary["transfer_failure"]["measured"]
    text = "\n".join(rep.lines())
    assert "FIRES" in text and "1/T" in text and "DLR" in text and "square_linf" in text
    json.dumps(rep.to_json())
    assert rep.per_image["unavailable_gradients"].shape == (6,)


# ===== bad arguments =====

@pytest.mark.parametrize("call,message", [
    (lambda m, x, y: apgd(m, x, y, -0.1), "eps must be a finite number >= 0"),
    (lambda m, x, y: apgd(m, x, y, float("nan")), "eps must be a finite number >= 0"),
    (lambda m, x, y: apgd(m, x, y, 0.1, loss="hinge"), "loss must be one of ce, dlr"),
    (lambda m, x, y: apgd(m, x, y, 0.1, norm="l1"), "norm must be one of linf, l2"),
    (lambda m, x, y: apgd(m, x, y, 0.1, steps=0), "steps must be an integer >= 1"),
    (lambda m, x, y: apgd(m, x, y, 0.1, rho=1.5), "rho must lie in"),
    (lambda m, x, y: apgd(m, x, y, 0.1, T=0), "temperature T must be a finite number > 0"),
    (lambda m, x, y: apgd(m, x, y, 0.1, targets=y), "must differ"),
    (lambda m, x, y: square_linf(m, x, y, -1.0), "eps must be a finite number >= 0"),
    (lambda m, x, y: square_linf(m, x, y, 0.1, queries=0), "queries must be an integer >= 1"),
    (lambda m, x, y: square_linf(m, x, y, 0.1, p_init=0.0), "p_init must lie in"),
    (lambda m, x, y: square_linf(m, x, y, 0.1, output="softmax"), "output=..."),
    (lambda m, x, y: transfer(m, m, x, y, 0.1, attack="fgsm"), "crafts with one of apgd, pgd"),
    (lambda m, x, y: transfer(m, m, x, y, 0.1, attack="pgd", loss="dlr"), "use attack='apgd'"),
    (lambda m, x, y: transfer(m, small_net(np.float32, K=4), x, y, 0.1), "same classes"),
    (lambda m, x, y: indicators.evaluate(m, x, y, 0.1, loss="margin"), "loss must be one of"),
    (lambda m, x, y: indicators.evaluate(m, x, y, 0.1, min_fraction=2), "min_fraction"),
])
def test_bad_arguments_are_clear_errors(call, message):
    model = small_net(dtype=np.float32)
    x = images(3, dtype=np.float32)
    y = model.predict(x)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call(model, x, y)


def test_targeted_dlr_on_three_classes_is_a_clear_error():
    model = small_net(dtype=np.float32, K=3)
    x = images(2, dtype=np.float32)
    y = model.predict(x)
    with pytest.raises(ValueError, match="needs at least 4 classes"):
        apgd(model, x, y, 0.1, loss="dlr", targets=(y + 1) % 3)
