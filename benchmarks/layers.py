"""tnlayers' automatic strategy against every tensorly-torch implementation and the dense layer, side by side.

    python benchmarks/layers.py --threads 2        # writes benchmarks/results/<device>-layers.md
    python benchmarks/layers.py --device cuda

Grid (speed issue): every format x rank (fraction of the dense parameter count) {0.05, 0.1, 0.25, 0.5} x
{train: forward + backward in train mode; inference: forward in eval mode under no_grad}, for a 64 -> 64
3x3 conv on a 32 x 64 x 32 x 32 input and a 1024 -> 1024 linear (modes (16, 8, 8)) on 256 rows. Columns:
dense ``nn.Conv2d``/``nn.Linear``; tensorly-torch 0.5 ``FactorizedConv``/``FactorizedLinear`` with each of its
implementations at the same format and rank ('mobilenet' only exists for CP convs; tltorch has no TR, and
calls its TT linear 'blocktt'); tnlayers with ``strategy="auto"`` and, for reference, forced "dense" and
"factorized". Every implementation of a row is timed once per round (the order rotating from round to
round), rounds interleaved, so background load hits them alike; the minimum over rounds is reported. ``auto``'s one-time decision (its timing of both
strategies) happens in the warm-up call and is reported separately.

Targets: auto <= 1.1x the fastest of {tltorch factorized, tltorch reconstructed, dense} in every row;
inference <= 1.05x dense at every rank; geometric-mean speed-up over tltorch's default ('factorized') >= 1.5x.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import tnlayers  # noqa: E402

FORMATS = ("tucker", "tt", "cp", "tr")
RANKS = (0.05, 0.1, 0.25, 0.5)
MODES = ("train", "inference")
CONV = {"tucker": tnlayers.TuckerConv2d, "tt": tnlayers.TTConv2d, "cp": tnlayers.CPConv2d, "tr": tnlayers.TRConv2d}
LINEAR = {"tucker": tnlayers.TuckerLinear, "tt": tnlayers.TTLinear, "cp": tnlayers.CPLinear, "tr": tnlayers.TRLinear}
TLTORCH_NAMES = {"conv": {"tucker": "tucker", "tt": "tt", "cp": "cp"},
                 "linear": {"tucker": "tucker", "tt": "blocktt", "cp": "cp"}}


def tltorch_layers(kind, fmt, rank, device):
    """{implementation: tensorly-torch layer} at this format and rank; {} when tltorch is missing or lacks it."""
    try:
        from tltorch.factorized_layers import FactorizedConv, FactorizedLinear
    except ImportError:
        return {}
    name = TLTORCH_NAMES[kind].get(fmt)
    if name is None:
        return {}
    implementations = ["factorized", "reconstructed"] + (["mobilenet"] if (kind, fmt) == ("conv", "cp") else [])
    layers = {}
    for impl in implementations:
        if kind == "conv":
            layers[impl] = FactorizedConv(64, 64, (3, 3), padding=1, factorization=name, rank=rank,
                                          implementation=impl, device=device)
        else:
            layers[impl] = FactorizedLinear((16, 8, 8), (16, 8, 8), factorization=name, rank=rank,
                                            implementation=impl, device=device)
    return layers


def ours(kind, fmt, rank, strategy, device):
    if kind == "conv":
        return CONV[fmt](64, 64, 3, padding=1, rank=rank, strategy=strategy, device=device)
    return LINEAR[fmt](1024, 1024, rank=rank, strategy=strategy, device=device, in_shape=(16, 8, 8),
                       out_shape=(16, 8, 8))


def call(module, x, mode, device):
    """One timed call: forward + backward (train) or a no-grad forward (inference); seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if mode == "train":
        module(x).sum().backward()
    else:
        with torch.no_grad():
            module(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_row(kind, fmt, rank, mode, x, dense, args, device):
    """Min ms over interleaved rounds for every implementation of one grid row."""
    modules = {"dense": dense}
    modules.update({f"tltorch {impl}": layer for impl, layer in tltorch_layers(kind, fmt, rank, device).items()})
    for strategy in ("dense", "factorized", "auto"):
        modules[f"tnlayers {strategy}"] = ours(kind, fmt, rank, strategy, device)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    for m in modules.values():
        m.train(mode == "train")
        m.zero_grad(set_to_none=True)
    tnlayers.strategy.clear_decisions()
    decision_ms = 1e3 * call(modules["tnlayers auto"], x, mode, device)  # first call: auto decides
    for name, m in modules.items():
        if name != "tnlayers auto":
            call(m, x, mode, device)  # warm-up
    times = {name: [] for name in modules}
    names = list(modules)
    for round_ in range(args.repeats):
        # rotate the order each round: what ran just before (a memory-hungry chain, say) shifts the next
        # call's time, and no implementation should always follow the same one
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            m = modules[name]
            if mode == "train":
                m.zero_grad(set_to_none=True)
            times[name].append(1e3 * call(m, x, mode, device))
    best = {name: min(t) for name, t in times.items()}
    return dict(kind=kind, format=fmt, rank=rank, mode=mode, ms=best, params=params, decision_ms=decision_ms,
                choice=modules["tnlayers auto"].last_strategy)


def summarize(rows):
    """Per row: auto / fastest other, auto / dense, tltorch default / auto; and the three targets."""
    for row in rows:
        ms = row["ms"]
        rivals = [ms[k] for k in ("dense", "tltorch factorized", "tltorch reconstructed") if k in ms]
        row["vs_best"] = ms["tnlayers auto"] / min(rivals)
        row["vs_dense"] = ms["tnlayers auto"] / ms["dense"]
        row["speedup_tl"] = ms["tltorch factorized"] / ms["tnlayers auto"] if "tltorch factorized" in ms else None
    speedups = [r["speedup_tl"] for r in rows if r["speedup_tl"] is not None]
    geo = math.exp(sum(map(math.log, speedups)) / len(speedups)) if speedups else None
    worst = max(rows, key=lambda r: r["vs_best"])
    worst_inf = max((r for r in rows if r["mode"] == "inference"), key=lambda r: r["vs_dense"])
    return geo, worst, worst_inf


def table(rows):
    names = ["dense", "tltorch factorized", "tltorch reconstructed", "tltorch mobilenet", "tnlayers dense",
             "tnlayers factorized", "tnlayers auto"]
    lines = ["| format | rank | mode | params tnlayers / tltorch | " + " | ".join(names)
             + " | auto chose | auto / fastest of {dense, tltorch} | auto / dense | tltorch default / auto | "
             "auto's decision ms |", "|---|---:|---|---|" + "---:|" * len(names) + "---|---:|---:|---:|---:|"]
    for r in rows:
        ms = r["ms"]
        tl_params = r["params"].get("tltorch factorized")
        tl_params = "-" if tl_params is None else f"{tl_params:,}"
        speedup = "-" if r["speedup_tl"] is None else f"{r['speedup_tl']:.2f}"
        lines.append(
            f"| {r['format']} | {r['rank']} | {r['mode']} | {r['params']['tnlayers auto']:,} / "
            f"{tl_params} | "
            + " | ".join(f"{ms[n]:.2f}" if n in ms else "-" for n in names)
            + f" | {r['choice']} | {r['vs_best']:.2f} | {r['vs_dense']:.2f} | "
            f"{speedup} | {r['decision_ms']:.0f} |")
    return lines


def verdicts(rows, title):
    geo, worst, worst_inf = summarize(rows)
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    return [f"- {title}: worst auto / fastest of {{dense, tltorch}}: {worst['vs_best']:.2f} ({worst['format']} "
            f"{worst['rank']} {worst['mode']}) — target <= 1.1: {met(worst['vs_best'] <= 1.1)}",
            f"- {title}: worst inference auto / dense: {worst_inf['vs_dense']:.2f} ({worst_inf['format']} "
            f"{worst_inf['rank']}) — target <= 1.05: {met(worst_inf['vs_dense'] <= 1.05)}",
            f"- {title}: geometric-mean speed-up over tltorch's default implementation: "
            + ("n/a (tensorly-torch not installed)" if geo is None else f"{geo:.2f}x — target >= 1.5: {met(geo >= 1.5)}")]


def grid(kind, args, device):
    if kind == "conv":
        x = torch.randn(args.batch, 64, args.size, args.size, device=device)
        dense = nn.Conv2d(64, 64, 3, padding=1, device=device)
    else:
        x = torch.randn(args.rows, 1024, device=device)
        dense = nn.Linear(1024, 1024, device=device)
    rows = []
    for fmt in args.formats:
        for rank in args.ranks:
            for mode in MODES:
                rows.append(run_row(kind, fmt, rank, mode, x, dense, args, device))
                r = rows[-1]
                print(f"{kind} {fmt} {rank} {mode}: auto {r['ms']['tnlayers auto']:.2f} ms ({r['choice']}), "
                      f"dense {r['ms']['dense']:.2f} ms", flush=True)
    summarize(rows)
    return rows


def write(conv_rows, linear_rows, args, path):
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    try:
        import tltorch
        tl_version = f"tensorly-torch {tltorch.__version__}"
    except ImportError:
        tl_version = "tensorly-torch not installed"
    load = f"; load average before the run {args.load:.2f}" if args.load is not None else ""
    load += "; flush-denormal on" if args.flush_denormal else ""
    lines = [f"# Layers: tnlayers auto vs tensorly-torch vs dense ({device.type})", "",
             f"- Machine: {machine}; torch {torch.__version__}; {tl_version}{load}",
             f"- Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`",
             f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; min ms over {args.repeats} interleaved rounds "
             "after one warm-up call each (train: forward + backward; inference: eval-mode forward under no_grad)", ""]
    lines += ["## Verdicts", ""] + verdicts(conv_rows, "conv") + (verdicts(linear_rows, "linear") if linear_rows else [])
    lines += ["", f"## Conv2d 64 -> 64, 3x3, input {args.batch}x64x{args.size}x{args.size} (ms)", ""] + table(conv_rows)
    if linear_rows:
        lines += ["", f"## Linear 1024 -> 1024, modes (16, 8, 8), {args.rows} rows (ms)", ""] + table(linear_rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))
    print(f"written to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--ranks", nargs="+", type=float, default=list(RANKS))
    parser.add_argument("--no-linear", action="store_true", help="conv grid only")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True): on x86 CPUs, oneDNN's thin 1x1 convolutions otherwise run "
                             "up to 2.5x slower in some processes (denormal arithmetic), for every library alike")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_denormal and not torch.set_flush_denormal(True):
        print("--flush-denormal: not supported on this CPU; measuring without it")
    args.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    device = torch.device(args.device)
    conv_rows = grid("conv", args, device)
    linear_rows = [] if args.no_linear else grid("linear", args, device)
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "-").lower()
    write(conv_rows, linear_rows, args, args.out or Path(__file__).parent / "results" / f"{tag}-layers.md")


if __name__ == "__main__":
    main()
