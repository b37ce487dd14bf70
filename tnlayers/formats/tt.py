"""Tensor-Train: cores (n_1, r_1), (r_1, n_2, r_2), ..., (r_{d-1}, n_d); bonds written [1, r_1, ..., 1]."""
from __future__ import annotations

from math import prod

import torch

from ..decompositions.result import Decomposition
from ..decompositions.tensor_train import tt_svd, tt_svd_cost

from ._rank import check_int_rank, rank_list
from .network import Network, check_modes, mode_label

NAME = "tt"
MERGE_SPATIAL = True  # a conv's kh*kw is one mode: cores (C_in, r1), (r1, kh*kw, r2), (r2, C_out)
SPLIT_CHANNELS = {"conv": False, "linear": True}


def network(modes, rank) -> Network:
    modes = check_modes(modes)
    d = len(modes)
    if isinstance(rank, (list, tuple)) and len(rank) == d + 1:  # [1, r1, ..., r_{d-1}, 1]
        if check_int_rank(rank[0], "rank[0]") != 1 or check_int_rank(rank[-1], "rank[-1]") != 1:
            raise ValueError(f"tt rank written with its boundary bonds must start and end with 1, got {list(rank)!r}")
        rank = rank[1:-1]
    bonds = rank_list(rank, d - 1, NAME)
    sizes = {mode_label(i): n for i, n in enumerate(modes)}
    sizes.update({f"r{k + 1}": r for k, r in enumerate(bonds)})
    cores = [(mode_label(0), "r1")]
    cores += [(f"r{k}", mode_label(k), f"r{k + 1}") for k in range(1, d - 1)]
    cores += [(f"r{d - 1}", mode_label(d - 1))]
    return Network(NAME, modes, tuple(cores), sizes)


def layer_rank(rank, roles):
    return rank


def excess(net: Network):
    """Bonds larger than the rank of the unfolding they cut: they add parameters, not expressiveness."""
    msgs = []
    for k in range(1, len(net.modes)):
        r, cap = net.sizes[f"r{k}"], min(prod(net.modes[:k]), prod(net.modes[k:]))
        if r > cap:
            msgs.append(f"bond r{k}={r} > {cap}")
    return msgs


def decompose(tensor: torch.Tensor, net: Network, **_) -> Decomposition:
    """TT-SVD (``tnlayers.decompositions.tt_svd``); bonds may come back smaller than asked (the unfolding's
    rank). ``spectra["r<k>"]``: the singular values of the k-th sequential unfolding."""
    d = len(net.modes)
    out = tt_svd(tensor, [net.sizes[f"r{k}"] for k in range(1, d)])
    out.cores[0], out.cores[-1] = out.cores[0][0], out.cores[-1][..., 0]
    return out


def decompose_cost(net: Network, **_) -> int:
    """Multiply-adds of ``decompose``, roughly (for progress reporting)."""
    return tt_svd_cost(net.modes, [net.sizes[f"r{k}"] for k in range(1, len(net.modes))])
