"""Train a tensorized CIFAR ResNet with SGD, SAM, DAS or BAR (the paper's CIFAR-10 experiments).

    python examples/train_cifar.py --data-dir ~/data --model resnet32 --format tr --rank 15 --optimizer das
    python examples/train_cifar.py --dataset synthetic --epochs 2 --max-steps 20     # smoke run, no data
    python examples/train_cifar.py --dataset digits --model resnet20 --label-noise 0.4  # bundled data, minutes

Defaults are the paper's (appendix B): lr 0.1 with cosine annealing, momentum 0.9, weight decay 5e-4,
batch 128, 200 epochs; SAM rho 0.05, DAS alpha 0.1. ``--label-noise 0.4`` flips that fraction of the
training labels to a uniformly chosen other class (symmetric noise; the test set stays clean).

CIFAR-10 is read from ``--data-dir`` in its python format (``cifar-10-batches-py/data_batch_1..5`` and
``test_batch``, as distributed); nothing is downloaded. ``--dataset synthetic`` makes a 10-class task with
learnable structure (class templates under noise, random shifts) for runs without the data; ``--dataset
digits`` trains on scikit-learn's bundled 8x8 handwritten digits (1437 train / 360 test, real images, no
download; the split is fixed, ``--seed`` varies initialization, data order, augmentation and label noise).
``--augment crop`` (random crops only) suits digits, whose mirror images are not digits.
Per epoch: train loss, test accuracy, mean norm deviation Q over the core groups, median step time;
written as JSON and CSV to ``--out-dir`` with a PNG of the curves. ``--checkpoint PATH`` saves everything
needed to resume after every epoch (``tnlayers.training``: model, optimizer state incl. DAS/SAM, schedule,
RNG states, data order); ``--resume`` continues from it with the same results as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import csv
import json
import pickle
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tnlayers
from tnlayers.digits import digits, random_crops, symmetric_label_noise as add_label_noise  # the demo's too
from tnlayers.optim import BAR, DAS, GSAM, SAM, training_step
from tnlayers.training import load_checkpoint, save_checkpoint

CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # CIFAR-10 channel mean, std


def load_cifar10(data_dir: Path):
    folder = Path(data_dir).expanduser() / "cifar-10-batches-py"
    files = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"CIFAR-10 not found: missing {missing[0]}{' and more' if len(missing) > 1 else ''}.\n"
                         f"Nothing is downloaded here: put the python version of CIFAR-10 (cifar-10-batches-py) "
                         f"under --data-dir, or run with --dataset synthetic.")

    def read(paths):
        xs, ys = [], []
        for path in paths:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(batch["labels"])
        return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys)
    return read(files[:5]), read(files[5:])


def synthetic_task(n_train: int, n_test: int, seed: int):
    """Ten smooth class templates; each image is its template, randomly shifted, plus noise (uint8)."""
    gen = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(10, 3, 8, 8, generator=gen), size=32, mode="bilinear", align_corners=False)

    def draw(n):
        labels = torch.randint(0, 10, (n,), generator=gen)
        shifts = torch.randint(-3, 4, (n, 2), generator=gen)
        images = torch.stack([torch.roll(templates[c], tuple(s.tolist()), dims=(1, 2)) for c, s in zip(labels, shifts)])
        images = (images + 0.35 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
        return (images * 255).to(torch.uint8), labels
    return draw(n_train), draw(n_test)


def load_digits():
    """scikit-learn's 8x8 digits as uint8 3-channel images, the demo's fixed 80/20 split (``tnlayers.digits``)."""
    (x_train, y_train), (x_test, y_test) = digits(0)
    as_uint8 = lambda x: (x * 255).round().to(torch.uint8)  # noqa: E731  (digits() scales to [0, 1])
    return (as_uint8(x_train), y_train), (as_uint8(x_test), y_test)


def channel_stats(images: torch.Tensor):
    """Per-channel mean and std of uint8 images, scaled to [0, 1]."""
    x = images.float() / 255
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())


def normalize(images: torch.Tensor, stats=CIFAR_STATS) -> torch.Tensor:
    mean, std = stats
    x = images.float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def augment(x: torch.Tensor, gen: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random crop with size/8-pixel padding (4 for 32x32) and horizontal flip (the standard CIFAR augmentation;
    ``flip=False``: crops only)."""
    x = random_crops(x, gen, pad=max(1, x.shape[-1] // 8))  # one crop per batch keeps it vectorized
    if not flip:
        return x
    flipped = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(flipped.view(-1, 1, 1, 1), x.flip(3), x)


def build_model(args) -> torch.nn.Module:
    model = getattr(tnlayers.models, args.model)(num_classes=10)
    if args.format != "dense":
        model = tnlayers.tensorize(model, format=args.format, rank=args.rank)
    return model


def build_optimizer(args, model, total_steps):
    sgd = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), **sgd)
    if args.optimizer == "sam":
        return SAM(model.parameters(), torch.optim.SGD, rho=args.rho, **sgd)
    if args.optimizer == "gsam":
        return GSAM(model.parameters(), torch.optim.SGD, rho=args.rho, alpha=args.gsam_alpha, **sgd)
    if args.optimizer == "das":
        return DAS(model.parameters(), torch.optim.SGD, alpha=args.alpha, **sgd)
    return BAR(model.parameters(), torch.optim.SGD, alpha=args.alpha, total_steps=total_steps, **sgd)


def load_data(args):
    if args.dataset == "cifar10":
        return load_cifar10(args.data_dir)
    if args.dataset == "digits":
        return load_digits()
    return synthetic_task(args.synthetic_size, args.synthetic_size // 5, args.seed)


def train(args, write_results: bool = True) -> list:
    """Train as ``args`` (from :func:`parse_args`) say; returns the per-epoch history (``write_results=False``:
    nothing is written but the checkpoint, for callers that collect the histories themselves)."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    (x_train, y_train), (x_test, y_test) = load_data(args)
    stats = CIFAR_STATS if args.dataset == "cifar10" else channel_stats(x_train)
    if args.label_noise:
        y_train = add_label_noise(y_train, args.label_noise, args.seed)
    x_test = normalize(x_test, stats)
    model = build_model(args)
    steps_per_epoch = (len(y_train) + args.batch_size - 1) // args.batch_size
    total = args.epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, args.epochs * steps_per_epoch)
    opt = build_optimizer(args, model, total)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    gen = torch.Generator().manual_seed(args.seed + 1)  # data order and augmentation
    history, step, first_epoch = [], 0, 0
    if args.resume:
        if args.checkpoint is None:
            raise SystemExit("--resume needs --checkpoint PATH")
        if Path(args.checkpoint).exists():
            saved = load_checkpoint(args.checkpoint, model, opt, sched)
            step, extra = saved["step"], saved["extra"]
            history, first_epoch = extra["history"], extra["epoch"]
            gen.set_state(extra["generator"])
            print(f"resumed from {args.checkpoint} after epoch {first_epoch} (step {step})")
    for epoch in range(first_epoch, args.epochs):
        model.train()
        losses, times = [], []
        for idx in torch.randperm(len(y_train), generator=gen).split(args.batch_size):
            if step >= total:
                break
            x, y = normalize(x_train[idx], stats), y_train[idx]
            x = x if args.augment == "none" else augment(x, gen, flip=args.augment == "crop+flip")
            start = time.perf_counter()
            loss = training_step(model, opt, lambda: F.cross_entropy(model(x), y))
            sched.step()
            times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
            step += 1
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x_test.split(500), y_test.split(500)))
        q = tnlayers.norm_report(model)
        history.append(dict(epoch=epoch + 1, steps=step, train_loss=statistics.fmean(losses) if losses else float("nan"),
                            test_accuracy=correct / len(y_test), mean_Q=statistics.fmean(q.values()) if q else None,
                            step_ms=1e3 * statistics.median(times) if times else None))
        print(json.dumps(history[-1]))
        if args.checkpoint is not None:  # after every epoch: model, optimizer, schedule, RNGs, data order
            save_checkpoint(args.checkpoint, model, opt, sched, step=step,
                            extra=dict(epoch=epoch + 1, history=history, generator=gen.get_state()))
        if step >= total or (args.stop_after is not None and epoch + 1 - first_epoch >= args.stop_after):
            break
    if write_results:
        write(args, history)
    return history


def write(args, history) -> None:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model}_{args.format}_{args.optimizer}_noise{args.label_noise}"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (out / f"{stem}.json").write_text(json.dumps(dict(args=settings, history=history), indent=2))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [h["epoch"] for h in history]
    a.plot(epochs, [h["test_accuracy"] for h in history])
    a.set(xlabel="epoch", ylabel="test accuracy")
    b.plot(epochs, [h["mean_Q"] or 0 for h in history])
    b.set(xlabel="epoch", ylabel="mean Q over core groups")
    fig.suptitle(stem)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["cifar10", "synthetic", "digits"], default="cifar10")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--model", choices=["resnet20", "resnet32"], default="resnet32")
    p.add_argument("--format", choices=["tr", "cp", "tt", "tucker", "dense"], default="tr")
    p.add_argument("--rank", type=float, default=15, help="int rank, or a float in (0, 1): fraction of parameters")
    p.add_argument("--optimizer", choices=["sgd", "sam", "gsam", "das", "bar"], default="das")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--rho", type=float, default=0.05, help="SAM")
    p.add_argument("--alpha", type=float, default=0.1, help="DAS / BAR")
    p.add_argument("--gsam-alpha", type=float, default=0.1, help="GSAM's surrogate-gap coefficient")
    p.add_argument("--augment", choices=["crop+flip", "crop", "none"], default="crop+flip")
    p.add_argument("--label-noise", type=float, default=0.0)
    p.add_argument("--synthetic-size", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=Path("runs"))
    p.add_argument("--checkpoint", type=Path, default=None, help="save here after every epoch (atomic)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint when it exists")
    p.add_argument("--stop-after", type=int, default=None, help="train this many epochs now, resume later")
    args = p.parse_args(argv)
    if not 0.0 <= args.label_noise < 1.0:
        p.error("--label-noise must be in [0, 1)")
    if args.epochs < 1 or args.batch_size < 1 or (args.max_steps is not None and args.max_steps < 1):
        p.error("--epochs, --batch-size and --max-steps must be >= 1")
    if args.rank >= 1:
        if args.rank != int(args.rank):
            p.error("--rank must be an int >= 1 or a fraction in (0, 1)")
        args.rank = int(args.rank)
    elif args.rank <= 0:
        p.error("--rank must be an int >= 1 or a fraction in (0, 1)")
    return args


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
