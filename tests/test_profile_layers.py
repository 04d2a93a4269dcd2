"""experiments/profile_layers.py: every step of a pass is timed once, in the order the pass runs
it, and the table is written (tiny batches: no speed is asserted)."""
import csv
import os
import subprocess
import sys

from scratchnet.model import papernot_mnist

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                      "profile_layers.py")
LAYERS = [layer.name for layer in papernot_mnist(seed=0).layers]


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)


def test_the_training_step_and_the_input_gradient_are_timed_step_by_step(tmp_path):
    for which, last in (("train", ["update"]), ("grad", [])):
        out = tmp_path / f"{which}.csv"
        done = _run("--pass", which, "--batch", "4", "--repeats", "1", "--out", str(out))
        assert done.returncode == 0, done.stderr
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
        want = ([f"forward {n}" for n in LAYERS] + ["loss"] + [f"backward {n}" for n in reversed(LAYERS)] + last)
        assert [r["step"] for r in rows] == want
        assert all(float(r["wall_ms"]) > 0 and float(r["cpu_ms"]) >= 0 for r in rows)
        assert "images/s" in done.stdout and f"batch 4" in done.stdout


def test_a_bad_option_is_one_line_and_nothing_runs(tmp_path):
    done = _run("--batch", "0")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--batch" in done.stderr
    (tmp_path / "plain").write_text("a file")
    done = _run("--out", str(tmp_path / "plain" / "p.csv"), "--repeats", "1", "--batch", "4")
    assert done.returncode == 1 and done.stderr.startswith("error: the folder of --out"), done.stderr
    assert "Traceback" not in done.stderr
