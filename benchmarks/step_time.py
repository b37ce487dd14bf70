"""Median training-step time of SGD, SAM, DAS, BAR, X-SAM and GSAM on a small tensorized CNN, as ratios to SGD.

    python benchmarks/step_time.py                      # CPU, writes benchmarks/results/local/step_time_cpu.md
    python benchmarks/step_time.py --device cuda --out benchmarks/results/step_time_cuda.md

A training step is forward + backward + optimizer step (SAM, GSAM, X-SAM: two forward/backward passes;
X-SAM also re-estimates the top Hessian eigenvector every ``--eig-every`` steps, which its step time
includes on those steps). Methods are timed in interleaved rounds, so a background load affects them
alike; the median over all measured steps is reported, and the mean, which spreads X-SAM's eigen-updates
over the steps (amortized cost). The eigen-update alone is timed too. The optimizer-only columns time
``step()`` alone (for DAS the core rescale plus the base step), the part DAS adds to. Targets:
DAS ≤ 1.10× and SAM ≤ 2.1× SGD per training step.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_name  # noqa: E402
from _memory import FLAG_HELP, apply_flag  # noqa: E402
from _output import default_out  # noqa: E402
from tqdm import tqdm  # noqa: E402

import tnlayers  # noqa: E402
from tnlayers.groups import core_groups  # noqa: E402
from tnlayers.core_precondition import precondition_core_grads_  # noqa: E402
from tnlayers.optim import BAR, DAS, GSAM, SAM, XSAM, disable_running_stats  # noqa: E402

FORMATS = {"tucker": "TuckerConv2d", "tt": "TTConv2d", "tr": "TRConv2d", "cp": "CPConv2d"}


def tensorized_cnn(fmt: str, width: int, blocks: int, rank: int, device, classes: int = 10) -> nn.Module:
    """A plain stack of tensorized 3x3 convs with BatchNorm (a small CIFAR-style net, dense head).
    Built on ``device`` directly (the stem's rank is capped at its 3 input channels)."""
    conv = getattr(tnlayers, FORMATS[fmt])
    layers = [conv(3, width, 3, padding=1, rank=min(rank, 3), device=device), nn.BatchNorm2d(width, device=device),
              nn.ReLU()]
    for _ in range(blocks):
        layers += [conv(width, width, 3, padding=1, rank=rank, device=device), nn.BatchNorm2d(width, device=device),
                   nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes, device=device)]
    return nn.Sequential(*layers)


# the paper's tensorized ResNets (tnlayers.models / tensorize), besides the small CNN above
PAPER_MODELS = {
    "tr_resnet20": lambda: tnlayers.models.tr_resnet20(rank=15),
    "tr_resnet32": lambda: tnlayers.models.tr_resnet32(rank=15),
    "cp_resnet20": lambda: tnlayers.tensorize(tnlayers.models.resnet20(), format="cp", rank=0.2),
    "tt_resnet18": lambda: tnlayers.models.tt_resnet18(),
}


def build_model(args, device) -> nn.Module:
    if args.model == "cnn":
        return tensorized_cnn(args.format, args.width, args.blocks, args.rank, device)
    return PAPER_MODELS[args.model]().to(device)


def describe_model(args) -> str:
    if args.model == "cnn":
        return f"{args.blocks + 1} x {FORMATS[args.format]} (width {args.width}, rank {args.rank}) + BatchNorm, dense head"
    return {"tr_resnet20": "TR-ResNet-20, rank 15, Table 8 shapes", "tr_resnet32": "TR-ResNet-32, rank 15, Table 8 shapes",
            "cp_resnet20": "CP-ResNet-20, 20% of each conv's parameters", "tt_resnet18": "TT-ResNet-18, Table 9 ranks"
            }[args.model]


class PreconditionedSGD(torch.optim.SGD):
    """torch.optim.SGD whose step first calls ``tnlayers.precondition_core_grads_(model)`` (the opt-in
    remedy for the step size on W): its cost is what "SGD+precondition" measures."""

    def __init__(self, model, overlap="mean", **options):
        super().__init__(model.parameters(), **options)
        self._model, self._overlap = model, overlap

    def step(self, closure=None):
        precondition_core_grads_(self._model, overlap=self._overlap)
        return super().step(closure)


def make_optimizer(method: str, params, total_steps: int, eig_every: int = 10, eig_iters: int = 5, model=None):
    base = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)
    if method == "SGD":
        return torch.optim.SGD(params, **base)
    if method == "SGD+precondition":
        return PreconditionedSGD(model, **base)
    if method == "SGD+precondition-project":  # overlap="project", 4 conjugate-gradient iterations
        return PreconditionedSGD(model, overlap="project", **base)
    if method == "SAM":
        return SAM(params, torch.optim.SGD, rho=0.05, **base)
    if method == "DAS":
        return DAS(params, torch.optim.SGD, alpha=0.1, backend="torch", **base)
    if method == "DAS-triton":  # the fused kernels (CUDA; CPU only under TRITON_INTERPRET=1)
        return DAS(params, torch.optim.SGD, alpha=0.1, backend="triton", **base)
    if method == "BAR":
        return BAR(params, torch.optim.SGD, alpha=0.1, total_steps=total_steps, **base)
    if method == "XSAM":
        return XSAM(params, torch.optim.SGD, rho=0.05, xi=0.5, eig_every=eig_every, eig_iters=eig_iters, **base)
    if method == "GSAM":
        return GSAM(params, torch.optim.SGD, rho=0.05, alpha=0.1, **base)
    raise ValueError(f"unknown method {method!r}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(model, opt, x, y, device) -> tuple:
    """(whole step seconds, optimizer-step seconds, eigen-update seconds or None)."""
    synchronize(device)
    start = time.perf_counter()
    eigen = None
    if isinstance(opt, XSAM) and opt.eigen_update_due:
        with disable_running_stats(model):
            opt.update_eigenvector(lambda: F.cross_entropy(model(x), y))
        synchronize(device)
        eigen = time.perf_counter() - start
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    if isinstance(opt, SAM):
        opt.first_step()
        with disable_running_stats(model):
            F.cross_entropy(model(x), y).backward()
    synchronize(device)
    before_step = time.perf_counter()
    opt.step()
    synchronize(device)
    end = time.perf_counter()
    return end - start, end - before_step, eigen


def machine_description(device: torch.device) -> str:
    text = f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, torch threads: {torch.get_num_threads()}"
    try:
        import triton
        text += f", triton {triton.__version__}"
    except ImportError:
        text += ", triton not installed"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    if hasattr(os, "getloadavg"):  # other work on a shared machine shifts all methods; interleaving evens it out
        text += f"; load average {os.getloadavg()[0]:.1f} at the end of the run"
    return text


def run(args) -> dict:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    setups = {}
    for method in args.methods:
        torch.manual_seed(0)
        model = build_model(args, device)
        setups[method] = (model, make_optimizer(method, model.parameters(), args.warmup + args.rounds * args.steps,
                                                args.eig_every, args.eig_iters, model))
    for method, (model, opt) in setups.items():
        for _ in range(args.warmup):
            training_step(model, opt, x, y, device)
    times = {m: ([], []) for m in args.methods}
    eigen_times = {m: [] for m in args.methods}
    for _ in tqdm(range(args.rounds), desc="rounds", disable=not sys.stderr.isatty()):
        for method, (model, opt) in setups.items():
            for _ in range(args.steps):
                whole, step, eigen = training_step(model, opt, x, y, device)
                times[method][0].append(whole)
                times[method][1].append(step)
                if eigen is not None:
                    eigen_times[method].append(eigen)
    model = setups[args.methods[0]][0]
    return {
        "medians": {m: (statistics.median(w), statistics.median(s)) for m, (w, s) in times.items()},
        "spread": {m: (min(w), max(w)) for m, (w, s) in times.items()},
        "means": {m: statistics.fmean(w) for m, (w, s) in times.items()},
        "eigen_updates": {m: (statistics.median(e), len(e)) for m, e in eigen_times.items() if e},
        "n_groups": len(core_groups(model)),
        "n_cores": sum(len(c) for _, c in core_groups(model)),
        "n_params": sum(p.numel() for p in model.parameters()),
        "samples": len(times[args.methods[0]][0]),
    }


def report(args, result) -> str:
    device = torch.device(args.device)
    medians = result["medians"]
    sgd_whole, sgd_step = medians["SGD"]
    lines = [
        f"# Step time on {device.type.upper()}",
        "",
        f"- Machine: {machine_description(device)}",
        f"- Command: `{' '.join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Model: {describe_model(args)}; {result['n_groups']} core groups, {result['n_cores']} cores, "
        f"{result['n_params']} parameters",
        f"- Batch {args.batch} x 3 x {args.size} x {args.size}; optimizers: SGD(lr 0.05, momentum 0.9, wd 1e-4); "
        f"SAM rho 0.05; DAS alpha 0.1; BAR alpha 0.1; XSAM rho 0.05, xi 0.5, eig_every {args.eig_every}, "
        f"eig_iters {args.eig_iters}; GSAM rho 0.05, alpha 0.1",
        f"- Median over {result['samples']} steps per method ({args.rounds} interleaved rounds of {args.steps}, "
        f"after {args.warmup} warm-up steps)",
        "",
        "| method | training step median (ms) | min | max | x SGD | mean (ms) | mean x SGD mean | optimizer step (ms) "
        "| x SGD step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sgd_mean = result["means"]["SGD"]
    for method, (whole, step) in medians.items():
        low, high = result["spread"][method]
        mean = result["means"][method]
        lines.append(f"| {method} | {whole * 1e3:.2f} | {low * 1e3:.2f} | {high * 1e3:.2f} | {whole / sgd_whole:.2f} | "
                     f"{mean * 1e3:.2f} | {mean / sgd_mean:.2f} | {step * 1e3:.3f} | {step / sgd_step:.2f} |")
    lines += ["", "Targets: DAS <= 1.10x SGD, SAM <= 2.1x (1.8-2.2x) SGD per training step. The optimizer-step "
              "column for SAM/GSAM/XSAM is its second_step (restore, correction, base step); its first_step sits in the "
              "whole step."]
    for method, (eigen, count) in result["eigen_updates"].items():
        lines += ["", f"{method} eigen-update (power iteration, {args.eig_iters} Hessian-vector products: 1 forward + "
                  f"1 backward with graph + {args.eig_iters} double-backward passes): median {eigen * 1e3:.2f} ms over "
                  f"{count} updates = {eigen / sgd_whole:.2f}x an SGD training step, {eigen / medians[method][0]:.2f}x "
                  f"an {method} step without update; every {args.eig_every} steps it adds "
                  f"{eigen / args.eig_every * 1e3:.2f} ms per step on average (included in the mean column)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="cnn", choices=["cnn", *PAPER_MODELS],
                        help="cnn: the small stack below; or one of the paper's tensorized ResNets")
    parser.add_argument("--format", default="tucker", choices=sorted(FORMATS), help="for --model cnn")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=5, help="tensorized convs after the stem")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads; 1 gives steadier CPU timings on a shared machine")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--steps", type=int, default=2, help="steps per method per round")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="default: SGD SAM DAS BAR XSAM GSAM, plus DAS-triton on CUDA; also SGD+precondition and "
                             "SGD+precondition-project (SGD after tnlayers.precondition_core_grads_, overlap 'mean' "
                             "or 'project')")
    parser.add_argument("--eig-every", type=int, default=10, help="XSAM: steps between eigenvector updates")
    parser.add_argument("--eig-iters", type=int, default=5, help="XSAM: power iterations per update")
    parser.add_argument("--keep-freed-memory", action="store_true", help=FLAG_HELP)
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/local/step_time_<device>.md, git-ignored; "
                        "name a committed table to update it)")
    args = parser.parse_args(argv)
    if args.methods is None:
        args.methods = ["SGD", "SAM", "DAS", "BAR", "XSAM", "GSAM"] + (
            ["DAS-triton"] if args.device.startswith("cuda") else [])
    if "SGD" not in args.methods:
        args.methods = ["SGD"] + args.methods
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_flag(args)
    if "DAS-triton" in args.methods and not args.device.startswith("cuda"):
        parser.error("DAS-triton needs --device cuda")
    result = run(args)
    text = report(args, result)
    print(text)
    tag = torch.device(args.device).type + ("" if args.model == "cnn" else f"_{args.model}")
    out = Path(args.out) if args.out else default_out(f"step_time_{tag}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(dict(
        command=sys.argv, machine=machine_description(torch.device(args.device)), settings=vars(args),
        result={k: v for k, v in result.items()}), indent=2))
    print(f"written to {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
