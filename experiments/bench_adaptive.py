"""Speed and memory of APGD and the Square attack on Papernot's MNIST network.

    nice python experiments/bench_adaptive.py [--n 100] [--steps 20] [--queries 100] [--device cpu]

Prints APGD iterations per second (one iteration = one forward and one backward
pass of the whole batch; also as image-iterations per second), Square queries
per second (one query = one image's forward pass), and the peak memory of each
(tracemalloc: every NumPy allocation; and the process's peak resident size).

The network is freshly initialised and the images are uniform noise: the
timings do not depend on the weights or the pixels. The labels are the
network's own predictions, so every image is attacked. Square's eps is small
(``--square-eps``) so that few images succeed early and the batch stays full;
the mean batch actually queried is printed.
"""
import argparse
import os
import resource
import time
import tracemalloc

import numpy as np

from scratchnet.attacks import apgd, square_linf
from scratchnet.backend import resolve_device, to_device
from scratchnet.model import papernot_mnist


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="images, all in one batch (default 100)")
    ap.add_argument("--steps", type=int, default=20, help="APGD iterations (default 20)")
    ap.add_argument("--queries", type=int, default=100, help="Square queries per image (default 100)")
    ap.add_argument("--square-eps", type=float, default=0.02, help="Square's budget (default 0.02)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    model = papernot_mnist(seed=0).to(device)
    rng = np.random.default_rng(0)
    x = rng.random((args.n, 1, 28, 28)).astype(np.float32)
    y = model.predict(to_device(x, device))
    print(f"Papernot MNIST network on {device}, batch {args.n}, random images; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    apgd(model, x[:4], y[:4], 0.1, steps=2)                 # warm-up (JIT kernels)
    square_linf(model, x[:4], y[:4], 0.1, queries=2)

    for loss in ("ce", "dlr"):
        tracemalloc.start()
        t0 = time.perf_counter()
        apgd(model, x, y, 0.3, loss=loss, steps=args.steps, batch_size=args.n)
        dt = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"APGD-{loss.upper()}: {args.steps / dt:.2f} iterations/s of the batch of {args.n} "
              f"({args.n * args.steps / dt:.0f} image-iterations/s; {args.steps} iterations in {dt:.1f} s), "
              f"peak {peak / 2**20:.0f} MiB traced")

    tracemalloc.start()
    t0 = time.perf_counter()
    _, r = square_linf(model, x, y, args.square_eps, queries=args.queries, batch_size=args.n)
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    q = int(r.iterations.sum())
    print(f"Square (eps {args.square_eps}): {q / dt:.0f} queries/s ({q} queries in {dt:.1f} s; mean batch "
          f"queried {q / args.queries:.0f} of {args.n}; success {r.success.mean():.0%}), "
          f"peak {peak / 2**20:.0f} MiB traced")
    print(f"process peak resident size {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
