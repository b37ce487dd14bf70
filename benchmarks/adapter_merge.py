"""Peak memory of merging adapters into a model, and the round-off that unmerge leaves.

    python benchmarks/adapter_merge.py          # writes benchmarks/results/local/adapter_merge.md
    python benchmarks/adapter_merge.py --out benchmarks/results/adapter_merge.md

Memory (Linux): each case runs in a fresh process with glibc's ``MALLOC_MMAP_THRESHOLD_=65536``. A fixed
threshold turns glibc's adaptive one off, so every buffer above 64 KiB is a mapping of its own, unmapped when
freed: the resident set then follows the live tensors. The process builds N ``Linear(d, d)`` layers with
adapters (random cores), resets the kernel's peak-resident counter (``/proc/self/clear_refs``), merges, and
reads the peak (``VmHWM``): peak minus the resident size before merge is the most merge held beyond the model.
Three ways: "clone + ΔW copy (before)" replays tnlayers' merge before it worked in place (a copy of each
weight kept for unmerge, ΔW built scaled and contiguous by ``delta_weight()``); "keep_original" is
``merge(model, keep_original=True)`` (a copy of each weight kept, ΔW added in place); "in place" is the
default ``merge(model)``.

Round-off: the default merge then unmerge on layers of each dtype, per entry |W'' - W| against the bound the
docstring of ``tnlayers.adapters.merge`` states, u (|W| + |W'|) with W' the merged weight: the largest ratio (<= 1
is within the bound) and the share of entries not restored bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _output import default_out  # noqa: E402
from step_time import machine_description  # noqa: E402

from tnlayers.adapters import adapt, merge, named_adapters, unmerge  # noqa: E402

WAYS = ("clone + ΔW copy (before)", "keep_original", "in place")
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "bfloat16": 2.0 ** -8}
MIB = 2 ** 20


def build(fmt: str, layers: int, dim: int, rank: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(dim, dim, bias=False, dtype=dtype) for _ in range(layers)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapt(model, fmt, rank=rank, target_modules="[0-9]+", init="random")
    for _, adapter in named_adapters(model):  # a ΔW about 1% of W, as after fine-tuning
        with torch.no_grad():
            factor = 0.01 * adapter.base.weight.norm() / adapter.delta_weight().norm()
            adapter.cores[0].mul_(factor.to(adapter.cores[0].dtype))
    return model


@torch.no_grad()
def merge_as_before(model: nn.Module) -> None:
    """tnlayers' merge before it worked in place: ΔW from delta_weight() (scaled, contiguous), a clone of the
    weight kept for unmerge, then ΔW added."""
    for _, adapter in named_adapters(model):
        weight = adapter.base.weight
        delta = adapter._to_base_layout(adapter.delta_weight()).to(weight.dtype)
        if not bool(torch.isfinite(delta).all()):
            raise ValueError("non-finite ΔW")
        adapter.weight_before_merge = weight.detach().clone()
        weight.add_(delta)
        adapter.merged = True


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def measure(fmt: str, layers: int, dim: int, rank: int, way: str) -> dict:
    """One case, in this process: bytes of the model and of one layer, merge's peak beyond the model, what
    merge leaves resident beyond it, and merge's time."""
    for warm_up in (merge_as_before, merge):  # the kernels' code pages, resident from here on (RSS counts them)
        small = build(fmt, 1, 64, 4)
        warm_up(small)
        unmerge(small)
    model = build(fmt, layers, dim, rank)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer_bytes = dim * dim * 4
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux 4.0+)
    start = time.perf_counter()
    if way == WAYS[0]:
        merge_as_before(model)
    else:
        merge(model, keep_original=way == "keep_original")
    seconds = time.perf_counter() - start
    return dict(model_bytes=model_bytes, layer_bytes=layer_bytes, peak_above=_status("VmHWM") - before,
                left_above=_status("VmRSS") - before, seconds=seconds)


def run_case(fmt: str, layers: int, dim: int, rank: int, way: str) -> dict:
    """``measure`` in a fresh process with the fixed mmap threshold."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    case = json.dumps(dict(fmt=fmt, layers=layers, dim=dim, rank=rank, way=way))
    out = subprocess.run([sys.executable, __file__, "--case", case], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@torch.no_grad()
def round_off(fmt: str, dim: int, rank: int, dtype_name: str, layers: int = 2) -> dict:
    dtype = getattr(torch, dtype_name)
    model = build(fmt, layers, dim, rank, dtype)
    original = [m.base.weight.detach().clone() for _, m in named_adapters(model)]
    merge(model)
    merged = [m.base.weight.detach().clone() for _, m in named_adapters(model)]
    unmerge(model)
    ratio, inexact, total = 0.0, 0, 0
    for (_, m), w0, wm in zip(named_adapters(model), original, merged):
        w, w0, wm = m.base.weight.double(), w0.double(), wm.double()
        bound = UNIT_ROUNDOFF[dtype_name] * (w0.abs() + wm.abs())
        ratio = max(ratio, ((w - w0).abs() / bound).max().item())
        inexact += int((w != w0).sum())
        total += w.numel()
    return dict(ratio=ratio, inexact=inexact / total)


def report(args, memory: list, errors: list, machine: str) -> str:
    lines = [
        "# Merging adapters: peak memory and unmerge round-off", "",
        f"- Machine: {machine}",
        f"- Command: `{' '.join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)}`",
        f"- Model: N x Linear({args.dim}, {args.dim}, bias=False) float32, every layer adapted (rank {args.rank}, "
        "random cores scaled so ΔW is about 1% of W)",
        "- Memory: one fresh process per row, glibc MALLOC_MMAP_THRESHOLD_=65536 (each buffer above 64 KiB its "
        "own mapping, unmapped on free, so the resident set follows the live tensors); peak = VmHWM after "
        "resetting it (/proc/self/clear_refs) just before merge, minus the resident size then", "",
        "| format | N layers | model (MiB) | one layer's weight (MiB) | merge | peak above the model (MiB) | "
        "in layers | left resident after merge (MiB) | merge time (s) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in memory:
        lines.append(f"| {row['fmt']} | {row['layers']} | {row['model_bytes'] / MIB:.1f} | "
                     f"{row['layer_bytes'] / MIB:.1f} | {row['way']} | {row['peak_above'] / MIB:.1f} | "
                     f"{row['peak_above'] / row['layer_bytes']:.2f} | {row['left_above'] / MIB:.1f} | "
                     f"{row['seconds']:.3f} |")
    lines += ["", "Target: the default merge peaks at no more than one layer's weight above the model, whatever N.", "",
              f"## Unmerge round-off (default merge, then unmerge; 2 layers of {args.error_dim} x {args.error_dim})",
              "",
              "Bound per entry: |W'' - W| <= u (|W| + |W'|), u = 2^-53 (float64), 2^-24 (float32), "
              "2^-8 (bfloat16).", "",
              "| format | dtype | largest error / bound | entries not restored bit for bit |",
              "|---|---|---:|---:|"]
    for row in errors:
        lines.append(f"| {row['fmt']} | {row['dtype']} | {row['ratio']:.3f} | {100 * row['inexact']:.2f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--formats", nargs="+", default=["lora", "tucker", "tt", "cp", "tr"])
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--error-dim", type=int, default=512, help="layer size of the round-off table")
    parser.add_argument("--out", type=Path, default=None, help="the .md to write (default: benchmarks/results/local/)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one memory case, run by run_case in a fresh process
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(measure(**json.loads(args.case))))
        return
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("adapter_merge.py measures peak memory through /proc/self/clear_refs and VmHWM (Linux)")
    memory = []
    for fmt in args.formats:
        for layers in args.layers:
            for way in args.ways:
                row = run_case(fmt, layers, args.dim, args.rank, way)
                memory.append(dict(row, fmt=fmt, layers=layers, way=way))
                print(f"{fmt} N={layers} {way}: peak {row['peak_above'] / MIB:.1f} MiB above the model")
    errors = [dict(round_off(fmt, args.error_dim, args.rank, dtype), fmt=fmt, dtype=dtype)
              for fmt in args.formats for dtype in UNIT_ROUNDOFF]
    out = args.out or default_out("adapter_merge.md")
    out.write_text(report(args, memory, errors, machine_description(torch.device("cpu"))))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
