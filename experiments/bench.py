"""How fast does scratchnet train and differentiate the Papernot network on the CPU?

Measures two passes of the Papernot MNIST network in float32:

* a training step: forward (dropout on), softmax cross-entropy, backward,
  SGD update (momentum 0.9), batch 128;
* an input-gradient pass: forward (evaluation mode), softmax cross-entropy,
  backward to the input image, batch 1000; what every gradient attack does.

Each figure is the median over ``--repeats`` timed runs, after ``--warmup``
untimed ones (Numba compilation, first-touch of buffers). Where PyTorch is
importable, the same network built in PyTorch is measured in the same run, and
the ratio scratchnet / PyTorch is printed. PyTorch is only a baseline here; the
package never needs it.

Usage::

    python experiments/bench.py                 # both libraries, print a table
    python experiments/bench.py --out bench.json   # also write the figures as JSON
    python experiments/bench.py --no-torch --repeats 5

The images are random uniform [0, 1) pixels and random labels (the speed of the
network does not depend on what the images show), so no data set is needed.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import scratchnet  # noqa: E402
from kernels import cpu as cpu_kernels  # noqa: E402
from scratchnet.losses import softmax_cross_entropy  # noqa: E402
from scratchnet.model import papernot_mnist  # noqa: E402
from scratchnet.optim import SGD  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-batch", type=int, default=128, help="images per training step (default 128)")
    p.add_argument("--grad-batch", type=int, default=1000, help="images per input-gradient pass (default 1000)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per figure; the median is reported (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default 2)")
    p.add_argument("--no-torch", action="store_true", help="measure scratchnet only")
    p.add_argument("--out", metavar="PATH", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    for name in ("train_batch", "grad_batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be at least 0, got {args.warmup}")
    return args


def timed(fn, repeats, warmup):
    """Median and every wall-clock time (seconds) of ``fn()`` over ``repeats`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def fake_mnist(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    return x, y


# ===== scratchnet =====

def bench_scratchnet(args):
    model = papernot_mnist(seed=0, dtype=np.float32)
    opt = SGD(model, lr=0.01, momentum=0.9)
    x_train, y_train = fake_mnist(args.train_batch, seed=1)
    x_grad, y_grad = fake_mnist(args.grad_batch, seed=2)

    def train_step():
        z = model.logits(x_train, train=True)
        _, dz = softmax_cross_entropy(z, y_train)
        model.backward(dz)
        opt.step()

    def input_gradient():
        z = model.logits(x_grad)
        _, dz = softmax_cross_entropy(z, y_grad)
        return model.backward(dz, param_grads=False)   # attacks need dL/dx only

    t_train, all_train = timed(train_step, args.repeats, args.warmup)
    t_grad, all_grad = timed(input_gradient, args.repeats, args.warmup)
    return {"train_step_s": t_train, "train_images_per_s": args.train_batch / t_train,
            "input_grad_s": t_grad, "input_grad_images_per_s": args.grad_batch / t_grad,
            "train_step_times_s": all_train, "input_grad_times_s": all_grad,
            "threads": cpu_kernels.describe_threads()}


# ===== PyTorch (baseline only) =====

def bench_torch(args):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1024, 200), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x_train, y_train = (torch.from_numpy(a) for a in fake_mnist(args.train_batch, seed=1))
    x_grad, y_grad = (torch.from_numpy(a) for a in fake_mnist(args.grad_batch, seed=2))

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x_train), y_train).backward()
        opt.step()

    def input_gradient():
        model.eval()
        x = x_grad.clone().requires_grad_(True)
        # autograd.grad with inputs=x computes only what dL/dx needs (no weight gradients)
        (dx,) = torch.autograd.grad(loss_fn(model(x), y_grad), x)
        return dx

    t_train, all_train = timed(train_step, args.repeats, args.warmup)
    t_grad, all_grad = timed(input_gradient, args.repeats, args.warmup)
    return {"version": torch.__version__, "num_threads": torch.get_num_threads(),
            "train_step_s": t_train, "train_images_per_s": args.train_batch / t_train,
            "input_grad_s": t_grad, "input_grad_images_per_s": args.grad_batch / t_grad,
            "train_step_times_s": all_train, "input_grad_times_s": all_grad}


def main(argv=None):
    args = parse_args(argv)
    results = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                           "python": platform.python_version(), "numpy": np.__version__,
                           "scratchnet": scratchnet.__version__},
               "train_batch": args.train_batch, "grad_batch": args.grad_batch,
               "repeats": args.repeats, "warmup": args.warmup}
    results["scratchnet"] = bench_scratchnet(args)
    torch_error = None
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError as e:
            torch_error = f"PyTorch not importable ({e}); measured scratchnet only"
        else:
            results["torch"] = bench_torch(args)

    s = results["scratchnet"]
    th = s["threads"]
    print(f"Papernot MNIST network, float32, {os.cpu_count()} CPUs; median of {args.repeats} runs "
          f"after {args.warmup} warm-up runs")
    print(f"scratchnet threads: Numba {th['numba_threads']} ({th['numba_threading_layer']} layer), "
          f"BLAS {th['blas_threads']} ({th['blas']})")
    rows = [("scratchnet", s)]
    if "torch" in results:
        t = results["torch"]
        print(f"PyTorch {t['version']}: {t['num_threads']} threads")
        rows.append(("PyTorch", t))
    print(f"\n{'':12s} {'train step (batch ' + str(args.train_batch) + ')':>28s} "
          f"{'input gradient (batch ' + str(args.grad_batch) + ')':>32s}")
    for name, r in rows:
        print(f"{name:12s} {r['train_images_per_s']:12,.0f} img/s {r['train_step_s'] * 1e3:8.1f} ms "
              f"{r['input_grad_images_per_s']:16,.0f} img/s {r['input_grad_s'] * 1e3:8.1f} ms")
    if "torch" in results:
        t = results["torch"]
        results["ratio"] = {"train": s["train_images_per_s"] / t["train_images_per_s"],
                            "input_grad": s["input_grad_images_per_s"] / t["input_grad_images_per_s"]}
        print(f"{'ratio':12s} {results['ratio']['train']:18.2f}x {'':11s}"
              f"{results['ratio']['input_grad']:22.2f}x   (scratchnet / PyTorch)")
    if torch_error:
        print(torch_error)
    epoch_s = 60000 / s["train_images_per_s"]
    print(f"\nscratchnet: one 60,000-image training epoch takes about {epoch_s:.0f} s at this speed")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
