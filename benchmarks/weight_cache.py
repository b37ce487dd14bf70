"""Eval inference with the no-grad weight cache: the default value check, inside ``tnlayers.cached()``, with the
cache off, and the ``nn`` layer, side by side (CUDA events on a GPU, perf_counter on CPU).

    python benchmarks/weight_cache.py --device cuda   # writes benchmarks/results/local/<device>-weight_cache.md

Off the CPU the default check synchronizes with the device once per call; ``tnlayers.cached()`` skips it
(docs/design.md, 'Inference weight cache').
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tnlayers  # noqa: E402
from _output import default_out  # noqa: E402

CASES = [  # (name, tensorized layer, nn layer, input shape)
    ("TTConv2d(64, 64, 3, rank=16), x 32x64x32x32", lambda: tnlayers.TTConv2d(64, 64, 3, padding=1, rank=16),
     lambda: nn.Conv2d(64, 64, 3, padding=1), (32, 64, 32, 32)),
    ("TRConv2d(256, 256, 3, rank=0.1), x 64x256x16x16", lambda: tnlayers.TRConv2d(256, 256, 3, padding=1, rank=0.1),
     lambda: nn.Conv2d(256, 256, 3, padding=1), (64, 256, 16, 16)),
    ("CPLinear(1024, 1024, rank=0.5), x 256", lambda: tnlayers.CPLinear(1024, 1024, rank=0.5),
     lambda: nn.Linear(1024, 1024), (256, 1024)),
    ("TTLinear(1024, 1024, rank=0.1), x 8", lambda: tnlayers.TTLinear(1024, 1024, rank=0.1),
     lambda: nn.Linear(1024, 1024), (8, 1024)),
]


def mean_us(fn, device: torch.device, calls: int, warmup: int) -> float:
    """Mean µs per call over ``calls`` back-to-back calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / calls * 1000
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) / calls * 1e6


def row(name, make, make_dense, shape, device, calls, warmup) -> str:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # excess-rank notes are not what this measures
        layer, off = make().to(device).eval(), make().to(device).eval()
    off.load_state_dict(layer.state_dict())
    layer.strategy = off.strategy = "dense"
    off.cache_weight = False
    dense, x = make_dense().to(device).eval(), torch.randn(shape, device=device)
    with torch.no_grad():
        t_nn, t_checked, t_off = (mean_us(lambda m=m: m(x), device, calls, warmup) for m in (dense, layer, off))
        with tnlayers.cached():
            t_trusted = mean_us(lambda: layer(x), device, calls, warmup)
        same = torch.allclose(layer(x), off(x), rtol=1e-4, atol=1e-4)
    return (f"| {name} | {t_nn:.1f} | {t_checked:.1f} | {t_trusted:.1f} | {t_off:.1f} | {t_checked / t_nn:.2f} | "
            f"{t_trusted / t_nn:.2f} | {same} |")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/local/, git-ignored)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = ["# Eval inference with the weight cache", "",
             f"- Machine: {machine}; torch {torch.__version__}",
             f"- Command: `python benchmarks/{Path(__file__).name} {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; mean µs per call over {args.calls} back-to-back "
             f"calls after {args.warmup} warm-ups, eval mode, no_grad, strategy='dense'", "",
             "| layer | nn µs | cache, values checked (default) µs | inside tnlayers.cached() µs | cache off µs | "
             "default / nn | cached() / nn | same output |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [row(*case, device, args.calls, args.warmup) for case in CASES]
    text = "\n".join(lines) + "\n"
    print(text)
    tag = "cpu" if device.type == "cpu" else machine.replace(" ", "-").lower()
    out = Path(args.out) if args.out else default_out(f"{tag}-weight_cache.md")
    out.write_text(text)
    print(f"written to {out}")
    return text


if __name__ == "__main__":
    main()
