"""Norm-dynamics metrics of core groups (docs/design.md, 'Norm deviation: s_k, γ_k, Q and Cov')."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from .groups import core_groups

__all__ = ["squared_norms", "norm_deviation", "norm_report"]


def squared_norms(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """s_k = ||G_k||_F^2 for each core, as one vector (differentiable): float64 if any core is float64,
    else float32 (half and bf16 cores are summed in float32)."""
    if len(cores) == 0:
        raise ValueError("cores must hold at least one tensor")
    dtype = torch.float64 if any(c.dtype == torch.float64 for c in cores) else torch.float32
    return torch.stack([c.to(dtype).pow(2).sum() for c in cores])


def norm_deviation(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Norm deviation Q = sum_k (s_k - mean s)^2 of one core group; 0 iff all cores have equal norm.

    Returns a 0-d tensor (differentiable, so it can also serve as a regularizer); ``float(Q)`` for logging.
    """
    s = squared_norms(list(cores))
    return (s - s.mean()).pow(2).sum()


@torch.no_grad()
def norm_report(model: nn.Module) -> Dict[str, float]:
    """``{layer_name: Q}`` for every core group of ``model``, ready for CSV/TensorBoard logging."""
    return {name: float(norm_deviation(cores)) for name, cores in core_groups(model)}
