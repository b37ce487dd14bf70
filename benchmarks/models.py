"""Whole networks: the model zoo's ResNets dense and in every tensorized format, train step and eval, eager and
``torch.compile``, peak memory, and a profile of where a train step's time goes.

    python benchmarks/models.py --quick                  # ResNet-20 only; writes benchmarks/results/local/models_cpu.md
    python benchmarks/models.py --models resnet20 --repeats 3       # all formats, eager and compiled
    python benchmarks/models.py --models resnet18 --modes eager --repeats 2
    python benchmarks/models.py --device cuda --quick

Models: CIFAR ResNet-20 / ResNet-32 (batch 128, 32x32) and ResNet-18 (10 classes, batch 32, 64x64), from
``tnlayers.models``; ``--batch`` / ``--size`` override (the demo's setting: ``--size 8 --batch 64 --tr-ranks 8``).
Variants of each: dense; TR at ``--tr-ranks`` (int ranks on the paper's Table 8 shapes: 15 is the paper's,
10 the rank first measured) on the CIFAR nets; TT, CP, Tucker (and TR on ResNet-18) at ``--ranks``, fractions
of each conv's parameters (10% / 25%); on ResNet-18 also the paper's TT at Table 9 ranks. Every conv is
tensorized (``tensorize``'s default: the classifier stays dense), ``strategy="auto"``. ``--batched-weights``
adds each tensorized variant once more with ``tnlayers.set_batched_weights`` (labelled ``tr+batched 8``), so both
rebuild modes are measured side by side in one run.

Each configuration (model, variant, eager or compiled) runs in its own process: one eager train step and
eval forward first (``auto`` times its choices there; a compiled model then uses those choices), for
``compile`` the first compiled train step and eval forward are timed as compile time (one cache folder per
run: the first process compiles cold, later ones hit the cache), then ``--warmup`` untimed and ``--steps``
timed eval forwards (eval mode, no_grad) and train steps (SGD with momentum: zero_grad, forward,
cross-entropy, backward, step). Processes run in ``--repeats`` rounds, each round in a fresh random order
(eager configurations first, dense first in each mode), so background load hits all alike; the minimum over
every timed call of every round is reported, and "x dense" divides it by the dense model's minimum in the same
mode. ``--clock cpu`` compares the processes' CPU time instead of wall time: on a machine shared with other
jobs, with ``--threads 1``, it counts each process's own work only (with 2 threads, OpenMP's waiting threads
spin, and other jobs stretch the waits).

Memory, training: CPU: the peak resident set during the timed train steps (Linux VmHWM, reset through
/proc/self/clear_refs before them), and its rise above the process before the first forward (model, data
and libraries loaded); CUDA: ``torch.cuda.max_memory_allocated`` over the same steps, and its rise above
``memory_allocated`` before the first forward. Eager runs also count the bytes autograd saves for backward
in one training forward (unique storages, parameters excluded): what the graph holds, whatever the
allocator does. ``--keep-freed-memory`` (default on; glibc): freed buffers are reused, not unmapped, as the
README advises for CPU training (see _memory.py). The profile (``benchmarks/_profile_model.py``) runs the
dense model and ``--profile`` variants of the first model under torch.profiler.

Targets (CIFAR ResNet-20, batch 128, eager, 2 threads): every variant's train step and eval <= 1.0x dense;
TT/CP/Tucker at 10% <= 0.5x dense train step; peak training memory <= dense; compiled faster than eager.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tnlayers  # noqa: E402
from _memory import FLAG_HELP, keep_freed_memory  # noqa: E402
from _models_report import code_version, write_outputs  # noqa: E402
from _output import default_out  # noqa: E402
from tnlayers.models import TABLE9, cifar_resnet, resnet18, resnet20, resnet32  # noqa: E402

# name: (builder, batch, image size)
MODELS = {"resnet20": (lambda: resnet20(), 128, 32), "resnet32": (lambda: resnet32(), 128, 32),
          "resnet18": (lambda: resnet18(num_classes=10), 32, 64),
          "tiny": (lambda: cifar_resnet(8, widths=(4, 8, 16)), 8, 16)}  # tiny: a ResNet-8 for the tests
FORMATS = ("tt", "tr", "cp", "tucker")
MODES = ("eager", "compile")
SGD = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
BATCHED = "+batched"  # a variant's format with this suffix: the same model with tnlayers.set_batched_weights


def variants(model: str, args) -> list:
    """[(format, rank)] of one model, dense first; rank: an int (TR on the CIFAR nets), a fraction, or
    "table9" (the paper's TT-ResNet-18)."""
    out = [("dense", None)]
    for fmt in args.formats:
        if model == "resnet18" and fmt == "tt" and not args.no_table9:
            out.append(("tt", "table9"))
        ranks = args.tr_ranks if fmt == "tr" and model != "resnet18" else args.ranks
        out += [(fmt, rank) for rank in ranks]
    if getattr(args, "batched_weights", False):  # each tensorized variant twice: per-layer and batched rebuilds
        out = [v for f, r in out for v in ([(f, r)] if f == "dense" else [(f, r), (f + BATCHED, r)])]
    return out


def label(fmt: str, rank) -> str:
    return fmt if rank is None else f"{fmt} {rank}"


def build(model: str, fmt: str, rank, device) -> torch.nn.Module:
    """``fmt`` may end in ``+batched``: then with ``tnlayers.set_batched_weights``."""
    torch.manual_seed(0)
    net = MODELS[model][0]()
    fmt, batched = base_format(fmt), fmt.endswith(BATCHED)
    if fmt != "dense":
        with warnings.catch_warnings():  # Table 8's stem, Table 9's r1 > C_in: they warn, known (the paper's)
            warnings.simplefilter("ignore")
            net = tnlayers.tensorize(net, format=fmt, rank=TABLE9 if rank == "table9" else rank)
    if batched:
        tnlayers.set_batched_weights(net)
    return net.to(device)


def base_format(fmt: str) -> str:
    return fmt[:-len(BATCHED)] if fmt.endswith(BATCHED) else fmt


def batch_of(model: str, args, device):
    """A fixed random batch (inputs, labels) of the model's default or the asked size."""
    _, batch, size = MODELS[model]
    batch, size = args.batch or batch, args.size or size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    return x, torch.randint(0, 10, (batch,), generator=gen).to(device)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(run, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(run(x), y).backward()
    opt.step()


def eval_forward(model, run, x) -> None:
    model.eval()
    with torch.no_grad():
        run(x)
    model.train()


def timed(fn, device) -> tuple:
    """(wall seconds, this process's CPU seconds) of one call. On a loaded machine a single-threaded process's CPU
    time still counts its own work only, where its wall time also counts the other jobs' turns."""
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


class PeakMemory:
    """Bytes now and the peak since ``reset``: resident set on CPU (VmRSS / VmHWM), allocated on CUDA."""

    def __init__(self, device):
        self.device, self.reset_works = device, True
        self.before = self.current()

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"no {field} in /proc/self/status")

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._status("VmRSS")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak resident set (VmHWM) restarts from the current one
        except OSError:
            self.reset_works = False  # the peak is then the process's whole life: said in the report

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._status("VmHWM")


def saved_bytes(model, x, y) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    del loss
    return sum(seen.values())


def strategies(model) -> dict:
    """{"dense": n, "factorized": n}: what the tensorized layers ran in their last eager forward."""
    counts = {}
    for m in model.modules():
        if getattr(m, "last_strategy", None):
            counts[m.last_strategy] = counts.get(m.last_strategy, 0) + 1
    return counts


def prepare(spec: dict):
    """(device, model, x, y, SGD optimizer) of one configuration, with this process's threads and allocator set."""
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    if spec["keep_freed_memory"]:
        keep_freed_memory()
    model = build(spec["model"], spec["format"], spec["rank"], device)
    if spec.get("recompute"):
        tnlayers.set_recompute(model)
    x, y = batch_of(spec["model"], argparse.Namespace(batch=spec["batch"], size=spec["size"]), device)
    return device, model, x, y, torch.optim.SGD(model.parameters(), **SGD)


def child(spec: dict) -> dict:
    """One configuration in this process: the timed calls, memory and, for compile, the compile time."""
    device, model, x, y, opt = prepare(spec)
    memory = PeakMemory(device)
    out = dict(spec=spec, params=sum(p.numel() for p in model.parameters()), batch=x.shape[0], size=x.shape[-1])
    # eager first calls: "auto" decides here (timing both strategies once per shape and grad mode)
    out["first_train_s"] = timed(lambda: train_step(model, opt, x, y), device)[0]
    out["strategies_train"] = strategies(model)
    out["first_eval_s"] = timed(lambda: eval_forward(model, model, x), device)[0]
    out["strategies_eval"] = strategies(model)
    run = model
    if spec["mode"] == "compile":
        run = torch.compile(model)
        out["compile_train_s"] = timed(lambda: train_step(run, opt, x, y), device)[0]
        out["compile_eval_s"] = timed(lambda: eval_forward(model, run, x), device)[0]
    for _ in range(spec["warmup"]):
        train_step(run, opt, x, y)
        eval_forward(model, run, x)
    out["eval_s"], out["eval_cpu_s"] = zip(*[timed(lambda: eval_forward(model, run, x), device)
                                             for _ in range(spec["steps"])])
    memory.reset()
    out["train_s"], out["train_cpu_s"] = zip(*[timed(lambda: train_step(run, opt, x, y), device)
                                               for _ in range(spec["steps"])])
    out.update(before_bytes=memory.before, peak_bytes=memory.peak(), peak_reset=memory.reset_works)
    if spec["mode"] == "eager":
        out["saved_bytes"] = saved_bytes(model, x, y)
    return out


def run_child(spec: dict, env: dict, timeout: float, profile: bool = False) -> dict:
    flag = "--profile-child" if profile else "--child"
    command = [sys.executable, str(Path(__file__).resolve()), flag, json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
    except subprocess.TimeoutExpired:
        return dict(spec=spec, error=f"timed out after {timeout:.0f} s")
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        return dict(spec=spec, error=f"exit {done.returncode}: {lines[-1][:300]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def configurations(args) -> list:
    return [dict(model=model, format=fmt, rank=rank, mode=mode)
            for model in args.models for fmt, rank in variants(model, args) for mode in args.modes
            if mode == "eager" or base_format(fmt) in args.compile_formats]


def key(spec: dict) -> str:
    return f"{spec['model']} | {label(spec['format'], spec['rank'])} | {spec['mode']}"


def run_all(args, write) -> dict:
    """{configuration key: [child results]} over interleaved rounds; ``write(results)`` after every process, so a
    run stopped by --budget or killed still leaves what it measured."""
    common = dict(device=args.device, threads=args.threads, warmup=args.warmup, steps=args.steps,
                  batch=args.batch, size=args.size, keep_freed_memory=args.keep_freed_memory,
                  recompute=args.recompute)
    env = {"TORCHINDUCTOR_CACHE_DIR": args.cache_dir}
    configs, rng = configurations(args), random.Random(0)
    results, start = {key(c): [] for c in configs}, time.perf_counter()
    for round_ in range(args.repeats):
        # per mode, dense first (what a budget-cut run needs most), the rest in a fresh random order
        shuffled = sorted(rng.sample(configs, len(configs)), key=lambda c: c["format"] != "dense")
        order = [c for mode in MODES for c in shuffled if c["mode"] == mode]
        for config in order:
            if args.budget and time.perf_counter() - start > args.budget:
                print(f"--budget {args.budget:g} s spent: stopping in round {round_ + 1}", flush=True)
                return results
            result = run_child({**config, **common}, env, args.child_timeout)
            results[key(config)].append(result)
            if "error" in result:
                print(f"  {key(config)}: FAILED {result['error']}", flush=True)
            else:
                print(f"  {key(config)}: train {min(result['train_s']) * 1e3:.1f} ms, eval "
                      f"{min(result['eval_s']) * 1e3:.1f} ms, peak {result['peak_bytes'] / 2 ** 20:.0f} MiB"
                      + (f", compile {result['compile_train_s']:.1f} + {result['compile_eval_s']:.1f} s"
                         if "compile_train_s" in result else ""), flush=True)
            write(results)
    return results


def profile_choices(args) -> list:
    """[(format, rank)] to profile on the first model: dense, then ``--profile``'s variants (default: the first TR
    variant, the format the first measurements found slowest against dense, else the first tensorized one)."""
    found = variants(args.models[0], args)
    names = args.profile
    if names is None:
        names = [label(*next((v for v in found if v[0] == "tr"), found[min(1, len(found) - 1)]))]
    known = {label(f, r): (f, r) for f, r in found}
    missing = [name for name in names if name not in known]
    if missing:
        raise ValueError(f"--profile {missing}: not a variant of {args.models[0]}; its variants: {list(known)}")
    return [known[name] for name in dict.fromkeys(["dense", *names])] if names else []


def profiles(args, chosen: list) -> list:
    """Each chosen variant of the first model profiled in its own process."""
    spec = dict(model=args.models[0], device=args.device, threads=args.threads, batch=args.batch, size=args.size,
                keep_freed_memory=args.keep_freed_memory, steps=args.profile_steps, clock=args.clock,
                recompute=args.recompute)
    return [run_child({**spec, "format": f, "rank": r}, {}, args.child_timeout, profile=True) for f, r in chosen]


def parse_rank(text: str):
    value = float(text)
    return int(value) if value >= 1 and value == int(value) else value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet32", "resnet18"], choices=list(MODELS))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS, help="besides dense")
    parser.add_argument("--ranks", nargs="+", type=parse_rank, default=[0.1, 0.25],
                        help="TT/CP/Tucker (and TR on ResNet-18): fractions of each conv's parameters")
    parser.add_argument("--tr-ranks", nargs="+", type=parse_rank, default=[10, 15],
                        help="TR on the CIFAR nets: int ranks on Table 8's shapes (15: the paper's)")
    parser.add_argument("--no-table9", action="store_true", help="ResNet-18: leave out the paper's TT (Table 9)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--compile-formats", nargs="+", default=["dense", *FORMATS], choices=["dense", *FORMATS],
                        help="which variants also run compiled (compiling costs ~10-60 s a process)")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 (CIFAR nets), 32 (ResNet-18)")
    parser.add_argument("--size", type=int, default=None, help="image side; default 32 (CIFAR nets), 64 (ResNet-18)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in every process")
    parser.add_argument("--repeats", type=int, default=3, help="rounds: processes per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed train steps and eval calls per process")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps and eval calls per process")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="what the tables compare: wall "
                        "time, or the process's CPU time (CPU only; with --threads 1 it is robust to other jobs)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which no further process starts (what ran is reported)")
    parser.add_argument("--child-timeout", type=float, default=1800.0, help="seconds one process may take")
    parser.add_argument("--profile", nargs="*", default=None,
                        help='variants of the first model to profile next to dense, e.g. "tr 10" "tt 0.1" (default: '
                        'its first TR variant, else its first tensorized one); the flag alone: no profile')
    parser.add_argument("--profile-steps", type=int, default=3, help="train steps under the profiler")
    parser.add_argument("--recompute", action="store_true", help="tnlayers.set_recompute on every tensorized "
                        "model: factorized layers rerun their chain in backward instead of saving its intermediates")
    parser.add_argument("--batched-weights", action="store_true", help="also each tensorized variant with "
                        "tnlayers.set_batched_weights (labelled '<format>+batched'): same-shape layers rebuild their "
                        "weights in one contraction per step")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True, help=FLAG_HELP)
    parser.add_argument("--quick", action="store_true", help="defaults for a short run: ResNet-20, ranks 0.1 and TR "
                        "10, 2 rounds (CUDA: 1, a process there starts slower) of 2 warm-up and 5 timed steps")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/local/"
                        "models_<device>.md, git-ignored; a .json next to it; name a committed file to update it)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.profile_child:
        from _profile_model import profile_child
        print(json.dumps(profile_child(json.loads(args.profile_child), prepare)))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    if args.device.startswith("cuda") and args.clock == "cpu":
        parser.error("--clock cpu times CPU work; on --device cuda the step times are wall times (synchronized)")
    if args.quick:  # other defaults; what the command line names still counts
        parser.set_defaults(models=["resnet20"], ranks=[0.1], tr_ranks=[10], steps=5, warmup=2,
                            repeats=1 if args.device.startswith("cuda") else 2)
        args = parser.parse_args(argv)
    for name in ("repeats", "steps", "threads", "profile_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        chosen = profile_choices(args)
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out) if args.out else default_out(f"models_{torch.device(args.device).type}.md")
    loads = [os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")]
    names = {model: [label(f, r) for f, r in variants(model, args)] for model in args.models}
    args.code = code_version()  # once, at the start: what the processes ran
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tnlayers-inductor-") as cache:
        args.cache_dir = cache  # this run's compile cache: its first compiled process compiles cold
        results = run_all(args, lambda r: write_outputs(args, names, r, [], loads, out, quiet=True))
    spent = args.budget and time.perf_counter() - start > args.budget
    if spent and chosen:
        print(f"--budget {args.budget:g} s spent: no profile", flush=True)
    profiled = [] if spent else profiles(args, chosen)
    loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    write_outputs(args, names, results, profiled, loads, out)


if __name__ == "__main__":
    main()
