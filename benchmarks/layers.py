"""tnlayers' automatic strategy against every tensorly-torch implementation and the dense layer, side by side.

    python benchmarks/layers.py --threads 1 --keep-freed-memory   # writes benchmarks/results/local/<device>-layers.md
    python benchmarks/layers.py --device cuda

Grid: every format x rank (fraction of the dense parameter count) {0.05, 0.1, 0.25, 0.5} x
{train, inference}, for a 64 -> 64 3x3 conv on a 32 x 64 x 32 x 32 input and a 1024 -> 1024 linear (modes
(16, 8, 8)) on 256 rows. train: forward + backward of the layer as it runs inside a network, from a given
upstream gradient (no loss op is timed), the input needing its gradient (``--first-layer``: not);
inference: forward in eval mode under no_grad. Columns: dense ``nn.Conv2d``/``nn.Linear``; tensorly-torch
0.5 ``FactorizedConv``/``FactorizedLinear`` with each of its implementations at the same format and rank
('mobilenet' only exists for CP convs; tltorch has no TR, and calls its TT linear 'blocktt'); tnlayers with
``strategy="auto"`` and, for reference, forced "dense" and "factorized". Every implementation of a row is
timed once per round (in a fresh random order each round), rounds interleaved, so background load hits
them alike; the minimum over rounds is reported. ``auto``'s one-time decision (its timing of both
strategies) happens in the first call and is reported separately.

On glibc, ``--keep-freed-memory`` stops the allocator from unmapping freed tensors (see _memory.py):
otherwise page faults on fresh 8 MB buffers cost more than a thin conv and land on whichever calls happen
to get fresh memory, for every library alike.

Further sections (``--sections``; all by default), the same grid and verdicts: a Conv1d 64 -> 64, k = 3, on
batch x 64 x size² (as many positions as the Conv2d input); a Conv3d 64 -> 64, 3x3x3, on (batch/8) x 64 x
(size/4) x (size/2) x (size/2); a depthwise Conv2d (groups=64) 64 -> 64, 3x3, on the Conv2d input (tltorch has no
grouped conv: nn is its only rival; a depthwise layer has no factorized chain, so no "tnlayers factorized" column).
tltorch's ``FactorizedConv`` takes 1-D and 3-D kernels as it takes 2-D ones.
An Embedding section (``_embedding_bench.py``): lookups against nn.Embedding and tltorch's FactorizedEmbedding, at
ranks of its own (``--embedding-ranks``), and the 1,000,000 x 256 lookup-vs-rebuild measurement of issue 22.

Targets: auto <= 1.1x the fastest of {tltorch factorized, tltorch reconstructed, dense} in every row;
inference <= 1.05x dense at every rank; geometric-mean speed-up over tltorch's default ('factorized') >= 1.5x.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import random
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tnlayers  # noqa: E402
from _embedding_bench import (LOOKUPS, RANKS as EMBEDDING_RANKS, embedding_inputs, lookup_vs_rebuild,  # noqa: E402
                              our_embedding, tltorch_embeddings)
from _machine import cpu_name  # noqa: E402
from _memory import FLAG_HELP, NOTE, apply_flag  # noqa: E402
from _output import default_out  # noqa: E402

FORMATS = ("tucker", "tt", "cp", "tr")
RANKS = (0.05, 0.1, 0.25, 0.5)
MODES = ("train", "inference")
MIN_ROUNDS = 3  # every implementation is timed at least this often, whatever --budget says
CONV = {"tucker": tnlayers.TuckerConv2d, "tt": tnlayers.TTConv2d, "cp": tnlayers.CPConv2d, "tr": tnlayers.TRConv2d}
_L = tnlayers.layers
# section -> (tnlayers class per format, nn class, kernel, groups) for the conv sections beside the Conv2d one
CONV_SECTIONS = {
    "conv1d": ({"tucker": _L.TuckerConv1d, "tt": _L.TTConv1d, "cp": _L.CPConv1d, "tr": _L.TRConv1d}, nn.Conv1d,
               (3,), 1),
    "conv3d": ({"tucker": _L.TuckerConv3d, "tt": _L.TTConv3d, "cp": _L.CPConv3d, "tr": _L.TRConv3d}, nn.Conv3d,
               (3, 3, 3), 1),
    "depthwise": (CONV, nn.Conv2d, (3, 3), 64),
}
SECTIONS = ("conv", "linear", *CONV_SECTIONS, "embedding")
TITLES = {"embedding": "Embedding 100,000 x 128, index modes (50, 50, 40), dim modes (8, 4, 4), {} lookups; rank: "
                       "the fraction of the table's parameters kept",
          "conv1d": "Conv1d 64 -> 64, k=3, input {}", "conv3d": "Conv3d 64 -> 64, 3x3x3, input {}",
          "depthwise": "Depthwise Conv2d 64 -> 64 (groups=64), 3x3, input {}"}
LINEAR = {"tucker": tnlayers.TuckerLinear, "tt": tnlayers.TTLinear, "cp": tnlayers.CPLinear, "tr": tnlayers.TRLinear}
TLTORCH_NAMES = {"conv": {"tucker": "tucker", "tt": "tt", "cp": "cp"},
                 "linear": {"tucker": "tucker", "tt": "blocktt", "cp": "cp"}}


def tltorch_layers(kind, fmt, rank, device):
    """{implementation: tensorly-torch layer} at this format and rank; {} when tltorch is missing or lacks it."""
    if kind == "embedding":
        return tltorch_embeddings(fmt, rank, device)
    try:
        from tltorch.factorized_layers import FactorizedConv, FactorizedLinear
    except ImportError:
        return {}
    kernel = CONV_SECTIONS[kind][2] if kind in CONV_SECTIONS else (3, 3)
    name = TLTORCH_NAMES["linear" if kind == "linear" else "conv"].get(fmt)
    if name is None or kind == "depthwise":  # (tltorch has no grouped conv)
        return {}
    implementations = ["factorized", "reconstructed"] + (["mobilenet"] if (kind != "linear" and fmt == "cp") else [])
    layers = {}
    for impl in implementations:
        if kind != "linear":
            layers[impl] = FactorizedConv(64, 64, kernel, padding=1, factorization=name, rank=rank,
                                          implementation=impl, device=device)
            # tltorch 0.5's FactorizedConv leaves its factors uninitialized (torch.empty): timed as built,
            # garbage values with denormals made its calls up to 20x slower, varying from process to process
            layers[impl].reset_parameters()  # its own init: the weight ~ N(0, 0.02)
        else:
            layers[impl] = FactorizedLinear((16, 8, 8), (16, 8, 8), factorization=name, rank=rank,
                                            implementation=impl, device=device)
    return layers


def ours(kind, fmt, rank, strategy, device):
    if kind == "embedding":
        return our_embedding(fmt, rank, strategy, device)
    if kind in CONV_SECTIONS:
        classes, _, kernel, groups = CONV_SECTIONS[kind]
        return classes[fmt](64, 64, kernel, padding=1, groups=groups, rank=rank, strategy=strategy, device=device)
    if kind == "conv":
        return CONV[fmt](64, 64, 3, padding=1, rank=rank, strategy=strategy, device=device)
    return LINEAR[fmt](1024, 1024, rank=rank, strategy=strategy, device=device, in_shape=(16, 8, 8),
                       out_shape=(16, 8, 8))


def call(module, x, grad, mode, device):
    """One timed call, seconds. train: forward + backward of the layer alone, as inside a network: the
    upstream gradient ``grad`` is given (no loss op is timed) and the input needs its gradient unless
    --first-layer; inference: a no-grad forward in eval mode."""
    if mode == "train":
        module.zero_grad(set_to_none=True)
        x.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if mode == "train":
        module(x).backward(grad)
    else:
        with torch.no_grad():
            module(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def round_orders(names, rounds, seed=0):
    """The order of every round: a fresh shuffle each (seeded, so runs repeat). What ran just before shifts a
    call's time: a Tucker chain took 12.1 ms (min of 20) right after a dense conv, 9.4 ms after a chain. A
    rotation keeps each implementation behind the same neighbour in every round but one, and the minimum
    would keep that bias."""
    rng = random.Random(seed)
    return [rng.sample(names, len(names)) for _ in range(rounds)]


def run_row(kind, fmt, rank, mode, x, grad, dense, args, device):
    """Min ms over interleaved rounds for every implementation of one grid row."""
    modules = {"dense": dense}
    modules.update({f"tltorch {impl}": layer for impl, layer in tltorch_layers(kind, fmt, rank, device).items()})
    for strategy in ("dense", "auto") if kind == "depthwise" else ("dense", "factorized", "auto"):  # (no chain)
        modules[f"tnlayers {strategy}"] = ours(kind, fmt, rank, strategy, device)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    for m in modules.values():
        m.train(mode == "train")
        m.zero_grad(set_to_none=True)
    tnlayers.strategy.clear_decisions()
    decision_ms = 1e3 * call(modules["tnlayers auto"], x, grad, mode, device)  # first call: auto decides
    for name, m in modules.items():
        if name != "tnlayers auto":
            call(m, x, grad, mode, device)  # warm-up
    times = {name: {} for name in modules}  # name -> {round: ms}
    for round_, order in enumerate(round_orders(list(modules), args.repeats)):
        for name in order:
            if len(times[name]) >= MIN_ROUNDS and sum(times[name].values()) > 1e3 * args.budget:
                continue  # a slow implementation (seconds per call): its few rounds suffice, far from the fastest
            times[name][round_] = 1e3 * call(modules[name], x, grad, mode, device)
    best = {name: min(t.values()) for name, t in times.items()}
    return dict(kind=kind, format=fmt, rank=rank, mode=mode, ms=best, times=times, params=params, decision_ms=decision_ms,
                choice=modules["tnlayers auto"].last_strategy)


def paired(times, a, b) -> float:
    """Median, over the rounds that timed both, of a's time / b's time in the same round. Background load
    on a shared machine drifts over seconds: two identical convs' separate minimums over 30 rounds still
    differed by 6%, while ratios taken within a round cancel the drift."""
    return statistics.median(times[a][r] / times[b][r] for r in times[a].keys() & times[b].keys())


def summarize(rows):
    """Per row: auto / fastest other, auto / dense, tltorch default / auto, each as a ratio of minimums
    ("min") and as the median of per-round ratios ("paired"); the three targets for each estimate."""
    for row in rows:
        ms, times = row["ms"], row["times"]
        rivals = [k for k in ("dense", "tltorch factorized", "tltorch reconstructed") if k in ms]
        fastest = min(rivals, key=ms.get)
        row["vs_best"] = {"min": ms["tnlayers auto"] / ms[fastest], "paired": paired(times, "tnlayers auto", fastest)}
        row["vs_dense"] = {"min": ms["tnlayers auto"] / ms["dense"], "paired": paired(times, "tnlayers auto", "dense")}
        row["speedup_tl"] = None if "tltorch factorized" not in ms else {
            "min": ms["tltorch factorized"] / ms["tnlayers auto"],
            "paired": paired(times, "tltorch factorized", "tnlayers auto")}
    out = {}
    for est in ("min", "paired"):
        speedups = [r["speedup_tl"][est] for r in rows if r["speedup_tl"] is not None]
        geo = math.exp(sum(map(math.log, speedups)) / len(speedups)) if speedups else None
        worst = max(rows, key=lambda r: r["vs_best"][est])
        worst_inf = max((r for r in rows if r["mode"] == "inference"), key=lambda r: r["vs_dense"][est])
        out[est] = (geo, worst, worst_inf)
    return out


def _pair(ratio) -> str:
    return "-" if ratio is None else f"{ratio['min']:.2f} / {ratio['paired']:.2f}"


def table(rows):
    names = ["dense", "tltorch factorized", "tltorch reconstructed", "tltorch mobilenet", "tnlayers dense",
             "tnlayers factorized", "tnlayers auto"]
    lines = ["| format | rank | mode | params tnlayers / tltorch | " + " | ".join(names)
             + " | auto chose | auto / fastest of {dense, tltorch} (min / paired) | auto / dense (min / paired) | "
             "tltorch default / auto (min / paired) | auto's decision ms |",
             "|---|---:|---|---|" + "---:|" * len(names) + "---|---:|---:|---:|---:|"]
    for r in rows:
        ms = r["ms"]
        tl_params = r["params"].get("tltorch factorized")
        tl_params = "-" if tl_params is None else f"{tl_params:,}"
        lines.append(
            f"| {r['format']} | {r['rank']} | {r['mode']} | {r['params']['tnlayers auto']:,} / "
            f"{tl_params} | "
            + " | ".join(f"{ms[n]:.2f}" if n in ms else "-" for n in names)
            + f" | {r['choice']} | {_pair(r['vs_best'])} | {_pair(r['vs_dense'])} | "
            f"{_pair(r['speedup_tl'])} | {r['decision_ms']:.0f} |")
    return lines


def input_shape(kind, args):
    """The input of a conv section (module docstring), or the lookups of the embedding section."""
    if kind == "embedding":
        return (LOOKUPS,)
    if kind == "conv1d":
        return (args.batch, 64, args.size * args.size)
    if kind == "conv3d":
        return (max(args.batch // 8, 1), 64, max(args.size // 4, 1), max(args.size // 2, 1), max(args.size // 2, 1))
    return (args.batch, 64, args.size, args.size)


def _tltorch_missing(title) -> str:
    """Why a section has no tensorly-torch rows."""
    if importlib.util.find_spec("tltorch") is None:
        return "tensorly-torch not installed"
    return "tensorly-torch has no grouped conv" if title == "depthwise" else "no tensorly-torch rows"


def verdicts(rows, title):
    """The three targets, judged on the paired estimate (see ``paired``); the ratio of minimums is shown too."""
    summary = summarize(rows)
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    (geo, worst, worst_inf), (geo_min, worst_min, worst_inf_min) = summary["paired"], summary["min"]
    lines = [f"- {title}: worst auto / fastest of {{dense, tltorch}}: paired {worst['vs_best']['paired']:.2f} "
             f"({worst['format']} {worst['rank']} {worst['mode']}); ratio of minimums {worst_min['vs_best']['min']:.2f} ({worst_min['format']} "
             f"{worst_min['rank']} {worst_min['mode']}) — target <= 1.1: {met(worst['vs_best']['paired'] <= 1.1)}",
             f"- {title}: worst inference auto / dense: paired {worst_inf['vs_dense']['paired']:.2f} "
             f"({worst_inf['format']} {worst_inf['rank']}); ratio of minimums {worst_inf_min['vs_dense']['min']:.2f} "
             f"({worst_inf_min['format']} {worst_inf_min['rank']}) — target <= 1.05: "
             f"{met(worst_inf['vs_dense']['paired'] <= 1.05)}"]
    if geo is None:
        lines.append(f"- {title}: geometric-mean speed-up over tltorch's default: n/a ({_tltorch_missing(title)})")
    else:
        lines.append(f"- {title}: geometric-mean speed-up over tltorch's default implementation: paired {geo:.2f}x; "
                     f"ratio of minimums {geo_min:.2f}x — target >= 1.5: {met(geo >= 1.5)}")
    return lines


def grid(kind, args, device):
    if kind == "embedding":  # indices need no gradient; the upstream gradient is the lookups'
        x, dense, grad = embedding_inputs(device)
    elif kind in CONV_SECTIONS:
        _, dense_class, kernel, groups = CONV_SECTIONS[kind]
        x = torch.randn(*input_shape(kind, args), device=device)
        dense = dense_class(64, 64, kernel, padding=1, groups=groups, device=device)
    elif kind == "conv":
        x = torch.randn(args.batch, 64, args.size, args.size, device=device)
        dense = nn.Conv2d(64, 64, 3, padding=1, device=device)
    else:
        x = torch.randn(args.rows, 1024, device=device)
        dense = nn.Linear(1024, 1024, device=device)
    if kind != "embedding":
        grad = torch.randn_like(x)  # the upstream gradient: 64 -> 64 same-padding convs, 1024 -> 1024 linear
        x.requires_grad_(not args.first_layer)
    rows = []
    for fmt in args.formats:
        for rank in (args.embedding_ranks if kind == "embedding" else args.ranks):
            for mode in MODES:
                rows.append(run_row(kind, fmt, rank, mode, x, grad, dense, args, device))
                r = rows[-1]
                print(f"{kind} {fmt} {rank} {mode}: auto {r['ms']['tnlayers auto']:.2f} ms ({r['choice']}), "
                      f"dense {r['ms']['dense']:.2f} ms", flush=True)
    return rows


def write(conv_rows, linear_rows, args, path, more=None, notes=()):
    """``more``: {section: rows} of the further sections (module docstring); ``notes``: lines after the verdicts."""
    more = more or {}
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    try:
        import tltorch
        tl_version = f"tensorly-torch {tltorch.__version__}"
    except ImportError:
        tl_version = "tensorly-torch not installed"
    load = f"; load average before the run {args.load:.2f}" if args.load is not None else ""
    load += "; flush-denormal on" if args.flush_denormal else ""
    load += f"; {NOTE}" if args.keep_freed_memory else ""
    lines = [f"# Layers: tnlayers auto vs tensorly-torch vs dense ({device.type})", "",
             f"- Machine: {machine}; torch {torch.__version__}; {tl_version}{load}",
             f"- Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`",
             f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; min ms over {args.repeats} interleaved rounds "
             f"(at least {MIN_ROUNDS} for an implementation that has spent {args.budget:g} s in its row) "
             "after one warm-up call each (train: forward + backward from a given upstream gradient, the input "
             + ("needing no gradient (--first-layer)" if args.first_layer else "needing its gradient, as in a hidden layer")
             + "; inference: eval-mode forward under no_grad)", ""]
    lines += ["## Verdicts", ""] + (verdicts(conv_rows, "conv") if conv_rows else []) \
        + (verdicts(linear_rows, "linear") if linear_rows else [])
    for kind, rows in more.items():
        lines += verdicts(rows, kind)
    lines += list(notes)
    if conv_rows:
        lines += ["", f"## Conv2d 64 -> 64, 3x3, input {args.batch}x64x{args.size}x{args.size} (ms)", ""] \
            + table(conv_rows)
    if linear_rows:
        lines += ["", f"## Linear 1024 -> 1024, modes (16, 8, 8), {args.rows} rows (ms)", ""] + table(linear_rows)
    for kind, rows in more.items():
        shape = "x".join(map(str, input_shape(kind, args)))
        lines += ["", f"## {TITLES[kind].format(shape)} (ms)", ""] + table(rows)
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
    parser.add_argument("--repeats", type=int, default=30,
                        help="interleaved rounds per row; the minimum counts. On a shared VM a call's time spreads "
                             "+-25%%, and the minimum of 9 rounds still differed 15%% between identical convs")
    parser.add_argument("--budget", type=float, default=3.0,
                        help="seconds one implementation may spend in a row before it sits out later rounds "
                             f"(after {MIN_ROUNDS} rounds)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--ranks", nargs="+", type=float, default=list(RANKS))
    parser.add_argument("--first-layer", action="store_true",
                        help="train rows: the input needs no gradient (a network's first layer); default: it does")
    parser.add_argument("--no-linear", action="store_true",
                        help="no linear grid (as leaving 'linear' out of --sections)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="which grids to run (default: all)")
    parser.add_argument("--embedding-ranks", nargs="+", type=float, default=list(EMBEDDING_RANKS),
                        help="ranks of the embedding section: fractions of the table's parameters")
    parser.add_argument("--embedding-rebuild-rounds", type=int, default=3,
                        help="rounds of the embedding section's 1,000,000 x 256 lookup-vs-rebuild measurement "
                             "(0: skip it)")
    parser.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True)")
    parser.add_argument("--keep-freed-memory", action="store_true", help=FLAG_HELP)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_denormal and not torch.set_flush_denormal(True):
        print("--flush-denormal: not supported on this CPU; measuring without it")
    apply_flag(args)
    args.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    device = torch.device(args.device)
    conv_rows = grid("conv", args, device) if "conv" in args.sections else []
    linear_rows = [] if args.no_linear or "linear" not in args.sections else grid("linear", args, device)
    more = {kind: grid(kind, args, device) for kind in (*CONV_SECTIONS, "embedding") if kind in args.sections}
    rounds = args.embedding_rebuild_rounds if "embedding" in args.sections else 0
    notes = lookup_vs_rebuild(device, rounds) if rounds > 0 else []
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "-").lower()
    write(conv_rows, linear_rows, args, args.out or default_out(f"{tag}-layers.md"), more, notes)


if __name__ == "__main__":
    main()
