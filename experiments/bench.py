"""How fast does scratchnet train and differentiate the Papernot network, next to PyTorch?

Measures two passes of the Papernot MNIST network in float32:

* a training step: forward (dropout on), softmax cross-entropy, backward,
  SGD update (momentum 0.9), batch 128;
* an input-gradient pass: forward (evaluation mode), softmax cross-entropy,
  backward to the input image, batch 1000; what every gradient attack does.

Each figure is the median over ``--repeats`` timed runs, after ``--warmup``
untimed ones (Numba compilation, first-touch of buffers), in each of
``--rounds`` rounds, pooled. A round measures the training step of both
libraries back to back, then the input gradient of both: on a machine whose
speed drifts (the project's 2-core machine: by up to 20 % within minutes),
the two sides of a ratio are timed a few seconds apart rather than a
minute, and the rounds show how much the ratio itself moves. Beside the wall
clock, the process's CPU time per pass is reported: on a machine shared with
other jobs the wall clock says how long a pass took, the CPU time how much
work it cost (including threads spinning while they wait). Where PyTorch is
importable, the same network built in PyTorch is measured in the same run, and
the ratio scratchnet / PyTorch is printed. PyTorch is only a baseline here; the
package never needs it.

Every (library, pass) pair runs in a fresh Python process, so that each one's
peak memory can be measured on its own: on the CPU, the highest resident size
while the timed passes run, less the resident size once the libraries were
imported (read from /proc/self/status; the high-water mark is reset after
the warm-up through /proc/self/clear_refs). Allocations of NumPy, BLAS and
PyTorch alike count; Python's tracemalloc would miss the BLAS buffers. On the
GPU, the memory each library's allocator holds at its peak (CuPy's memory pool,
``torch.cuda.max_memory_allocated``).

Threads: each library keeps its own default (all cores) unless ``--threads``
sets both; a user's NUMBA_NUM_THREADS, OMP_NUM_THREADS etc. are inherited by
the measuring processes as they are. The threads used are printed, and
whether scratchnet's CPU kernels set malloc to keep freed memory for reuse
(``kernels/cpu.py``; PyTorch's process keeps glibc's defaults, unless the
user's MALLOC_* variables, inherited by both, set them).

Usage::

    python experiments/bench.py                   # both libraries, print a table
    python experiments/bench.py --out bench.json  # also write the figures as JSON
    python experiments/bench.py --no-torch --repeats 5
    python experiments/bench.py --rounds 5           # more rounds: the ratio's spread over time
    python experiments/bench.py --threads 1       # one core each: compare the work, not the scheduling
    python experiments/bench.py --device gpu      # scratchnet on CuPy against PyTorch on CUDA

The images are random uniform [0, 1) pixels and random labels (the speed of the
network does not depend on what the images show), so no data set is needed.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

EPOCH_IMAGES = 55000          # MNIST's 60,000 training images less the 5,000 held out for validation
PASSES = ("train", "input_grad")


class UsageError(Exception):
    """A bad option or an unusable device: one line on stderr, exit status 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="cpu: NumPy/Numba against PyTorch on the CPU; gpu: CuPy against PyTorch on CUDA")
    p.add_argument("--train-batch", type=int, default=128, help="images per training step (default 128)")
    p.add_argument("--grad-batch", type=int, default=1000, help="images per input-gradient pass (default 1000)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per figure; the median is reported (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default 2)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds, each timing every pass of both libraries back to back; the figures pool "
                        "the timed runs of all rounds (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for Numba and for PyTorch (default: each library's own default, all cores)")
    p.add_argument("--no-torch", action="store_true", help="measure scratchnet only")
    p.add_argument("--out", metavar="PATH", help="also write the figures to this JSON file")
    p.add_argument("--worker", metavar="LIBRARY:PASS", help=argparse.SUPPRESS)   # one measurement, JSON to stdout
    args = p.parse_args(argv)
    for name in ("train_batch", "grad_batch", "repeats", "rounds", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be at least 0, got {args.warmup}")
    return args


def fake_mnist(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    return x, y


# ===== memory: the process's resident size, from /proc =====

def _status_kib(field):
    """VmRSS (now) or VmHWM (peak) of this process in KiB, from /proc/self/status; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak():
    """Restart the peak resident size (VmHWM) from the current one; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mib(base_kib):
    """The peak resident size since the last reset, less ``base_kib``, in MiB.

    Where /proc is missing, the process's lifetime peak (getrusage), less the base."""
    peak = _status_kib("VmHWM")
    if peak is None:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    return (peak - (base_kib or 0)) / 1024


# ===== timing =====

def timed(fn, repeats, sync=lambda: None):
    """Wall-clock times and process CPU times (seconds) of ``fn()`` over ``repeats`` runs."""
    wall, cpu = [], []
    for _ in range(repeats):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


# ===== the two libraries, one pass each =====

def scratchnet_pass(which, args):
    """(pass function, sync, describe-threads, peak-memory function) for scratchnet."""
    import numba

    from scratchnet.backend import to_device
    from scratchnet.kernels import cpu as cpu_kernels
    from scratchnet.losses import softmax_cross_entropy
    from scratchnet.model import papernot_mnist
    from scratchnet.optim import SGD

    if args.threads:
        numba.set_num_threads(args.threads)
    model = papernot_mnist(seed=0, dtype=np.float32).to(args.device)
    n = args.train_batch if which == "train" else args.grad_batch
    x, y = (to_device(a, args.device) for a in fake_mnist(n, seed=1 if which == "train" else 2))
    if which == "train":
        opt = SGD(model, lr=0.01, momentum=0.9)

        def run():
            z = model.logits(x, train=True)
            _, dz = softmax_cross_entropy(z, y)
            model.backward(dz, input_grad=False)           # training: no gradient for the images
            opt.step()
    else:
        def run():
            z = model.logits(x)
            _, dz = softmax_cross_entropy(z, y)
            return model.backward(dz, param_grads=False)   # attacks need dL/dx only

    if args.device == "gpu":
        import cupy
        pool = cupy.get_default_memory_pool()
        return (run, cupy.cuda.Device().synchronize, lambda: {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()},
                lambda base: pool.total_bytes() / 2**20)
    return run, lambda: None, cpu_kernels.describe_threads, _peak_mib


def torch_pass(which, args):
    """The same for the same network in PyTorch."""
    import torch
    from torch import nn

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "gpu" else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1024, 200), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10)).to(device)
    loss_fn = nn.CrossEntropyLoss()
    n = args.train_batch if which == "train" else args.grad_batch
    x, y = (torch.from_numpy(a).to(device) for a in fake_mnist(n, seed=1 if which == "train" else 2))
    if which == "train":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def run():
            model.train()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
    else:
        def run():
            model.eval()
            xg = x.clone().requires_grad_(True)
            # autograd.grad with inputs=x computes only what dL/dx needs (no weight gradients)
            (dx,) = torch.autograd.grad(loss_fn(model(xg), y), xg)
            return dx

    if device == "cuda":
        return (run, torch.cuda.synchronize, lambda: {"version": torch.__version__, "device": torch.cuda.get_device_name()},
                lambda base: torch.cuda.max_memory_allocated() / 2**20)
    return run, lambda: None, lambda: {"version": torch.__version__, "num_threads": torch.get_num_threads()}, _peak_mib


def worker(args):
    """Measure one (library, pass) in this process; print its figures as one JSON line."""
    library, which = args.worker.split(":")
    base = _status_kib("VmRSS")              # libraries not yet imported: measured below, after they are
    if library == "scratchnet":
        import numba  # noqa: F401
        import scratchnet.kernels.cpu  # noqa: F401
        setup = scratchnet_pass
    else:
        import torch  # noqa: F401
        setup = torch_pass
    if args.device == "gpu":
        import cupy  # noqa: F401            # both libraries' processes load the same CUDA runtime
    base = _status_kib("VmRSS") or base
    run, sync, threads, peak = setup(which, args)
    for _ in range(args.warmup):
        run()
    sync()
    reset = _reset_peak() if args.device == "cpu" else None
    if args.device == "gpu" and library == "torch":
        import torch
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = timed(run, args.repeats, sync)
    batch = args.train_batch if which == "train" else args.grad_batch
    t = statistics.median(wall)
    print(json.dumps({"seconds": t, "images_per_s": batch / t, "cpu_seconds": statistics.median(cpu),
                      "times_s": wall, "cpu_times_s": cpu, "peak_mib": peak(base),
                      "peak_is_of_the_passes": bool(reset), "threads": threads()}))


def pooled(rounds, batch):
    """One (library, pass)'s figures over all rounds: medians of the pooled timed runs, the
    highest peak memory."""
    wall = [t for r in rounds for t in r["times_s"]]
    cpu = [t for r in rounds for t in r["cpu_times_s"]]
    t = statistics.median(wall)
    return {"seconds": t, "images_per_s": batch / t, "cpu_seconds": statistics.median(cpu), "times_s": wall,
            "cpu_times_s": cpu, "peak_mib": max(r["peak_mib"] for r in rounds),
            "peak_is_of_the_passes": all(r["peak_is_of_the_passes"] for r in rounds),
            "threads": rounds[0]["threads"], "images_per_s_by_round": [r["images_per_s"] for r in rounds]}


def measure(library, which, args):
    """Run one worker process; its JSON figures."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{library}:{which}", "--device", args.device,
           "--train-batch", str(args.train_batch), "--grad-batch", str(args.grad_batch),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {library} ({which}) failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_device(args):
    """Raise UsageError with the reason when the device cannot be used here."""
    if args.device != "gpu":
        return
    from scratchnet.backend import gpu_available
    ok, reason = gpu_available()
    if not ok:
        raise UsageError(f"--device gpu: {reason}")
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            return
        if not torch.cuda.is_available():
            raise UsageError("--device gpu: this PyTorch cannot use CUDA (a CPU-only build, or no driver); "
                             "rerun with --no-torch, or install a CUDA build of PyTorch")


# ===== the table =====

def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    try:
        check_device(args)
    except UsageError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    import scratchnet
    results = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                           "python": platform.python_version(), "numpy": np.__version__,
                           "scratchnet": scratchnet.__version__},
               "device": args.device, "train_batch": args.train_batch, "grad_batch": args.grad_batch,
               "repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds}
    libraries = ["scratchnet"]
    torch_note = None
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            libraries.append("torch")
        except ImportError as e:
            torch_note = f"PyTorch not importable ({e}); measured scratchnet only"
    rounds = {library: {which: [] for which in PASSES} for library in libraries}
    for r in range(args.rounds):
        for which in PASSES:
            for library in libraries:         # the two sides of a ratio, back to back
                print(f"round {r + 1}/{args.rounds}, measuring {library}: {which.replace('_', ' ')} ...",
                      file=sys.stderr, flush=True)
                try:
                    rounds[library][which].append(measure(library, which, args))
                except RuntimeError as e:
                    print(f"bench.py: error: {e}", file=sys.stderr)
                    return 1
    for library in libraries:
        results[library] = {which: pooled(rounds[library][which],
                                          args.train_batch if which == "train" else args.grad_batch)
                            for which in PASSES}
    print_table(results, args, torch_note)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    return 0


def print_table(results, args, torch_note):
    s = results["scratchnet"]
    where = f"{os.cpu_count()} CPUs" if args.device == "cpu" else s["train"]["threads"].get("device", "GPU")
    print(f"Papernot MNIST network, float32, {args.device} ({where}); median of {args.repeats} runs "
          f"after {args.warmup} warm-up runs in each of {args.rounds} rounds, each library and pass in a "
          f"process of its own")
    if args.device == "cpu":
        th = s["train"]["threads"]
        spin = f", spin {th['omp_spin_count']}" if th.get("omp_spin_count") else ""
        print(f"scratchnet threads: Numba {th['numba_threads']} ({th['numba_threading_layer']} layer{spin}), "
              f"BLAS {th['blas_threads']} ({th['blas']}); freed memory kept for reuse: "
              f"{'yes' if th.get('freed_memory_kept') else 'no'} (kernels/cpu.py)")
    rows = [("scratchnet", s)]
    if "torch" in results:
        t = results["torch"]
        info = t["train"]["threads"]
        print(f"PyTorch {info['version']}: " + (f"{info['num_threads']} threads" if args.device == "cpu" else info["device"]))
        rows.append(("PyTorch", t))
    memory = "peak MiB" if args.device == "cpu" else "GPU MiB"
    print(f"\n{'':12s} {'train step (batch ' + str(args.train_batch) + ')':>45s}"
          f"{'input gradient (batch ' + str(args.grad_batch) + ')':>47s}")
    print(f"{'':12s} {'img/s':>9s} {'wall ms':>9s} {'CPU ms':>9s} {memory:>10s}   "
          f"{'img/s':>9s} {'wall ms':>9s} {'CPU ms':>9s} {memory:>10s}")
    for name, r in rows:
        a, g = r["train"], r["input_grad"]
        print(f"{name:12s} {a['images_per_s']:9,.0f} {a['seconds'] * 1e3:9.1f} {a['cpu_seconds'] * 1e3:9.1f} "
              f"{a['peak_mib']:10,.0f}   {g['images_per_s']:9,.0f} {g['seconds'] * 1e3:9.1f} "
              f"{g['cpu_seconds'] * 1e3:9.1f} {g['peak_mib']:10,.0f}")
    if "torch" in results:
        t = results["torch"]
        ratio = {"train": s["train"]["images_per_s"] / t["train"]["images_per_s"],
                 "input_grad": s["input_grad"]["images_per_s"] / t["input_grad"]["images_per_s"],
                 "train_cpu": t["train"]["cpu_seconds"] / s["train"]["cpu_seconds"],
                 "input_grad_cpu": t["input_grad"]["cpu_seconds"] / s["input_grad"]["cpu_seconds"],
                 "train_memory": s["train"]["peak_mib"] / t["train"]["peak_mib"],
                 "input_grad_memory": s["input_grad"]["peak_mib"] / t["input_grad"]["peak_mib"]}
        results["ratio"] = ratio
        by_round = {which: [a / b for a, b in zip(s[which]["images_per_s_by_round"],
                                                  t[which]["images_per_s_by_round"])] for which in PASSES}
        results["ratio_by_round"] = by_round
        print(f"{'ratio':12s} {ratio['train']:8.2f}x {'':9s} {ratio['train_cpu']:8.2f}x {ratio['train_memory']:9.2f}x   "
              f"{ratio['input_grad']:8.2f}x {'':9s} {ratio['input_grad_cpu']:8.2f}x {ratio['input_grad_memory']:9.2f}x")
        print("(ratios: scratchnet's throughput / PyTorch's and PyTorch's CPU time / scratchnet's, above 1 = "
              "scratchnet ahead;\n memory: scratchnet's / PyTorch's, below 1 = scratchnet smaller)")
        if args.rounds > 1:
            print("throughput ratio in each round: training step "
                  + " ".join(f"{x:.2f}x" for x in by_round["train"]) + "; input gradient "
                  + " ".join(f"{x:.2f}x" for x in by_round["input_grad"]))
    if args.device == "cpu":
        exact = all(r[p]["peak_is_of_the_passes"] for _, r in rows for p in PASSES)
        print("peak MiB: highest resident size during the timed passes, less the size once the libraries "
              "were loaded" + ("" if exact else " (peak over the whole measuring process: /proc/self/clear_refs "
                                               "was not available)"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None:
        results["load_average_1min"] = load
        print(f"load average over the last minute: {load:.1f} on {os.cpu_count()} CPUs"
              + ("  (other jobs share the machine: wall times are inflated)"
                 if args.device == "cpu" and load > (args.threads or os.cpu_count()) + 0.5 else ""))
    if torch_note:
        print(torch_note)
    epoch_s = EPOCH_IMAGES / s["train"]["images_per_s"]
    results["scratchnet_epoch_s"] = epoch_s
    print(f"\nscratchnet: one {EPOCH_IMAGES:,}-image training epoch (batch {args.train_batch}) takes about "
          f"{epoch_s:.1f} s at this speed")


if __name__ == "__main__":
    sys.exit(main())
