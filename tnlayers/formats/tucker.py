"""Tucker: a core (R_1, ..., R_d) and a factor (n_k, R_k) per factored mode. A mode whose rank is
``None`` keeps its full size in the core and has no factor: Tucker-2 of a conv weight is
factors on the two channel modes only, core (R_in, kh, kw, R_out)."""
from __future__ import annotations

from math import prod

import torch

from ..decompositions.options import check_n_iter_max
from ..decompositions.result import Decomposition
from ..decompositions.tucker_hooi import hooi, hooi_cost

from ._rank import rank_list
from .network import Network, check_modes, mode_label

NAME = "tucker"
MERGE_SPATIAL = False
SPLIT_CHANNELS = {"conv": False, "linear": False}  # TuckerLinear of order 2 = FLoRA's A G B^T


def network(modes, rank) -> Network:
    modes = check_modes(modes)
    ranks = rank_list(rank, len(modes), NAME, allow_none=True)
    if all(r is None for r in ranks):
        raise ValueError("tucker rank must factor at least one mode (all entries are None)")
    sizes = {mode_label(i): n for i, n in enumerate(modes)}
    core, factors = [], []
    for i, r in enumerate(ranks):
        if r is None:
            core.append(mode_label(i))
        else:
            sizes[f"r{i}"] = r
            core.append(f"r{i}")
            factors.append((mode_label(i), f"r{i}"))
    return Network(NAME, modes, (tuple(core), *factors), sizes)


def layer_rank(rank, roles):
    """Tucker-2 for layers: an int or a per-channel-mode sequence leaves the spatial modes unfactored;
    a sequence over every mode (None allowed) is taken as is (full Tucker)."""
    channel = [i for i, role in enumerate(roles) if role != "spatial"]
    if isinstance(rank, (list, tuple)) and len(rank) == len(roles):
        return list(rank)
    if isinstance(rank, (list, tuple)):
        if len(rank) != len(channel):
            raise ValueError(f"tucker rank for this layer needs {len(channel)} entries (one per channel mode) "
                             f"or {len(roles)} (one per mode, None = unfactored), got {list(rank)!r}")
        it = iter(rank)
        return [next(it) if role != "spatial" else None for role in roles]
    return [None if role == "spatial" else rank for role in roles]


def excess(net: Network):
    """A rank above its mode's size, or above the product of the core's other sizes, cannot help."""
    core = net.shapes[0]
    msgs = []
    for i, n in enumerate(net.modes):
        r = net.sizes.get(f"r{i}")
        if r is not None and r > n:
            msgs.append(f"rank r{i}={r} > n{i}={n}")
        elif r is not None and r > prod(core) // r:
            msgs.append(f"rank r{i}={r} > {prod(core) // r} (the core's other sizes)")
    return msgs


def decompose(tensor: torch.Tensor, net: Network, n_iter_max: int = 10, tol: float = 1e-4, **_) -> Decomposition:
    """HOSVD then HOOI sweeps over the factored modes (``tnlayers.decompositions.hooi``): at most
    ``n_iter_max`` sweeps, fewer once a sweep lowers the relative error by less than ``tol``. Ranks above what
    the shape can fill come back smaller and are padded afterwards."""
    return hooi(tensor, [net.sizes.get(f"r{i}") for i in range(len(net.modes))], n_iter_max=n_iter_max, tol=tol)


def decompose_cost(net: Network, n_iter_max: int = 10, **_) -> int:
    """Multiply-adds of ``decompose`` with all ``n_iter_max`` sweeps, roughly (for progress reporting)."""
    return hooi_cost(net.modes, [net.sizes.get(f"r{i}") for i in range(len(net.modes))], check_n_iter_max(n_iter_max))
