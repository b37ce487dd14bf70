"""LinearAdapter: an adapter around ``nn.Linear`` or Hugging Face's GPT-2 ``Conv1D`` (a linear layer
whose weight is stored transposed, (in, out), applied with ``addmm``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import LinearPlan
from ..types import Shape
from .adapter import Adapter

__all__ = ["LinearAdapter", "is_hf_conv1d"]


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's c_attn, c_proj, c_fc), recognized without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and \
        isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


class LinearAdapter(Adapter):
    """``base(x) + scale·ΔW x`` for a frozen ``nn.Linear`` (or GPT-2 ``Conv1D``), ΔW (out, in) in format
    ``format`` ("lora", "tucker", "tt", "cp", "tr") of rank ``rank``; scale = alpha / rank.
    ``alpha`` is the adapter's output scale (scale = alpha / rank, LoRA's ``lora_alpha``), unrelated to the
    ``alpha`` of DAS, BAR or GSAM.

        >>> import torch
        >>> from tnlayers.adapters import LinearAdapter
        >>> base = torch.nn.Linear(32, 16)
        >>> adapter = LinearAdapter(base, "lora", rank=4, alpha=8)  # B (16, 4) · A (4, 32), B starts at zero
        >>> [tuple(c.shape) for c in adapter.cores], adapter.scale
        ([(16, 4), (4, 32)], 2.0)
        >>> x = torch.randn(5, 32)
        >>> torch.equal(adapter(x), base(x)), base.weight.requires_grad
        (True, False)
    """

    def __init__(self, base: nn.Module, format: str = "tucker", rank: int = 8, alpha: float = 16.0, *,
                 dropout: float = 0.0, init: str = "zero", strategy: str = "auto", out_shape: Optional[Shape] = None,
                 in_shape: Optional[Shape] = None):
        super().__init__()
        self.transposed = is_hf_conv1d(base)
        if not (isinstance(base, nn.Linear) or self.transposed):
            raise TypeError(f"LinearAdapter wraps an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
        in_dim, out_dim = base.weight.shape if self.transposed else base.weight.shape[::-1]
        self.in_features, self.out_features = in_dim, out_dim
        self._setup(base, format, rank, alpha, dropout, init, strategy, (out_dim, in_dim, ()), out_shape, in_shape)
        self.plan = LinearPlan(self.network, self.roles)

    def _delta_shape(self):
        return (self.out_features, self.in_features)

    def _to_base_layout(self, delta):
        return delta.t() if self.transposed else delta

    def _dense(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The base layer's own op with W + delta (the same kernel, so ΔW = 0 gives base(x) bit for bit)."""
        if self.transposed:  # as Conv1D.forward: addmm(bias, x, W) on the rows
            y = torch.addmm(self.base.bias, x.reshape(-1, self.in_features), self.base.weight + delta.t())
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.base.weight + delta, self.base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects input of shape (*, {self.in_features}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        self._check_materialized("forward")
        rows = x.numel() // self.in_features
        flops = lambda: (2 * rows * self.in_features * self.out_features, self.plan.weight_cost,  # noqa: E731
                         self.plan.costs(rows)[1])
        return self._forward_by(x, self._strategy_for(x, rows, flops))

    def _forward_by(self, x: torch.Tensor, strategy: str) -> torch.Tensor:
        if strategy == "dense":
            return self._dense(x, self.delta_weight())
        rows = x.numel() // self.in_features
        y = self.base(x)
        x2d = self.dropout(x).reshape(rows, self.in_features)
        delta = self.plan.factorized(x2d, self.core_parameters()).reshape(*x.shape[:-1], self.out_features)
        return y + (self.scale * delta).to(y.dtype)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        return f"{kind}: in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()
