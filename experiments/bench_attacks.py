"""Speed and memory of the attacks on Papernot's MNIST network, on the CPU (or GPU).

    nice python experiments/bench_attacks.py [--train-steps 40] [--n 100] [--device cpu]

Prints images per second of FGSM, of one PGD step and of JSMA (per image, run
to success or to its 14.5 % cap), the peak memory of JSMA at batch 100
(tracemalloc: every NumPy allocation; and the process's peak resident size),
the time of the JSMA pair search alone, and the seconds per image of C&W L2
with its default budget (5 rounds of 100 Adam steps, target = label + 1, on
the first ``--n-cw`` images as one batch). On the CPU it first prints the
thread and memory settings in force (``kernels/cpu.py``): to compare them
with others, run it again with the others in the environment (e.g.
``NUMBA_THREADING_LAYER=workqueue``).

The network is briefly trained (``--train-steps`` Adam steps of 64 images at
T = 1; 0 = untrained) so that JSMA's number of iterations is realistic; the
timings do not depend on the weights otherwise. The accuracy is printed.
"""
import resource
import time
import tracemalloc

import numpy as np

from scratchnet.attacks import cw_l2, fgsm, jsma, pgd
from scratchnet.attacks.jsma import DEFAULT_PAIR_CHUNK, saliency_pairs
from scratchnet.backend import resolve_device, to_device
from scratchnet.cli import Parser, nonnegative_int, positive_int, run_script
from scratchnet.data import load_mnist
from scratchnet.losses import softmax_cross_entropy
from scratchnet.model import papernot_mnist
from scratchnet.optim import Adam


def main():
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-steps", type=nonnegative_int, default=40,
                    help="Adam steps of 64 images before the attacks (default 40; 0: untrained)")
    ap.add_argument("--n", type=positive_int, default=100, help="images (and JSMA batch size; default 100)")
    ap.add_argument("--data-dir", default=None, help="folder with the MNIST .gz files (default: as the loader finds it)")
    ap.add_argument("--n-cw", type=nonnegative_int, default=20,
                    help="images for C&W L2, one batch (default 20; 0: skip)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or gpu")
    args = ap.parse_args()
    device = resolve_device(args.device)

    data = load_mnist(args.data_dir, progress=False)
    model = papernot_mnist(seed=0).to(device)
    opt, rng = Adam(model, lr=1e-3), np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        b = rng.integers(0, len(data.train_x), 64)
        _, dz = softmax_cross_entropy(model.logits(to_device(data.train_x[b], device), train=True),
                                      to_device(data.train_y[b], device), 1.0)
        model.backward(dz)
        opt.step()
    x, y = data.test_x[:args.n], data.test_y[:args.n].astype(np.int64)
    acc = float((model.predict(to_device(x, device)) == y).mean())
    print(f"Papernot MNIST network on {device}, {args.train_steps} Adam steps of 64 images "
          f"({time.perf_counter() - t0:.0f} s), test accuracy on the {args.n} images {acc:.1%}")
    if device == "cpu":                      # known once a parallel kernel has run
        from scratchnet.kernels import cpu
        print(f"CPU settings: {cpu.describe_threads()}")

    fgsm(model, x[:10], y[:10], 0.1)                       # warm-up (JIT kernels)
    t0 = time.perf_counter()
    fgsm(model, x, y, 0.1, batch_size=args.n)
    dt = time.perf_counter() - t0
    print(f"FGSM: {args.n / dt:.1f} images/s (batch {args.n})")

    steps = 5
    t0 = time.perf_counter()
    _, r = pgd(model, x, y, 0.3, step=0.3, steps=steps, batch_size=args.n)   # big steps: count the passes
    dt = time.perf_counter() - t0
    passes = int(r.gradient_evals.sum())
    print(f"PGD: {passes / dt:.1f} image-steps/s (one forward + backward per image and step; "
          f"{passes} image-steps in {dt:.1f} s)")

    targets = (y + 1) % 10
    jsma(model, x[:2], y[:2], targets[:2], batch_size=2)  # warm-up (its pair search is a JIT kernel too)
    tracemalloc.start()
    t0 = time.perf_counter()
    _, r = jsma(model, x, y, targets, batch_size=args.n, progress=True)
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    s = r.summary()
    print(f"JSMA (probs at T = 1, target = label + 1, pair_chunk {DEFAULT_PAIR_CHUNK}): "
          f"{dt / args.n:.3f} s per image ({args.n / dt:.2f} images/s), mean iterations "
          f"{r.iterations.mean():.1f}, success {s['success_rate']:.1%} of {s['n_correct']} correct images")
    print(f"JSMA peak memory at batch {args.n}: {peak / 2**20:.0f} MiB traced (NumPy arrays); "
          f"process peak resident size {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")

    P = 784
    a = np.random.default_rng(1).standard_normal((args.n, P)).astype(np.float32)
    b = -a + 0.1 * np.random.default_rng(2).standard_normal((args.n, P)).astype(np.float32)
    saliency_pairs(a[:2], b[:2], np.ones((2, P), bool))    # warm-up
    t0 = time.perf_counter()
    saliency_pairs(a, b, np.ones((args.n, P), bool))
    dt = time.perf_counter() - t0
    print(f"JSMA pair search alone: {1e3 * dt / args.n:.3f} ms per image per iteration "
          f"({P * P:,} pairs each)")

    if args.n_cw > 0:
        n = min(args.n_cw, args.n)
        t0 = time.perf_counter()
        _, r = cw_l2(model, x[:n], y[:n], (y[:n] + 1) % 10, batch_size=n)
        dt = time.perf_counter() - t0
        print(f"C&W L2 (logits, 5 rounds x 100 Adam steps, target = label + 1, batch {n}): "
              f"{dt / n:.2f} s per image, success {r.summary()['success_rate']:.1%}")
    return 0


if __name__ == "__main__":
    run_script(main)
