"""The fixed cost of a tensorized layer call: what the layer adds on top of the ops it runs, measured on inputs
so small that the ops themselves cost almost nothing (the regime of the demo's 8x8 ResNet and of every small
layer), against a hand-written module doing the same work:

- eval (``no_grad``, strategy "dense", weight cached): the ``nn`` layer (one conv/matmul with a stored weight),
  also inside ``tnlayers.cached()`` (the cache's guard then skips comparing the cores' values);
- train, strategy "dense" (forward + backward): an ``opt_einsum`` ``contract_expression`` of the cores, planned
  once, then one ``F.conv2d``/``F.linear`` (what one would write by hand);
- train, strategy "factorized" (forward + backward): the layer's own functional chain (``layer.plan``) called
  directly, so the difference is the layer's Python (checks, strategy, dispatch) alone.

    python benchmarks/layer_overhead.py            # writes benchmarks/results/local/cpu-layer_overhead.md

Minimum over rounds of the mean µs per call, reference and layer in alternating rounds (1 thread by default:
fixed costs are single-threaded Python). Every reference is first checked to compute the layer's output.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import opt_einsum
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tnlayers  # noqa: E402
from _machine import cpu_name  # noqa: E402
from _output import default_out  # noqa: E402

CASES = [  # (name, tensorized layer, nn layer, input shape): the demo's TR-ResNet-20 layers and 10% budgets
    ("TRConv2d(16, 16, 3, rank=8)", lambda: tnlayers.TRConv2d(16, 16, 3, padding=1, rank=8, bias=False),
     lambda: nn.Conv2d(16, 16, 3, padding=1, bias=False), (1, 16, 2, 2)),
    ("TRConv2d(64, 64, 3, rank=8)", lambda: tnlayers.TRConv2d(64, 64, 3, padding=1, rank=8, bias=False),
     lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (1, 64, 2, 2)),
    ("TTConv2d(64, 64, 3, rank=0.1)", lambda: tnlayers.TTConv2d(64, 64, 3, padding=1, rank=0.1, bias=False),
     lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (1, 64, 2, 2)),
    ("CPConv2d(64, 64, 3, rank=0.1)", lambda: tnlayers.CPConv2d(64, 64, 3, padding=1, rank=0.1, bias=False),
     lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (1, 64, 2, 2)),
    ("TuckerConv2d(64, 64, 3, rank=0.1)", lambda: tnlayers.TuckerConv2d(64, 64, 3, padding=1, rank=0.1, bias=False),
     lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (1, 64, 2, 2)),
    ("TTLinear(64, 10, rank=4)", lambda: tnlayers.TTLinear(64, 10, rank=4), lambda: nn.Linear(64, 10), (1, 64)),
]


def paired_us(ref, fn, calls: int, rounds: int, warmup: int) -> tuple:
    """(ref, fn): minimum over ``rounds`` of the mean µs per call of ``calls`` back-to-back calls, the two
    measured in alternating rounds (so a slow spell of the machine hits both)."""
    for _ in range(warmup):
        ref(), fn()
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, f in enumerate((ref, fn)):
            begin = time.perf_counter()
            for _ in range(calls):
                f()
            best[i] = min(best[i], (time.perf_counter() - begin) / calls * 1e6)
    return tuple(best)


class HandWritten(nn.Module):
    """The dense strategy written by hand: the cores through one planned ``opt_einsum`` expression, then the
    ``nn`` op. Shares the layer's parameters (no copy)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        plan = layer.plan
        order = plan.out_modes + plan.in_modes + plan.spatial_modes
        equation = tnlayers.formats.network.einsum_equation(layer.network.cores, order)
        self.expr = opt_einsum.contract_expression(equation, *[tuple(c.shape) for c in layer.core_parameters()])
        self.shape = tuple(layer.weight.shape)
        self.conv = getattr(layer, "_conv_args", None)

    def forward(self, x):
        w = self.expr(*self.layer.core_parameters(), backend="torch").reshape(self.shape)
        if self.conv is None:
            return F.linear(x, w, self.layer.bias)
        return F.conv2d(x, w, self.layer.bias, **self.conv)


def chain(layer):
    """The layer's factorized chain called directly: no checks, strategy, or cache."""
    if getattr(layer, "_conv_args", None) is None:
        return lambda x: layer.plan.factorized(x, layer.core_parameters()) + layer.bias
    return lambda x: layer.plan.factorized(x, layer.core_parameters(), layer._conv_args, layer.bias)


def train_call(module, x):
    def step():
        module(x).sum().backward()
    return step


def row(name, make, make_dense, shape, args) -> str:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # excess-rank notes are not what this measures
        layer = make()
    dense, x = make_dense(), torch.randn(shape)
    with torch.no_grad():  # every reference computes the layer's function: checked below, then timed
        dense.weight.copy_(layer.weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
        expected = layer(x)
        outputs = [dense(x), HandWritten(layer)(x)] + ([chain(layer)(x)] if getattr(layer.plan, "supported", True)
                                                       else [])
    same = all(torch.allclose(y, expected, rtol=1e-4, atol=1e-5) for y in outputs)
    measure = lambda ref, fn: paired_us(ref, fn, args.calls, args.rounds, args.warmup)  # noqa: E731
    cells = []
    layer.strategy = "dense"
    with torch.no_grad():
        dense.eval(), layer.eval()
        cells.append(measure(lambda: dense(x), lambda: layer(x)))
        with tnlayers.cached():  # the cache guard without its value comparison
            cells.append(measure(lambda: dense(x), lambda: layer(x)))
    layer.train()
    cells.append(measure(train_call(HandWritten(layer), x), train_call(layer, x)))
    if getattr(layer.plan, "supported", True):
        layer.strategy = "factorized"
        cells.append(measure(train_call(chain(layer), x), train_call(layer, x)))
    else:
        cells.append(None)
    text = " | ".join("- | - | -" if c is None else f"{c[0]:.1f} | {c[1]:.1f} | {c[1] - c[0]:+.1f}" for c in cells)
    return f"| {name}, x {'x'.join(map(str, shape))} | {text} | {same} |"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--note", default=None, help="a line added to the header (e.g. the code state)")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/local/, git-ignored)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Fixed cost per layer call", "",
             f"- Machine: {cpu_name()}; torch {torch.__version__}, {args.threads} torch thread(s)",
             f"- Command: `python benchmarks/{Path(__file__).name} {command}`",
             f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; minimum over {args.rounds} rounds of the mean "
             f"µs per call over {args.calls} back-to-back calls, after {args.warmup} warm-ups; reference and layer "
             f"in alternating rounds",
             *([f"- {args.note}"] if args.note else []),
             "- Reference (ref): eval: the nn layer (also inside `tnlayers.cached()`, which skips the cache guard's "
             "value comparison); train dense: opt_einsum expression of the cores + F.conv2d/"
             "F.linear, forward + backward; train factorized: the layer's chain (`layer.plan`) called directly. "
             "+: the layer's own fixed cost, layer - ref", "",
             "| layer, input | eval nn µs | eval layer µs | + | inside cached(): nn µs | layer µs | + | "
             "train dense ref µs | layer µs | + | train factorized ref µs | layer µs | + | same output |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += [row(*case, args) for case in CASES]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) if args.out else default_out("cpu-layer_overhead.md")
    out.write_text(text)
    print(f"written to {out}")
    return text


if __name__ == "__main__":
    main()
