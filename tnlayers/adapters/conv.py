"""Conv2dAdapter: an adapter around ``nn.Conv2d`` (any stride, padding, padding mode, dilation, groups)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import ConvPlan
from ..shapes import output_size
from ..types import Shape
from .adapter import Adapter

__all__ = ["Conv2dAdapter"]


class Conv2dAdapter(Adapter):
    """``base(x) + scale·ΔW * x`` for a frozen ``nn.Conv2d``; ΔW has the base weight's shape
    (C_out, C_in / groups, kh, kw). Tucker is Tucker-2 over the channels (core (r, kh, kw, r)), TT puts
    kh·kw in one core between the output and input modes, CP is 4-way, LoRA is B (C_out, r) · A (r, kh, kw, C_in).
    The factorized way (1x1 maps and one small conv, ``tnlayers.contract.ConvPlan``) exists for groups=1
    and layouts whose cores do not mix input and kernel modes (not LoRA); otherwise "factorized" is a second
    conv with scale·ΔW beside the base conv.
    ``alpha`` is the adapter's output scale (scale = alpha / rank, LoRA's ``lora_alpha``), unrelated to the
    ``alpha`` of DAS, BAR or GSAM.

        >>> import torch
        >>> from tnlayers.adapters import Conv2dAdapter
        >>> base = torch.nn.Conv2d(16, 16, 3, padding=1)
        >>> adapter = Conv2dAdapter(base, "tucker", rank=4, alpha=8)
        >>> [tuple(c.shape) for c in adapter.cores]
        [(4, 3, 3, 4), (16, 4), (16, 4)]
        >>> x = torch.randn(2, 16, 8, 8)
        >>> adapter(x).shape, torch.equal(adapter(x), base(x))
        (torch.Size([2, 16, 8, 8]), True)
    """

    def __init__(self, base: nn.Conv2d, format: str = "tucker", rank: int = 8, alpha: float = 16.0, *,
                 dropout: float = 0.0, init: str = "zero", strategy: str = "auto", out_shape: Optional[Shape] = None,
                 in_shape: Optional[Shape] = None):
        super().__init__()
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"Conv2dAdapter wraps an nn.Conv2d, got {type(base).__name__}")
        out_dim, in_dim, kh, kw = base.weight.shape
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self._setup(base, format, rank, alpha, dropout, init, strategy, (out_dim, in_dim, (kh, kw)), out_shape,
                    in_shape)
        self.plan = ConvPlan(self.network, self.roles, (kh, kw))
        self._through_cores = self.plan.supported and base.groups == 1

    def _delta_shape(self):
        return tuple(self.base.weight.shape)

    def _conv_args(self):
        """(padding the input needs first, keyword arguments of the kernel conv), as nn.Conv2d pads."""
        base = self.base
        if base.padding_mode != "zeros":
            return base._reversed_padding_repeated_twice, dict(stride=base.stride, dilation=base.dilation, padding=0)
        return None, dict(stride=base.stride, dilation=base.dilation, padding=base.padding)

    def _flops(self, x: torch.Tensor):
        batch, _, h, w = x.shape
        pad, args = self._conv_args()
        if pad is not None:
            h, w = h + pad[2] + pad[3], w + pad[0] + pad[1]
        padding = args["padding"]
        if padding == "same":
            h_out, w_out = h, w
        else:
            ph, pw = (0, 0) if padding == "valid" else (padding, padding) if isinstance(padding, int) else padding
            (kh, kw), (sh, sw), (dh, dw) = self.base.kernel_size, self.base.stride, self.base.dilation
            h_out, w_out = output_size(h, kh, sh, 2 * ph, dh), output_size(w, kw, sw, 2 * pw, dw)
        dense, factorized = self.plan.costs(batch, h, w, max(h_out, 1), max(w_out, 1))
        base = dense - self.plan.weight_cost
        if not self._through_cores:  # a second conv with ΔW
            factorized = base + self.plan.weight_cost
        return base, self.plan.weight_cost, factorized  # (ConvPlan counts C_in / groups: the base conv's cost)

    def _delta_conv(self, x: torch.Tensor) -> torch.Tensor:
        """scale·ΔW * x, without the bias."""
        if not self._through_cores:
            return self.base._conv_forward(x, self.delta_weight(), None)
        pad, args = self._conv_args()
        if pad is not None:
            x = F.pad(x, pad, mode=self.base.padding_mode)
        return self.scale * self.plan.factorized(x, self.core_parameters(), args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects input of shape (N, {self.in_channels}, H, W) or "
                             f"({self.in_channels}, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        self._check_materialized("forward")
        unbatched = x.dim() == 3
        x4 = x.unsqueeze(0) if unbatched else x
        y = self._forward_by(x4, self._strategy_for(x4, tuple(x4.shape), lambda: self._flops(x4)))
        return y.squeeze(0) if unbatched else y

    def _forward_by(self, x4: torch.Tensor, strategy: str) -> torch.Tensor:
        if strategy == "dense":
            return self.base._conv_forward(x4, self.base.weight + self.delta_weight(), self.base.bias)
        y = self.base(x4)
        return y + self._delta_conv(self.dropout(x4)).to(y.dtype)

    def extra_repr(self) -> str:
        return f"Conv2d: in_channels={self.in_channels}, out_channels={self.out_channels}, " + super().extra_repr()
