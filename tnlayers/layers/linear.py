"""TensorizedLinear: ``nn.Linear`` with a factorized weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import LinearPlan
from .layer import TensorizedLayer

__all__ = ["TensorizedLinear"]


class TensorizedLinear(TensorizedLayer):
    """``nn.Linear(in_features, out_features, bias)`` whose (out, in) weight is a tensor network over
    (in modes..., out modes...). ``rank``: int, per-bond sequence, or float in (0, 1] (fraction of the
    dense parameter count). ``in_shape``/``out_shape`` override the automatic tensorization.
    ``strategy``: "dense" (rebuild W, then F.linear), "factorized" (contract x through the cores) or
    "auto" (cheaper by FLOPs, per batch size)."""

    KIND = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 rank, format: str | None = None, in_shape=None, out_shape=None, strategy: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._setup(format, in_features, out_features, (), rank, in_shape, out_shape, bias, strategy, device, dtype)
        self.plan = LinearPlan(self.network, self.roles)
        self.reset_parameters()

    def _weight_shape(self):
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects input of shape (*, {self.in_features}), "
                             f"got {tuple(x.shape)}")
        rows = x.numel() // self.in_features
        strategy = self._strategy_for(rows, lambda: self.plan.costs(rows))
        if strategy == "dense":
            return F.linear(x, self.weight, self.bias)
        y = self.plan.factorized(x.reshape(rows, self.in_features), list(self.cores))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def from_dense(cls, module: nn.Linear, *, rank, format: str | None = None, in_shape=None, out_shape=None,
                   strategy: str = "auto", **options) -> "TensorizedLinear":
        """Build from an ``nn.Linear`` by decomposing its weight (``options`` go to the decomposition)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_dense expects an nn.Linear, got {type(module).__name__}")
        layer = cls(module.in_features, module.out_features, module.bias is not None, module.weight.device,
                    module.weight.dtype, rank=rank, format=format, in_shape=in_shape, out_shape=out_shape,
                    strategy=strategy)
        layer.init_from_weight(module.weight, module.bias, **options)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               + super().extra_repr()
