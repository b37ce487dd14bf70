"""Does DAS buy robustness to noisy labels, and at what cost? SGD vs SAM vs GSAM vs DAS vs BAR, with error bars.

    python benchmarks/label_noise.py                     # the full study: benchmarks/results/local/label_noise.md
    python benchmarks/label_noise.py --out benchmarks/results/label_noise.md
    python benchmarks/label_noise.py --quick             # seconds: a smoke run of the whole pipeline

Grid: {TR-ResNet-20 at the paper's rank 15 (its Table 8 shapes, all convs), TT-ResNet-20 at 10% of the conv
parameters} x symmetric label noise {0, 20%, 40%} x seeds 0-4 x {SGD, SAM, GSAM, DAS, BAR}.
Data: scikit-learn's bundled 8x8 handwritten digits (1437 train / 360 test), the only real image set that ships
with a package this project already uses (no download); CIFAR-10 would need one. The split is fixed; a seed sets
the initialization, the data order, the crops and which labels are flipped, identically for every optimizer, so
the optimizers are compared in pairs (same seed = same everything else).
Recipe: ``examples/train_cifar.py`` (its ``train``, not a copy): the paper's CIFAR hyper-parameters (SGD lr 0.1,
cosine, momentum 0.9, weight decay 5e-4, batch 128, SAM/GSAM rho 0.05, GSAM alpha 0.1, DAS/BAR alpha 0.1) for 30
epochs (360 steps), random crops (no flips: a mirrored digit is not a digit). Reported: test accuracy on the clean
test labels after the last epoch (no early stopping: choosing an epoch by test accuracy would flatter the noisiest
runs), the mean norm deviation Q over the core groups at the end, the median step time and the run's wall time.
Significance: per cell, the paired differences over seeds of DAS - SGD, SAM - SGD, DAS - SAM (and BAR, GSAM -
SGD): mean, a paired t-test's two-sided p-value and a 95% bootstrap interval of the mean difference.

Runs go to a JSON file next to the table as they finish; rerunning with the same output continues where it
stopped (``--fresh`` starts over).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import shlex
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this file lies in, before site-packages
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_name  # noqa: E402
from _output import default_out  # noqa: E402

OPTIMIZERS = ("sgd", "sam", "gsam", "das", "bar")
NAMES = {"sgd": "SGD", "sam": "SAM", "gsam": "GSAM", "das": "DAS", "bar": "BAR"}
MODELS = {"TR-ResNet-20 r15": ("tr", "15"), "TT-ResNet-20 0.1": ("tt", "0.1")}
PAIRS = (("das", "sgd"), ("sam", "sgd"), ("das", "sam"), ("bar", "sgd"), ("gsam", "sgd"))
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_cifar.py"


def _train_cifar():
    spec = importlib.util.spec_from_file_location("train_cifar", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_one(task: dict) -> dict:
    """One training run (in a worker process, one thread): the last epoch's numbers and the wall time."""
    import torch

    threads = torch.get_num_threads()  # train() sets one thread (--threads 1); given back for --jobs 1
    train_cifar = _train_cifar()
    fmt, rank = MODELS[task["model"]]
    argv = ["--dataset", "digits", "--model", "resnet20", "--format", fmt, "--rank", rank, "--optimizer",
            task["optimizer"], "--label-noise", str(task["noise"]), "--seed", str(task["seed"]), "--epochs",
            str(task["epochs"]), "--augment", "crop", "--threads", "1"]
    if task.get("max_steps"):
        argv += ["--max-steps", str(task["max_steps"])]
    start = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # not the per-epoch lines
        warnings.simplefilter("ignore")  # the stem's TR layer is larger than its conv (Table 8 shapes): known
        try:
            history = train_cifar.train(train_cifar.parse_args(argv), write_results=False)
        finally:
            torch.set_num_threads(threads)
    last = history[-1]
    return dict(task, accuracy=last["test_accuracy"], mean_Q=last["mean_Q"], train_loss=last["train_loss"],
                step_ms=statistics.median(h["step_ms"] for h in history if h["step_ms"] is not None),
                wall_s=time.perf_counter() - start)


def key(run: dict) -> tuple:
    return run["model"], run["noise"], run["optimizer"], run["seed"]


def paired(a: list, b: list, rng: np.random.Generator) -> dict:
    """Mean of a - b over paired seeds, the paired t-test's two-sided p-value and a 95% bootstrap interval."""
    d = np.asarray(a) - np.asarray(b)
    out = dict(mean=float(d.mean()), n=len(d))
    if len(d) < 2:
        return dict(out, p=float("nan"), low=float("nan"), high=float("nan"))
    sd = d.std(ddof=1)
    if sd == 0:  # every seed gave the same difference: no t statistic
        p = 1.0 if d.mean() == 0 else float("nan")
    else:
        from scipy import stats  # scikit-learn's dependency, so present wherever the digits are
        p = float(stats.ttest_rel(a, b).pvalue)
    means = d[rng.integers(0, len(d), (10000, len(d)))].mean(1)
    return dict(out, p=p, low=float(np.quantile(means, 0.025)), high=float(np.quantile(means, 0.975)))


def summarize(runs: list, seeds: list) -> tuple:
    by = {key(r): r for r in runs}
    rows, tests = [], []
    rng = np.random.default_rng(0)
    cells = sorted({(r["model"], r["noise"]) for r in runs}, key=lambda c: (list(MODELS).index(c[0]), c[1]))
    for model, noise in cells:
        sgd_ms = [by[(model, noise, "sgd", s)]["step_ms"] for s in seeds if (model, noise, "sgd", s) in by]
        for opt in OPTIMIZERS:
            got = [by[(model, noise, opt, s)] for s in seeds if (model, noise, opt, s) in by]
            if not got:
                continue
            acc = [100 * r["accuracy"] for r in got]
            ms = [r["step_ms"] for r in got]
            rows.append(dict(model=model, noise=noise, optimizer=opt, n=len(got), acc=statistics.fmean(acc),
                             acc_sd=statistics.stdev(acc) if len(acc) > 1 else 0.0,
                             Q=statistics.fmean(r["mean_Q"] for r in got), step_ms=statistics.median(ms),
                             x_sgd=statistics.median(ms) / statistics.median(sgd_ms) if sgd_ms else float("nan"),
                             wall_s=statistics.fmean(r["wall_s"] for r in got)))
        for a, b in PAIRS:
            both = [s for s in seeds if (model, noise, a, s) in by and (model, noise, b, s) in by]
            if both:
                result = paired([100 * by[(model, noise, a, s)]["accuracy"] for s in both],
                                [100 * by[(model, noise, b, s)]["accuracy"] for s in both], rng)
                tests.append(dict(model=model, noise=noise, pair=f"{NAMES[a]} - {NAMES[b]}", **result))
    return rows, tests


def machine_line(load: float) -> str:
    import torch
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, 1 thread per run; load "
            f"average {load:.1f} when the last run finished")


def holm(pvalues: list) -> list:
    """Holm-Bonferroni adjusted p-values (controls the chance of any false positive over all the tests)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [float("nan")] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        if not math.isnan(pvalues[i]):
            running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
            adjusted[i] = running
    return adjusted


def write_table(rows: list, tests: list, args, log: dict, out: Path) -> None:
    lines = ["# Label noise: SGD, SAM, GSAM, DAS and BAR on tensorized ResNet-20, scikit-learn digits", "",
             f"- Command: `{args.command}`", f"- Machine: {machine_line(log['load'])}; {args.jobs} runs at a time",
             f"- Time: {args.n_runs} runs, {sum(r['wall_s'] * r['n'] for r in rows) / 60:.0f} min of run time in "
             f"all, {log['elapsed_s'] / 60:.0f} min of wall time; other jobs shared the 2 cores, so the times "
             "(and the x SGD ratios of single cells) are rough: the step-time ratios of benchmarks/step_time.py, "
             "measured interleaved, are the ones to quote",
             f"- Setting: {args.epochs} epochs of batch 128 on the 1437 training digits (8x8, random crops), clean "
             f"360-image test set; symmetric label noise (a flipped label is any other class, uniformly); seeds "
             f"{args.seeds[0]}-{args.seeds[-1]}; paper hyper-parameters (see the script's docstring)",
             "- acc: clean test accuracy after the last epoch, mean ± standard deviation over seeds; Q: mean norm "
             "deviation over the core groups at the end; ms/step: median step time (one thread), x SGD: relative "
             "to SGD in the same cell (times under the load named above)", "",
             "| model | noise | optimizer | seeds | acc (%) | Q | ms/step | x SGD | wall s/run |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {100 * r['noise']:.0f}% | {NAMES[r['optimizer']]} | {r['n']} | "
                     f"{r['acc']:.1f} ± {r['acc_sd']:.1f} | {r['Q']:.3g} | {r['step_ms']:.1f} | {r['x_sgd']:.2f} | "
                     f"{r['wall_s']:.0f} |")
    lines += ["", "## Paired differences (percentage points of test accuracy, same seeds)", "",
              "p: paired t-test, two-sided; 95% CI: bootstrap of the mean difference over seeds (10,000 resamples). "
              "With 5 seeds the test is weak: read a p-value above 0.05 as 'no difference shown', not 'no "
              "difference'.", "", "| model | noise | difference | mean | 95% CI | p | Holm p |",
              "|---|---:|---|---:|---|---:|---:|"]
    adjusted_p = holm([t["p"] for t in tests])
    for t, adjusted in zip(tests, adjusted_p):
        p = "n/a (no spread)" if math.isnan(t["p"]) else f"{t['p']:.3f} | {adjusted:.3f}"
        lines.append(f"| {t['model']} | {100 * t['noise']:.0f}% | {t['pair']} | {t['mean']:+.2f} | "
                     f"[{t['low']:+.2f}, {t['high']:+.2f}] | {p} |")
    small = [f"{t['pair']}, {t['model']}, {100 * t['noise']:.0f}%" for t in tests if t["p"] < 0.05]
    survive = sum(a < 0.05 for a in adjusted_p)
    lines += ["", f"{len(tests)} comparisons: by chance alone about {0.05 * len(tests):.1f} would have p < 0.05; "
              f"{len(small)} do{' (' + '; '.join(small) + ')' if small else ''}, and {survive} remain below 0.05 "
              "after Holm's correction for the number of comparisons (column 'Holm p')."]
    out.write_text("\n".join(lines) + "\n")


def plot(rows: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, opt in enumerate(OPTIMIZERS):
            mine = sorted((r for r in rows if r["model"] == model and r["optimizer"] == opt), key=lambda r: r["noise"])
            if mine:
                x = [100 * r["noise"] + (i - 2) * 0.6 for r in mine]  # a small offset keeps the error bars apart
                label = f"{NAMES[opt]} ({statistics.median(r['x_sgd'] for r in mine):.2f}x SGD/step)"
                ax.errorbar(x, [r["acc"] for r in mine], yerr=[r["acc_sd"] for r in mine], marker="o", capsize=3,
                            label=label)
        ax.set(title=model, xlabel="label noise (%)", ylabel="clean test accuracy (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="the table (default benchmarks/results/local/label_noise.md)"
                   "; the runs (.json) and the plot (.png) go next to it")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 1 epoch of 2 steps, noise 0 and 0.4")
    p.add_argument("--fresh", action="store_true", help="ignore runs saved by an earlier call with this --out")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.seeds < 1 or args.epochs < 1:
        p.error("--jobs, --seeds and --epochs must be >= 1")
    if any(not 0.0 <= n < 1.0 for n in args.noise):
        p.error("--noise rates must be in [0, 1)")
    args.command = "python benchmarks/label_noise.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None
                                                                         else argv))
    args.max_steps = None
    if args.quick:
        args.seeds, args.epochs, args.noise, args.max_steps = 2, 1, [0.0, 0.4], 2
    args.seeds = list(range(args.seeds))
    args.out = args.out or default_out("label_noise.md")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    raw = args.out.with_suffix(".json")
    saved = {} if args.fresh or not raw.exists() else json.loads(raw.read_text())
    runs, log = saved.get("runs", []), saved.get("log", dict(elapsed_s=0.0, load=float("nan")))
    settings = dict(epochs=args.epochs, max_steps=args.max_steps)
    runs = [r for r in runs if all(r.get(k) == v for k, v in settings.items())]  # another setting's runs: redo
    done = {key(r) for r in runs}
    tasks = [dict(model=m, noise=n, optimizer=o, seed=s, **settings) for m in args.models for n in args.noise
             for s in args.seeds for o in OPTIMIZERS if (m, n, o, s) not in done]
    args.n_runs = len(tasks) + len(done)
    start = time.perf_counter()
    # --jobs 1 runs in this process (also when this file is loaded as a module, which workers could not import)
    pool = ProcessPoolExecutor(args.jobs) if args.jobs > 1 else contextlib.nullcontext()
    with pool:
        for i, run in enumerate((pool.map if args.jobs > 1 else map)(run_one, tasks), 1):
            runs.append(run)
            log = dict(elapsed_s=log["elapsed_s"] + time.perf_counter() - start, load=os.getloadavg()[0])
            start = time.perf_counter()
            raw.write_text(json.dumps(dict(command=args.command, log=log, runs=runs), indent=1))  # survives a stop
            print(f"[{i}/{len(tasks)}] {run['model']} noise {run['noise']} {NAMES[run['optimizer']]} seed "
                  f"{run['seed']}: {100 * run['accuracy']:.1f}% ({run['wall_s']:.0f} s)", flush=True)
    rows, tests = summarize(runs, args.seeds)
    write_table(rows, tests, args, log, args.out)
    plot(rows, args.out.with_suffix(".png"))
    print(args.out.read_text())
    return dict(rows=rows, tests=tests)


if __name__ == "__main__":
    main()
