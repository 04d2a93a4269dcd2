"""``scratchnet diagnose``: the masking decision on the small MNIST networks trained at T = 100 and
T = 1 (``model_hot``, ``model_T1``), the estimated temperature, the rule, and the error paths.

The T = 100 network is saved *without* its training temperature: the diagnosis must find the
masking from the model's outputs alone.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import mnist_dir, needs_mnist
from scratchnet import cli
from scratchnet.cli import diagnose
from scratchnet.model import save

# a cheap configuration: 40 images from test image 600, short attacks
FAST = ["--n", "40", "--offset", "600", "--steps", "10", "--queries", "100", "--samples", "10",
        "--device", "cpu"]


def run(capsys, *argv):
    status = cli.main(["diagnose", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def saved(model_hot, model_T1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("diagnose")
    hot, cold = folder / "hot.npz", folder / "cold.npz"
    save(model_hot, hot, metadata={})                 # no T recorded: nothing to peek at
    save(model_T1, cold, metadata={"recipe": "standard", "T": 1.0})
    return {"hot": hot, "cold": cold, "folder": folder}


# ===== the decision on real networks =====

@needs_mnist
def test_masking_found_on_the_T100_net_without_being_told_T(saved, capsys, tmp_path):
    out_json, out_png = tmp_path / "d.json", tmp_path / "d.png"
    status, out, err = run(capsys, saved["hot"], *FAST, "--data-dir", mnist_dir(), "--source", saved["cold"],
                           "--json", out_json, "--png", out_png)
    assert status == 0, err
    rec = json.loads(out_json.read_text())
    assert rec["gradient_masking"] is True
    assert rec["model_metadata_not_used"] == {}
    attacks = {a["name"]: a for a in rec["attacks"]}
    assert list(attacks) == ["cheap", "apgd-dlr", "apgd-ce-rescaled", "square", "transfer"]
    cheap, worst = attacks["cheap"]["robust_accuracy"], rec["worst_case"]["robust_accuracy"]
    # measured: cheap 62 %, every mitigation and the worst case 0 %
    assert cheap >= 0.4 and worst <= 0.1, (cheap, worst)
    for name in ("apgd-dlr", "apgd-ce-rescaled", "square", "transfer"):
        assert attacks[name]["robust_accuracy"] <= 0.15, (name, attacks[name])
    # both halves of the rule hold here, and each is stated
    assert len(rec["gradient_masking_reasons"]) == 2
    assert rec["indicators"]["summary"]["unavailable_gradients"]["fired"]
    # the estimated temperature is well above 1 (logits ~ T-fold), but it is an estimate (measured 17)
    assert rec["estimated_T"]["T_est"] > 5
    # the worst case per image is the AND of every attack's per-image robustness
    per = rec["per_image"]
    flags = np.array([per[f"robust_{a}"] for a in attacks])
    assert per["robust_worst_case"] == np.logical_and.reduce(flags).tolist()
    assert rec["worst_case"]["n_robust"] == int(np.sum(per["robust_worst_case"]))
    lo, hi = rec["worst_case"]["interval"]
    assert 0 <= lo <= worst <= hi <= 1
    assert "verdict: GRADIENT MASKING" in out and "gradient_masking: true" in out
    assert "unavailable_gradients" in out and "FIRES" in out
    from PIL import Image
    assert Image.open(out_png).size[0] > 600


@needs_mnist
@pytest.mark.parametrize("eps", [0.3, 0.05])
def test_no_masking_on_the_T1_net(saved, capsys, tmp_path, eps):
    """At eps 0.3 every attack wins; at 0.05 about a third of the images resist every attack alike
    (measured: 37 % for APGD-CE, APGD-DLR and the worst case)."""
    out_json = tmp_path / "d.json"
    status, out, err = run(capsys, saved["cold"], *FAST, "--eps", eps, "--data-dir", mnist_dir(),
                           "--json", out_json)
    assert status == 0, err
    rec = json.loads(out_json.read_text())
    assert rec["gradient_masking"] is False and rec["gradient_masking_reasons"] == []
    assert rec["estimated_T"]["T_est"] < 2
    assert rec["indicators"]["summary"]["unavailable_gradients"]["n_flagged"] == 0
    cheap = rec["attacks"][0]["robust_accuracy"]
    assert abs(cheap - rec["worst_case"]["robust_accuracy"]) < 0.1
    if eps == 0.05:
        assert 0.1 < rec["worst_case"]["robust_accuracy"] < 0.8
    assert "transfer" not in [a["name"] for a in rec["attacks"]]      # no --source given
    assert "verdict: no gradient masking detected" in out


@needs_mnist
def test_a_cheap_attack_that_is_not_masked_finds_no_masking_on_the_T100_net(saved, capsys, tmp_path):
    """--loss dlr: the indicators read APGD-DLR, which the T-fold logits do not stop. The same hot
    network is then not flagged: the rule judges the evaluation, not the training temperature."""
    out_json = tmp_path / "d.json"
    status, out, err = run(capsys, saved["hot"], *FAST, "--loss", "dlr", "--data-dir", mnist_dir(),
                           "--json", out_json)
    assert status == 0, err
    rec = json.loads(out_json.read_text())
    assert rec["gradient_masking"] is False, rec["gradient_masking_reasons"]
    attacks = {a["name"]: a for a in rec["attacks"]}
    assert attacks["cheap"]["robust_accuracy"] <= 0.15                   # measured 0 %
    assert "the cheap attack itself" in attacks["apgd-dlr"]["label"]     # not run twice
    assert rec["per_image"]["robust_apgd-dlr"] == rec["per_image"]["robust_cheap"]
    assert rec["indicators"]["summary"]["unavailable_gradients"]["n_flagged"] == 0
    assert "cheap: APGD-DLR, 10 steps" in out


# ===== the pieces =====

def test_estimated_temperature_follows_the_logit_scale():
    margins = np.random.default_rng(0).uniform(5, 25, size=101)
    base = diagnose.estimate_temperature(margins)
    assert base == pytest.approx(np.median(margins) / diagnose.REFERENCE_MARGIN)
    assert diagnose.estimate_temperature(50 * margins) == pytest.approx(50 * base)   # T-fold logits, T-fold estimate
    assert diagnose.estimate_temperature(margins / 10) == 1.0                        # never below 1
    with pytest.raises(ValueError, match="cannot estimate"):
        diagnose.estimate_temperature([])
    with pytest.raises(ValueError, match="cannot estimate"):
        diagnose.estimate_temperature([1.0, np.inf])


def test_top2_margins_match_the_sorted_logits(model_T1, mnist):
    x = mnist.test_x[:7]
    z = np.sort(model_T1.logits(x).astype(np.float64), axis=1)
    # float32 logits of a batch of 3 and of 7 may differ in the last bit
    np.testing.assert_allclose(diagnose.top2_margins(model_T1, x, batch_size=3), z[:, -1] - z[:, -2], rtol=1e-5)


def rec(k, n):
    return diagnose.robust_accuracy(np.arange(n) < k)


def test_masking_rule():
    # a large gap with separated intervals: masking
    masked, why = diagnose.masking_decision(rec(60, 100), rec(2, 100), n_unavailable=0, n_correct=95)
    assert masked and "60 %" in why[0]
    # a 10-point gap whose intervals overlap (small n): not enough
    assert not diagnose.masking_decision(rec(5, 20), rec(3, 20), 0, 20)[0]
    # the same rates on many images: resolved
    assert diagnose.masking_decision(rec(250, 1000), rec(150, 1000), 0, 900)[0]
    # a gap below ten points is never masking, however many images
    assert not diagnose.masking_decision(rec(500, 10000), rec(420, 10000), 0, 9000)[0]
    # zero gradients on most correct images: masking even when the attacks agree
    masked, why = diagnose.masking_decision(rec(10, 100), rec(10, 100), n_unavailable=51, n_correct=100)
    assert masked and why == ["the loss gradient is exactly zero at 51 of the 100 correctly classified images"]
    assert not diagnose.masking_decision(rec(10, 100), rec(10, 100), n_unavailable=50, n_correct=100)[0]


def test_robust_accuracy_record():
    r = diagnose.robust_accuracy([True, False, False, True])
    assert r["n_robust"] == 2 and r["n"] == 4 and r["robust_accuracy"] == 0.5
    assert r["interval"][0] < 0.5 < r["interval"][1]
    assert diagnose.robust_accuracy([False] * 30)["interval"][0] == 0.0


# ===== errors: one line, exit 2 for usage, 1 for runtime failures =====

@pytest.mark.parametrize("argv, status, message", [
    (["--eps", "-0.1"], 2, "argument --eps: expected a finite number >= 0, got -0.1"),
    (["--eps", "1.5"], 2, "--eps must be at most 1"),
    (["--loss", "hinge"], 2, "argument --loss: invalid choice: 'hinge'"),
    (["--n", "0"], 2, "argument --n: expected a positive integer, got 0"),
    (["--steps", "ten"], 2, "argument --steps"),
    (["--json", "/no/such/folder/d.json"], 2, "output folder does not exist"),
    (["--offset", "20000"], 2, "--offset 20000 is past the 10000 test images"),
])
def test_bad_arguments_are_one_line_usage_errors(saved, capsys, argv, status, message):
    code, _, err = run(capsys, saved["hot"], "--data-dir", mnist_dir(), "--no-download", *argv)
    assert code == status == cli.EXIT_USAGE, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("scratchnet diagnose: error:")


def test_a_file_that_is_not_a_model_is_a_one_line_runtime_failure(saved, capsys, tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a model")
    for argv in ([garbage], [tmp_path / "absent.npz"], [saved["hot"], "--source", garbage]):
        code, _, err = run(capsys, *argv, "--no-download")
        assert code == cli.EXIT_RUNTIME == 1, err
        assert err.startswith("scratchnet diagnose: error:") and err.count("\n") == 1, err
        assert "Traceback" not in err
    assert "garbage.npz" in err


def test_python_m_scratchnet_diagnose_help():
    run_ = subprocess.run([sys.executable, "-m", "scratchnet", "diagnose", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert run_.returncode == 0
    text = " ".join(run_.stdout.split())
    assert "gradient_masking is true when" in text and "T_est = max(1, median top-two logit margin / 10)" in text
