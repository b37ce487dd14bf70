"""The tables of benchmarks/models.py: per model, time (train step, eval; eager and compiled; x dense) and memory,
then the targets and the profile; the same figures as JSON next to the markdown."""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from _machine import cpu_name
from _memory import NOTE
from _profile_model import format_profiles

MIB = 2 ** 20


def ok(runs: list) -> list:
    return [r for r in runs if "error" not in r]


def best(runs: list, field: str):
    """The minimum over every timed call of every process, seconds; None when nothing ran."""
    values = [min(r[field]) for r in ok(runs)]
    return min(values) if values else None


def paired(runs_a: list, runs_b: list, field: str):
    """Median over rounds of (a's minimum / b's minimum in the same round): background load drifts between
    rounds, a ratio within one round cancels it. None without a round where both ran."""
    ratios = [min(a[field]) / min(b[field]) for a, b in zip(runs_a, runs_b) if "error" not in a and "error" not in b]
    return statistics.median(ratios) if ratios else None


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _ratio(a, b) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def _both(runs, dense, field) -> str:
    """"min / paired" ratio against dense."""
    a, b, p = best(runs, field), best(dense, field), paired(runs, dense, field)
    return "-" if a is None or b is None else f"{a / b:.2f} / {'-' if p is None else f'{p:.2f}'}"


def _peak(runs, field="peak_bytes"):
    values = [r[field] for r in ok(runs) if r.get(field) is not None]
    return min(values) if values else None


def _rise(runs):
    values = [r["peak_bytes"] - r["before_bytes"] for r in ok(runs)]
    return min(values) if values else None


def _mib(value) -> str:
    if value is None:
        return "-"
    return f"{value / MIB:.0f}" if value >= 100 * MIB else f"{value / MIB:.2g}" if value < MIB else f"{value / MIB:.1f}"


def _layers(runs) -> str:
    if not ok(runs):
        return "-"
    train, infer = ok(runs)[0]["strategies_train"], ok(runs)[0]["strategies_eval"]
    if not train and not infer:
        return "-"
    return f"{train.get('dense', 0)}/{train.get('factorized', 0)}, {infer.get('dense', 0)}/{infer.get('factorized', 0)}"


def _compile_times(runs) -> str:
    done = ok(runs)
    if not done:
        return "-"
    first = f"{done[0]['compile_train_s']:.0f} + {done[0]['compile_eval_s']:.0f}"
    if len(done) == 1:
        return first
    later = min(done[1:], key=lambda r: r["compile_train_s"] + r["compile_eval_s"])
    return f"{first} / {later['compile_train_s']:.0f} + {later['compile_eval_s']:.0f}"


def code_version() -> str:
    """The commit measured, and whether tnlayers/ had uncommitted changes then (a figure belongs to the code)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tnlayers"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    if not commit:
        return "not a git checkout"
    return f"git {commit}" + (" with uncommitted changes under tnlayers/" if dirty else "")


def machine(args, loads) -> str:
    device = torch.device(args.device)
    text = f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {args.threads} torch threads"
    if device.type == "cuda":
        text = f"GPU {torch.cuda.get_device_name(device)}; host {text}"
    if args.keep_freed_memory:
        text += f"; {NOTE}"
    if getattr(args, "recompute", False):
        text += "; --recompute: tnlayers.set_recompute on every tensorized model"
    end = "still running" if len(loads) < 2 else f"{loads[1]:.1f} at the end"
    return (text + f"; load average {loads[0]:.1f} at the start, {end} (a shared machine: compare the ratios, "
            "measured side by side in interleaved processes, rather than absolute times)")


def model_section(args, model: str, variants: list, results: dict) -> tuple:
    """(markdown lines, {variant: figures}) of one model."""
    def runs(name, mode):
        return results.get(f"{model} | {name} | {mode}", [])
    dense_e, dense_c = runs("dense", "eager"), runs("dense", "compile")
    train, infer = ("train_cpu_s", "eval_cpu_s") if getattr(args, "clock", "wall") == "cpu" else ("train_s", "eval_s")
    memory = "peak allocated (MiB)" if args.device.startswith("cuda") else "peak RSS (MiB)"
    time_rows = ["| variant | params | layers dense/factorized (train, eval) | train eager ms | x dense (min / paired) "
                 "| train compiled ms | x dense compiled | compiled / eager | eval eager ms | x dense | eval compiled "
                 "ms | x dense compiled | compiled / eager |",
                 "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    mem_rows = [f"| variant | training {memory}, eager | x dense | rise | rise x dense | saved for backward (MiB) | "
                f"x dense | training {memory}, compiled | rise | compile s, train + eval (first / later process) | "
                "failures |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    figures = {}
    for name in variants:
        eager, comp = runs(name, "eager"), runs(name, "compile")
        params = next((r["params"] for r in ok(eager) + ok(comp)), None)
        te, tc, ee, ec = best(eager, train), best(comp, train), best(eager, infer), best(comp, infer)
        time_rows.append(
            f"| {name} | {'-' if params is None else f'{params:,}'} | {_layers(eager)} | {_ms(te)} | "
            f"{_both(eager, dense_e, train)} | {_ms(tc)} | {_both(comp, dense_c, train)} | {_ratio(tc, te)} | "
            f"{_ms(ee)} | {_both(eager, dense_e, infer)} | {_ms(ec)} | {_both(comp, dense_c, infer)} | "
            f"{_ratio(ec, ee)} |")
        errors = "; ".join(sorted({f"{r['spec']['mode']}: {r['error']}" for r in eager + comp if "error" in r}))
        saved, saved_dense = _peak(eager, "saved_bytes"), _peak(dense_e, "saved_bytes")
        mem_rows.append(
            f"| {name} | {_mib(_peak(eager))} | {_ratio(_peak(eager), _peak(dense_e))} | {_mib(_rise(eager))} | "
            f"{_ratio(_rise(eager), _rise(dense_e))} | {_mib(saved)} | {_ratio(saved, saved_dense)} | "
            f"{_mib(_peak(comp))} | {_mib(_rise(comp))} | {_compile_times(comp)} | {errors or '-'} |")
        figures[name] = dict(params=params, train_eager_s=te, train_compiled_s=tc, eval_eager_s=ee,
                             eval_compiled_s=ec, peak_eager_bytes=_peak(eager), rise_eager_bytes=_rise(eager),
                             saved_bytes=saved, peak_compiled_bytes=_peak(comp),
                             paired_train_eager=paired(eager, dense_e, train),
                             paired_eval_eager=paired(eager, dense_e, infer),
                             paired_train_compiled=paired(comp, dense_c, train))
    any_run = next((r for v in variants for m in ("eager", "compile") for r in ok(runs(v, m))), None)
    shape = "" if any_run is None else f", batch {any_run['batch']}, {any_run['size']}x{any_run['size']}"
    lines = [f"## {model}{shape}", "", "### Time", ""] + time_rows + ["", "### Memory", ""] + mem_rows
    return lines + [""] + targets(figures), figures


def targets(figures: dict) -> list:
    """The targets of the module docstring, judged on the ratios of minimums; a variant without both figures is
    listed as not measured, never as met."""
    dense = figures.get("dense", {})

    def verdict(pairs, limit, numerator, denominator):
        """pairs: [(name, figures)]; MISSED where numerator > limit x denominator."""
        bad = [f"{n} {f[numerator] / base[denominator]:.2f}" for n, f, base in pairs
               if f.get(numerator) and base.get(denominator) and f[numerator] > limit * base[denominator]]
        absent = [n for n, f, base in pairs if not (f.get(numerator) and base.get(denominator))]
        text = "MISSED: " + ", ".join(bad) if bad else "met" if len(absent) < len(pairs) else "not measured"
        return text + (f" (not measured: {', '.join(absent)})" if absent and len(absent) < len(pairs) else "")
    tensorized = [(n, f, dense) for n, f in figures.items() if n != "dense"]
    tenth = [t for t in tensorized  # ("tt+batched 0.1" counts too)
             if t[0].split()[0].split("+")[0] in ("tt", "cp", "tucker") and t[0].split()[-1] == "0.1"]
    own = [(n, f, f) for n, f, _ in tensorized]
    return [f"- Eager train step <= 1.0x dense: {verdict(tensorized, 1.0, 'train_eager_s', 'train_eager_s')}",
            f"- Eager eval <= 1.0x dense: {verdict(tensorized, 1.0, 'eval_eager_s', 'eval_eager_s')}",
            f"- TT/CP/Tucker at 10%: eager train step <= 0.5x dense: "
            f"{verdict(tenth, 0.5, 'train_eager_s', 'train_eager_s')}",
            f"- Peak training memory (eager) <= dense: "
            f"{verdict(tensorized, 1.0, 'peak_eager_bytes', 'peak_eager_bytes')}",
            f"- Compiled train step faster than eager (tensorized): "
            f"{verdict(own, 0.999999, 'train_compiled_s', 'train_eager_s')}", ""]


def write_outputs(args, names: dict, results: dict, profiled: list, loads: list, out: Path, quiet: bool = False) -> str:
    """Write the markdown and JSON; ``names``: {model: [variant labels]}, dense first."""
    steps = "" if args.device.startswith("cuda") else \
        "; the process's CPU time (--clock cpu)" if args.clock == "cpu" else "; wall time"
    lines = ["# Whole networks: dense vs tensorized, train step and eval, eager and compiled", "",
             f"- Machine: {machine(args, loads)}",
             f"- Command: `{' '.join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)}`",
             f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; code: {args.code}",
             f"- Each configuration in its own process, {args.repeats} interleaved round(s) of {args.warmup} warm-up "
             f"and {args.steps} timed train steps and eval calls; minimum over all timed calls{steps}. x dense: "
             "ratio of the minimums / median of per-round ratios (paired). Train step: SGD (lr 0.01, momentum 0.9, "
             "wd 5e-4) zero_grad + forward + cross-entropy + backward + step; eval: eval mode under no_grad. Compiled: "
             "`torch.compile(model)` (default mode) after one eager train step and eval call (auto's timed choices); "
             "its compile time is excluded from the step times. Layers: tensorized layers that ran dense / factorized.",
             "- Memory: peak during the timed train steps; rise: above the process before its first forward "
             "(model, data and libraries loaded). Saved for backward: distinct non-parameter storages autograd "
             "keeps after one training forward (eager).", ""]
    figures = {}
    for model, variants in names.items():
        section, figures[model] = model_section(args, model, variants, results)
        lines += section
    lines += format_profiles(profiled)
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "profile_child", "cache_dir")}
    out.with_suffix(".json").write_text(json.dumps(dict(
        command=sys.argv, machine=machine(args, loads), settings=settings, loads=loads, figures=figures,
        runs=results, profiles=profiled), indent=1, default=str))
    if not quiet:
        print(text)
        print(f"written to {out} and {out.with_suffix('.json')}")
    return text
