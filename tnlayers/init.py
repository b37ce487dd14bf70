"""Variance-preserving initialization of cores (after Pan et al., ICML 2022), and the weight std a layer
starts at.

An entry of the reconstructed tensor is a sum over every bond configuration of a product of one entry
per core. With independent zero-mean cores of variance s_k^2, the terms are uncorrelated, so
Var(W) = (product of all bond sizes) * prod_k s_k^2. Giving every core the same std solves for it.

The target std of a layer's weight (``weight_std=``) is ``"nn"`` (the default: the std of ``nn.Conv2d`` /
``nn.Linear``'s default init), ``"kaiming_normal"`` (He et al.: ReLU gain, fan-in) or a positive number.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import List, Sequence, Union

import torch

from .formats.network import Network

__all__ = ["core_std", "kaiming_std", "nn_default_std", "init_cores_", "WEIGHT_STDS", "check_weight_std",
           "resolve_weight_std"]

WeightStd = Union[str, float]
WEIGHT_STDS = ("nn", "kaiming_normal")  # the named targets of ``weight_std=``


def kaiming_std(fan_in: int) -> float:
    """std of ``nn.init.kaiming_normal_`` (a=0, fan_in, leaky_relu gain sqrt(2)) for this fan-in."""
    return math.sqrt(2.0 / fan_in)


def nn_default_std(fan_in: int) -> float:
    """std of ``nn.Conv2d``/``nn.Linear``'s default weight, ``kaiming_uniform_(a=sqrt(5))``: uniform on
    ±1/sqrt(fan_in), whose std is that bound over sqrt(3)."""
    return 1.0 / math.sqrt(3.0 * fan_in)


def check_weight_std(value) -> WeightStd:
    """``value`` if it is a valid ``weight_std=`` (a name of WEIGHT_STDS or a finite number > 0), else a
    ValueError/TypeError naming the argument. Example: ``check_weight_std(0.05) == 0.05``."""
    if isinstance(value, str):
        if value not in WEIGHT_STDS:
            raise ValueError(f"weight_std must be one of {WEIGHT_STDS} or a positive number, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"weight_std must be one of {WEIGHT_STDS} or a positive number, got "
                        f"{type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"weight_std must be a finite number > 0 (or one of {WEIGHT_STDS}), got {value!r}")
    return float(value)


def resolve_weight_std(value: WeightStd, fan_in: int) -> float:
    """The std a ``weight_std=`` value asks for, for a layer of this fan-in."""
    if value == "nn":
        return nn_default_std(fan_in)
    if value == "kaiming_normal":
        return kaiming_std(fan_in)
    return float(value)


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
