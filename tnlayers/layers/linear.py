"""TensorizedLinear: ``nn.Linear`` with a factorized weight."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import LinearPlan
from ..shapes import positive_int
from ..types import Device, DType, Rank, Shape
from .tensorized import TensorizedLayer

__all__ = ["TensorizedLinear"]


class TensorizedLinear(TensorizedLayer):
    """``nn.Linear(in_features, out_features, bias)`` whose (out, in) weight is a tensor network over
    (in modes..., out modes...). ``rank``: int, per-bond sequence, or float in (0, 1] (fraction of the
    dense parameter count). ``in_shape``/``out_shape`` override the automatic tensorization.
    ``strategy``: "dense" (rebuild W, then F.linear), "factorized" (contract x through the cores), "flops"
    (fewer FLOPs) or "auto" (FLOPs, refined by timing both once per batch size: :mod:`tnlayers.strategy`).
    Without gradients the dense weight is cached until a core changes.

    ``weight_std``: the std of the reconstructed weight at init (``reset_parameters``): ``"nn"`` (default)
    that of ``nn.Linear``'s default init, 1/sqrt(3 in_features); ``"kaiming_normal"`` He's
    sqrt(2/in_features); or a number > 0. The bias starts as ``nn.Linear``'s.

    Example::

        >>> import torch, tnlayers
        >>> layer = tnlayers.TensorizedLinear(64, 32, rank=4, format="tt")  # = tnlayers.TTLinear(64, 32, rank=4)
        >>> layer(torch.randn(8, 64)).shape
        torch.Size([8, 32])
        >>> layer.weight.shape, layer.in_shape, layer.out_shape
        (torch.Size([32, 64]), (4, 4, 4), (4, 4, 2))
    """

    KIND = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Device = None,
                 dtype: DType = None, *, rank: Rank, format: Optional[str] = None, in_shape: Optional[Shape] = None,
                 out_shape: Optional[Shape] = None, strategy: str = "auto", weight_std: Union[float, str] = "nn"):
        super().__init__()
        in_features = positive_int(in_features, "in_features")
        out_features = positive_int(out_features, "out_features")
        self.in_features, self.out_features = in_features, out_features
        self._setup(format, in_features, out_features, (), rank, in_shape, out_shape, bias, strategy, device, dtype,
                    weight_std)
        self.plan = LinearPlan(self.network, self.roles)
        self.reset_parameters()

    def _weight_shape(self):
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects input of shape (*, {self.in_features}), "
                             f"got {tuple(x.shape)}")
        return self._apply_cores(x)

    def _shape_key(self, x):
        # only the number of rows matters; rounded up to a power of two so varying lengths share decisions
        rows = x.numel() // self.in_features
        return 1 << max(rows - 1, 0).bit_length()

    def _dense(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _factorized(self, x, cores, bias):
        rows = x.numel() // self.in_features
        y = self.plan.factorized(x.reshape(rows, self.in_features), cores)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias.to(y.dtype)

    def _costs(self, x):
        return self.plan.costs(x.numel() // self.in_features)

    @classmethod
    def from_dense(cls, module: nn.Linear, *, rank: Rank, format: Optional[str] = None,
                   in_shape: Optional[Shape] = None, out_shape: Optional[Shape] = None, strategy: str = "auto",
                   **options: Any) -> "TensorizedLinear":
        """Build from an ``nn.Linear`` by decomposing its weight (``options`` go to the decomposition).

            >>> import torch, tnlayers
            >>> dense = torch.nn.Linear(32, 32)
            >>> layer = tnlayers.TuckerLinear.from_dense(dense, rank=32)  # full rank: exact
            >>> layer.decomposition_error < 1e-5
            True
        """
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
