"""Dense tensor -> cores of a network: the format's decomposition (``tnlayers/decompositions/``, torch.linalg in
float64 on the CPU), then cores grown to the network's sizes where a bond came back smaller."""
from __future__ import annotations

import math
from typing import List

import torch

from .decompositions.result import Decomposition
from .decompositions.threads import mostly_one_thread
from .formats import get_format
from .formats.network import Network
from .init import core_std

__all__ = ["decompose", "decompose_cost", "decompose_network", "pad_cores", "relative_error"]


def pad_cores(cores: List[torch.Tensor], net: Network, noise_std: float, generator: torch.Generator
              ) -> List[torch.Tensor]:
    """Grow cores whose bonds came back smaller than ``net`` asks, without changing the tensor they form.

    For each grown bond, its last core gets zeros in the new slices and the other cores random entries:
    every added term of the contraction is then zero, yet each added entry has a non-zero gradient (two
    zero sides would be a saddle that training never leaves).

        >>> from tnlayers.formats import get_format
        >>> net = get_format("tt").network((2, 3), 4)  # bond r1 = 4 > 2, the largest a 2 x 3 matrix has
        >>> cores = pad_cores([torch.ones(2, 2), torch.ones(2, 3)], net, 0.1, torch.Generator().manual_seed(0))
        >>> [tuple(c.shape) for c in cores], bool((cores[1][2:] == 0).all())
        ([(2, 4), (4, 3)], True)
    """
    last_holder = {label: k for k, labels in enumerate(net.cores) for label in labels}
    out = []
    for k, (core, labels, shape) in enumerate(zip(cores, net.cores, net.shapes)):
        if tuple(core.shape) == shape:
            out.append(core)
            continue
        if any(got > want for got, want in zip(core.shape, shape)) or core.ndim != len(shape):
            raise RuntimeError(f"decomposition returned core {k} of shape {tuple(core.shape)}, larger than {shape}")
        grown = torch.randn(shape, generator=generator, dtype=torch.float64).mul_(noise_std).to(core)
        grown[tuple(slice(0, n) for n in core.shape)] = core
        for axis, label in enumerate(labels):
            if last_holder[label] == k and core.shape[axis] < shape[axis]:
                grown.narrow(axis, core.shape[axis], shape[axis] - core.shape[axis]).zero_()
        out.append(grown)
    return out


@torch.no_grad()
@mostly_one_thread
def decompose_network(tensor: torch.Tensor, net: Network, seed: int = 0, **options) -> Decomposition:
    """The format's decomposition of ``tensor`` (shape ``net.modes``) with the cores of ``net`` (float64, on the
    CPU, grown to its sizes) and the spectra the decomposition computed (singular values per unfolding it cut,
    for choosing ranks). ``options`` go to the format's decomposition (``n_iter_max``, ``tol`` for CP-ALS, HOOI).

        >>> from tnlayers.formats import get_format
        >>> out = decompose_network(torch.randn(4, 6), get_format("tt").network((4, 6), 2))
        >>> [tuple(c.shape) for c in out.cores], tuple(out.spectra["r1"].shape)
        ([(4, 2), (2, 6)], (4,))
    """
    if tuple(tensor.shape) != net.modes:
        raise ValueError(f"tensor of shape {tuple(tensor.shape)} does not match the network's modes {net.modes}")
    # one contiguous float64 copy (a layer's weight comes as a permuted view): the unfoldings are then views
    array = tensor.detach().to("cpu", torch.float64, memory_format=torch.contiguous_format)
    spread = float(array.std()) if array.numel() > 1 else 0.0
    # a copy of ours may be overwritten by the decomposition (TR-SVD's first cut): one tensor of its size, not two
    owned = array.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
    out = get_format(net.format).decompose(array, net, overwrite=owned, **options)
    std = core_std(net, spread or 1.0)
    out.cores = [c.contiguous() for c in pad_cores(out.cores, net, std, torch.Generator().manual_seed(seed))]
    return out


def decompose(tensor: torch.Tensor, net: Network, seed: int = 0, **options) -> List[torch.Tensor]:
    """Cores of ``net`` (format, shapes) approximating ``tensor`` (shape ``net.modes``), as float64 tensors
    on the CPU. ``options`` go to the format's decomposition (e.g. ``n_iter_max`` for CP-ALS, HOOI).

        >>> from tnlayers.formats import get_format
        >>> [tuple(c.shape) for c in decompose(torch.randn(4, 6), get_format("cp").network((4, 6), 3))]
        [(4, 3), (6, 3)]
    """
    return decompose_network(tensor, net, seed, **options).cores


def decompose_cost(net: Network, **options) -> int:
    """Multiply-adds that decomposing into ``net`` takes, roughly: the weight of a layer in a progress bar
    over layers whose costs differ by orders of magnitude. ``options`` as for ``decompose``.

        >>> from tnlayers.formats import get_format
        >>> big, small = get_format("cp").network((512, 3, 3, 512), 229), get_format("cp").network((64, 3, 3, 64), 27)
        >>> decompose_cost(big) > 100 * decompose_cost(small)
        True
    """
    return int(get_format(net.format).decompose_cost(net, **options))


@torch.no_grad()
@mostly_one_thread
def relative_error(approx: torch.Tensor, exact: torch.Tensor, chunk: int = 1 << 20) -> float:
    """``||approx - exact|| / ||exact||`` (Frobenius), the squares summed in float64 over ``chunk`` entries at a
    time: float64 accumulation without a float64 copy of either tensor (2x a float32 weight each). The
    difference itself is taken in the tensors' dtype, where it is exact for close values (Sterbenz).

        >>> relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 5.0]))  # 1 / sqrt(34)
        0.17149858514250882
    """
    a, e = approx.reshape(-1), exact.reshape(-1)
    diff = torch.zeros((), dtype=torch.float64, device=e.device)
    norm = torch.zeros((), dtype=torch.float64, device=e.device)
    for start in range(0, e.numel(), chunk):
        piece = e[start:start + chunk]
        diff += torch.linalg.vector_norm(a[start:start + chunk] - piece, dtype=torch.float64) ** 2
        norm += torch.linalg.vector_norm(piece, dtype=torch.float64) ** 2
    return math.sqrt(float(diff)) / max(math.sqrt(float(norm)), 1e-300)
