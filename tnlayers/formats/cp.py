"""CP (canonical polyadic): one factor (n_k, R) per mode, all sharing the rank index; no weight vector
(its scale lives in the factors, so every factor is a member of the scale-invariant group)."""
from __future__ import annotations

from math import prod

import numpy as np

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


def decompose(array: np.ndarray, net: Network, n_iter_max: int = 1000, tol: float = 1e-12, random_state=0,
              linesearch: bool = True, **_):
    """CP-ALS (tensorly). ALS finds a good, not the best, rank-R fit; the weights are spread evenly
    over the factors (sign kept on the first)."""
    from tensorly.decomposition import parafac

    r = net.sizes["r"]
    init = "svd" if r <= min(net.modes) else "random"
    weights, factors = parafac(array, rank=r, init=init, n_iter_max=n_iter_max, tol=tol,
                               random_state=random_state, normalize_factors=True, linesearch=linesearch)
    spread = np.abs(weights) ** (1.0 / len(factors))
    factors = [f * spread for f in factors]
    factors[0] = factors[0] * np.sign(weights + (weights == 0))
    return factors
