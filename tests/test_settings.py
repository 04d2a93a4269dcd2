"""Every numeric setting is checked before any work, by one rule for the library, the command line
and the experiment scripts: nonsense values are one-line errors, zero is never "the default"."""
import math
import sys
import warnings

import numpy as np
import pytest

from scratchnet import cache as C
from scratchnet import cli, functional, recipes, training
from scratchnet.study import attack_vs_T, common, grad_vs_T, saturation
from scratchnet.study import distillation, robustness


def nothing_may_run(monkeypatch):
    """Make loading data or training fail the test: the settings must be refused before either."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")
    monkeypatch.setattr(C, "load_mnist", forbidden)
    monkeypatch.setattr(recipes, "train_recipe", forbidden)
    monkeypatch.setattr(training, "train", forbidden)
    monkeypatch.setattr(common, "load_data", forbidden)
    import scratchnet.data
    monkeypatch.setattr(scratchnet.data, "load_mnist", forbidden)


# ===== the library =====

@pytest.mark.parametrize("T", [0, -1, math.nan, math.inf, 1e300, 2e6, 1e-9, "hot", None])
def test_temperatures_outside_float32s_range_are_refused(T):
    with pytest.raises(ValueError, match=r"T must be a finite number > 0, from 1e-06 to 1e\+06"):
        functional.check_T(T)


def test_the_temperature_limits_are_accepted():
    assert functional.check_T(functional.T_MIN) == 1e-6 and functional.check_T(functional.T_MAX) == 1e6
    assert functional.check_T("20") == 20.0


@pytest.mark.parametrize("lr", [0, -1, 1e6, 1.5, math.nan, math.inf, "fast", True])
def test_nonsense_learning_rates_are_refused(lr):
    with pytest.raises(ValueError, match="lr must be"):
        training.check_learning_rate(lr)


@pytest.mark.parametrize("value", [0, -3, 2.5, "many", math.nan, math.inf, None, True])
def test_counts_must_be_integers_of_at_least_one(value):
    with pytest.raises(ValueError, match="epochs must be"):
        training.check_positive_int(value, "epochs")


def test_counts_and_seeds_that_are_fine():
    assert training.check_positive_int(3, "epochs") == 3 and training.check_positive_int(4.0, "n") == 4
    assert training.check_positive_int("7", "n") == 7 and training.check_seed(0) == 0
    assert training.check_learning_rate(1e-3) == 1e-3 and training.check_learning_rate(training.MAX_LR) == 1.0
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        training.check_seed(-1)


@pytest.mark.parametrize("recipe, kwargs", [
    ("temperature", {"T": 1e300}), ("temperature", {"T": 0}), ("standard", {"lr": 0}),
    ("standard", {"lr": -1}), ("standard", {"lr": 1e6}), ("standard", {"epochs": 0}),
    ("standard", {"batch_size": 0}), ("standard", {"seed": -1}), ("standard", {"train_size": 0}),
    ("standard", {"warmup_steps": 0}), ("distilled", {"T": 20, "lr": float("nan")}),
])
def test_the_cache_refuses_bad_settings_before_any_work(monkeypatch, tmp_path, recipe, kwargs):
    nothing_may_run(monkeypatch)
    with pytest.raises(ValueError, match="must be"):
        C.get_model(recipe, cache_dir=tmp_path, architecture="small", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_the_training_loop_refuses_bad_settings_before_the_first_step():
    model = recipes.build_model("small", 0)
    before = {k: v.copy() for k, v in model.params.items()}
    x, y = np.zeros((8, 1, 28, 28), np.float32), np.zeros(8, np.int64)
    for bad in ({"lr": 0}, {"lr": 1e6}, {"T": 1e300}, {"epochs": 0}, {"batch_size": -1}, {"seed": -2}):
        with pytest.raises(ValueError, match="must be"):
            training.train(model, x, y, progress=False, **bad)
    assert all(np.array_equal(before[k], model.params[k]) for k in before)


# ===== the command line =====

def run(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("option, value", [
    ("--lr", "0"), ("--lr", "-1"), ("--lr", "1e6"), ("--lr", "nan"), ("--T", "1e300"), ("--T", "1e-9"),
    ("--epochs", "0"), ("--epochs", "-2"), ("--epochs", "2.5"), ("--batch-size", "0"), ("--seed", "-1"),
    ("--train-size", "0"),
])
def test_train_refuses_nonsense_settings_in_one_line_before_any_work(capsys, monkeypatch, option, value):
    nothing_may_run(monkeypatch)
    status, _, err = run(capsys, "train", "--recipe", "temperature", "--T", "20", option, value)
    assert status == cli.EXIT_USAGE
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"argument {option}: expected " in err or f"argument {option}: temperature T must be" in err, err


def test_the_limits_are_stated_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "from 1e-6 to 1e6" in out and "at most 1" in out


@pytest.mark.parametrize("T", ["1e-50", "1e300", "0"])
def test_attack_refuses_a_temperature_float32_cannot_divide_by(capsys, tmp_path, T):
    """z / T overflowed float32 for T = 1e-50: the same 's = z / T' RuntimeWarning came from
    softmax and log-softmax, printed twice, and the run went on with NaN."""
    from scratchnet.model import save
    save(recipes.build_model("small", 0), tmp_path / "m.npz", {"recipe": "standard", "T": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # any RuntimeWarning fails the test
        status, _, err = run(capsys, "attack", str(tmp_path / "m.npz"), "--wrt", "probs", "--T", T, "--n", "5")
    assert status == cli.EXIT_USAGE and len(err.strip().splitlines()) == 1, err
    assert "from 1e-06 to 1e+06" in err


def test_warnings_are_one_line_each(capsys, monkeypatch):
    """Python's default format adds the source line of the call, which repeats the message:
    read as the same warning printed twice."""
    from scratchnet.cli import evaluate

    def warns(args):
        warnings.warn("ignoring cached model X: trained by training version 1; retraining")
        with np.errstate(over="warn"):
            np.exp(np.float32(1000))
        return 0
    monkeypatch.setattr(evaluate, "run", warns)
    status, _, err = run(capsys, "evaluate", "m.npz")
    assert status == 0
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0] == "warning: ignoring cached model X: trained by training version 1; retraining"
    assert lines[1].startswith("warning: overflow encountered in exp (RuntimeWarning at test_settings.py:")


def test_version(capsys):
    from scratchnet import __version__
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"scratchnet {__version__} (training version {recipes.TRAINING_VERSION})"


# ===== the experiment scripts =====

STUDIES = [grad_vs_T, attack_vs_T, distillation, saturation, robustness]


def study_status(monkeypatch, capsys, study, *argv):
    """Run a study's main() as its script would (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{study.__name__.rsplit('.', 1)[1]}.py", *argv])
    status = cli.run_guarded(study.main, "error: ")
    return status, capsys.readouterr().err


@pytest.mark.parametrize("study", STUDIES, ids=lambda s: s.__name__.rsplit(".", 1)[1])
@pytest.mark.parametrize("argv", [["--n", "0"], ["--epochs", "0"], ["--train-size", "0"], ["--n", "-5"],
                                  ["--seeds", "-1"], ["--T", "1e300"]])
def test_a_zero_or_negative_option_is_an_error_not_the_default(monkeypatch, capsys, study, argv):
    nothing_may_run(monkeypatch)
    status, err = study_status(monkeypatch, capsys, study, *argv)
    assert status == cli.EXIT_USAGE, err
    assert len(err.strip().splitlines()) == 1 and f"argument {argv[0]}" in err, err
    assert not err.startswith("error: ") or "error: error" not in err


def test_only_an_absent_option_means_the_default():
    parser = common.make_parser("a study")
    common.add_common_options(parser, grad_vs_T.QUICK, grad_vs_T.FULL)
    given = common.settings_from(parser.parse_args(["--n", "7", "--epochs", "2", "--seeds", "0", "3"]),
                                 grad_vs_T.QUICK, grad_vs_T.FULL)
    assert given["n"] == 7 and given["epochs"] == 2 and given["seeds"] == [0, 3]
    default = common.settings_from(parser.parse_args([]), grad_vs_T.QUICK, grad_vs_T.FULL)
    assert default["n"] == grad_vs_T.FULL["n"] and default["epochs"] == grad_vs_T.FULL["epochs"]
    quick = common.settings_from(parser.parse_args(["--quick"]), grad_vs_T.QUICK, grad_vs_T.FULL)
    assert quick["n"] == grad_vs_T.QUICK["n"]


@pytest.mark.parametrize("study", STUDIES, ids=lambda s: s.__name__.rsplit(".", 1)[1])
def test_a_results_folder_that_cannot_take_files_fails_before_any_work(monkeypatch, capsys, tmp_path, study):
    nothing_may_run(monkeypatch)
    (tmp_path / "plain").write_text("a file")
    out = tmp_path / "plain" / "results"
    status, err = study_status(monkeypatch, capsys, study, "--out", str(out), "--T", "1", "20")
    assert status == cli.EXIT_RUNTIME, err
    assert err.strip() == f"error: the results folder (--out) {out} is not writable: Not a directory"


@pytest.mark.parametrize("study", STUDIES, ids=lambda s: s.__name__.rsplit(".", 1)[1])
def test_each_study_help_states_its_own_defaults(study):
    """The help of --T, --seeds, --n and --epochs gives the study's own full and quick defaults
    (the robustness study measures 500 images, not grad_vs_T's 1000)."""
    parser = common.make_parser(study.__doc__)
    common.add_common_options(parser, study.QUICK, study.FULL)
    helps = {a.dest: " ".join(a.help.split()) for a in parser._actions if a.help}
    assert f"default {study.FULL['T']}" in helps["T"]
    assert f"default {' '.join(map(str, study.FULL.get('seeds', [0])))})" in helps["seeds"]
    assert f"(default {study.FULL['n']}; quick {study.QUICK['n']})" in helps["n"]
    assert f"(default {study.FULL['epochs']}; quick {study.QUICK['epochs']})" in helps["epochs"]
