"""Command line: ``tnlayers demo`` (the main job) and ``tnlayers info``; also ``python -m tnlayers``.
With no command it prints this help; ``tnlayers --version`` prints the version."""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["main"]


def demo(args) -> dict:
    """SGD vs SAM vs DAS on a tensor-ring ResNet-20 learning digits from noisy labels (:mod:`tnlayers.demo`)."""
    from .demo import run_demo
    return run_demo(args)


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
    p = sub.add_parser("demo", help="SGD vs SAM vs DAS on a tensor-ring ResNet-20 learning digits from noisy labels")
    p.add_argument("--noise", type=float, default=0.4, help="fraction of training labels flipped (default 0.4)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per optimizer, paired (default 2)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--steps", type=int, default=None, help="stop each run after this many steps (smoke runs)")
    p.add_argument("--rank", type=int, default=15, help="tensor-ring rank of every conv (the paper's 15)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--plot", default="tnlayers_demo.png", help="PNG of accuracy vs step time and the loss curves "
                   "('' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=demo)
    sub.add_parser("info", help="versions and kernel availability").set_defaults(func=info)
    args = parser.parse_args(argv)
    if args.command is None:  # bare `tnlayers`: the help, as a request for it (exit 0, like pip), not an error
        parser.print_help()
        return 0
    for name in ("steps", "rank", "batch_size", "seeds", "epochs"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.command == "demo":
        if not math.isfinite(args.lr) or args.lr <= 0:
            parser.error(f"--lr must be a finite number > 0, got {args.lr}")
        if not 0.0 <= args.noise < 0.9:
            parser.error(f"--noise must be in [0, 0.9) (at 0.9 a flipped label is as likely as the true one), "
                         f"got {args.noise}")
        for flag, path in (("--out", args.out), ("--plot", args.plot)):
            _check_output_path(parser, flag, path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*adds parameters but no expressiveness")
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
