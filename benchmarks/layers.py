"""Forward+backward time (and peak memory on CUDA) of every tensorized layer class and strategy, against
the dense ``nn.Conv2d``/``nn.Linear`` and, when ``tensorly-torch`` is installed, its ``FactorizedConv`` at the same format
and rank.

    python benchmarks/layers.py --threads 2            # writes benchmarks/results/<device>-layers.md
    python benchmarks/layers.py --device cuda

Configurations are those of the speed issue's table: a 64 -> 64 3x3 conv on a 32 x 64 x 32 x 32 input,
each format at about 3.6k and 18.6k parameters (the dense conv has 36.9k). tltorch's Tucker conv gets
ranks (R_out, R_in, 3, 3) (Tucker-2), its TT conv ranks (1, r1, 3, r2, 1)... as it parametrizes them.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import tnlayers  # noqa: E402

# (label, tnlayers class, rank, tltorch factorization, tltorch rank)
CONFIGS = [
    ("Tucker-2 (14,14)", tnlayers.TuckerConv2d, 14, "tucker", (14, 14, 3, 3)),
    ("TT (26,2)", tnlayers.TTConv2d, [1, 26, 2, 1], None, None),
    ("CP 28", tnlayers.CPConv2d, 28, "cp", 28),
    ("TR 4", tnlayers.TRConv2d, 4, None, None),
    ("Tucker-2 (39,39)", tnlayers.TuckerConv2d, 39, "tucker", (39, 39, 3, 3)),
    ("TT (101,9)", tnlayers.TTConv2d, [1, 101, 9, 1], None, None),
    ("CP 138", tnlayers.CPConv2d, 138, "cp", 138),
    ("TR 10", tnlayers.TRConv2d, 10, None, None),
]


# linear layers: 1024 -> 1024 (modes (16, 8, 8) each) on a batch of 256 rows
LINEAR_CONFIGS = [
    ("TT 8", tnlayers.TTLinear, 8, "blocktt", 8),  # tltorch calls its TT linear "blocktt"
    ("TR 8", tnlayers.TRLinear, 8, None, None),
    ("CP 32", tnlayers.CPLinear, 32, "cp", 32),
    ("Tucker 64 (FLoRA shape)", tnlayers.TuckerLinear, 64, None, None),
]


def tltorch_linear(factorization, rank, implementation, device):
    try:
        from tltorch.factorized_layers import FactorizedLinear
    except ImportError:
        return None
    return FactorizedLinear((16, 8, 8), (16, 8, 8), factorization=factorization, rank=rank,
                            implementation=implementation, device=device)


def tltorch_conv(factorization, rank, implementation, device):
    """tensorly-torch's FactorizedConv at this rank, or None when tltorch is not installed."""
    try:
        from tltorch.factorized_layers import FactorizedConv
    except ImportError:
        return None
    return FactorizedConv(64, 64, (3, 3), padding=1, factorization=factorization, rank=rank,
                          implementation=implementation, device=device)


def measure(module, x, repeats, device):
    """(min ms, median ms, peak MiB or None) of forward + backward."""
    def once():
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()
    once()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
    return min(times), statistics.median(times), peak


def strategy_rows(label, make_layer, x, args, device):
    """One row per forward strategy of a tnlayers layer (``make_layer(strategy)`` builds it)."""
    rows = []
    for strategy in ("dense", "factorized", "auto"):
        layer = make_layer(strategy)
        result = measure(layer, x, args.repeats, device)
        chosen = next(iter(layer._choices.values()), strategy) if strategy == "auto" else strategy
        rows.append((f"tnlayers {label}", sum(p.numel() for p in layer.parameters()),
                     strategy if strategy != "auto" else f"auto -> {chosen}", *result))
    return rows


def tltorch_rows(label, make_layer, x, args, device):
    """tensorly-torch's two implementations, when it is installed and takes this configuration."""
    rows = []
    for implementation in ("factorized", "reconstructed"):
        try:
            layer = make_layer(implementation)
        except Exception as error:  # report, don't stop the run: tltorch's API differs by version
            print(f"tltorch {label} {implementation}: {error}")
            continue
        if layer is None:
            break
        rows.append((f"tltorch {label}", sum(p.numel() for p in layer.parameters()), implementation,
                     *measure(layer, x, args.repeats, device)))
    return rows


def run(args):
    device = torch.device(args.device)
    x = torch.randn(args.batch, 64, args.size, args.size, device=device)
    dense = nn.Conv2d(64, 64, 3, padding=1, device=device)
    rows = [("dense nn.Conv2d", sum(p.numel() for p in dense.parameters()), "-", *measure(dense, x, args.repeats, device))]
    for label, cls, rank, tl_factorization, tl_rank in CONFIGS:
        rows += strategy_rows(label, lambda s: cls(64, 64, 3, padding=1, rank=rank, strategy=s, device=device),
                              x, args, device)
        if tl_factorization is not None:
            rows += tltorch_rows(label, lambda impl: tltorch_conv(tl_factorization, tl_rank, impl, device), x, args,
                                 device)
        print(*rows[-1][:3], f"{rows[-1][3]:.1f} ms")
    return rows, run_linear(args, device)


def run_linear(args, device):
    x = torch.randn(256, 1024, device=device)
    dense = nn.Linear(1024, 1024, device=device)
    rows = [("dense nn.Linear", sum(p.numel() for p in dense.parameters()), "-", *measure(dense, x, args.repeats, device))]
    for label, cls, rank, tl_factorization, tl_rank in LINEAR_CONFIGS:
        rows += strategy_rows(label, lambda s: cls(1024, 1024, rank=rank, strategy=s, device=device), x, args, device)
        if tl_factorization is not None:
            rows += tltorch_rows(label, lambda impl: tltorch_linear(tl_factorization, tl_rank, impl, device), x,
                                 args, device)
    return rows


def table(rows, dense_min):
    lines = ["| layer | params | strategy | min ms | median ms | x dense | peak MiB |", "|---|---:|---|---:|---:|---:|---:|"]
    for name, params, strategy, t_min, t_median, peak in rows:
        lines.append(f"| {name} | {params:,} | {strategy} | {t_min:.1f} | {t_median:.1f} | {t_min / dense_min:.2f} | "
                     f"{'-' if peak is None else f'{peak:.0f}'} |")
    return lines


def write(rows, linear_rows, args, path):
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    try:
        import tltorch
        tl_version = f"tensorly-torch {tltorch.__version__}"
    except ImportError:
        tl_version = "tensorly-torch not installed"
    lines = [f"# Layer forward+backward ({device.type})", "",
             f"- Machine: {machine}; torch {torch.__version__}; {tl_version}",
             f"- Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`",
             f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; input {args.batch}x64x{args.size}x{args.size}, "
             f"64->64 3x3 conv, padding 1; {args.repeats} repeats after one warm-up; ratios of the min to the "
             "dense nn.Conv2d's min", "", "## Conv2d 64 -> 64, 3x3", ""] + table(rows, rows[0][3])
    lines += ["", "## Linear 1024 -> 1024, batch 256 (x dense: against nn.Linear)", ""] + table(linear_rows, linear_rows[0][3])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"written to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, linear_rows = run(args)
    tag = "cpu" if args.device == "cpu" else torch.cuda.get_device_name().replace(" ", "-").lower()
    write(rows, linear_rows, args, args.out or Path(__file__).parent / "results" / f"{tag}-layers.md")


if __name__ == "__main__":
    main()
