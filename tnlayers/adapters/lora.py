"""LoRA (Hu et al. 2021) as a format module, the same data the formats in ``tnlayers.formats`` give:
two cores, B (out, r) and A (r, in, *kernel), so ΔW = B·A. Adapters only: a layer replaced by B·A is
just a smaller dense layer, so this format is not offered to ``tensorize``."""
from __future__ import annotations

from math import prod

from ..formats._rank import rank_list
from ..formats.network import Network, check_modes, mode_label

NAME = "lora"
MERGE_SPATIAL = False
SPLIT_CHANNELS = {"conv": False, "linear": False}  # B·A spans the whole (out, in): splitting adds nothing


def network(modes, rank) -> Network:
    """Mode 0 is the output; every other mode (input, kernel) sits on A."""
    modes = check_modes(modes)
    (r,) = rank_list(rank, 1, NAME)
    sizes = {mode_label(i): n for i, n in enumerate(modes)}
    sizes["r"] = r
    cores = ((mode_label(0), "r"), ("r", *(mode_label(i) for i in range(1, len(modes)))))
    return Network(NAME, modes, cores, sizes)


def layer_rank(rank, roles):
    return rank


def excess(net: Network):
    r, cap = net.sizes["r"], min(net.modes[0], prod(net.modes[1:]))
    return [f"rank {r} > {cap} (the rank of an {net.modes[0]} x {prod(net.modes[1:])} matrix)"] if r > cap else []
