"""The command line: help, error paths (one line, non-zero exit, no traceback), outputs checked
before any work, ``scratchnet models``, and a tiny train + evaluate."""
import errno
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


# ===== files the command will write are checked before any work =====

def _no_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the output was checked")
    monkeypatch.setattr(D, "load_mnist", forbidden)
    from scratchnet import recipes
    monkeypatch.setattr(recipes, "train_recipe", forbidden)


def _tiny_mnist():
    """Random images in MNIST's shapes: for runs that must stop before training anyway."""
    rng = np.random.default_rng(0)
    x = lambda n: rng.random((n, 1, 28, 28), dtype=np.float32)
    y = lambda n: rng.integers(0, 10, n)
    return D.MNIST(x(64), y(64), x(16), y(16), x(16), y(16), "/nowhere", 0)


@pytest.mark.parametrize("where", ["under a file", "a folder", "read-only"])
def test_an_impossible_out_fails_before_any_work(capsys, tmp_path, monkeypatch, where):
    _no_work(monkeypatch)
    (tmp_path / "plain").write_text("a file")
    out, reason = {"under a file": (tmp_path / "plain" / "m.npz", "output folder does not exist"),
                   "a folder": (tmp_path, "is a folder"),
                   "read-only": (tmp_path / "m.npz", "is not writable: Read-only file system")}[where]
    if where == "read-only":
        from scratchnet import files

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    status, _, err = run(capsys, "train", "--recipe", "standard", "--out", str(out))
    assert status == cli.EXIT_USAGE
    assert_one_line_error(status, err, "argument --out", reason)


def test_a_cache_folder_that_cannot_take_files_fails_before_training(capsys, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    monkeypatch.setattr(D, "load_mnist", lambda *a, **k: _tiny_mnist())
    (tmp_path / "plain").write_text("a file")
    folder = tmp_path / "plain" / "models"
    status, _, err = run(capsys, "train", "--recipe", "standard", "--architecture", "small",
                         "--cache-dir", str(folder), "--quiet")
    assert status == cli.EXIT_RUNTIME
    assert_one_line_error(status, err, f"the model cache folder {folder} is not writable: Not a directory")


# ===== scratchnet models =====

@pytest.fixture
def filled_cache(tmp_path):
    """A cache folder with two models (one from an older training version), an unfinished run's
    checkpoint, and two files that are not the cache's; plus a model outside the folder."""
    from scratchnet import checkpoint, recipes
    from scratchnet.cache import model_key
    from scratchnet.model import save
    from scratchnet.optim import Adam
    folder = tmp_path / "models"
    settings = {"architecture": "small", "batch_size": 128, "optimizer": "adam", "lr": None, "warmup_steps": None,
                "train_size": None, "validation": 5000, "validation_seed": 0}
    model = recipes.build_model("small", 0)
    names = {}
    for recipe, T, acc, version in (("temperature", 20.0, 0.9876, recipes.TRAINING_VERSION),
                                    ("standard", 1.0, 0.9912, recipes.TRAINING_VERSION - 1)):
        names[recipe] = model_key(recipe, T, 0, 5, settings) + ".npz"
        save(model, folder / names[recipe], {"recipe": recipe, "T": T, "seed": 0, "epochs": 5,
                                             "test_accuracy": acc, "training_version": version})
    names["checkpoint"] = model_key("distilled", 100.0, 1, 5, settings) + ".ckpt.npz"
    checkpoint.save_checkpoint(str(folder / names["checkpoint"]), model, Adam(model), 2, [], {})
    (folder / "notes.txt").write_text("mine")
    save(model, folder / "my-own-model.npz")
    save(model, tmp_path / "outside-temperature-T20.npz")
    return folder, names


def test_models_lists_recipe_T_seed_accuracy_size_and_path(capsys, filled_cache):
    folder, names = filled_cache
    status, out, err = run(capsys, "models", "--cache-dir", str(folder))
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"model cache {folder}: 2 model(s), 1 unfinished run(s), ")
    row = next(line for line in lines if names["temperature"] in line).split()
    assert row[:7] == ["temperature", "20", "0", "5", "small", "98.76", "%"]
    assert row[8:] == ["MB", str(folder / names["temperature"])]
    assert float(row[7]) == pytest.approx(os.path.getsize(folder / names["temperature"]) / 1e6, abs=0.06)
    old = lines.index(next(line for line in lines if names["standard"] in line))
    assert "training version 1" in lines[old + 1] and "never reused" in lines[old + 1]
    assert any(names["checkpoint"] in line and "2/5 epochs" in line for line in lines)
    assert "notes.txt" not in out and "my-own-model" not in out and "outside" not in out
    status, out2, _ = run(capsys, "models", "list", "--cache-dir", str(folder))
    assert status == 0 and out2 == out


def test_models_remove_asks_for_yes_and_touches_only_the_cache_s_own_files(capsys, filled_cache):
    folder, names = filled_cache
    before = sorted(os.listdir(folder))
    status, out, err = run(capsys, "models", "--cache-dir", str(folder), "remove", "temperature-*")
    assert status == cli.EXIT_USAGE and sorted(os.listdir(folder)) == before
    assert out.strip() == f"would remove {folder / names['temperature']}"
    assert_one_line_error(status, err, "nothing removed: add --yes")

    status, out, err = run(capsys, "models", "--cache-dir", str(folder), "remove", "temperature-*", "--yes")
    assert status == 0, err
    assert sorted(os.listdir(folder)) == sorted(set(before) - {names["temperature"]})

    status, out, err = run(capsys, "models", "--cache-dir", str(folder), "remove", "--all", "--yes")
    assert status == 0, err
    assert sorted(os.listdir(folder)) == ["my-own-model.npz", "notes.txt"]     # not the cache's: kept
    assert (folder.parent / "outside-temperature-T20.npz").exists()


@pytest.mark.parametrize("pattern", ["../outside-*", "{outside}", "/etc/*"])
def test_models_remove_never_reaches_outside_the_cache(capsys, filled_cache, pattern):
    folder, _ = filled_cache
    pattern = pattern.format(outside=folder.parent / "outside-temperature-T20.npz")
    before = sorted(os.listdir(folder))
    status, _, err = run(capsys, "models", "--cache-dir", str(folder), "remove", pattern, "--yes")
    assert status == cli.EXIT_USAGE
    assert_one_line_error(status, err, "is not in the cache folder")
    assert sorted(os.listdir(folder)) == before and (folder.parent / "outside-temperature-T20.npz").exists()


def test_models_remove_with_no_match_fails(capsys, filled_cache):
    folder, _ = filled_cache
    status, _, err = run(capsys, "models", "--cache-dir", str(folder), "remove", "cw-*", "--yes")
    assert status == cli.EXIT_RUNTIME
    assert_one_line_error(status, err, "matches 'cw-*'")
