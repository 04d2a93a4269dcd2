"""The command line: help, error paths (one line, non-zero exit, no traceback), and a tiny train + evaluate."""
import os
import subprocess
import sys

import numpy as np
import pytest

from scratchnet import cli
from scratchnet import data as D

from conftest import mnist_dir, needs_mnist


def run(capsys, *argv):
    """main(argv) in this process: (exit status, stdout, stderr)."""
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *fragments):
    assert status != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ===== help =====

def test_module_help_runs_as_a_program():
    result = subprocess.run([sys.executable, "-m", "scratchnet", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for command in ("train", "evaluate", "attack"):
        assert command in result.stdout


@pytest.mark.parametrize("command, options", [
    ("train", ["--recipe", "--T", "--epochs", "--seed", "--data-dir", "--out", "--cache-dir", "--force",
               "--architecture", "--optimizer", "--lr", "--batch-size", "--train-size", "--device",
               "--no-download", "--quiet"]),
    ("evaluate", ["--T", "--data-dir", "--device", "--no-download"]),
])
def test_help_explains_every_option(capsys, command, options):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
    for option in options:
        assert option in out


def test_no_command_prints_help_and_fails(capsys):
    status, out, err = run(capsys)
    assert status == 2 and "train" in err


# ===== usage errors =====

def test_bad_recipe_is_one_line(capsys):
    status, _, err = run(capsys, "train", "--recipe", "annealed", "--T", "20")
    assert_one_line_error(status, err, "invalid choice: 'annealed'", "standard", "distilled")


@pytest.mark.parametrize("T", ["0", "-1", "nan", "inf", "hot"])
def test_temperature_must_be_positive(capsys, T):
    status, _, err = run(capsys, "train", "--recipe", "temperature", "--T", T)
    assert_one_line_error(status, err, "--T")


def test_temperature_recipe_needs_T_and_standard_refuses_other_T(capsys):
    status, _, err = run(capsys, "train", "--recipe", "distilled", "--no-download")
    assert_one_line_error(status, err, "needs a temperature")
    status, _, err = run(capsys, "train", "--recipe", "standard", "--T", "20", "--no-download")
    assert_one_line_error(status, err, "standard recipe trains at T = 1")


def test_missing_data_is_one_line_naming_files_and_folder(capsys, tmp_path):
    status, _, err = run(capsys, "train", "--recipe", "standard", "--data-dir", str(tmp_path), "--no-download")
    assert_one_line_error(status, err, str(tmp_path), "train-images-idx3-ubyte.gz")


def test_missing_data_without_network_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(D, "MIRRORS", [(tmp_path / "no-such-mirror").as_uri() + "/"])
    status, _, err = run(capsys, "train", "--recipe", "standard", "--data-dir", str(tmp_path / "d"), "--quiet")
    assert_one_line_error(status, err, "no network", "t10k-labels-idx1-ubyte.gz")


def test_unreadable_model_is_one_line(capsys, tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a model")
    status, _, err = run(capsys, "evaluate", str(garbage))
    assert_one_line_error(status, err, "garbage.npz")
    status, _, err = run(capsys, "evaluate", str(tmp_path / "absent.npz"))
    assert_one_line_error(status, err, "absent.npz", "not found")


# ===== one exit-code policy for every command =====

def test_attack_command_is_wired(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["attack", "--help"])
    assert info.value.code == 0
    assert "MODEL.npz" in capsys.readouterr().out


def test_top_level_help_states_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for code, meaning in ((1, "the command failed"), (2, "a usage error"), (130, "interrupted")):
        assert f"{code} {meaning}" in out, out


@pytest.mark.parametrize("argv", [["train", "--recipe", "standard", "--epochs", "0"],
                                  ["evaluate", "m.npz", "--T", "0"],
                                  ["attack", "m.npz", "--n", "-3"],
                                  ["attack", "m.npz", "--attack", "jsma", "--wrt", "loss"]])
def test_a_usage_error_exits_2_for_every_command(capsys, tmp_path, argv):
    argv = [str(tmp_path / a) if a == "m.npz" else a for a in argv]
    status, _, err = run(capsys, *argv)
    assert status == cli.EXIT_USAGE == 2
    assert_one_line_error(status, err, f"scratchnet {argv[0]}")


@pytest.mark.parametrize("command", ["evaluate", "attack"])
def test_an_unreadable_model_exits_1_for_every_command(capsys, tmp_path, command):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a model")
    status, _, err = run(capsys, command, str(garbage))
    assert status == cli.EXIT_RUNTIME == 1
    assert_one_line_error(status, err, f"scratchnet {command}: error:", "garbage.npz")


def test_ctrl_c_exits_130_with_one_line(capsys, monkeypatch):
    from scratchnet.cli import evaluate

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "run", interrupted)
    status, _, err = run(capsys, "evaluate", "m.npz")
    assert status == cli.EXIT_INTERRUPTED == 130
    assert err.strip() == "scratchnet evaluate: interrupted"


# ===== a tiny real run =====

@needs_mnist
def test_train_then_evaluate_a_tiny_model(capsys, tmp_path):
    out_path = tmp_path / "tiny.npz"
    status, out, err = run(capsys, "train", "--recipe", "temperature", "--T", "10", "--epochs", "1",
                           "--architecture", "small", "--train-size", "500", "--lr", "0.01",
                           "--data-dir", mnist_dir(), "--cache-dir", str(tmp_path / "cache"),
                           "--out", str(out_path), "--quiet")
    assert status == 0, err
    assert "temperature model, trained at T = 10" in out and "test accuracy" in out
    assert out_path.is_file() and len(os.listdir(tmp_path / "cache")) == 1

    status, out, err = run(capsys, "evaluate", str(out_path), "--data-dir", mnist_dir())
    assert status == 0, err
    accuracy = float(out.split("test accuracy: ")[1].split(" %")[0])
    assert 30 < accuracy <= 100
    assert "exactly 1.0" in out and "mean top probability" in out
    table = out.split("confusion counts:\n")[1].strip().splitlines()
    assert len(table) == 11                                  # header + 10 classes
    counts = np.array([[int(v) for v in row.split()[1:]] for row in table[1:]])
    assert counts.sum() == 10000
    assert counts.sum(axis=1).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(np.trace(counts) / 100 - accuracy) < 0.01
