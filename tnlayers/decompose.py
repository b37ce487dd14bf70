"""Dense tensor -> cores of a network, with tensorly (float64 numpy, no global backend change)."""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from .formats import get_format
from .formats.network import Network
from .init import core_std

__all__ = ["decompose", "pad_cores"]


def pad_cores(cores: List[np.ndarray], net: Network, noise_std: float, rng: np.random.Generator) -> List[np.ndarray]:
    """Grow cores whose bonds came back smaller than ``net`` asks, without changing the tensor they form.

    For each grown bond, its last core gets zeros in the new slices and the other cores random entries:
    every added term of the contraction is then zero, yet each added entry has a non-zero gradient (two
    zero sides would be a saddle that training never leaves).
    """
    last_holder = {label: k for k, labels in enumerate(net.cores) for label in labels}
    out = []
    for k, (core, labels, shape) in enumerate(zip(cores, net.cores, net.shapes)):
        if core.shape == shape:
            out.append(core)
            continue
        if any(got > want for got, want in zip(core.shape, shape)) or core.ndim != len(shape):
            raise RuntimeError(f"decomposition returned core {k} of shape {core.shape}, larger than {shape}")
        grown = rng.normal(0.0, noise_std, size=shape)
        grown[tuple(slice(0, n) for n in core.shape)] = core
        for axis, label in enumerate(labels):
            if last_holder[label] == k and core.shape[axis] < shape[axis]:
                index = [slice(None)] * len(shape)
                index[axis] = slice(core.shape[axis], None)
                grown[tuple(index)] = 0.0
        out.append(grown)
    return out


def decompose(tensor: torch.Tensor, net: Network, seed: int = 0, **options) -> List[torch.Tensor]:
    """Cores of ``net`` (format, shapes) approximating ``tensor`` (shape ``net.modes``), as float64 tensors
    on the CPU. ``options`` go to the format's decomposition (e.g. ``n_iter_max`` for CP-ALS, HOOI)."""
    import tensorly as tl

    if tuple(tensor.shape) != net.modes:
        raise ValueError(f"tensor of shape {tuple(tensor.shape)} does not match the network's modes {net.modes}")
    array = tensor.detach().to("cpu", torch.float64).numpy()
    with tl.backend_context("numpy"):
        cores = get_format(net.format).decompose(array, net, **options)
    std = core_std(net, float(array.std()) or 1.0)
    cores = pad_cores([np.asarray(c, dtype=np.float64) for c in cores], net, std, np.random.default_rng(seed))
    return [torch.from_numpy(np.ascontiguousarray(c)) for c in cores]
