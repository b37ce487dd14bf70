"""What every tensorized module shares: a network's cores held as one scale-invariant group."""
from __future__ import annotations

import warnings
from typing import List, Sequence

import torch
from torch import nn

from ..formats import get_format
from ..formats.network import Network
from ..groups import mark_core_group

__all__ = ["CoreModule", "build_network"]

_warned = set()  # (format, excess message) pairs already reported: the excess warning is one-time


def build_network(fmt, modes, rank, roles) -> Network:
    """The format's network for ``modes``; warns once per configuration about bonds that cannot help."""
    net = fmt.network(modes, fmt.layer_rank(rank, roles))
    excess = fmt.excess(net)
    key = (fmt.NAME, net.modes, tuple(net.ranks.items()))
    if excess and key not in _warned:
        _warned.add(key)
        warnings.warn(f"{fmt.NAME} network over modes {net.modes}: {', '.join(excess)}. Kept as given: the "
                      f"excess adds parameters but no expressiveness.", UserWarning, stacklevel=4)
    return net


class CoreModule(nn.Module):
    """Holds ``self.cores`` (an ``nn.ParameterList`` in the network's core order) as one core group."""

    network: Network

    def _init_cores(self, net: Network, device=None, dtype=None) -> None:
        self.network = net
        self.format = net.format
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(shape, device=device, dtype=dtype)) for shape in net.shapes])
        mark_core_group(list(self.cores))

    def core_parameters(self) -> List[nn.Parameter]:
        """The cores, in order: the parameters of this module's scale-invariant group."""
        return list(self.cores)

    @property
    def ranks(self) -> dict:
        """Bond label -> size, e.g. ``{'r1': 64, 'r2': 64}`` for a TT conv."""
        return dict(self.network.ranks)

    def __setstate__(self, state):
        super().__setstate__(state)
        mark_core_group(list(self.cores))  # deepcopy/unpickling makes new parameter objects without markers

    @torch.no_grad()
    def _load_cores(self, cores: Sequence[torch.Tensor]) -> None:
        for param, value in zip(self.cores, cores):
            param.copy_(value.to(param.dtype))

    def _format_module(self):
        return get_format(self.network.format)
