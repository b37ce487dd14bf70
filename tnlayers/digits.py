"""scikit-learn's bundled handwritten digits (no download) as a small image task, with symmetric label noise:
the data of ``tnlayers demo``, ``examples/train_cifar.py --dataset digits`` and the label-noise and
learning-rate benchmarks.
"""
from __future__ import annotations

import sys
from typing import Tuple

import torch

__all__ = ["digits", "symmetric_label_noise", "random_crops"]

Split = Tuple[torch.Tensor, torch.Tensor]


def digits(seed: int = 0) -> Tuple[Split, Split]:
    """The 1797 8x8 digits as 3-channel float images in [0, 1], split 80/20 (1437 train / 360 test) by a
    permutation drawn from ``seed``.

        >>> (x, y), (x_test, y_test) = digits(0)
        >>> x.shape, len(y_test)
        (torch.Size([1437, 3, 8, 8]), 360)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("the digits data come with scikit-learn: pip install 'tnlayers[demo]'")
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8).expand(-1, 3, -1, -1) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def symmetric_label_noise(labels: torch.Tensor, rate: float, seed: int, classes: int = 10) -> torch.Tensor:
    """Flip a ``rate`` fraction of ``labels`` (each with probability ``rate``) to a uniformly chosen *other* class.

        >>> labels = torch.arange(10).repeat(100)
        >>> noisy = symmetric_label_noise(labels, 0.4, seed=0)
        >>> round(float((noisy != labels).float().mean()), 2), bool(((noisy >= 0) & (noisy < 10)).all())
        (0.4, True)
    """
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(labels), generator=gen) < rate
    offsets = torch.randint(1, classes, (len(labels),), generator=gen)
    return torch.where(flip, (labels + offsets) % classes, labels)


def random_crops(x: torch.Tensor, gen: torch.Generator, pad: int = 1) -> torch.Tensor:
    """One random crop of the batch ``x`` (N, C, H, W) after zero-padding by ``pad`` pixels (no flips: a mirrored
    digit is not a digit).

        >>> x = torch.ones(4, 3, 8, 8)
        >>> random_crops(x, torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 8, 8])
    """
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    i, j = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()  # one crop per batch keeps it vectorized
    return padded[..., i:i + h, j:j + w]
