"""Decomposing a whole ResNet-18 (``tensorize(..., init="decompose")``): tnlayers' torch decompositions against the
tensorly path they replaced, in time, peak memory and per-layer error.

    python benchmarks/decompose.py --quick     # ~5 min on 2 idle cores; writes benchmarks/results/local/decompose.md
    python benchmarks/decompose.py --out benchmarks/results/decompose.md    # the committed table, ~15 min idle

The model is ``tnlayers.models.resnet18()`` (torchvision's layout and init, seed 0), every conv tensorized at
``--rank`` (a fraction of each layer's parameters), the classifier left dense. Two parts:

1. Whole network, each run in a fresh process (``--threads`` intra-op threads): wall time of ``tensorize`` and
   its peak resident memory above the process's before it (Linux's VmHWM, reset through /proc/self/clear_refs),
   next to the dense model's parameter bytes: once as a user's first call meets it (glibc's default allocator,
   one-time heap and library growth included), once in steady state (after a 512x512x3x3 conv was decomposed,
   with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed buffers leave the process at once). The old path
   (``--old-network``, default TT and TR: its Tucker takes minutes, its CP does not finish) is the same
   ``tensorize`` with the format's decomposition swapped for the tensorly call it used to make. Old and new
   runs alternate, so a background load hits both alike.
2. Per distinct layer shape: relative Frobenius error (float64) and time of the old and the new decomposition,
   interleaved. The old CP-ALS (1000 iterations with line search, random start) and HOOI (100 sweeps) only run
   on layers below ``--old-cp-limit`` / ``--old-tucker-limit`` (weight entries x rank / weight entries): above
   that they take minutes to hours per layer.

The error target: new <= 1.01 x old on every layer both ran.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from math import isqrt, prod
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _machine import cpu_name  # noqa: E402
from _output import default_out  # noqa: E402

import tnlayers  # noqa: E402
from tnlayers.decompositions import Decomposition  # noqa: E402
from tnlayers.formats import get_format  # noqa: E402
from tnlayers.models import resnet18  # noqa: E402

FORMATS = ("tt", "tr", "tucker", "cp")


# -- the path this replaced: tensorly on float64 numpy, as tnlayers/formats/*.py called it ---------------------
def old_cores(fmt: str, array: np.ndarray, net) -> list:
    import tensorly as tl
    from tensorly.decomposition import parafac, partial_tucker, tensor_ring, tensor_train

    with tl.backend_context("numpy"):
        if fmt == "tt":
            ranks = [1] + [net.sizes[f"r{k}"] for k in range(1, len(net.modes))] + [1]
            factors = list(tensor_train(array, rank=ranks).factors)
            return [factors[0][0]] + factors[1:-1] + [factors[-1][..., 0]]
        if fmt == "tr":
            asked = [net.sizes[f"r{k}"] for k in range(len(net.modes))]
            budget = min(net.modes[0], prod(net.modes[1:]))
            r0 = max(q for q in range(1, min(asked[0], isqrt(budget)) + 1) if budget % q == 0)
            return list(tensor_ring(array, rank=[r0, min(asked[1], budget // r0)] + asked[2:] + [r0]).factors)
        if fmt == "tucker":
            modes = [i for i in range(len(net.modes)) if f"r{i}" in net.sizes]
            core = [min(net.sizes.get(f"r{i}", n), n) for i, n in enumerate(net.modes)]
            ranks = [min(core[i], prod(core) // core[i]) for i in modes]
            (core, factors), _ = partial_tucker(array, rank=ranks, modes=modes, n_iter_max=100, tol=1e-12)
            return [core, *factors]
        r = net.sizes["r"]
        weights, factors = parafac(array, rank=r, init="svd" if r <= min(net.modes) else "random", n_iter_max=1000,
                                   tol=1e-12, random_state=0, normalize_factors=True, linesearch=True)
        spread = np.abs(weights) ** (1.0 / len(factors))
        factors = [f * spread for f in factors]
        factors[0] = factors[0] * np.sign(weights + (weights == 0))
        return factors


def old_decompose(fmt: str):
    """A drop-in for ``tnlayers.formats.<fmt>.decompose`` that runs the old tensorly call."""
    def decompose(tensor, net, **_):
        cores = old_cores(fmt, tensor.numpy(), net)
        return Decomposition([torch.from_numpy(np.ascontiguousarray(c, dtype=np.float64)) for c in cores])
    return decompose


# -- whole network, in a child process --------------------------------------------------------------------------
def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def child(fmt: str, impl: str, warm: str, rank: float, threads: int) -> dict:
    """One ``tensorize`` of a fresh ResNet-18, after a warm-up that loads the libraries (a small conv), or that
    also grows the process's one-time workspace (``warm="big"``: a 512x512x3x3 conv decomposed first)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = resnet18().eval()
    dense_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if impl == "old":
        setattr(get_format(fmt), "decompose", old_decompose(fmt))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        width = 512 if warm == "big" else 8
        tnlayers.tensorize(torch.nn.Sequential(torch.nn.Conv2d(width, width, 3), torch.nn.Linear(2, 2)), format=fmt,
                           rank=rank, init="decompose", progress=False)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before, reset = _kib("VmRSS"), True
    except OSError:
        before, reset = _kib("VmRSS"), False
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tnlayers.tensorize(model, format=fmt, rank=rank, init="decompose", progress=False)
    seconds = time.perf_counter() - start
    peak = _kib("VmHWM")
    errors = {row["name"]: row["error"] for row in tnlayers.summary(model, print_table=False)}
    return dict(seconds=seconds, before_kib=before, peak_kib=peak, peak_reset=reset, dense_bytes=dense_bytes,
                errors=errors)


# glibc returns a freed buffer above this size to the system at once, so the peak RSS is what the tensors needed
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_child(fmt: str, impl: str, args, warm: str = "small", env=None) -> dict:
    command = [sys.executable, __file__, "--child", fmt, impl, warm, "--rank", str(args.rank), "--threads",
               str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def rise(result: dict) -> float:
    return (result["peak_kib"] - result["before_kib"]) / 1024


def whole_network(args) -> dict:
    """{(format, path): [timed runs]}, plus {(format, path, "steady"): [one run]}: the peak after a big warm-up,
    with the live-memory allocator setting."""
    runs = {(fmt, impl): [] for fmt in args.formats for impl in ("old", "new")
            if impl == "new" or fmt in args.old_network}
    for repeat in range(args.repeats):
        for fmt in args.formats:
            impls = [impl for impl in ("old", "new") if (fmt, impl) in runs]
            for impl in impls if repeat % 2 == 0 else impls[::-1]:
                result = run_child(fmt, impl, args)
                runs[(fmt, impl)].append(result)
                print(f"  network {fmt} {impl}: {result['seconds']:.2f} s, peak +{rise(result):.1f} MiB", flush=True)
    for fmt, impl in list(runs):
        result = run_child(fmt, impl, args, "big", LIVE_MALLOC)
        runs[(fmt, impl, "steady")] = [result]
        print(f"  network {fmt} {impl}, steady, live memory: peak +{rise(result):.1f} MiB", flush=True)
    return runs


# -- per distinct layer ------------------------------------------------------------------------------------------
def distinct_layers(fmt: str, rank: float):
    """[(name, count, modes tensor (float64), network)] of the conv layers, one per distinct (shape, ranks)."""
    torch.manual_seed(0)
    dense = resnet18()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shell = tnlayers.tensorize(copy.deepcopy(dense), format=fmt, rank=rank)
    modules, found = dict(dense.named_modules()), {}
    for name, layer in shell.named_modules():
        if hasattr(layer, "network") and hasattr(layer, "_weight_to_modes"):
            key = (layer.network.modes, tuple(sorted(layer.network.ranks.items())))
            if key in found:
                found[key][1] += 1
            else:
                weight = layer._weight_to_modes(modules[name].weight.detach()).to(torch.float64).contiguous()
                found[key] = [name, 1, weight, layer.network]
    return [tuple(v) for v in found.values()]


def relative_error(cores, tensor: torch.Tensor, net) -> float:
    rebuilt = torch.einsum(net.equation(), *[torch.as_tensor(np.asarray(c), dtype=torch.float64) for c in cores])
    return float((rebuilt - tensor).norm() / tensor.norm())


def timed(fn):
    time.sleep(0.3)  # let the other library's OpenMP threads stop spinning (they do, ~0.2 s after a parallel region)
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def per_layer(args) -> dict:
    rows = {}
    for fmt in args.formats:
        rows[fmt] = []
        for i, (name, count, tensor, net) in enumerate(distinct_layers(fmt, args.rank)):
            work = tensor.numel() * (net.sizes["r"] if fmt == "cp" else 1)
            limit = {"cp": args.old_cp_limit, "tucker": args.old_tucker_limit}.get(fmt)
            run_old = limit is None or work <= limit
            order = ["old", "new"] if i % 2 == 0 else ["new", "old"]
            result = {}
            for impl in order:
                if impl == "old" and not run_old:
                    continue
                if impl == "old":
                    cores, seconds = timed(lambda: old_cores(fmt, tensor.numpy(), net))
                else:
                    cores, seconds = timed(lambda: get_format(fmt).decompose(tensor, net).cores)
                result[impl] = (relative_error(cores, tensor, net), seconds)
            rows[fmt].append((name, count, net, result))
            text = ", ".join(f"{k} err {e:.5f} in {s:.2f} s" for k, (e, s) in result.items())
            print(f"  layer {fmt} {name}: {text}", flush=True)
    return rows


# -- report ------------------------------------------------------------------------------------------------------
def machine(args) -> str:
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, numpy {np.__version__}, "
            f"tensorly {_version('tensorly')}, {args.threads} torch threads{load}")


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except ImportError:
        return "not installed"


def _median(values):
    return statistics.median(values) if values else float("nan")


def report(args, network, layers, loads) -> str:
    lines = [f"# Decomposing ResNet-18 at rank {args.rank} (`tensorize(..., init=\"decompose\")`)", "",
             f"- Machine: {machine(args)} (load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end: "
             f"compare the old/new ratios, which interleaving keeps fair, rather than the absolute times)",
             f"- Command: `{' '.join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)}`",
             f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             "- Old: tensorly 'tensor_train' / 'tensor_ring' / 'partial_tucker' (100 sweeps) / 'parafac' (1000 "
             "iterations, line search) on float64 numpy, as tnlayers called them before; new: "
             "`tnlayers.decompositions` (defaults: HOOI <= 10 sweeps, tol 1e-4; CP-ALS <= 100 iterations, tol 1e-6)",
             "", "## Whole network", "",
             f"Time: median over {args.repeats} run(s), each in a fresh process. Memory: the rise of the peak "
             "resident set during `tensorize` above the process with the dense model loaded, x: in units of the dense "
             "model's parameter and buffer bytes. *Fresh*: the timed runs (a fresh process, glibc's default "
             "allocator: includes the one-time growth of the heap and of the libraries' workspaces). *Steady*: one "
             "run after a 512x512x3x3 conv was decomposed first, with `MALLOC_MMAP_THRESHOLD_=65536` (freed "
             "buffers go back to the system at once): what the tensors themselves need.", "",
             "| format | new (s) | old (s) | old / new | new, fresh (MiB, x) | new, steady (MiB, x) | old, fresh "
             "(MiB) | old, steady (MiB) | mean layer error new | old |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fmt in args.formats:
        new, old = network.get((fmt, "new"), []), network.get((fmt, "old"), [])
        t_new, t_old = _median([r["seconds"] for r in new]), _median([r["seconds"] for r in old])
        dense = new[0]["dense_bytes"] / 2 ** 20
        fresh, steady = _median([rise(r) for r in new]), rise(network[(fmt, "new", "steady")][0])
        fresh_old = _median([rise(r) for r in old])
        steady_old = rise(network[(fmt, "old", "steady")][0]) if old else float("nan")
        err_new = statistics.fmean(new[0]["errors"].values())
        err_old = statistics.fmean(old[0]["errors"].values()) if old else float("nan")
        lines.append(f"| {fmt} | {t_new:.2f} | {t_old:.2f} | {t_old / t_new:.2f} | {fresh:.1f} ({fresh / dense:.2f}) "
                     f"| {steady:.1f} ({steady / dense:.2f}) | {fresh_old:.1f} | {steady_old:.1f} | {err_new:.5f} | "
                     f"{err_old:.5f} |".replace("nan", "—"))
    lines += ["", f"Dense model: {network[(args.formats[0], 'new')][0]['dense_bytes'] / 2 ** 20:.1f} MiB. Targets: "
              "<= 30 s for TT, TR, Tucker and <= 60 s for CP on a quiet 2-core machine with 2 threads; peak memory "
              "<= 2x the dense model's, i.e. a rise of at most 1x.", "", "## Per layer", "",
              "One row per distinct layer shape (count: how many layers of ResNet-18 have it). Error: relative "
              "Frobenius error in float64; ratio: new / old (target <= 1.01). Old CP/Tucker only where they finish "
              f"in reasonable time (CP: weight entries x rank <= {args.old_cp_limit:,}; Tucker: weight entries <= "
              f"{args.old_tucker_limit:,}).", ""]
    for fmt in args.formats:
        lines += [f"### {fmt}", "", "| layer | modes | ranks | count | old error | new error | new / old | old (s) | "
                  "new (s) | old / new time |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        worst = 0.0
        for name, count, net, result in layers[fmt]:
            e_new, s_new = result["new"]
            e_old, s_old = result.get("old", (float("nan"), float("nan")))
            ratio = e_new / e_old if "old" in result else float("nan")
            worst = max(worst, ratio) if "old" in result else worst
            ranks = ", ".join(str(r) for r in dict(net.ranks).values())
            lines.append(f"| {name} | {'x'.join(map(str, net.modes))} | {ranks} | {count} | {e_old:.5f} | "
                         f"{e_new:.5f} | {ratio:.4f} | {s_old:.2f} | {s_new:.2f} | {s_old / s_new:.1f} |"
                         .replace("nan", "—"))
        lines += ["", f"Worst new / old error ratio ({fmt}): {worst:.4f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--repeats", type=int, default=3, help="whole-network runs per format and path")
    parser.add_argument("--old-network", nargs="*", default=["tt", "tr"], choices=FORMATS,
                        help="formats whose old path also runs on the whole network (Tucker: minutes; CP: hours)")
    parser.add_argument("--old-cp-limit", type=int, default=3_000_000, help="old CP-ALS only on layers with weight "
                        "entries x rank up to this")
    parser.add_argument("--old-tucker-limit", type=int, default=2_400_000, help="old HOOI only on layers with up to "
                        "this many weight entries")
    parser.add_argument("--quick", action="store_true", help="1 whole-network run per path, the old CP/Tucker on "
                        "small layers only")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/local/decompose.md, "
                        "git-ignored; name benchmarks/results/decompose.md to update the committed table)")
    parser.add_argument("--child", nargs=3, metavar=("FORMAT", "PATH", "WARM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.rank, args.threads)))
        return
    if args.quick:
        args.repeats, args.old_cp_limit, args.old_tucker_limit = 1, 1_100_000, 150_000
    torch.set_num_threads(args.threads)
    loads = [os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")]
    print("whole network:", flush=True)
    network = whole_network(args)
    print("per layer:", flush=True)
    layers = per_layer(args)
    loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    text = report(args, network, layers, loads)
    print(text)
    out = Path(args.out) if args.out else default_out("decompose.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
