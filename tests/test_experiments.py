"""Smoke tests of the experiment scripts, each run as a user runs it (a subprocess).

One tiny configuration serves every script: the small network, trained on
4,000 images for 3 epochs at T = 1 and T = 30. Measured on this machine, its
logits already grow enough with T for the masked gradient at T = 30 to be
about 10^-3 of the T = 1 model's, while the rescaled one stays within a
factor of 2 (see ``test_grad_vs_T``). The models are trained once, in a
module-wide cache folder, and shared by all the tests.
"""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import mnist_dir, needs_mnist

from scratchnet.stats import ratio_interval, wilson
from scratchnet.study import attack_vs_T, grad_vs_T, robustness, saturation
from scratchnet.study import distillation as distillation_vs_temperature

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
EXPERIMENTS = os.path.join(ROOT, "experiments")

TINY = ["--T", "1", "30", "--architecture", "small", "--train-size", "4000", "--epochs", "3", "--no-progress"]

pytestmark = needs_mnist


def run(script, args, cwd, env_extra=None):
    # the scripts import the scratchnet of this checkout, whatever is installed
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, SCRATCHNET_DATA=mnist_dir(), PYTHONPATH=path, **(env_extra or {}))
    return subprocess.run([sys.executable, os.path.join(EXPERIMENTS, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working folder and one model cache for the whole module."""
    root = tmp_path_factory.mktemp("experiments")
    return {"root": root, "cache": str(root / "models")}


def check_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


# ===== the scripts on a tiny configuration =====

def test_grad_vs_T(work):
    out = work["root"] / "grad"
    proc = run("grad_vs_T.py", TINY + ["--n", "40", "--cache-dir", work["cache"], "--out", str(out)], work["root"])
    check_ok(proc)
    for name in ("grad_vs_T.csv", "grad_vs_T.json", "grad_vs_T.png"):
        assert (out / name).stat().st_size > 0
    columns, rows = read_csv(out / "grad_vs_T.csv")
    assert columns == grad_vs_T.COLUMNS
    # 3 models (standard, temperature and distilled at T = 30) x 2 sources x 2 quantities
    assert len(rows) == 12

    def row(recipe, T, source):
        return next(r for r in rows if r["recipe"] == recipe and float(r["T"]) == T
                    and r["source"] == source and r["quantity"] == "loss")

    masked = float(row("temperature", 30, "masked")["suppression_log10_geomean"])
    rescaled = float(row("temperature", 30, "rescaled")["suppression_log10_geomean"])
    # the masked gradient shrinks by orders of magnitude; the rescaled one does not
    assert masked < -1.5, f"masked gradient at T = 30 only 10^{masked:.2f} of T = 1's"
    assert rescaled > -1.0, f"rescaled gradient at T = 30 is 10^{rescaled:.2f} of T = 1's"
    assert float(row("standard", 1, "masked")["suppression_log10_geomean"]) == 0.0
    assert "log10 suppression" in proc.stdout

    # the prediction with the margin gradient's growth, and Papernot et al.'s float32 statistic
    hot, std = row("temperature", 30, "masked"), row("standard", 1, "masked")
    assert float(std["logit_gradient_growth_log10"]) == 0.0 and float(std["float32_suppression_log10_mean_all"]) == 0.0
    assert float(hot["logit_gradient_growth_log10"]) > 0                   # the logits, and dM/dx, grow with T
    assert float(hot["predicted_log10_with_logit_growth"]) == pytest.approx(
        float(hot["predicted_log10_from_mean_margin"]) + float(hot["logit_gradient_growth_log10"]), abs=1e-4)
    for r in rows:
        if r["source"] == "masked":
            # a plain float32 mean over all images: finite here (no model is saturated everywhere)
            assert float(r["float32_l1_mean_all"]) > 0 and float(r["zero_gradient_fraction"]) < 1
            assert float(r["float32_log10_l1_mean_all"]) == pytest.approx(
                math.log10(float(r["float32_l1_mean_all"])), abs=1e-4)
    assert "Papernot et al.'s kind of statistic" in proc.stdout

    # a rerun reuses every model and every result: nothing is trained or measured again
    before = sorted(os.listdir(out / "parts"))
    again = run("grad_vs_T.py", TINY + ["--n", "40", "--cache-dir", work["cache"], "--out", str(out)], work["root"])
    check_ok(again)
    assert sorted(os.listdir(out / "parts")) == before
    assert read_csv(out / "grad_vs_T.csv")[1] == rows


def test_attack_vs_T(work):
    out = work["root"] / "attack"
    args = TINY + ["--n", "2", "--n-fgsm", "20", "--n-cw", "2", "--eps", "0.2",
                   "--cache-dir", work["cache"], "--out", str(out)]
    proc = run("attack_vs_T.py", args, work["root"])
    check_ok(proc)
    for name in ("attack_vs_T.csv", "attack_vs_T.json", "attack_vs_T.png", "attack_vs_T_distortion.png"):
        assert (out / name).stat().st_size > 0
    columns, rows = read_csv(out / "attack_vs_T.csv")
    assert columns == attack_vs_T.COLUMNS
    # 3 models x (JSMA and FGSM at one eps, each in 2 formulations, and C&W) x (masked, fixed)
    assert len(rows) == 3 * 5 * 2
    for r in rows:
        n_correct, n_success = int(r["n_correct"]), int(r["n_success"])
        assert 0 <= n_success <= n_correct <= int(r["n_images"])
        assert int(r["n_attempts"]) == n_correct
        assert r["formulation"] == ("" if r["attack"] == "cw" else r["formulation"])
        assert r["formulation"] in (("",) if r["attack"] == "cw" else ("exact", "paper"))
        if n_correct:                                          # every rate with its Wilson interval
            lo, hi = wilson(n_success, n_correct)
            assert float(r["success_lo"]) == pytest.approx(lo, abs=1e-5)
            assert float(r["success_hi"]) == pytest.approx(hi, abs=1e-5)
            assert float(r["success_lo"]) <= float(r["success_rate"]) <= float(r["success_hi"])
        if r["attack"] == "jsma":
            assert int(r["n_images"]) == 2 * 9                 # every source image at its 9 other classes
        if r["source"] == "masked":
            assert r["wrt"] in ("probs", "loss") and float(r["attack_T"]) == 1.0
        elif float(r["T"]) == 30 and r["attack"] != "cw":
            assert float(r["attack_T"]) == 30.0                # softmax(z / T_train)
    cw_fixed = [r for r in rows if r["attack"] == "cw" and r["source"] == "fixed"]
    assert all(r["wrt"] == "logits" for r in cw_fixed)
    assert "success rate over correctly classified images" in proc.stdout
    assert "Carlini and Wagner" in proc.stdout
    # every rate of a T = 30 model against the standard model's, with its Katz interval
    columns, ratios = read_csv(out / "attack_vs_T_ratios.csv")
    assert columns == attack_vs_T.RATIO_COLUMNS
    with_attempts = [r for r in rows if r["recipe"] != "standard" and int(r["n_attempts"]) > 0]
    assert len(ratios) == len(with_attempts) > 0
    for r in ratios:
        k1, n1, k2, n2 = (int(r[c]) for c in ("base_success", "base_attempts", "n_success", "n_attempts"))
        assert (float(r["fewer"]), float(r["fewer_lo"]), float(r["fewer_hi"])) == pytest.approx(
            ratio_interval(k1, n1, k2, n2), rel=1e-5)
    assert "x fewer [95 %]" in proc.stdout and "paper arithmetic" in proc.stdout


def test_distillation_vs_temperature(work):
    out = work["root"] / "distillation"
    args = TINY + ["--seeds", "0", "--n", "40", "--n-jsma", "2", "--n-fgsm", "20", "--eps", "0.2",
                   "--cache-dir", work["cache"], "--out", str(out),
                   "--reuse", str(work["root"] / "grad"), str(work["root"] / "attack")]
    proc = run("distillation_vs_temperature.py", args, work["root"])
    check_ok(proc)
    for name in ("distillation_vs_temperature.csv", "distillation_vs_temperature.json",
                 "distillation_vs_temperature.png"):
        assert (out / name).stat().st_size > 0
    columns, rows = read_csv(out / "distillation_vs_temperature.csv")
    assert columns == distillation_vs_temperature.COLUMNS
    assert [r["measure"] for r in rows] == [m[0] for m in distillation_vs_temperature.MEASURES]
    acc = rows[0]
    assert float(acc["temperature_lo"]) <= float(acc["temperature_mean"]) <= float(acc["temperature_hi"])
    # the spread table: every model, every measure and the logit margin; one seed has no sd
    columns, spread = read_csv(out / "distillation_vs_temperature_spread.csv")
    assert columns == distillation_vs_temperature.SPREAD_COLUMNS
    assert {(r["recipe"], float(r["T"])) for r in spread} == {("standard", 1.0), ("temperature", 30.0),
                                                              ("distilled", 30.0)}
    margins = [r for r in spread if r["measure"] == distillation_vs_temperature.MARGIN]
    assert len(margins) == 3 and all(r["n_seeds"] == "1" and r["sd"] == "nan" for r in margins)
    assert float(next(r for r in margins if r["recipe"] == "temperature")["mean"]) > float(
        next(r for r in margins if r["recipe"] == "standard")["mean"])            # the margin grows with T
    # the measurements grad_vs_T and attack_vs_T finished were read, not recomputed:
    # only this script's own store is empty of them
    if (out / "parts").exists():
        assert len(os.listdir(out / "parts")) == 0
    # the verdict paragraph, whichever way the numbers decide it
    assert ("distillation adds nothing detectable" in proc.stdout) != ("distillation does add something" in proc.stdout)


def test_saturation(work):
    out = work["root"] / "saturation"
    proc = run("saturation.py", TINY + ["--cache-dir", work["cache"], "--out", str(out)], work["root"])
    check_ok(proc)
    for name in ("saturation.png", "saturation.csv", "saturation.json"):
        assert (out / name).stat().st_size > 0
    columns, rows = read_csv(out / "saturation.csv")
    assert columns == saturation.COLUMNS
    assert [(r["recipe"], float(r["T"])) for r in rows] == [("standard", 1.0), ("temperature", 30.0)]
    assert all(r["label"] == r["prediction"] for r in rows)     # the shown digit is classified correctly
    # at T = 1 the rescaled gradient is the masked one
    assert float(rows[0]["masked_log10_l2"]) == pytest.approx(float(rows[0]["rescaled_log10_l2"]))
    with open(out / "saturation.json") as f:
        assert len(json.load(f)["log10_probs"][0]) == 10


def test_robustness_vs_T(work):
    out = work["root"] / "robustness"
    args = TINY + ["--n", "30", "--eps", "0.1", "0.3", "--steps", "10", "--pgd-steps", "5", "--queries", "30",
                   "--samples", "3", "--cache-dir", work["cache"], "--out", str(out)]
    proc = run("robustness_vs_T.py", args, work["root"])
    check_ok(proc)
    for name in ("robustness_vs_T.csv", "robustness_vs_T_indicators.csv", "robustness_vs_T.json",
                 "robustness_vs_T_worst.md", "robustness_vs_T.png", "robustness_vs_T_indicators.png"):
        assert (out / name).stat().st_size > 0
    columns, rows = read_csv(out / "robustness_vs_T.csv")
    assert columns == robustness.COLUMNS
    models = [("standard", 1.0), ("temperature", 30.0), ("distilled", 30.0)]
    # per model: the clean accuracy, then 2 eps x (7 attacks + the worst case)
    assert len(robustness.ATTACKS) == 7 and len(rows) == 3 * (1 + 2 * 8)

    def get(recipe, T, eps, attack):
        return next(r for r in rows if r["recipe"] == recipe and float(r["T"]) == T and float(r["eps"]) == eps
                    and r["attack"] == attack)

    for recipe, T in models:
        clean = int(get(recipe, T, 0.0, "clean")["n_robust"])
        for eps in (0.1, 0.3):
            worst = get(recipe, T, eps, "worst")
            each = [int(get(recipe, T, eps, a)["n_robust"]) for a in robustness.ATTACKS]
            # the worst case per image is at most the best single attack's count, never above the clean count
            assert int(worst["n_robust"]) <= min(each) and max(each) <= clean
            assert int(worst["n"]) == 30
            assert float(worst["lo"]) <= float(worst["robust_accuracy"]) <= float(worst["hi"])
        # more budget never leaves more images robust to the worst case
        assert int(get(recipe, T, 0.3, "worst")["n_robust"]) <= int(get(recipe, T, 0.1, "worst")["n_robust"])
    # on the standard model the transfer attack *is* APGD-CE at T = 1 (the same call on the same images)
    for eps in (0.1, 0.3):
        assert get("standard", 1.0, eps, "transfer")["n_robust"] == get("standard", 1.0, eps, "apgd-ce")["n_robust"]
    # the rescaled cross-entropy takes the temperature diagnose estimates from the logits of these images
    import glob
    from scratchnet.attacks.diagnostics import estimate_temperature, top2_margins
    from scratchnet.data import load_mnist
    from scratchnet.model import load
    test_x = load_mnist(mnist_dir(), download=False, progress=False).test_x[:30]
    for recipe, T in models:
        model, _ = load(glob.glob(os.path.join(work["cache"], f"{recipe}-T{T:g}-*.npz"))[0])
        expected = estimate_temperature(top2_margins(model, test_x))
        assert float(get(recipe, T, 0.1, "apgd-ce-T")["attack_T"]) == pytest.approx(expected, rel=1e-5)

    columns, ind = read_csv(out / "robustness_vs_T_indicators.csv")
    assert columns == robustness.INDICATOR_COLUMNS
    assert len(ind) == 3 * 2 * 2 * 6                     # models x eps x (APGD-CE, APGD-DLR) x indicators
    for r in ind:
        n_app, n_flag = int(r["n_applicable"]), int(r["n_flagged"])
        assert 0 <= n_flag <= n_app <= 30
        assert (r["fired"] == "True") == (n_flag > 0 and n_flag / n_app >= 0.1)
    assert "indicators of attack failure" in proc.stdout and "worst case per image on the standard model" in proc.stdout

    # a rerun reuses every model and every measurement, the transfer source included
    before = sorted(os.listdir(out / "parts"))
    assert sum(name.startswith("source-") for name in before) == 2
    again = run("robustness_vs_T.py", args, work["root"])
    check_ok(again)
    assert sorted(os.listdir(out / "parts")) == before
    assert read_csv(out / "robustness_vs_T.csv")[1] == rows


# ===== command-line errors: one line on stderr, non-zero exit =====

SCRIPTS = ["grad_vs_T.py", "attack_vs_T.py", "distillation_vs_temperature.py", "saturation.py",
           "robustness_vs_T.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_temperature(script, tmp_path):
    proc = run(script, ["--T", "-5", "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--T" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_unreadable_data(script, tmp_path):
    """MNIST files that are not MNIST: one line naming the problem, no traceback."""
    data = tmp_path / "mnist"
    data.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (data / name).write_bytes(b"not a gzip file")
    proc = run(script, TINY + ["--data-dir", str(data), "--cache-dir", str(tmp_path / "models"),
                               "--out", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_scripts_are_thin_and_never_import_each_other():
    """Each script only runs its study's main(); the logic lives in scratchnet.study."""
    import ast
    for f in SCRIPTS:
        with open(os.path.join(EXPERIMENTS, f)) as fh:
            tree = ast.parse(fh.read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert imported == {"scratchnet"}, (f, imported)
        assert len(tree.body) <= 4, f"{f} holds logic; it belongs in scratchnet/study"


# ===== a long run, interrupted =====

def test_an_interrupted_study_resumes_with_nothing_finished_recomputed(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the second model trains (its epoch 1 checkpointed): the rerun reads the first
    model and its result, resumes the second from its checkpoint, and measures only the second.
    A result file damaged afterwards is measured again, never read back."""
    from scratchnet import checkpoint as CK
    from scratchnet import cli
    argv = ["grad_vs_T.py", "--T", "1", "20", "--recipes", "temperature", "--architecture", "small",
            "--train-size", "500", "--epochs", "2", "--n", "20", "--no-progress",
            "--cache-dir", str(tmp_path / "models"), "--out", str(tmp_path / "out"), "--data-dir", mnist_dir()]
    monkeypatch.setattr(sys, "argv", argv)
    real_save, real_measure = CK.save_checkpoint, grad_vs_T.measure
    trained, measured, ctrl_c = [], [], [True]

    def save(path, model, opt, epoch, history, settings):
        real_save(path, model, opt, epoch, history, settings)
        trained.append((os.path.basename(path).split("-")[0], epoch))
        if trained[-1] == ("temperature", 1) and ctrl_c[0]:
            raise KeyboardInterrupt
    monkeypatch.setattr(CK, "save_checkpoint", save)
    monkeypatch.setattr(grad_vs_T, "measure", lambda model, x, y, T, p: measured.append(T) or real_measure(model, x, y, T, p))

    assert cli.run_guarded(grad_vs_T.main, "error: ") == cli.EXIT_INTERRUPTED
    assert trained == [("standard", 1), ("standard", 2), ("temperature", 1)] and measured == [1.0]

    trained.clear(), measured.clear()
    ctrl_c[0] = False
    capsys.readouterr()
    assert cli.run_guarded(grad_vs_T.main, "error: ") == 0
    assert trained == [("temperature", 2)]           # the standard model read, the other resumed
    assert measured == [20.0]                         # the standard model's result read back
    rows = read_csv(tmp_path / "out" / "grad_vs_T.csv")[1]
    assert len(rows) == 8                             # 2 models x 2 sources x 2 quantities

    # a result file cut short (not by scratchnet's writer, which cannot) is measured again
    parts = tmp_path / "out" / "parts"
    for part in parts.iterdir():
        if '"T": 1.0' in part.read_text() or "standard-" in part.read_text():
            part.write_text(part.read_text()[:50])
    trained.clear(), measured.clear()
    assert cli.run_guarded(grad_vs_T.main, "error: ") == 0
    assert trained == [] and measured == [1.0]
    assert read_csv(tmp_path / "out" / "grad_vs_T.csv")[1] == rows


def test_mcnemar_on_paired_flags():
    """The paired test of robustness_vs_T's verdict: exact binomial on the discordant images."""
    a = np.array([True] * 12 + [False] * 3 + [True] * 5)
    b = np.array([False] * 12 + [False] * 3 + [True] * 5)
    assert robustness.mcnemar(a, b) == (12, 0, pytest.approx(2 * 0.5 ** 12))
    assert robustness.mcnemar(b, a) == (0, 12, pytest.approx(2 * 0.5 ** 12))
    assert robustness.mcnemar(a, a) == (0, 0, 1.0)                  # no discordant image: nothing to test
    b2, c2, p = robustness.mcnemar([True, True, False, False], [False, True, True, False])
    assert (b2, c2) == (1, 1) and p == pytest.approx(1.0)
