"""Variance-preserving initialization of cores (after Pan et al., ICML 2022).

An entry of the reconstructed tensor is a sum over every bond configuration of a product of one entry
per core. With independent zero-mean cores of variance s_k^2, the terms are uncorrelated, so
Var(W) = (product of all bond sizes) * prod_k s_k^2. Giving every core the same std solves for it.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch

from .formats.network import Network

__all__ = ["core_std", "kaiming_std", "init_cores_"]


def kaiming_std(fan_in: int) -> float:
    """std of ``nn.init.kaiming_normal_`` (a=0, fan_in, leaky_relu gain sqrt(2)) for this fan-in."""
    return math.sqrt(2.0 / fan_in)


def core_std(net: Network, target_std: float) -> float:
    """Std of every core so that the reconstructed tensor has std ``target_std``."""
    n_terms = math.prod(net.sizes[b] for b in net.bonds)
    return (target_std ** 2 / n_terms) ** (1.0 / (2 * len(net.cores)))


@torch.no_grad()
def init_cores_(cores: Sequence[torch.Tensor], net: Network, target_std: float, generator=None) -> List[torch.Tensor]:
    std = core_std(net, target_std)
    for core in cores:
        core.normal_(0.0, std, generator=generator)
    return list(cores)
