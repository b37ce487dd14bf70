"""Norm-dynamics metrics of core groups (docs/design.md, 'Norm deviation: s_k, γ_k, Q and Cov').

Here: the norm deviation Q of one group (:func:`norm_deviation`, from :func:`squared_norms`) and of every group
of a model (:func:`norm_report`), as plain numbers. The per-step log of s_k, γ_k, Q, Cov(s, γ) and the λ_k an
optimizer applied is :class:`NormDynamics`, which lives with the optimizers (``tnlayers.optim.NormDynamics``)
and is re-exported here, so every norm metric can be imported from ``tnlayers.metrics``.

    >>> import tnlayers
    >>> from tnlayers.metrics import NormDynamics, norm_deviation, norm_report, squared_norms
    >>> NormDynamics is tnlayers.optim.NormDynamics and norm_deviation is tnlayers.norm_deviation
    True
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from .groups import core_groups
from .optim.dynamics import NormDynamics
from .optim.norms import stat_dtype

__all__ = ["squared_norms", "norm_deviation", "norm_report", "NormDynamics"]


def squared_norms(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """s_k = ||G_k||_F^2 for each core, as one vector (differentiable) on the first core's device: float64 if any
    core is float64 or complex128, else float32 (half and bf16 cores are summed in float32; a complex core's
    entries count as |z|²).

        >>> import torch
        >>> from tnlayers.metrics import squared_norms
        >>> squared_norms([torch.ones(2, 2), torch.ones(3)])
        tensor([4., 3.])
    """
    if len(cores) == 0:
        raise ValueError("cores must hold at least one tensor")
    dtype = stat_dtype(cores)
    home = cores[0].device
    return torch.stack([_squared(c, dtype).to(home) for c in cores])


def _squared(core: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """||core||² in ``dtype``, differentiably; a complex core as its pairs of reals."""
    return (torch.view_as_real(core.resolve_conj()) if core.is_complex() else core).to(dtype).pow(2).sum()


def norm_deviation(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Norm deviation Q = sum_k (s_k - mean s)^2 of one core group; 0 iff all cores have equal norm.

    Returns a 0-d tensor (differentiable, so it can also serve as a regularizer); ``float(Q)`` for logging.

        >>> import torch, tnlayers
        >>> tnlayers.norm_deviation([torch.ones(2, 2), torch.ones(3)])  # s = (4, 3): Q = 0.5² + 0.5²
        tensor(0.5000)
        >>> float(tnlayers.norm_deviation(tnlayers.TTConv2d(16, 16, 3, rank=4).cores)) >= 0
        True
    """
    s = squared_norms(list(cores))
    return (s - s.mean()).pow(2).sum()


@torch.no_grad()
def norm_report(model: nn.Module) -> Dict[str, float]:
    """``{layer_name: Q}`` for every core group of ``model``, ready for CSV/TensorBoard logging.

        >>> import torch, tnlayers
        >>> model = torch.nn.Sequential(tnlayers.TTLinear(16, 16, rank=2), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> report = tnlayers.norm_report(model)
        >>> list(report), type(report["0"])
        (['0'], <class 'float'>)
    """
    return {name: float(norm_deviation(cores)) for name, cores in core_groups(model)}
