"""Compress a ResNet-18 to the paper's TT-ResNet-18 (Table 9 ranks) by decomposition, then fine-tune.

    python examples/compress_resnet18.py --weights resnet18.pth --data-dir ~/imagenet --optimizer das
    python examples/compress_resnet18.py --dataset synthetic --only "layer1.*" --max-steps 5   # smoke run

``--weights``: a state_dict of a torchvision-layout ResNet-18 (e.g. saved from
``torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict()`` on a machine with network); nothing
is downloaded here, and without it the dense model starts random (said loudly: compression then has
nothing to preserve). ``--data-dir`` is an ImageFolder tree (``train/``, ``val/``; needs torchvision).
Paper settings (appendix B) are the defaults: SGD momentum 0.9, weight decay 1e-5, one-cycle schedule with
peak lr 0.008, batch 2048, 15 epochs; SAM rho 0.05, DAS alpha 0.01.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import tnlayers
from tnlayers.optim import DAS, SAM, training_step


def image_loaders(args):
    if args.dataset == "synthetic":
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.synthetic_size, 3, args.image_size, args.image_size, generator=gen)
        y = torch.randint(0, 1000, (args.synthetic_size,), generator=gen)
        x += 0.5 * torch.sin(y.float()).view(-1, 1, 1, 1)  # a little label signal
        batches = list(zip(x.split(args.batch_size), y.split(args.batch_size)))
        return batches, batches
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise SystemExit("--data-dir needs torchvision (ImageFolder); install it, or use --dataset synthetic")
    root = Path(args.data_dir).expanduser()
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise SystemExit(f"no ImageFolder tree at {root} (expected train/ and val/); nothing is downloaded here")
    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train = datasets.ImageFolder(root / "train", transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]))
    val = datasets.ImageFolder(root / "val", transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), norm]))
    loader = lambda ds, shuffle: torch.utils.data.DataLoader(ds, args.batch_size, shuffle=shuffle,  # noqa: E731
                                                             num_workers=args.workers)
    return loader(train, True), loader(val, False)


@torch.no_grad()
def evaluate(model, batches) -> dict:
    model.eval()
    top1 = top5 = n = 0
    for x, y in batches:
        best = model(x).topk(5, dim=1).indices
        top1 += int((best[:, 0] == y).sum())
        top5 += int((best == y[:, None]).any(1).sum())
        n += len(y)
    return dict(top1=top1 / n, top5=top5 / n)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--dataset", choices=["imagefolder", "synthetic"], default="imagefolder")
    p.add_argument("--data-dir", type=Path, default=Path("imagenet"))
    p.add_argument("--only", default=None, help="glob: compress only these Table 9 layers (quick runs)")
    p.add_argument("--optimizer", choices=["sgd", "sam", "das"], default="das")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=0.008)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--image-size", type=int, default=64, help="synthetic images only")
    p.add_argument("--synthetic-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch-size must be >= 1")
    torch.manual_seed(args.seed)

    model = tnlayers.models.resnet18()
    if args.weights is not None:
        model.load_state_dict(torch.load(args.weights, map_location="cpu"))
    else:
        warnings.warn("no --weights: compressing a randomly initialized ResNet-18 (smoke runs only)", stacklevel=1)
    ranks = {k: v for k, v in tnlayers.models.TABLE9.items() if args.only is None or fnmatch.fnmatchcase(k, args.only)}
    if not ranks:
        p.error(f"--only {args.only!r} matches no Table 9 layer")
    start = time.perf_counter()
    model = tnlayers.tensorize(model, format="tt", rank=ranks, init="decompose")
    table = tnlayers.summary(model)  # prints the per-layer table
    print(f"decomposed in {time.perf_counter() - start:.1f} s: {table.params:,} parameters "
          f"({table.compression:.1f}x fewer in the compressed layers' model than dense)")

    train, val = image_loaders(args)
    before = evaluate(model, val)
    sgd = dict(lr=args.lr, momentum=0.9, weight_decay=1e-5)
    opt = {"sgd": lambda: torch.optim.SGD(model.parameters(), **sgd),
           "sam": lambda: SAM(model.parameters(), torch.optim.SGD, rho=args.rho, **sgd),
           "das": lambda: DAS(model.parameters(), torch.optim.SGD, alpha=args.alpha, **sgd)}[args.optimizer]()
    total = args.epochs * len(train) if args.max_steps is None else min(args.max_steps, args.epochs * len(train))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total)
    step = 0
    for _ in range(args.epochs):
        model.train()
        for x, y in train:
            if step >= total:
                break
            training_step(model, opt, lambda: F.cross_entropy(model(x), y))
            sched.step()
            step += 1
    after = evaluate(model, val)
    result = dict(before_finetune=before, after_finetune=after, steps=step, params=table.params,
                  dense_params=table.dense_params, errors={r["name"]: r["error"] for r in table})
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
