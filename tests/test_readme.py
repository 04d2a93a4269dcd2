"""The README's commands do what it says: the test command is CI's, verbatim; the set-up makes a
virtual environment first; the cache's folder is documented; no example picks up a checkpoint."""
import fnmatch
import os
import re
import shlex

from scratchnet.cache import model_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_COMMAND = "python -m pip install -e '.[test]' && python -m pytest"


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def code_lines():
    """Every line of every ```bash block."""
    return [line for block in re.findall(r"```bash\n(.*?)```", readme(), re.S) for line in block.splitlines()]


def test_the_test_command_is_the_one_ci_runs_verbatim():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert TEST_COMMAND in code_lines() and TEST_COMMAND in ci.splitlines()


def test_a_virtual_environment_comes_before_the_first_install():
    lines = code_lines()
    venv = next(i for i, line in enumerate(lines) if "python -m venv .venv" in line and ". .venv/bin/activate" in line)
    first_install = next(i for i, line in enumerate(lines) if "pip install" in line)
    assert venv < first_install


def test_the_model_cache_folder_and_its_variable_are_documented():
    text = readme()
    assert "$SCRATCHNET_CACHE" in text and "~/.cache/scratchnet/models" in text
    assert "python -m scratchnet models" in text and "--version" in text


def test_no_example_file_pattern_picks_up_a_checkpoint():
    """A checkpoint sits beside its model, named KEY.ckpt.npz: a glob like 'temperature-T20-*.npz'
    hands it to evaluate as if it were a model."""
    settings = {"architecture": "papernot", "batch_size": 128, "optimizer": "adam", "lr": None,
                "warmup_steps": None, "train_size": None, "validation": 5000, "validation_seed": 0}
    key = model_key("temperature", 20, 0, 5, settings)
    checkpoint = f"~/.cache/scratchnet/models/{key}.ckpt.npz"
    for line in code_lines():
        for word in shlex.split(line, comments=True):
            if "*" in word and word.endswith(".npz") and "scratchnet models remove" not in line:
                assert not fnmatch.fnmatch(checkpoint, word), f"{word!r} in {line!r} matches {checkpoint}"


def test_the_seed_paper_is_named():
    text = " ".join(readme().split())
    assert "Haobei Song" in text
    assert ("Temperature control of softmax output layer rather than Distillation technique as a Defense "
            "to Adversarial Perturbations against Convolutional Neural Networks") in text
