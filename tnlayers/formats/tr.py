"""Tensor-Ring: cores (r_0, n_1, r_1), (r_1, n_2, r_2), ..., (r_{d-1}, n_d, r_0), closed by a trace."""
from __future__ import annotations

from math import isqrt, prod

import torch

from ..decompositions.result import Decomposition
from ..decompositions.tensor_train import tr_svd, tr_svd_cost

from ._rank import rank_list
from .network import Network, check_modes, mode_label

NAME = "tr"
MERGE_SPATIAL = True  # paper Table 8: (in modes..., kh*kw, out modes...)
SPLIT_CHANNELS = {"conv": True, "linear": True}


def network(modes, rank) -> Network:
    modes = check_modes(modes)
    d = len(modes)
    bonds = rank_list(rank, d, NAME)
    sizes = {mode_label(i): n for i, n in enumerate(modes)}
    sizes.update({f"r{k}": r for k, r in enumerate(bonds)})
    cores = tuple((f"r{k}", mode_label(k), f"r{(k + 1) % d}") for k in range(d))
    return Network(NAME, modes, cores, sizes)


def layer_rank(rank, roles):
    return rank


def excess(net: Network):
    """Core k maps bond r_k to (n_k, r_{k+1}); a bond larger than the other side of either core it joins
    can be shrunk (by a QR of that core) without changing any representable tensor."""
    d, msgs = len(net.modes), []
    for k in range(d):
        left, right, n = net.sizes[f"r{k}"], net.sizes[f"r{(k + 1) % d}"], net.modes[k]
        if left > n * right:
            msgs.append(f"bond r{k}={left} > n{k}*r{(k + 1) % d}={n * right}")
        if right > n * left:
            msgs.append(f"bond r{(k + 1) % d}={right} > r{k}*n{k}={n * left}")
    return msgs


def _svd_ranks(net: Network):
    """The ranks TR-SVD runs with: the first unfolding fixes r_0 * r_1 <= n_1; we split that budget as evenly as
    the asked ranks allow (r_0 = 1 would degrade the ring to a train)."""
    d = len(net.modes)
    asked = [net.sizes[f"r{k}"] for k in range(d)]
    budget = min(net.modes[0], prod(net.modes[1:]))
    r0 = max(q for q in range(1, min(asked[0], isqrt(budget)) + 1) if budget % q == 0)
    return [r0, min(asked[1], budget // r0)] + asked[2:]


def decompose(tensor: torch.Tensor, net: Network, *, overwrite: bool = False, **_) -> Decomposition:
    """TR-SVD (``tnlayers.decompositions.tr_svd``), r_0 * r_1 split as ``_svd_ranks`` says; bonds may come back
    smaller than asked, and are padded afterwards. ``overwrite``: ``tensor`` may be overwritten (the caller's
    own copy)."""
    return tr_svd(tensor, _svd_ranks(net), overwrite=overwrite)


def decompose_cost(net: Network, **_) -> int:
    """Multiply-adds of ``decompose``, roughly (for progress reporting)."""
    return tr_svd_cost(net.modes, _svd_ranks(net))
