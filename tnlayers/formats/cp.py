"""CP (canonical polyadic): one factor (n_k, R) per mode, all sharing the rank index; no weight vector
(its scale lives in the factors, so every factor is a member of the scale-invariant group)."""
from __future__ import annotations

from math import prod

import torch

from ..decompositions.alternating_least_squares import cp_als, cp_als_cost
from ..decompositions.options import check_n_iter_max
from ..decompositions.result import Decomposition

from ._rank import rank_list
from .network import Network, check_modes, mode_label

NAME = "cp"
MERGE_SPATIAL = False  # 4-way CP of a conv weight: factors (C_out,R), (C_in,R), (kh,R), (kw,R)
SPLIT_CHANNELS = {"conv": False, "linear": True}


def network(modes, rank) -> Network:
    modes = check_modes(modes)
    (r,) = rank_list(rank, 1, NAME)
    sizes = {mode_label(i): n for i, n in enumerate(modes)}
    sizes["r"] = r
    return Network(NAME, modes, tuple((mode_label(i), "r") for i in range(len(modes))), sizes)


def layer_rank(rank, roles):
    return rank


def excess(net: Network):
    cap = prod(net.modes) // max(net.modes)  # no tensor of this shape has a larger CP rank
    return [f"rank {net.sizes['r']} > {cap}"] if net.sizes["r"] > cap else []


def decompose(tensor: torch.Tensor, net: Network, n_iter_max: int = 100, tol: float = 1e-6, random_state: int = 0,
              **_) -> Decomposition:
    """CP-ALS (``tnlayers.decompositions.cp_als``): at most ``n_iter_max`` iterations, fewer once one lowers
    the relative error by less than ``tol``; ``random_state`` seeds the start columns beyond a mode's size.
    ALS finds a good, not the best, rank-R fit; the weights are spread evenly over the factors."""
    return cp_als(tensor, net.sizes["r"], n_iter_max=n_iter_max, tol=tol, seed=random_state)


def decompose_cost(net: Network, n_iter_max: int = 100, **_) -> int:
    """Multiply-adds of ``decompose`` with all ``n_iter_max`` iterations, roughly (for progress reporting)."""
    return cp_als_cost(net.modes, net.sizes["r"], check_n_iter_max(n_iter_max))
