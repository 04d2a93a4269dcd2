"""Where does a pass of the Papernot network spend its time? Each layer's forward and backward, timed.

``experiments/bench.py`` says how fast a whole pass is; this says which layer
makes it so. For a training step (batch 128, dropout on, SGD update) or an
input-gradient pass (batch 1000, no parameter gradients), every layer's
forward, the loss, every layer's backward and the update are timed one by
one: the median over ``--repeats`` passes of the wall clock and of the
process's CPU time. CPU time over wall time is the number of cores busy
(spinning threads count as busy: see ``kernels/cpu.py``). For a step under
about a millisecond that figure is unreliable: the other threads' CPU time
is not always counted by the time the step ends (a ReLU pass that runs 1.9x
faster on two threads than on one reads 1.0 cores here).

Usage::

    python experiments/profile_layers.py                 # training step
    python experiments/profile_layers.py --pass grad     # input gradient
    python experiments/profile_layers.py --out prof.csv  # also as CSV

Random images and labels, as in the bench: the speed does not depend on them.
Time it only while nothing else runs.
"""
import csv
import os
import statistics
import time

import numpy as np

from scratchnet.cli import Parser, positive_int, run_script
from scratchnet.files import atomic_write, check_writable


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pass", dest="which", choices=("train", "grad"), default="train",
                   help="train: a training step; grad: an input-gradient pass (default train)")
    p.add_argument("--batch", type=positive_int, help="images per pass (default 128 for train, 1000 for grad)")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed passes; medians are printed (default 10)")
    p.add_argument("--out", help="also write the table to this CSV file")
    return p.parse_args(argv)


def profile(which, batch, repeats, warmup=2):
    """[{step, wall_ms, cpu_ms}] in the order the pass runs them (medians over ``repeats``)."""
    from scratchnet.kernels import cpu  # noqa: F401   (the CPU kernels' thread and memory settings)
    from scratchnet.losses import softmax_cross_entropy
    from scratchnet.model import papernot_mnist
    from scratchnet.optim import SGD

    rng = np.random.default_rng(1)
    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    model = papernot_mnist(seed=0, dtype=np.float32)
    opt = SGD(model, lr=0.01, momentum=0.9)
    train = which == "train"
    times = {}

    def timed(step, fn, *args, **kwargs):
        wall, cpu_time = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        times.setdefault(step, []).append((time.perf_counter() - wall, time.process_time() - cpu_time))
        return out

    for i in range(warmup + repeats):
        if i == warmup:
            times.clear()                    # the warm-up passes compile and first touch the buffers
        h = x
        for layer in model.layers:
            h = timed(f"forward {layer.name}", layer.forward, h, train=train)
        _, d = timed("loss", softmax_cross_entropy, h, y)
        for k, layer in enumerate(reversed(model.layers)):
            first = k == len(model.layers) - 1
            if train:                        # as Sequential.backward(input_grad=False): no dx for the image
                d = timed(f"backward {layer.name}", layer.backward, d, need_dx=not first)
            else:                            # as an attack: dx only
                d = timed(f"backward {layer.name}", layer.backward, d, param_grads=False)
        if train:
            timed("update", opt.step)
    return [{"step": step, "wall_ms": 1e3 * statistics.median(w for w, _ in v),
             "cpu_ms": 1e3 * statistics.median(c for _, c in v)} for step, v in times.items()]


def main(argv=None):
    args = parse_args(argv)
    batch = args.batch or (128 if args.which == "train" else 1000)
    if args.out:                             # before the work, not after it
        check_writable(os.path.dirname(os.path.abspath(args.out)), "the folder of --out")
    rows = profile(args.which, batch, args.repeats)
    wall, cpu_time = sum(r["wall_ms"] for r in rows), sum(r["cpu_ms"] for r in rows)
    what = "training step" if args.which == "train" else "input-gradient pass"
    print(f"Papernot network, {what}, batch {batch}, float32, CPU; median of {args.repeats} passes")
    print(f"{'step':22s} {'wall ms':>8s} {'CPU ms':>8s} {'cores':>6s} {'share':>6s}")
    for r in rows:
        print(f"{r['step']:22s} {r['wall_ms']:8.2f} {r['cpu_ms']:8.2f} {r['cpu_ms'] / r['wall_ms']:6.2f} "
              f"{100 * r['wall_ms'] / wall:5.1f}%")
    print(f"{'sum':22s} {wall:8.2f} {cpu_time:8.2f} {cpu_time / wall:6.2f}   ({1e3 * batch / wall:,.0f} images/s)")
    if args.out:
        with atomic_write(args.out, "w", suffix=".csv") as f:
            w = csv.DictWriter(f, fieldnames=["step", "wall_ms", "cpu_ms"])
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_script(main)
