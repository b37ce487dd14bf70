"""Squared core norms in one multi-tensor launch, and the dtype they are reduced in: shared by the optimizers
(DAS/BAR's statistics, SAM's perturbation norm, the divergence check) and the norm metrics."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["stat_dtype", "foreach_squared_norms"]

_DOUBLE = (torch.float64, torch.complex128)


def stat_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 when any tensor is float64 or complex128 (keeps float64 checks exact), else float32 (half/bf16
    cores too; complex64 ones have float32 norms)."""
    return torch.float64 if any(t.dtype in _DOUBLE for t in tensors) else torch.float32


def foreach_squared_norms(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """||t||_F² of each tensor as one vector, in one multi-tensor launch."""
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=dtype)).square()
