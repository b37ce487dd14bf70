"""Time the optimizer step alone on the core sets of the paper's tensorized ResNets.

    python benchmarks/optimizer_step.py                 # CPU: torch paths; writes results/cpu-optimizer_step.md
    python benchmarks/optimizer_step.py --device cuda   # GPU: adds the fused Triton DAS; results/<gpu>-...md

Methods, all with SGD (lr 0.1, momentum 0.9, weight decay 5e-4) on the cores of one model, gradients fixed:
- ``SGD foreach`` / ``SGD fused``: torch.optim.SGD's multi-tensor and fused implementations;
- ``DAS naive loop``: DAS written the obvious way, a Python loop over layers with ``.item()`` (the baseline
  the paper authors' code resembles), then SGD foreach;
- ``DAS torch``: tnlayers' vectorized torch path (two ``_foreach_norm``, segment sums, one ``_foreach_mul_``);
- ``DAS triton``: the fused kernels, two launches per step (CUDA only).
Bytes moved are counted from the algorithm (elements read + written per core element), not measured.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_name  # noqa: E402
from _output import default_out  # noqa: E402
from tnlayers import core_groups, models  # noqa: E402
from tnlayers.optim import DAS  # noqa: E402

SGD_ARGS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
ALPHA = 0.1
# elements read + written per core element and step: SGD momentum reads p, g, buf and writes p, buf
TRAFFIC = {"SGD foreach": 5, "SGD fused": 5, "DAS naive loop": 9, "DAS torch": 9, "DAS triton": 7}


def core_sets():
    return {"TR-ResNet-20 (r=15)": lambda: models.tr_resnet20(rank=15),
            "TR-ResNet-32 (r=15)": lambda: models.tr_resnet32(rank=15),
            "TT-ResNet-18 (Table 9)": lambda: models.tt_resnet18()}


class NaiveDAS:
    """DAS as a per-layer Python loop with host reads, then the base step: what fusing replaces."""

    def __init__(self, groups, lr):
        self.groups, self.lr = groups, lr
        self.base = torch.optim.SGD([p for g in groups for p in g], foreach=True, **SGD_ARGS)
        self.total = None

    @torch.no_grad()
    def step(self):
        total = sum(float(c.grad.pow(2).sum()) for g in self.groups for c in g)
        for cores in self.groups:
            gammas = [float(c.grad.pow(2).sum()) for c in cores]
            mean = sum(gammas) / len(gammas)
            for c, gamma in zip(cores, gammas):
                s = float(c.pow(2).sum())
                if s > 0 and mean > 0:
                    c.mul_(1 + self.lr * ALPHA * total ** -0.5 * (gamma - mean) / s)
        self.base.step()


def make(method, groups, params):
    if method == "SGD foreach":
        return torch.optim.SGD(params, foreach=True, **SGD_ARGS)
    if method == "SGD fused":
        return torch.optim.SGD(params, fused=True, **SGD_ARGS)
    if method == "DAS naive loop":
        return NaiveDAS(groups, SGD_ARGS["lr"])
    backend = "torch" if method == "DAS torch" else "triton"
    return DAS(params, torch.optim.SGD, alpha=ALPHA, backend=backend, foreach=True, **SGD_ARGS)


def timed(fn, device, steps):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(steps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def kernel_launches(fn, device):
    """Kernels launched by one call of ``fn`` (CUDA profiler), or None on CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run(args):
    device = torch.device(args.device)
    methods = ["SGD foreach", "SGD fused", "DAS naive loop", "DAS torch"] + (["DAS triton"] if device.type == "cuda"
                                                                            else [])
    rows = []
    for name, build in core_sets().items():
        model = build().to(device)
        groups = [cores for _, cores in core_groups(model)]
        params = [p for g in groups for p in g]
        n_elements = sum(p.numel() for p in params)
        torch.manual_seed(0)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        results = {}
        for method in methods:
            try:
                opt = make(method, groups, params)
            except (RuntimeError, ValueError, TypeError) as error:  # e.g. fused SGD not built for this device
                print(f"  {name}: {method} unavailable: {error}")
                continue
            for _ in range(args.warmup):
                opt.step()
            times = timed(opt.step, device, args.steps)
            results[method] = (statistics.median(times), kernel_launches(opt.step, device))
        base = results["SGD foreach"][0]
        for method, (median, launches) in results.items():
            gbytes = TRAFFIC[method] * n_elements * 4 / 1e9
            rows.append((name, len(groups), len(params), n_elements, method, median, median / base,
                         results["DAS naive loop"][0] / median if "DAS" in method else None,
                         launches, gbytes / (median / 1e3)))
            print(f"{name:<24} {method:<15} {median:8.3f} ms  x{median / base:5.2f} SGD foreach")
    return rows


def write(rows, args, path):
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    lines = [f"# Optimizer step alone on the cores ({device.type})", "",
             f"- Machine: {machine}; torch {torch.__version__}",
             f"- Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`",
             f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; median over {args.steps} steps after "
             f"{args.warmup} warm-up steps; SGD lr 0.1, momentum 0.9, wd 5e-4; DAS alpha {ALPHA}",
             "- GB/s counts the algorithm's traffic (SGD 5, DAS torch 9, DAS fused 7 fp32 reads+writes per "
             "element), not measured bytes; launches are CUDA kernels from the profiler (CPU: -)", "",
             "| core set | groups | cores | elements | method | median ms | x SGD foreach | naive DAS / this "
             "| launches | GB/s |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, n_groups, n_cores, n_el, method, median, ratio, speedup, launches, gbs in rows:
        lines.append(f"| {name} | {n_groups} | {n_cores} | {n_el:,} | {method} | {median:.3f} | {ratio:.2f} | "
                     f"{'-' if speedup is None else f'{speedup:.1f}'} | {'-' if launches is None else launches} | "
                     f"{gbs:.1f} |")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"written to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/local/<device>-optimizer_step.md, git-ignored; "
                        "name a committed table to update it)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    rows = run(args)
    tag = "cpu" if args.device == "cpu" else torch.cuda.get_device_name().replace(" ", "-").lower()
    write(rows, args, args.out or default_out(f"{tag}-optimizer_step.md"))


if __name__ == "__main__":
    main()
