"""Compressing a trained network: uniform rank against ``rank="auto"`` (and VBMF for Tucker) at equal parameters,
per format — total weight error, test accuracy right after ``tensorize(..., init="decompose")``, and after a short
fine-tune with SGD and with DAS.

    python benchmarks/compress.py --quick   # ~3 min on 2 cores; writes benchmarks/results/local/compress.md
    python benchmarks/compress.py --out benchmarks/results/compress.md   # the committed table

The network: the CIFAR ResNet-20 of ``tnlayers.models`` trained here on scikit-learn's bundled digits (8x8, 1437
train / 360 test, clean labels; no download), every conv tensorized, the classifier left dense. For each format and
budget: *uniform* is ``rank=<budget>`` (each layer keeps that fraction of its parameters), *auto* is
``rank="auto", budget=<uniform's parameter count>`` (equal parameters), *vbmf* (Tucker) is ``rank="vbmf"``, with
*auto* also run at VBMF's count. Weight error: the sum over layers of the relative squared Frobenius error
, the loss ``rank="auto"`` minimizes (sum over layers of -n log(1 - e), n: weight entries, e: relative squared
error; as the size-weighted mean "lost energy" 1 - exp(-loss / sum n)), and the relative error of all conv weights
together. Accuracy right after decomposition with the dense model's BatchNorm statistics, and with them recomputed
on the training images (one pass, no labels used). Fine-tunes: ``--epochs-ft``
epochs of SGD (momentum 0.9, weight decay 5e-4, cosine from ``--lr-ft``) or DAS around the same SGD, random crops,
``--seeds`` seeds each; test accuracy on the 360 held-out digits (one digit = 0.28 points).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _machine import cpu_name  # noqa: E402
from _output import default_out  # noqa: E402

import tnlayers  # noqa: E402
from tnlayers.digits import digits, random_crops  # noqa: E402
from tnlayers.layers.tensorized import TensorizedLayer  # noqa: E402

FORMATS = ("tt", "tr", "tucker", "cp")


def _normalized(data):
    (x, y), (xt, yt) = data
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    return ((x - mean) / std, y), ((xt - mean) / std, yt)


def _accuracy(model, test) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(test[0]).argmax(1) == test[1]).float().mean())


def _recalibrated(model, train) -> torch.nn.Module:
    """A copy whose BatchNorm statistics are recomputed on the training images (no labels, no gradient): the
    decomposition changes every conv's output, and the dense model's running statistics no longer fit it."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for batch in train[0].split(256):
            model(batch)
    return model


def _fit(model, train, epochs: int, lr: float, seed: int, optimizer: str = "SGD") -> None:
    (x, y), gen = train, torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sgd = dict(lr=lr, momentum=0.9, weight_decay=5e-4)
    opt = (tnlayers.DAS(model.parameters(), torch.optim.SGD, alpha=0.1, **sgd) if optimizer == "DAS"
           else torch.optim.SGD(model.parameters(), **sgd))
    steps = epochs * -(-len(y) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            loss = F.cross_entropy(model(random_crops(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorizedLayer)}


def _measure(dense, fmt: str, label: str, args, data, **kwargs) -> dict:
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 3-channel stem's excess bonds: known, the same for every method
        model = tnlayers.tensorize(model, format=fmt, init="decompose", progress=False, **kwargs)
    seconds = time.perf_counter() - start
    layers, weights = _layers(model), dict(dense.named_modules())
    params = sum(m.network.num_params + (0 if m.bias is None else m.bias.numel()) for m in layers.values())
    dense_params = sum(m.dense_params for m in layers.values())
    norms = {n: float(weights[n].weight.detach().double().norm()) ** 2 for n in layers}
    sum_sq = sum(m.decomposition_error ** 2 for m in layers.values())
    sizes = {n: weights[n].weight.numel() for n in layers}
    loss = sum(-sizes[n] * math.log1p(-min(m.decomposition_error ** 2, 1 - 1e-12)) for n, m in layers.items())
    lost = 1 - math.exp(-loss / sum(sizes.values()))
    overall = math.sqrt(sum(m.decomposition_error ** 2 * norms[n] for n, m in layers.items()) / sum(norms.values()))
    row = dict(format=fmt, method=label, params=params, fraction=params / dense_params, sum_sq_error=sum_sq,
               lost_energy=lost,
               overall_error=overall, seconds=seconds, acc_decomposed=_accuracy(model, data[1]),
               acc_recalibrated=_accuracy(_recalibrated(model, data[0]), data[1]),
               ranks={n: m.rank_choice.rank if hasattr(m, "rank_choice") else next(iter(m.ranks.values()))
                      for n, m in layers.items()})
    for opt in ("SGD", "DAS"):
        accs = []
        for seed in range(args.seeds):
            tuned = copy.deepcopy(model)
            _fit(tuned, data[0], args.epochs_ft, args.lr_ft, seed, opt)
            accs.append(_accuracy(tuned, data[1]))
        row[f"acc_{opt}"] = statistics.fmean(accs)
        row[f"acc_{opt}_runs"] = accs
    print(f"{fmt:6s} {label:22s} params {params:7,} ({row['fraction']:.3f})  lost {lost:.4f}  sum rel.err^2 {sum_sq:.3f}  "
          f"overall {overall:.3f}  acc {row['acc_decomposed']:.3f} (BN {row['acc_recalibrated']:.3f}) -> SGD {row['acc_SGD']:.3f} / DAS "
          f"{row['acc_DAS']:.3f}  ({seconds:.1f} s)", flush=True)
    return row


def run(args) -> list:
    torch.set_num_threads(args.threads)
    data = _normalized(digits(0))
    torch.manual_seed(0)
    dense = tnlayers.models.resnet20(num_classes=10)
    cached = default_out(f"compress_dense_{args.epochs}_{args.lr}.pt")  # the same training, reused across runs
    start = time.perf_counter()
    if args.cache and cached.exists():
        dense.load_state_dict(torch.load(cached))
    else:
        _fit(dense, data[0], args.epochs, args.lr, seed=0)
        if args.cache:
            torch.save(dense.state_dict(), cached)
    print(f"dense ResNet-20: test accuracy {_accuracy(dense, data[1]):.3f} after {args.epochs} epochs "
          f"({time.perf_counter() - start:.0f} s{', loaded from ' + str(cached) if args.cache else ''})",
          flush=True)
    convs = [m for m in dense.modules() if isinstance(m, torch.nn.Conv2d)]
    rows = [dict(format="dense", method="-", params=sum(p.numel() for m in convs for p in m.parameters()),
                 fraction=1.0, acc_decomposed=_accuracy(dense, data[1]))]
    for budget in args.budgets:
        for fmt in args.formats:
            uniform = _measure(dense, fmt, f"uniform {budget}", args, data, rank=budget)
            rows.append(uniform)
            rows.append(_measure(dense, fmt, "auto (equal params)", args, data, rank="auto",
                                 budget=uniform["params"]))
    if "tucker" in args.formats:
        vbmf = _measure(dense, "tucker", "vbmf", args, data, rank="vbmf")
        rows.append(vbmf)
        rows.append(_measure(dense, "tucker", "auto (VBMF's params)", args, data, rank="auto", budget=vbmf["params"]))
    return rows


def _table(rows: list, args, header: list) -> str:
    lines = header + ["", "| format | method | params (conv) | of dense | lost energy (auto's loss) | sum rel. err^2 | overall error | "
                          "acc. decomposed | acc. BN recalibrated | acc. SGD ft | acc. DAS ft | time (s) |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["format"] == "dense":
            lines.append(f"| dense | - | {r['params']:,} | 1 | 0 | 0 | 0 | {r['acc_decomposed']:.3f} | - | - | - | - |")
            continue
        lines.append(f"| {r['format']} | {r['method']} | {r['params']:,} | {r['fraction']:.4f} | "
                     f"{r['lost_energy']:.4f} | {r['sum_sq_error']:.3f} | {r['overall_error']:.4f} | {r['acc_decomposed']:.3f} | "
                     f"{r['acc_recalibrated']:.3f} | "
                     f"{r['acc_SGD']:.3f} | {r['acc_DAS']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.25])
    parser.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--epochs-ft", type=int, default=3, help="fine-tune epochs after decomposition")
    parser.add_argument("--lr-ft", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, default=2, help="fine-tune seeds per optimizer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the trained dense model from benchmarks/results/local/ (default: yes)")
    parser.add_argument("--quick", action="store_true", help="one budget (0.25), 10 dense epochs, 1 seed")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/local/compress.md); "
                        "a .json with the rows is written next to it")
    args = parser.parse_args(argv)
    if args.quick:
        args.budgets, args.epochs, args.seeds = [0.25], 10, 1
    out = Path(args.out) if args.out else default_out("compress.md")
    load = os.getloadavg()[0]
    rows = run(args)
    header = ["# Compressing a trained ResNet-20: uniform rank vs `rank=\"auto\"` vs VBMF", "",
              f"- Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
              f"{args.threads} threads; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
              f"- Command: `python benchmarks/compress.py {' '.join(sys.argv[1:])}`",
              f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
              f"- Dense ResNet-20 trained {args.epochs} epochs on the digits (SGD lr {args.lr}); fine-tunes: "
              f"{args.epochs_ft} epochs from lr {args.lr_ft}, mean over {args.seeds} seed(s)"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_table(rows, args, header))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
