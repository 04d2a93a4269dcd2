"""experiments/bench.py, the kernels' benchmark: its options, its failure on a missing
GPU, and the figures it writes (timed on tiny batches: no speed is asserted)."""
import json
import os
import statistics
import subprocess
import sys

import pytest

from scratchnet.backend import gpu_available

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "bench.py")


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=timeout)


def test_gpu_without_a_gpu_is_one_clear_line():
    ok, _ = gpu_available()
    if ok:
        pytest.skip("a CUDA device is present here, so --device gpu would run")
    done = _run("--device", "gpu", "--no-torch")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("bench.py: error: --device gpu: ")
    assert "Traceback" not in done.stderr


def test_bad_option_is_an_argparse_error():
    done = _run("--repeats", "0")
    assert done.returncode == 2 and "--repeats must be at least 1" in done.stderr
    done = _run("--rounds", "0")
    assert done.returncode == 2 and "--rounds must be at least 1" in done.stderr


@pytest.mark.slow
def test_writes_throughput_memory_epoch_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    done = _run("--repeats", "2", "--warmup", "1", "--rounds", "2", "--train-batch", "8", "--grad-batch", "8",
                "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    for library in ["scratchnet"] + (["torch"] if "torch" in figures else []):
        for which in ("train", "input_grad"):
            r = figures[library][which]
            assert r["images_per_s"] > 0 and r["cpu_seconds"] > 0 and r["peak_mib"] > 0, (library, which)
            assert len(r["times_s"]) == 4 and len(r["images_per_s_by_round"]) == 2     # 2 runs x 2 rounds, pooled
            assert r["seconds"] == pytest.approx(statistics.median(r["times_s"]))
    assert figures["scratchnet"]["train"]["threads"]["numba_threads"] == 1
    assert figures["scratchnet_epoch_s"] == pytest.approx(55000 / figures["scratchnet"]["train"]["images_per_s"])
    assert "55,000-image training epoch" in done.stdout
    if "torch" in figures:
        assert {"train", "input_grad"} <= set(figures["ratio"])
        assert [len(figures["ratio_by_round"][which]) for which in ("train", "input_grad")] == [2, 2]
        assert "throughput ratio in each round: training step " in done.stdout
        assert figures["torch"]["train"]["threads"]["num_threads"] == 1


BENCH_ATTACKS = os.path.join(os.path.dirname(BENCH), "bench_attacks.py")


def test_bench_attacks_prints_every_attack_and_the_cpu_settings(mnist_folder):
    """experiments/bench_attacks.py on a tiny batch: a line for each attack (no speed asserted)."""
    done = subprocess.run([sys.executable, BENCH_ATTACKS, "--train-steps", "1", "--n", "3", "--n-cw", "2",
                           "--data-dir", str(mnist_folder)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for line in ("CPU settings: ", "FGSM: ", "PGD: ", "JSMA (probs at T = 1", "JSMA pair search alone",
                 "C&W L2 (logits, 5 rounds x 100 Adam steps, target = label + 1, batch 2): "):
        assert line in done.stdout, line
    bad = subprocess.run([sys.executable, BENCH_ATTACKS, "--n", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--n" in bad.stderr
