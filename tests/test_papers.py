"""What the comparison with the papers rests on:

* Papernot et al.'s kind of gradient statistic (``float32_row_l1`` and
  ``float32_plain_mean``) against a direct float32 computation of the
  softmax Jacobian of a small dense network, saturated images included;
* the gradient of the logit margin (``log10_margin_grad_norms``) against the
  logits' Jacobian, and the margin prediction with that gradient's growth on
  the small MNIST networks (it closes the gap the margin alone leaves);
* C&W's early abort (the paper budget's stopping rule);
* ``scratchnet attack --formulation``: passed to the attack, recorded, and its
  errors.
"""
import json

import numpy as np
import pytest

from conftest import mnist_dir, needs_mnist
from mnist_models import T_HIGH, correct_images
from scratchnet import cli
from scratchnet.attacks import cw_l2, gradient_diagnostics
from scratchnet.attacks.cw import PAPER_BUDGET
from scratchnet.attacks.diagnostics import compare_suppression, float32_plain_mean, float32_row_l1
from scratchnet.attacks.magnitudes import float64_copy, log10_margin_grad_norms
from scratchnet.attacks.sources import jacobian
from scratchnet.layers import Dense, Flatten, ReLU
from scratchnet.model import Sequential, save

K = 5


def dense_net(scale, seed=0):
    """16 - 8 - ReLU - 5 in float32; ``scale`` multiplies the last layer (a large one saturates)."""
    rng = np.random.default_rng(seed)
    model = Sequential([Flatten(name="flat"), Dense(16, 8, rng=rng, dtype=np.float32, name="d1"),
                        ReLU(name="r1"), Dense(8, K, rng=rng, dtype=np.float32, name="d2")])
    params = model.params
    params["d2.W"] *= np.float32(scale)
    return model


def direct_probs_jacobian(model, x):
    """d softmax(z) / dx written out by hand in float32: (N, K, 16).

    z = relu(x W1 + b1) W2 + b2;  dp_i/dz_j = p_i (delta_ij - p_j);
    dz_j/dx = W1 diag(relu'(h)) W2[:, j].
    """
    p = model.params
    W1, b1, W2, b2 = p["d1.W"], p["d1.b"], p["d2.W"], p["d2.b"]
    xf = x.reshape(len(x), -1).astype(np.float32)
    h = xf @ W1 + b1
    z = np.maximum(h, 0) @ W2 + b2
    e = np.exp(z - z.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)                               # float32, as deployed
    dp_dz = probs[:, :, None] * (np.eye(K, dtype=np.float32)[None] - probs[:, None, :])   # (N, K, K)
    dz_dx = np.einsum("dh,nh,hk->nkd", W1, (h > 0).astype(np.float32), W2)               # (N, K, 16)
    return np.einsum("nij,njd->nid", dp_dz, dz_dx).astype(np.float32), probs


# ===== Papernot et al.'s float32 statistic =====

def test_float32_amplitude_matches_a_direct_computation_saturated_images_included():
    rng = np.random.default_rng(3)
    # inputs scaled from 0.1 to 10: margins from a few units to a few hundred
    x = (rng.uniform(0, 1, size=(40, 1, 4, 4)) * np.logspace(-1, 1, 40)[:, None, None, None]).astype(np.float32)
    model = dense_net(scale=40.0)
    J_direct, probs = direct_probs_jacobian(model, x)
    saturated = ((probs == 0) | (probs == 1.0)).all(axis=1)         # float32 one-hot: 7 images
    partly = (probs == 1.0).any(axis=1) & ~saturated                # p_top == 1.0, others tiny: 16
    assert saturated.sum() >= 5 and partly.sum() >= 5 and (~saturated & ~partly).sum() >= 5

    J, _ = jacobian(model, x, "probs", 1.0)
    assert J.dtype == np.float32
    amp = float32_row_l1(J)
    direct = np.abs(J_direct).sum(axis=2, dtype=np.float32).mean(axis=1, dtype=np.float32)
    assert amp.dtype == np.float32
    # exactly zero precisely where float32 rounded the softmax to one-hot ...
    assert np.array_equal(amp == 0, direct == 0) and np.all(amp[saturated] == 0)
    # ... and equal up to float32 rounding elsewhere (two ways of forming p_i (delta_ij - p_j));
    # below 1.2e-38 float32 is subnormal, with an absolute step of 1.4e-45 per entry
    np.testing.assert_allclose(amp, direct, rtol=1e-4, atol=1e-43)
    assert np.all(amp[partly] > 0) and np.all(amp[partly] < 1e-6)    # tiny, not zero: float32 still sees them

    s = float32_plain_mean(amp)
    assert s["n"] == 40 and s["fraction_zero"] == pytest.approx((direct == 0).mean())
    assert s["mean"] == pytest.approx(float(direct.mean(dtype=np.float32)), rel=1e-5)
    assert s["log10_mean"] == pytest.approx(np.log10(direct.mean(dtype=np.float64)), abs=1e-5)
    nz = direct[direct > 0].astype(np.float64)
    assert s["log10_geometric_mean_nonzero"] == pytest.approx(np.log10(nz).mean(), abs=1e-4)
    assert s["log10_median"] == (-np.inf if (direct == 0).mean() > 0.5 else pytest.approx(np.log10(np.median(direct)), abs=1e-5))

    # the diagnostics carry the same numbers, image by image
    diag = gradient_diagnostics(model, x, probs.argmax(axis=1))
    np.testing.assert_array_equal(diag["probs_f32_row_l1"], amp)
    assert np.array_equal(diag["probs_all_zero"], amp == 0)


def test_float32_amplitude_of_a_single_gradient_is_its_l1_norm_summed_in_float32():
    g = np.zeros((3, 1, 2, 2), np.float32)
    g[0, 0, 0, 0], g[0, 0, 1, 1] = -2e-45, 3e-45                    # subnormals survive, as in float32
    g[2] = 0.25
    amp = float32_row_l1(g)
    assert amp.dtype == np.float32 and amp[1] == 0 and amp[2] == 1.0
    assert amp[0] == np.float32(2e-45) + np.float32(3e-45) > 0


def test_float32_plain_mean_refuses_float64_and_reports_an_empty_selection():
    with pytest.raises(ValueError, match="float32"):
        float32_plain_mean(np.ones(3))
    s = float32_plain_mean(np.ones(3, np.float32), mask=np.zeros(3, bool))
    assert s["n"] == 0 and np.isnan(s["mean"])


# ===== the margin's gradient and the prediction with its growth =====

@pytest.mark.parametrize("T", [1.0, 4.0])
def test_margin_gradient_is_the_difference_of_two_logit_jacobian_rows(T):
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, size=(6, 1, 4, 4))
    model64 = float64_copy(dense_net(scale=3.0))
    Jz, z = jacobian(model64, x, "logits")
    order = np.argsort(z, axis=1)
    rows = np.arange(len(x))
    dM = (Jz[rows, order[:, -1]] - Jz[rows, order[:, -2]]).reshape(len(x), -1) / T
    np.testing.assert_allclose(log10_margin_grad_norms(model64, x, T), np.log10(np.linalg.norm(dM, axis=1)),
                               rtol=0, atol=1e-12)


@needs_mnist
def test_the_margin_gradient_growth_closes_the_prediction_gap(model_hot, model_T1, mnist):
    """Measured on these networks: the margin alone predicts -93.5 decades against -92.0
    measured; adding the margin gradient's growth (+1.6 decades) predicts -91.9."""
    x, y = mnist.test_x[:200], mnist.test_y[:200].astype(np.int64)
    hot, ref = gradient_diagnostics(model_hot, x, y), gradient_diagnostics(model_T1, x, y)
    cmp = compare_suppression(hot, ref, "loss_log10_l2")
    measured = cmp["measured_log10_geometric_mean"]
    assert cmp["logit_gradient_growth_log10"] > 0.5, cmp         # dM/dx grows with the logits
    gap_margin = abs(measured - cmp["predicted_log10_from_mean_margin"])
    gap_both = abs(measured - cmp["predicted_log10_with_logit_growth"])
    assert gap_both < 0.5 and gap_both < gap_margin / 3, cmp
    # image by image, on the saturated correct images: exp(-M) * ||dM/dx|| is the loss gradient
    sat = hot["saturated"] & hot["correct"]
    assert sat.sum() > 50
    gap = np.abs(hot["loss_log10_l2"][sat] - hot["loss_log10_l2_predicted"][sat])
    assert np.median(gap) < 0.05, np.median(gap)
    assert np.median(np.abs(hot["loss_log10_l2"][sat] - hot["log10_factor_predicted"][sat])) > 1.0


# ===== C&W's early abort =====

@needs_mnist
def test_cw_early_abort_stops_rounds_that_no_longer_improve(model_T1, mnist):
    x, y = correct_images(model_T1, mnist, 6)
    t = (y + 1) % 10
    _, full = cw_l2(model_T1, x, y, targets=t, binary_steps=2, steps=400, lr=0.01, c=1.0)
    _, early = cw_l2(model_T1, x, y, targets=t, binary_steps=2, steps=400, lr=0.01, c=1.0, abort_early=True)
    assert np.all(full.gradient_evals == 2 * 400)
    assert early.gradient_evals.max() <= 2 * 400 and early.gradient_evals.min() < 2 * 400
    assert early.params["abort_early"] is True and full.params["abort_early"] is False
    assert early.summary()["success_rate"] >= 0.5


def test_paper_budget_is_carlini_and_wagners():
    assert PAPER_BUDGET == {"binary_steps": 9, "steps": 10000, "lr": 0.01, "c": 1e-3, "abort_early": True}


# ===== scratchnet attack --formulation =====

@pytest.fixture(scope="module")
def saved_hot(model_hot, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "hot.npz"
    save(model_hot, path, metadata={"recipe": "temperature", "T": T_HIGH})
    return path


def attack(*argv):
    return cli.main(["attack", *map(str, argv)])


@needs_mnist
@pytest.mark.parametrize("attack_name, formulation", [("jsma", None), ("jsma", "paper"), ("fgsm", "paper"),
                                                      ("pgd", "exact")])
def test_attack_formulation_reaches_the_attack_and_its_record(saved_hot, tmp_path, capsys, attack_name, formulation):
    out = tmp_path / "rec.json"
    argv = [saved_hot, "--attack", attack_name, "--n", "4", "--data-dir", mnist_dir(), "--device", "cpu",
            "--no-diagnostics", "--json", out, "--eps", "0.2", "--steps", "2"]
    if attack_name == "jsma":
        argv += ["--target", "next"]
    if formulation:
        argv += ["--formulation", formulation]
    status = attack(*argv)
    text = capsys.readouterr().out
    assert status == 0
    assert f"formulation {formulation or 'exact'}" in text
    assert json.loads(out.read_text())["summary"]["formulation"] == (formulation or "exact")


@needs_mnist
def test_attack_formulation_errors_are_one_line(saved_hot, capsys):
    common = [saved_hot, "--data-dir", mnist_dir(), "--device", "cpu", "--n", "2"]
    assert attack(*common, "--formulation", "float16") == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid choice: 'float16'" in err and "exact" in err and err.count("\n") == 1
    assert attack(*common, "--attack", "cw", "--formulation", "exact") == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--formulation applies to --attack fgsm, pgd, jsma" in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_attack_help_names_the_formulations_and_their_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["attack", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--formulation {exact,paper}" in out
    assert "'exact' (default" in out and "an error with --attack cw" in out


# ===== attack_vs_T's options for the paper budget =====

def test_attack_vs_T_settings_paper_budget_and_attack_selection():
    import argparse
    from scratchnet.cli import UsageError
    from scratchnet.study import attack_vs_T, common

    parser = argparse.ArgumentParser()
    common.add_common_options(parser, attack_vs_T.QUICK, attack_vs_T.FULL)
    attack_vs_T.add_options(parser)

    def settings(*argv):
        args = parser.parse_args(["--quick", *argv])
        return attack_vs_T.attack_settings(args, common.settings_from(args, attack_vs_T.QUICK, attack_vs_T.FULL))

    s = settings()
    assert s["cw"] == attack_vs_T.CW_DEFAULT_BUDGET and s["attacks"] == ["jsma", "fgsm", "cw"]
    assert [a for a, _ in attack_vs_T.attack_plan(s)] == ["jsma", "fgsm", "fgsm", "fgsm", "cw"]
    s = settings("--cw-paper-budget", "--attacks", "cw", "--n-cw", "3")
    assert s["cw"] == PAPER_BUDGET and attack_vs_T.attack_plan(s) == [("cw", None)]
    # the budget is part of the result's key: the two budgets never share a stored result
    keys = [attack_vs_T.attack_key("m", "cw", "fixed", 1.0, x) for x in (settings("--n-cw", "3"), s)]
    assert keys[0] != keys[1] and keys[1]["steps"] == 10000
    with pytest.raises(UsageError, match="runs nothing"):
        settings("--attacks", "cw", "--n-cw", "0")
    # the full run attacks 100 source images x 9 targets with JSMA
    assert attack_vs_T.FULL["n"] * 9 == 900
