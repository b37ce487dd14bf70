"""Command line: ``tnlayers demo`` (the main job) and ``tnlayers info``; also ``python -m tnlayers``.
With no command it prints this help; ``tnlayers --version`` prints the version."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

__all__ = ["main"]


def _digits(seed: int):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, no download), split 80/20."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("tnlayers demo needs scikit-learn for its bundled digits data: pip install 'tnlayers[demo]'")
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8).expand(-1, 3, -1, -1) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def _make_optimizer(name, params, lr):
    from .optim import DAS, SAM
    sgd = dict(lr=lr, momentum=0.9, weight_decay=5e-4)
    if name == "SGD":
        return torch.optim.SGD(params, **sgd)
    if name == "SAM":
        return SAM(params, torch.optim.SGD, rho=0.05, **sgd)
    return DAS(params, torch.optim.SGD, alpha=0.1, **sgd)


def _train(model, opt_name, data, args):
    """``args.steps`` SGD/SAM/DAS steps with a cosine schedule; returns losses and per-step seconds."""
    from .optim import training_step
    (x_train, y_train), _ = data
    opt = _make_optimizer(opt_name, model.parameters(), args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    losses, seconds = [], []
    model.train()
    for _ in range(args.steps):
        idx = torch.randint(len(y_train), (args.batch_size,), generator=gen)
        x, y = x_train[idx], y_train[idx]
        start = time.perf_counter()

        loss = training_step(model, opt, lambda: torch.nn.functional.cross_entropy(model(x), y))
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        sched.step()
    return losses, seconds


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'tnlayers[demo]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        window = 10
        loss = torch.tensor(r["losses"])
        smooth = loss.unfold(0, window, 1).mean(1) if len(loss) > window else loss
        ax.plot(range(len(smooth)), smooth, label=f"{r['model']} / {r['optimizer']}")
    ax.set(xlabel="step", ylabel="training loss (10-step mean)", yscale="log",
           title="tnlayers demo: ResNet-20 on scikit-learn digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def demo(args) -> dict:
    """Tensorize a ResNet-20 and train it with SGD, SAM and DAS on real handwritten digits; report size,
    accuracy, step time and norm deviation next to the dense ResNet-20."""
    import statistics

    import tnlayers
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    data = _digits(args.seed)
    (x_test, y_test) = data[1]
    label = f"TR-ResNet-20 r={args.rank}"
    runs = [("ResNet-20", "SGD")] + [(label, o) for o in ("SGD", "SAM", "DAS")]
    rows = []
    for model_name, opt_name in tqdm(runs, desc="demo", disable=args.quiet):
        torch.manual_seed(args.seed)
        model = tnlayers.models.resnet20(num_classes=10)
        if model_name != "ResNet-20":
            model = tnlayers.tensorize(model, format="tr", rank=args.rank)
        q_start = tnlayers.norm_report(model)
        losses, seconds = _train(model, opt_name, data, args)
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        q_end = tnlayers.norm_report(model)
        warm = seconds[min(10, len(seconds) - 1):]
        rows.append(dict(model=model_name, optimizer=opt_name, params=sum(p.numel() for p in model.parameters()),
                         test_accuracy=accuracy, final_loss=statistics.fmean(losses[-10:]),
                         step_ms=1e3 * statistics.median(warm), losses=losses,
                         mean_Q_start=statistics.fmean(q_start.values()) if q_start else None,
                         mean_Q_end=statistics.fmean(q_end.values()) if q_end else None))
    sgd_ms = {r["model"]: r["step_ms"] for r in rows if r["optimizer"] == "SGD"}
    print(f"\ntnlayers {tnlayers.__version__} demo: ResNet-20 on scikit-learn's digits ({len(data[0][1])} train / "
          f"{len(y_test)} test, 8x8 images as 3 channels), {args.steps} steps of batch {args.batch_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<20}{'optimizer':<10}{'params':>8}{'test acc':>10}{'loss':>8}{'ms/step':>9}{'x SGD':>7}"
          f"{'mean Q start -> end':>22}")
    for r in rows:
        q = "-" if r["mean_Q_start"] is None else f"{r['mean_Q_start']:.3g} -> {r['mean_Q_end']:.3g}"
        print(f"{r['model']:<20}{r['optimizer']:<10}{r['params']:>8}{100 * r['test_accuracy']:>9.1f}%"
              f"{r['final_loss']:>8.3f}{r['step_ms']:>9.1f}{r['step_ms'] / sgd_ms[r['model']]:>7.2f}{q:>22}")
    if args.out:
        with open(args.out, "w") as f:
            settings = {k: v for k, v in vars(args).items() if k != "func"}
            json.dump(dict(args=settings, rows=rows), f, indent=2)
        print(f"results written to {args.out}")
    if args.plot:
        _plot(rows, args.plot)
    return dict(rows=rows)


def info(args) -> None:
    import tnlayers
    from tnlayers.kernels import triton_available
    print(f"tnlayers {tnlayers.__version__}, torch {torch.__version__}, formats {sorted(tnlayers.FORMATS)}, "
          f"triton installed: {triton_available()}")


def _check_output_path(parser, flag: str, path) -> None:
    """Refuse, before any training, a results path that could not be written at the end."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        parser.error(f"{flag} {path!r} is a directory; give a file path")
    parent = target.parent
    if not parent.is_dir():
        parser.error(f"{flag} {path!r}: directory {str(parent)!r} does not exist (create it first)")
    if not os.access(parent, os.W_OK):
        parser.error(f"{flag} {path!r}: directory {str(parent)!r} is not writable")


def main(argv=None) -> int:
    from . import __version__
    parser = argparse.ArgumentParser(prog="tnlayers", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,info}")
    p = sub.add_parser("demo", help="tensorize a ResNet-20, train it with SGD/SAM/DAS on real digits, compare")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rank", type=int, default=8, help="tensor-ring rank of every conv")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--plot", default="tnlayers_demo.png", help="PNG of the loss curves ('' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=demo)
    sub.add_parser("info", help="versions and kernel availability").set_defaults(func=info)
    args = parser.parse_args(argv)
    if args.command is None:  # bare `tnlayers`: the help, as a request for it (exit 0, like pip), not an error
        parser.print_help()
        return 0
    for name in ("steps", "rank", "batch_size"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.command == "demo":
        if not math.isfinite(args.lr) or args.lr <= 0:
            parser.error(f"--lr must be a finite number > 0, got {args.lr}")
        for flag, path in (("--out", args.out), ("--plot", args.plot)):
            _check_output_path(parser, flag, path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*adds parameters but no expressiveness")
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
