"""Command line: ``tnlayers demo`` (the main job) and ``tnlayers info``."""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch

__all__ = ["main"]


def _digits(seed: int):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, no download), split 80/20."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("tnlayers demo needs scikit-learn for its bundled digits data: pip install 'tnlayers[demo]'")
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def _cnn(conv, linear):
    from torch import nn
    return nn.Sequential(conv(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         conv(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         conv(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear(32, 10))


def _models(rank):
    from torch import nn

    import tnlayers
    stem = lambda cls: (lambda c_in, c_out, k, **kw: nn.Conv2d(c_in, c_out, k, **kw) if c_in == 1  # noqa: E731
                        else cls(c_in, c_out, k, rank=rank, **kw))
    return {
        "dense": lambda: _cnn(nn.Conv2d, nn.Linear),
        f"TT (rank {rank})": lambda: _cnn(stem(tnlayers.TTConv2d), nn.Linear),
        f"TR (rank {rank})": lambda: _cnn(stem(tnlayers.TRConv2d), nn.Linear),
        f"Tucker (rank {rank})": lambda: _cnn(stem(tnlayers.TuckerConv2d), nn.Linear),
    }


def _optimizers():
    opts = {"SGD": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)}
    try:
        from tnlayers.optim import DAS
    except ImportError:
        return opts
    opts["DAS"] = lambda params, lr: DAS(params, torch.optim.SGD, alpha=0.05, lr=lr, momentum=0.9,
                                         weight_decay=5e-4)
    return opts


def demo(args) -> dict:
    """Train small tensorized CNNs on real handwritten digits; report size, accuracy, step time and Q."""
    import tnlayers
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = _digits(args.seed)
    rows = []
    runs = [(m, o) for m in _models(args.rank).items() for o in _optimizers().items()
            if not (m[0] == "dense" and o[0] != "SGD")]
    for (model_name, make_model), (opt_name, make_opt) in tqdm(runs, desc="demo", disable=args.quiet):
        torch.manual_seed(args.seed)
        model = make_model()
        opt = make_opt(model.parameters(), args.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
        steps, start = 0, None
        for epoch in range(args.epochs):
            model.train()
            if epoch == min(1, args.epochs - 1):  # time from the second epoch: the first one warms up
                steps, start = 0, time.perf_counter()
            for idx in torch.randperm(len(y_train)).split(args.batch_size):
                loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
            sched.step()
        step_ms = 1e3 * (time.perf_counter() - start) / steps
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        q = tnlayers.norm_report(model)
        rows.append(dict(model=model_name, optimizer=opt_name, params=sum(p.numel() for p in model.parameters()),
                         test_accuracy=accuracy, final_loss=float(loss.detach()), step_ms=step_ms,
                         mean_Q=sum(q.values()) / len(q) if q else None))
    dense_params = rows[0]["params"]
    print(f"\ntnlayers {tnlayers.__version__} demo: small CNNs on scikit-learn's digits "
          f"({len(y_train)} train / {len(y_test)} test), {args.epochs} epochs, torch {torch.__version__}")
    print(f"{'model':<18}{'optimizer':<10}{'params':>8}{'x smaller':>10}{'test acc':>10}{'ms/step':>9}{'mean Q':>10}")
    for r in rows:
        q = "-" if r["mean_Q"] is None else f"{r['mean_Q']:.3g}"
        print(f"{r['model']:<18}{r['optimizer']:<10}{r['params']:>8}{dense_params / r['params']:>10.1f}"
              f"{100 * r['test_accuracy']:>9.1f}%{r['step_ms']:>9.2f}{q:>10}")
    if args.out:
        with open(args.out, "w") as f:
            settings = {k: v for k, v in vars(args).items() if k != "func"}
            json.dump(dict(args=settings, rows=rows), f, indent=2)
        print(f"results written to {args.out}")
    return dict(rows=rows)


def info(args) -> None:
    import tnlayers
    from tnlayers.kernels import triton_available
    print(f"tnlayers {tnlayers.__version__}, torch {torch.__version__}, formats {sorted(tnlayers.FORMATS)}, "
          f"triton installed: {triton_available()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tnlayers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train small tensorized CNNs on real digits and report the trade-offs")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--rank", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=demo)
    sub.add_parser("info", help="versions and kernel availability").set_defaults(func=info)
    args = parser.parse_args(argv)
    if getattr(args, "epochs", 1) < 1:
        parser.error("--epochs must be >= 1")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*adds parameters but no expressiveness")
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
