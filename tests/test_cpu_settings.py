"""What importing the CPU kernels sets for the process (``kernels/cpu.py``): the threading
layer, the user's choice winning over it, the same weights from every layer, and malloc
keeping freed memory for the next arrays. Each case runs in a fresh process: Numba fixes its
layer at the first parallel kernel, and malloc's settings are the process's."""
import functools
import json
import os
import subprocess
import sys

import pytest

from scratchnet.kernels import cpu

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="GNU OpenMP's and glibc's settings are Linux's")

DESCRIBE = """
import json, numpy as np
from scratchnet.kernels import cpu
cpu.relu_forward(np.ones(1000, np.float32))          # a parallel kernel: Numba loads its layer
print(json.dumps(cpu.describe_threads()))
"""

# a few training steps of the Papernot network on an odd batch (37 images: blocks of unequal
# size), through conv1's im2col kernels and the Winograd ones; the weights' hash
TRAIN = """
import hashlib, json, numba, numpy as np
from scratchnet.kernels import cpu
from scratchnet.losses import softmax_cross_entropy
from scratchnet.model import papernot_mnist
from scratchnet.optim import SGD
rng = np.random.default_rng(1)
model = papernot_mnist(seed=0, dtype=np.float32)
opt = SGD(model, lr=0.01, momentum=0.9)
for _ in range(3):
    x = rng.random((37, 1, 28, 28), dtype=np.float32)
    _, dz = softmax_cross_entropy(model.logits(x, train=True), rng.integers(0, 10, 37))
    model.backward(dz, input_grad=False)
    opt.step()
digest = hashlib.sha256(b"".join(v.tobytes() for v in model.params.values())).hexdigest()
print(json.dumps({"layer": numba.threading_layer(), "threads": numba.get_num_threads(), "weights": digest}))
"""


def run(code, **env):
    """Run ``code`` in a fresh Python with ``env`` on top of this one's, minus the thread settings
    not named; its last output line as JSON."""
    base = {k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER", "GOMP_SPINCOUNT",
                                                                "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**base, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@functools.lru_cache(maxsize=None)
def omp_loads():
    """Whether Numba's OpenMP layer can be loaded here (it needs the system's libgomp)."""
    try:                                     # asked for explicitly, a layer that cannot load fails the run
        return run(DESCRIBE, NUMBA_THREADING_LAYER="omp")["numba_threading_layer"] == "omp"
    except AssertionError:
        return False


def test_the_default_is_openmp_with_a_bounded_spin_else_workqueue():
    threads = run(DESCRIBE)
    if omp_loads():
        assert threads["numba_threading_layer"] == "omp", threads
        assert threads["omp_spin_count"] == str(cpu.OMP_SPIN_COUNT), threads
    else:
        assert threads["numba_threading_layer"] == "workqueue", threads
        assert threads["omp_spin_count"] is None
    assert threads["blas_threads"] == 1, threads


def test_the_users_layer_and_spin_win():
    assert run(DESCRIBE, NUMBA_THREADING_LAYER="workqueue")["numba_threading_layer"] == "workqueue"
    if not omp_loads():
        pytest.skip("Numba's OpenMP layer cannot be loaded here (no libgomp), so there is no spin to set")
    threads = run(DESCRIBE, GOMP_SPINCOUNT="1000")
    assert threads["numba_threading_layer"] == "omp" and threads["omp_spin_count"] == "1000", threads


def test_every_threading_layer_gives_the_same_weights():
    layers = ["workqueue"] + (["omp"] if omp_loads() else [])
    try:
        import tbb  # noqa: F401
        layers.append("tbb")
    except ImportError:
        pass                                 # tbb is optional: not a dependency of scratchnet
    if len(layers) < 2:
        pytest.skip("only the workqueue layer loads here: no other layer to compare it with")
    runs = {layer: run(TRAIN, NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS="3") for layer in layers}
    for layer, r in runs.items():
        assert r["layer"] == layer and r["threads"] == 3, r
    assert len({r["weights"] for r in runs.values()}) == 1, runs


# page faults while a 64 MB array is made, filled and freed four times, after a first time
FAULTS = """
import json, resource, numpy as np
from scratchnet.kernels import cpu
np.ones(1 << 24, np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    np.ones(1 << 24, np.float32)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": cpu.FREED_MEMORY_KEPT, "faults": faults}))
"""


def test_freed_memory_is_reused_without_page_faults():
    """Kept: the next array reuses the freed pages (no faults). The control, where a user's
    MALLOC_ variable leaves glibc's defaults alone, faults in fresh pages every time (at least
    one per 2 MB huge page), so the check can fail."""
    kept = run(FAULTS)
    if not kept["kept"]:
        pytest.skip("malloc could not be set here (not glibc)")
    control = run(FAULTS, MALLOC_ARENA_MAX="8")
    assert not control["kept"]
    assert control["faults"] >= 4 * 32, control      # 64 MB = 32 huge pages, 16,384 small ones
    assert kept["faults"] <= 8, kept


@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000"}])
def test_the_users_malloc_settings_win(env):
    assert run(DESCRIBE, **env)["freed_memory_kept"] is False


BIG = """
import json, threading, numpy as np
from scratchnet.kernels import cpu
sums = []
def make():                                         # a second thread allocates from an arena of its own
    sums.append(float(np.ones(40_000_000, np.float32).sum()))
thread = threading.Thread(target=make)
thread.start()
thread.join()
sums.append(float(np.ones(40_000_000, np.float32).sum()))
print(json.dumps({"kept": cpu.FREED_MEMORY_KEPT, "sums": sums}))
"""


def test_arrays_larger_than_an_arena_heap_still_allocate_in_every_thread():
    """With no separate mapping per array, glibc still maps an array larger than a thread
    arena's 64 MB heap on its own (its fallback): 160 MB in a second thread and in the main one."""
    out = run(BIG)
    assert out["sums"] == [4e7, 4e7], out
