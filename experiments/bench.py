"""How fast does scratchnet train and differentiate the Papernot network on the CPU?

Measures two passes of the Papernot MNIST network in float32:

* a training step: forward (dropout on), softmax cross-entropy, backward,
  SGD update (momentum 0.9), batch 128;
* an input-gradient pass: forward (evaluation mode), softmax cross-entropy,
  backward to the input image, batch 1000; what every gradient attack does.

Each figure is the median over ``--repeats`` timed runs, after ``--warmup``
untimed ones (Numba compilation, first-touch of buffers). Beside the wall
clock, the process's CPU time per pass is reported: on a machine shared with
other jobs the wall clock says how long a pass took, the CPU time how much
work it cost (including threads spinning while they wait). Where PyTorch is
importable, the same network built in PyTorch is measured in the same run, and
the ratio scratchnet / PyTorch is printed. PyTorch is only a baseline here; the
package never needs it.

Usage::

    python experiments/bench.py                 # both libraries, print a table
    python experiments/bench.py --out bench.json   # also write the figures as JSON
    python experiments/bench.py --no-torch --repeats 5
    python experiments/bench.py --threads 1     # one core each: compare the work, not the scheduling

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

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import scratchnet  # noqa: E402
from scratchnet.kernels import cpu as cpu_kernels  # noqa: E402
from scratchnet.losses import softmax_cross_entropy  # noqa: E402
from scratchnet.model import papernot_mnist  # noqa: E402
from scratchnet.optim import SGD  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-batch", type=int, default=128, help="images per training step (default 128)")
    p.add_argument("--grad-batch", type=int, default=1000, help="images per input-gradient pass (default 1000)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per figure; the median is reported (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for Numba and for PyTorch (default: each library's own default, all cores)")
    p.add_argument("--no-torch", action="store_true", help="measure scratchnet only")
    p.add_argument("--out", metavar="PATH", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    for name in ("train_batch", "grad_batch", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be at least 0, got {args.warmup}")
    return args


def timed(fn, repeats, warmup):
    """Wall-clock times and process CPU times (seconds) of ``fn()`` over ``repeats`` runs."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def figures(train, grad, args):
    """Medians and throughputs of the two passes' timings."""
    (train_wall, train_cpu), (grad_wall, grad_cpu) = train, grad
    t_train, t_grad = statistics.median(train_wall), statistics.median(grad_wall)
    return {"train_step_s": t_train, "train_images_per_s": args.train_batch / t_train,
            "train_step_cpu_s": statistics.median(train_cpu),
            "input_grad_s": t_grad, "input_grad_images_per_s": args.grad_batch / t_grad,
            "input_grad_cpu_s": statistics.median(grad_cpu),
            "train_step_times_s": train_wall, "input_grad_times_s": grad_wall}


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

    if args.threads:
        numba.set_num_threads(args.threads)
    train = timed(train_step, args.repeats, args.warmup)
    grad = timed(input_gradient, args.repeats, args.warmup)
    return {**figures(train, grad, args), "threads": cpu_kernels.describe_threads()}


# ===== PyTorch (baseline only) =====

def bench_torch(args):
    import torch
    from torch import nn

    if args.threads:
        torch.set_num_threads(args.threads)
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

    train = timed(train_step, args.repeats, args.warmup)
    grad = timed(input_gradient, args.repeats, args.warmup)
    return {"version": torch.__version__, "num_threads": torch.get_num_threads(), **figures(train, grad, args)}


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
    print(f"\n{'':12s} {'train step (batch ' + str(args.train_batch) + ')':>36s}"
          f"{'input gradient (batch ' + str(args.grad_batch) + ')':>40s}")
    print(f"{'':12s} {'img/s':>10s} {'wall ms':>10s} {'CPU ms':>10s}   {'img/s':>10s} {'wall ms':>12s} {'CPU ms':>12s}")
    for name, r in rows:
        print(f"{name:12s} {r['train_images_per_s']:10,.0f} {r['train_step_s'] * 1e3:10.1f} "
              f"{r['train_step_cpu_s'] * 1e3:10.1f}   {r['input_grad_images_per_s']:10,.0f} "
              f"{r['input_grad_s'] * 1e3:12.1f} {r['input_grad_cpu_s'] * 1e3:12.1f}")
    if "torch" in results:
        t = results["torch"]
        results["ratio"] = {"train": s["train_images_per_s"] / t["train_images_per_s"],
                            "input_grad": s["input_grad_images_per_s"] / t["input_grad_images_per_s"],
                            "train_cpu": t["train_step_cpu_s"] / s["train_step_cpu_s"],
                            "input_grad_cpu": t["input_grad_cpu_s"] / s["input_grad_cpu_s"]}
        r = results["ratio"]
        print(f"{'ratio':12s} {r['train']:9.2f}x {'':10s} {r['train_cpu']:9.2f}x   {r['input_grad']:9.2f}x "
              f"{'':12s} {r['input_grad_cpu']:11.2f}x")
        print("(ratio: scratchnet's throughput / PyTorch's, and PyTorch's CPU time / scratchnet's; above 1 = scratchnet ahead)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None:
        results["load_average_1min"] = load
        print(f"load average over the last minute: {load:.1f} on {os.cpu_count()} CPUs"
              + ("  (other jobs share the machine: wall times are inflated)"
                 if load > (args.threads or os.cpu_count()) + 0.5 else ""))   # this run itself adds ~1 per thread
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
