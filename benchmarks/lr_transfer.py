"""Does the dense model's learning rate carry over to its tensorized version?

    python benchmarks/lr_transfer.py                       # writes benchmarks/results/local/lr_transfer.md
    python benchmarks/lr_transfer.py --out benchmarks/results/lr_transfer.md
    python benchmarks/lr_transfer.py --quick               # seconds: a smoke run of the whole pipeline

Grid: {dense, TT, TR, CP, Tucker} x lr {the dense recipe's lr, 2x it} x {with, without BatchNorm} x seeds,
on (a) a small CNN (three 3x3 convs + ReLU (+ BatchNorm), dense head) and (b) the CIFAR ResNet-20 of
``tnlayers.models`` (its BatchNorms replaced by ``nn.Identity`` for the no-BatchNorm variant), tensorized
with ``tnlayers.tensorize(model, format=..., rank=8)`` (the classifier stays dense).
Data: scikit-learn's bundled 8x8 digits (``tnlayers.digits.digits``: 1437 train / 360 test, no download).
Recipe: SGD, momentum 0.9, weight decay 5e-4, batch 32, cosine schedule (the recipe of the demo when this grid
was run). Every run is also repeated at 0.5x the dense lr; the *tuned* lr of a model/format (per
BatchNorm variant) is the one of {0.5, 1, 2}x with the best mean test accuracy.

A run *diverges* when a loss or a parameter becomes non-finite, or a step's loss exceeds 10x the first step's
loss; it stops there and scores chance accuracy (0.10). A cell (model, format, lr, BatchNorm) is *met* when
the tensorized model diverges in no more seeds than the dense model in the same cell, and its mean test
accuracy is at least the tuned-lr run's mean minus that run's seed standard deviation.
``--remedy [ARCH ...]`` adds rows trained with a remedy at 1x and 2x the dense lr, judged against the same plain
tuned-lr runs: ``--remedy-kind precondition`` (default) calls ``tnlayers.precondition_core_grads_(model)`` between
backward and step; ``--remedy-kind precondition_project`` the same with ``overlap="project"`` (conjugate
gradients towards the tangent-space projection); ``--remedy-kind param_groups`` trains with
``tnlayers.lr.param_groups`` (per-core lr multipliers matched to a dense step at init).

The script imports ``tnlayers`` from the checkout it lies in (run a copy placed in another checkout's
``benchmarks/`` to measure that checkout); the file it used is written into the results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this file lies in, before site-packages
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_name  # noqa: E402
from _output import default_out  # noqa: E402

import tnlayers  # noqa: E402
from tnlayers.digits import digits  # noqa: E402

FORMATS = ("tt", "tr", "cp", "tucker")
LR_MULTS = (0.5, 1.0, 2.0)  # 1 and 2: the acceptance grid; 0.5 only for the tuned-lr sweep
CHANCE = 0.10


def small_cnn(bn: bool, width: int = 32, classes: int = 10) -> nn.Module:
    """Three 3x3 convs (3 -> width -> width -> width) with ReLU (and BatchNorm), flattened into a dense head."""
    layers, c_in = [], 3
    for _ in range(3):
        layers += [nn.Conv2d(c_in, width, 3, padding=1)] + ([nn.BatchNorm2d(width)] if bn else []) + [nn.ReLU()]
        c_in = width
    layers += [nn.Flatten(), nn.Linear(width * 8 * 8, classes)]
    return nn.Sequential(*layers)


def resnet20(bn: bool) -> nn.Module:
    """tnlayers.models.resnet20; without BatchNorm every BatchNorm2d becomes nn.Identity (done here, the
    model code is unchanged)."""
    model = tnlayers.models.resnet20(num_classes=10)
    if not bn:
        for name, module in list(model.named_modules()):
            for child, sub in list(module.named_children()):
                if isinstance(sub, nn.BatchNorm2d):
                    setattr(module, child, nn.Identity())
    return model


ARCHS = {"cnn": small_cnn, "resnet20": resnet20}


def build(arch: str, fmt: str, bn: bool, rank, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = ARCHS[arch](bn)
    if fmt != "dense":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 3-channel stem at rank 8 is larger than dense: said once per run
            model = tnlayers.tensorize(model, format=fmt, rank=rank)
    return model


def finite_params(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train_one(arch, fmt, bn, lr, seed, args, data, remedy=None) -> dict:
    """One run; returns its divergence flag, test accuracy, last losses and seconds."""
    model = build(arch, fmt, bn, args.rank, seed)
    (x_train, y_train), (x_test, y_test) = data
    params = model.parameters()
    if remedy == "param_groups":
        from tnlayers.lr import param_groups
        params = param_groups(model, lr=lr)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = args.steps[arch]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(1000 + seed)
    model.train()
    start = time.perf_counter()
    first, diverged, losses, step = None, False, [], 0
    for step in range(steps):
        idx = torch.randint(len(y_train), (args.batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        value = float(loss.detach())
        first = value if first is None else first
        if not math.isfinite(value) or value > 10 * first:
            diverged = True
            break
        loss.backward()
        if remedy == "precondition":
            tnlayers.precondition_core_grads_(model)
        elif remedy == "precondition_project":
            tnlayers.precondition_core_grads_(model, overlap="project")
        opt.step()
        sched.step()
        losses.append(value)
        if (step + 1) % 25 == 0 and not finite_params(model):
            diverged = True
            break
    if not diverged and not finite_params(model):
        diverged = True
    if diverged:
        accuracy = CHANCE
    else:
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return dict(diverged=diverged, accuracy=accuracy, steps_run=step + 1, seconds=time.perf_counter() - start,
                final_loss=statistics.fmean(losses[-10:]) if losses and not diverged else None)


def mean_std(values):
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def run_grid(args) -> dict:
    data = digits(0)
    plain = [(fmt, None) for fmt in ("dense",) + tuple(args.formats)]
    runs = {}  # key "arch|fmt|remedy|bn|mult" -> list of per-seed results
    total = sum(len(plain) * 3 + len(args.formats) * 2 * (arch in args.remedy) for arch in args.archs) * 2 * args.seeds
    done, start = 0, time.perf_counter()
    for arch in args.archs:
        variants = plain + [(fmt, args.remedy_kind) for fmt in args.formats if arch in args.remedy]
        for bn in (True, False):
            for fmt, remedy in variants:
                for mult in LR_MULTS:
                    if remedy and mult == 0.5:
                        continue  # the remedy is judged at the dense lr and 2x it, against the plain tuned runs
                    key = f"{arch}|{fmt}|{int(bool(remedy))}|{int(bn)}|{mult:g}"
                    runs[key] = [train_one(arch, fmt, bn, mult * args.lr, seed, args, data, remedy)
                                 for seed in range(args.seeds)]
                    done += args.seeds
                    if not args.quiet:
                        r = runs[key]
                        print(f"[{time.perf_counter() - start:7.1f}s {done}/{total}] {key}: diverged "
                              f"{sum(x['diverged'] for x in r)}/{len(r)}, acc "
                              f"{statistics.fmean(x['accuracy'] for x in r):.3f}", flush=True)
    return runs


def summarize(runs, args) -> list:
    """One row per (arch, bn, fmt, remedy, mult in {1, 2}) with the verdict."""
    rows = []

    def cell(arch, fmt, remedy, bn, mult):
        return runs.get(f"{arch}|{fmt}|{int(remedy)}|{int(bn)}|{mult:g}")

    for arch in args.archs:
        for bn in (True, False):
            for fmt in ("dense",) + tuple(args.formats):
                sweep = {m: mean_std([r["accuracy"] for r in cell(arch, fmt, False, bn, m)]) for m in LR_MULTS}
                tuned = max(LR_MULTS, key=lambda m: sweep[m][0])
                for remedy in ((False, True) if arch in args.remedy and fmt != "dense" else (False,)):
                    for mult in (1.0, 2.0):
                        r = cell(arch, fmt, remedy, bn, mult)
                        dense = cell(arch, "dense", False, bn, mult)
                        div = sum(x["diverged"] for x in r)
                        div_dense = sum(x["diverged"] for x in dense)
                        acc = mean_std([x["accuracy"] for x in r])
                        t_mean, t_std = sweep[tuned]
                        div_ok = div <= div_dense
                        acc_ok = acc[0] >= t_mean - t_std
                        rows.append(dict(arch=arch, bn=bn, format=fmt, remedy=remedy, lr=mult * args.lr, mult=mult,
                                         diverged=div, diverged_dense=div_dense, seeds=len(r), acc_mean=acc[0],
                                         acc_std=acc[1], tuned_mult=tuned, tuned_mean=t_mean, tuned_std=t_std,
                                         divergence_ok=div_ok, accuracy_ok=acc_ok,
                                         verdict="met" if (div_ok and acc_ok) else "MISSED",
                                         seconds=sum(x["seconds"] for x in r)))
    return rows


def machine_line() -> str:
    text = (f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"torch threads: {torch.get_num_threads()}")
    if hasattr(os, "getloadavg"):
        text += f", load average at the end {os.getloadavg()[0]:.2f}"
    return text


def describe(args) -> list:
    names = {"cnn": "small CNN (3 x Conv2d 3x3, width 32, ReLU, flatten + Linear head)",
             "resnet20": "CIFAR ResNet-20 (tnlayers.models.resnet20; no-BN variant: BatchNorm2d -> Identity)"}
    return [f"- {arch}: {names[arch]}, {args.steps[arch]} steps" for arch in args.archs]


def write(rows, runs, args, seconds, out: Path, commands=None) -> None:
    cmd = "`; `".join(commands or [" ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)])
    lines = [
        "# Learning-rate transfer: the dense recipe on tensorized models", "",
        f"- Machine: {machine_line()}",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- tnlayers imported from: `{Path(tnlayers.__file__).resolve().parent}`",
        f"- Grid time: {seconds / 60:.1f} min on one core ({len(runs) * args.seeds} runs)",
        "- Data: scikit-learn digits (8x8, as 3 channels), 1437 train / 360 test",
        f"- Recipe: SGD momentum 0.9, weight decay 5e-4, batch {args.batch}, cosine schedule; dense lr "
        f"{args.lr:g} and 2x; tuned lr = best mean accuracy of {{0.5, 1, 2}} x {args.lr:g} per model/format/BN",
        f"- Tensorized with `tnlayers.tensorize(model, format=..., rank={args.rank})` (classifier dense)",
        *describe(args),
        f"- {args.seeds} seeds per cell (seed: init and batch order; one fixed data split)",
        "- Diverged: non-finite loss or parameter, or a step's loss > 10x the first step's; scored as chance (0.10)",
        "- Verdict: met when diverged <= the dense model's count in the same cell AND mean accuracy >= "
        "tuned-lr mean - tuned-lr std", "",
        "| model | BN | format | lr | diverged | dense diverged | test acc (mean ± std) | tuned lr | tuned acc | "
        "verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fmt = r["format"] + (f" + {args.remedy_kind}" if r["remedy"] else "")
        verdict = "(reference)" if r["format"] == "dense" else r["verdict"]
        if r["format"] == "dense" and not r["accuracy_ok"]:
            verdict = "(reference; below its own tuned lr)"
        lines.append(f"| {r['arch']} | {'yes' if r['bn'] else 'no'} | {fmt} | {r['lr']:g} | {r['diverged']}/{r['seeds']} "
                     f"| {r['diverged_dense']}/{r['seeds']} | {r['acc_mean']:.3f} ± {r['acc_std']:.3f} | "
                     f"{r['tuned_mult'] * args.lr:g} | {r['tuned_mean']:.3f} ± {r['tuned_std']:.3f} | {verdict} |")
    judged = [r for r in rows if r["format"] != "dense"]
    missed = [r for r in judged if r["verdict"] != "met"]
    lines += ["", f"Cells met: {len(judged) - len(missed)} of {len(judged)} tensorized cells."]
    for remedy in sorted({r["remedy"] for r in judged}):
        for arch in args.archs:
            for bn in (True, False):
                part = [r for r in judged if r["remedy"] == remedy and r["arch"] == arch and r["bn"] == bn]
                if part:
                    lines.append(f"- {arch}, BN {'yes' if bn else 'no'}, {args.remedy_kind if remedy else 'plain SGD'}: "
                                 f"{sum(r['verdict'] == 'met' for r in part)} of {len(part)} met; diverged in "
                                 f"{sum(r['diverged'] for r in part)} of {sum(r['seeds'] for r in part)} runs (dense: "
                                 f"{sum(r['diverged_dense'] for r in part)})")
    lines.append("")
    for r in missed:
        why = [w for w, ok in (("diverges more often than dense", r["divergence_ok"]),
                               ("accuracy below the tuned-lr spread", r["accuracy_ok"])) if not ok]
        lines.append(f"- MISSED: {r['arch']}, BN {'yes' if r['bn'] else 'no'}, {r['format']}"
                     f"{' + ' + args.remedy_kind if r['remedy'] else ''}, lr {r['lr']:g}: {'; '.join(why)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "merge")}
    out.with_suffix(".json").write_text(json.dumps(dict(settings=settings, seconds=seconds, rows=rows, runs=runs,
                                                        commands=commands or [cmd],
                                                        tnlayers=str(Path(tnlayers.__file__).resolve().parent)),
                                                   indent=1))
    print(f"written {out} ({seconds / 60:.1f} min)")


# -- the step-size ratio ||dW_cores|| / ||dW_dense|| of one SGD step at init ------------------------------------
RATIO_LAYERS = {"conv 64->64 3x3": lambda fmt, rank, **kw: tnlayers.TensorizedConv2d(64, 64, 3, padding=1, rank=rank,
                                                                                    format=fmt, **kw),
                "linear 256->256": lambda fmt, rank, **kw: tnlayers.TensorizedLinear(256, 256, rank=rank, format=fmt,
                                                                                    **kw)}
RATIO_RANKS = (0.05, 0.1, 0.25, 0.5)


def init_choices():
    """The inits to compare: the He/Kaiming-normal start (the earlier default) and nn's default, by name
    where the layers take ``weight_std=``; else (an older checkout) the layers' only default."""
    import inspect
    if "weight_std" in inspect.signature(tnlayers.TensorizedLinear).parameters:
        return {"He sqrt(2/fan_in) (before)": {"weight_std": "kaiming_normal"}, "nn 1/sqrt(3 fan_in) (after)": {}}
    return {"default": {}}


def exact_ratio(layer, grad, eta, multipliers=None, precondition=None):
    """||W(cores - eta m g) - W(cores)|| / ||eta G||, W rebuilt by the layer itself (float64); g preconditioned
    by ``tnlayers.core_precondition.precondition_grads`` with ``overlap=precondition`` when it is given."""
    import copy
    layer = copy.deepcopy(layer).double()
    layer.cache_weight = False
    cores = layer.core_parameters()
    weight = layer.weight
    grads = torch.autograd.grad(weight, cores, grad.double())
    if precondition:
        from tnlayers.core_precondition import precondition_grads
        grads = precondition_grads(layer, grads, overlap=precondition)
    multipliers = multipliers or [1.0] * len(cores)
    with torch.no_grad():
        before = weight.detach().clone()
        for c, g, m in zip(cores, grads, multipliers):
            c.sub_(eta * m * g)
        return float((layer.weight - before).norm() / (eta * grad.double().norm()))


def digits_gradient(layer, seed):
    """dL/dW of a real loss: cross-entropy on a batch of 32 digits through conv(3->64) -> ReLU -> ``layer`` ->
    ReLU -> flatten -> Linear (the tensorized layer at init, the rest nn's default init)."""
    torch.manual_seed(seed)
    (x, y), _ = digits(0)
    idx = torch.randint(len(y), (32,), generator=torch.Generator().manual_seed(seed))
    stem, head = nn.Conv2d(3, 64, 3, padding=1), nn.Linear(64 * 64, 10)
    weight = layer.weight.detach().clone().requires_grad_()
    h = torch.relu(F.conv2d(torch.relu(stem(x[idx])), weight, layer.bias, padding=1))
    loss = F.cross_entropy(head(h.flatten(1)), y[idx])
    return torch.autograd.grad(loss, weight)[0]


def ratio_grid(args) -> list:
    from tnlayers.lr import core_lr_multipliers, step_ratio
    rows, eta = [], 1e-3
    for init, kw in init_choices().items():
        for kind, make in RATIO_LAYERS.items():
            for fmt in args.formats:
                for rank in args.ratio_ranks:
                    exact, first, remedy, real, pre, proj = [], [], [], [], [], []
                    for seed in range(args.ratio_seeds):
                        torch.manual_seed(seed)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            layer = make(fmt, rank, **kw)
                        grad = torch.randn(layer._weight_shape(), generator=torch.Generator().manual_seed(10 + seed))
                        exact.append(exact_ratio(layer, grad, eta))
                        first.append(step_ratio(layer, layer._weight_to_modes(grad.double())))
                        m = core_lr_multipliers(layer)  # matched with its own probe (seed 0), checked on this one
                        remedy.append(exact_ratio(layer, grad, eta, m))
                        pre.append(exact_ratio(layer, grad, eta, precondition="mean"))
                        proj.append(exact_ratio(layer, grad, eta, precondition="project"))
                        if kind.startswith("conv") and rank == 0.1:
                            g = digits_gradient(layer, seed)
                            real.append((exact_ratio(layer, g, eta), exact_ratio(layer, g, eta, m),
                                         exact_ratio(layer, g, eta, precondition="mean"),
                                         exact_ratio(layer, g, eta, precondition="project")))
                    row = dict(init=init, layer=kind, format=fmt, rank=rank, cores=len(layer.core_parameters()),
                               exact=mean_std(exact), first_order=mean_std(first), remedy=mean_std(remedy),
                               precondition=mean_std(pre), project=mean_std(proj))
                    if real:
                        row["digits"] = mean_std([r[0] for r in real])
                        row["digits_remedy"] = mean_std([r[1] for r in real])
                        row["digits_precondition"] = mean_std([r[2] for r in real])
                        row["digits_project"] = mean_std([r[3] for r in real])
                    rows.append(row)
                    if not args.quiet:
                        print(init, kind, fmt, rank, f"{row['exact'][0]:.3f}", flush=True)
    return rows


def write_ratios(rows, args, seconds, out: Path) -> None:
    cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)
    inits = list(dict.fromkeys(r["init"] for r in rows))
    lines = ["# Step size on W: ||dW|| of one SGD step on the cores / ||dW|| of one SGD step on a dense W", "",
             f"- Machine: {machine_line()}", f"- Command: `{cmd}`",
             f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- tnlayers imported from: `{Path(tnlayers.__file__).resolve().parent}`",
             f"- Time: {seconds:.0f} s",
             f"- One SGD step, lr 1e-3, same gradient G for both; G standard Gaussian; mean ± std over "
             f"{args.ratio_seeds} seeds (layer init and G). *exact*: W rebuilt by the layer after the step (float64); "
             "*first order*: `tnlayers.lr.step_ratio` (||Σ_k J_k J_kᵀ G|| / ||G||). *param_groups*: exact ratio with "
             "the per-core multipliers of `tnlayers.param_groups` (matched on their own Gaussian probes, checked on this G). "
             "*preconditioned*: exact ratio with the gradients of `tnlayers.precondition_core_grads_` (damping 0.01); "
             "*project*: the same with `overlap=\"project\"` (4 conjugate-gradient iterations). *digits*: G "
             "= the gradient of a cross-entropy loss on 32 digits (conv rows at rank 0.1 only).",
             "- Rank: fraction of the dense layer's parameters (the layers' float rank).", ""]
    for init in inits:
        lines += [f"## Init: {init}", "",
                  "| layer | format | rank | cores | exact | first order | param_groups (exact) | preconditioned (exact) "
                  "| project (exact) | digits G | digits G, param_groups | digits G, preconditioned | digits G, project |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["init"] != init:
                continue
            ms = lambda v: f"{v[0]:.3f} ± {v[1]:.3f}" if v else ""  # noqa: E731
            lines.append(f"| {r['layer']} | {r['format']} | {r['rank']:g} | {r['cores']} | {ms(r['exact'])} | "
                         f"{ms(r['first_order'])} | {ms(r['remedy'])} | {ms(r.get('precondition'))} | "
                         f"{ms(r.get('project'))} | {ms(r.get('digits'))} | {ms(r.get('digits_remedy'))} | "
                         f"{ms(r.get('digits_precondition'))} | {ms(r.get('digits_project'))} |")
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(dict(seconds=seconds, rows=rows), indent=1))
    print(f"written {out}")


def merge(args) -> list:
    """One results file from grids run separately (e.g. one model per process, on separate cores): their
    runs and settings are combined and judged together; the grid time is the sum of theirs."""
    parts = [json.loads(Path(p).read_text()) for p in args.merge]
    runs, seconds, commands = {}, 0.0, []
    for part in parts:
        runs.update(part["runs"])
        seconds += part["seconds"]
        commands += part.get("commands", [])
    first = parts[0]["settings"]
    for key in ("seeds", "lr", "rank", "batch", "formats", "remedy_kind"):
        if any(p["settings"][key] != first[key] for p in parts):
            raise SystemExit(f"--merge: the grids differ in {key}")
    args.archs = [a for a in ARCHS if any(a in p["settings"]["archs"] for p in parts)]
    args.remedy = [a for a in ARCHS if any(a in p["settings"]["remedy"] for p in parts)]
    args.steps = {k: v for p in parts for k, v in p["settings"]["steps"].items() if k in p["settings"]["archs"]}
    for key in ("seeds", "lr", "rank", "batch", "formats", "remedy_kind"):
        setattr(args, key, first[key])
    commands.append(" ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv))
    rows = summarize(runs, args)
    write(rows, runs, args, seconds, args.out or default_out("lr_transfer.md"), commands)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05, help="the dense model's good lr (the demo's)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cnn-steps", type=int, default=200)
    p.add_argument("--resnet-steps", type=int, default=100)
    p.add_argument("--remedy", nargs="*", choices=list(ARCHS), default=None,
                   help="also train these models (all when none named) with the --remedy-kind remedy")
    p.add_argument("--remedy-kind", choices=["precondition", "precondition_project", "param_groups"],
                   default="precondition",
                   help="the remedy --remedy trains with (default: tnlayers.precondition_core_grads_)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 seeds, 3 steps, TT only: a smoke run in seconds")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--ratios", action="store_true", help="instead of the training grid: the step-size ratio table "
                                                         "(default out benchmarks/results/local/lr_transfer_ratios.md)")
    p.add_argument("--merge", nargs="+", help="combine the .json results of separately run grids into --out")
    p.add_argument("--ratio-seeds", type=int, default=5)
    p.add_argument("--ratio-ranks", type=float, nargs="+", default=list(RATIO_RANKS))
    p.add_argument("--out", type=Path, help="results markdown (and .json beside it); default "
                                            "benchmarks/results/local/lr_transfer.md")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.cnn_steps, args.resnet_steps, args.formats = 2, 3, 2, ["tt"]
        args.ratio_seeds, args.ratio_ranks = 1, [0.1]
    args.steps = {"cnn": args.cnn_steps, "resnet20": args.resnet_steps}
    args.remedy = [] if args.remedy is None else [a for a in (args.remedy or ARCHS) if a in args.archs]
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.merge:
        return merge(args)
    if args.ratios:
        rows = ratio_grid(args)
        write_ratios(rows, args, time.perf_counter() - start, args.out or default_out("lr_transfer_ratios.md"))
        return rows
    out = args.out or default_out("lr_transfer.md")
    runs = run_grid(args)
    seconds = time.perf_counter() - start
    rows = summarize(runs, args)
    write(rows, runs, args, seconds, out)
    return rows


if __name__ == "__main__":
    main()
