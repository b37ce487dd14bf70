"""TensorizedConv2d: ``nn.Conv2d`` with a factorized weight."""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..contract import ConvPlan
from ..shapes import as_int, output_size, positive_int
from ..types import Device, DType, IntOrPair, Padding, Rank, Shape
from .tensorized import TensorizedLayer

__all__ = ["TensorizedConv2d"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _int_pair(value, low: int):
    """``value`` (an int or a pair; numpy integers too, as nn.Conv2d takes them) as two plain ints >= low,
    or None."""
    pair = tuple(as_int(v) for v in _pair(value))
    if len(pair) != 2 or any(v is None or v < low for v in pair):
        return None
    return pair


def _positive_pair(value, name) -> Tuple[int, int]:
    pair = _int_pair(value, 1)
    if pair is None:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair


def _padding_amounts(padding, kernel, dilation, stride):
    """(left, right, top, bottom) as F.pad takes them, from int / pair / 'same' / 'valid'."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions (stride must be 1)")
        (th, tw) = (dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    pair = _padding_pair(padding)
    return (pair[1], pair[1], pair[0], pair[0])


def _padding_pair(padding) -> Tuple[int, int]:
    pair = _int_pair(padding, 0)
    if pair is None:
        raise ValueError(f"padding must be a non-negative int, a pair of them, 'same' or 'valid', got {padding!r}")
    return pair


class TensorizedConv2d(TensorizedLayer):
    """``nn.Conv2d`` (same arguments; ``groups`` must be 1) whose (C_out, C_in, kh, kw) weight is a tensor
    network over (in modes..., spatial modes..., out modes...). ``rank``: int, per-bond sequence, or float
    in (0, 1] (fraction of the dense parameter count). ``strategy``: "dense" (rebuild W, one conv),
    "factorized" (1x1 maps -> small k x k conv -> 1x1 maps), "flops" (fewer FLOPs) or "auto" (FLOPs, refined
    by timing both once per input shape: :mod:`tnlayers.strategy`). Without gradients (``torch.no_grad``,
    ``eval`` inference) the dense weight is cached until a core changes, so inference costs one conv.

    ``weight_std``: the std of the reconstructed weight at init (``reset_parameters``): ``"nn"`` (default)
    that of ``nn.Conv2d``'s default init, 1/sqrt(3 fan_in); ``"kaiming_normal"`` He's sqrt(2/fan_in)
    (fan-in, ReLU gain); or a number > 0. The bias starts as ``nn.Conv2d``'s, uniform on ±1/sqrt(fan_in).

    Example::

        >>> import torch, tnlayers
        >>> conv = tnlayers.TensorizedConv2d(16, 32, 3, padding=1, rank=4, format="tr")  # = tnlayers.TRConv2d(...)
        >>> conv(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
        >>> conv.weight.shape
        torch.Size([32, 16, 3, 3])
        >>> tnlayers.TTConv2d(16, 32, 3, rank=4, weight_std="kaiming_normal").weight_std
        'kaiming_normal'
    """

    KIND = "conv"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: Padding = 0, dilation: IntOrPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: Device = None, dtype: DType = None, *, rank: Rank,
                 format: Optional[str] = None, in_shape: Optional[Shape] = None, out_shape: Optional[Shape] = None,
                 strategy: str = "auto", weight_std: Union[float, str] = "nn"):
        super().__init__()
        if as_int(groups) is None:
            raise TypeError(f"groups must be an int (tensorized convs support groups=1), got {groups!r}")
        groups = as_int(groups)
        if groups < 1:
            raise ValueError(f"groups must be a positive int (tensorized convs support groups=1), got {groups!r}")
        if groups != 1:
            raise NotImplementedError(f"groups={groups!r}: tensorized convs support groups=1 only")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        in_channels = positive_int(in_channels, "in_channels")
        out_channels = positive_int(out_channels, "out_channels")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, 1
        self.kernel_size = _positive_pair(kernel_size, "kernel_size")
        self.stride = _positive_pair(stride, "stride")
        self.dilation = _positive_pair(dilation, "dilation")
        self.padding = padding if isinstance(padding, str) else _padding_pair(padding)
        self.padding_mode = padding_mode
        self._pad = _padding_amounts(self.padding, self.kernel_size, self.dilation, self.stride)
        left, right, top, bottom = self._pad
        # zero padding that is symmetric goes to the conv itself; anything else is an explicit F.pad first
        self._explicit_pad = padding_mode != "zeros" or left != right or top != bottom
        self._conv_args = dict(stride=self.stride, dilation=self.dilation,
                               padding=(0, 0) if self._explicit_pad else (top, left))
        self._setup(format, in_channels, out_channels, self.kernel_size, rank, in_shape, out_shape, bias, strategy,
                    device, dtype, weight_std)
        self.plan = ConvPlan(self.network, self.roles, self.kernel_size)
        if strategy == "factorized" and not self.plan.supported:
            raise ValueError(f"strategy='factorized' is not available for this {self.format!r} layout; "
                             f"use 'dense' or 'auto'")
        self.reset_parameters()

    def _weight_shape(self):
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects input of shape (N, {self.in_channels}, H, W) or "
                             f"({self.in_channels}, H, W), got {tuple(x.shape)}")
        left, right, top, bottom = self._pad
        need = [d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel_size)]
        if x.shape[-2] + top + bottom < need[0] or x.shape[-1] + left + right < need[1]:
            raise ValueError(f"{type(self).__name__}: input of spatial size {tuple(x.shape[-2:])} (padded "
                             f"{(x.shape[-2] + top + bottom, x.shape[-1] + left + right)}) is smaller than the "
                             f"dilated kernel {tuple(need)}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self._explicit_pad:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        y = self._apply_cores(x)
        return y.squeeze(0) if unbatched else y

    def _state_config(self):
        return {**super()._state_config(), "kernel_size": self.kernel_size}

    def _apply_config(self):
        return (self.kernel_size, tuple(sorted(self._conv_args.items())))

    def _dense(self, x, weight, bias):
        return F.conv2d(x, weight, bias, **self._conv_args)

    def _factorized(self, x, cores, bias):
        return self.plan.factorized(x, cores, self._conv_args, bias)

    def _costs(self, x):
        batch, _, h, w = x.shape
        pad_h, pad_w = self._conv_args["padding"]
        h_out = output_size(h, self.kernel_size[0], self.stride[0], 2 * pad_h, self.dilation[0])
        w_out = output_size(w, self.kernel_size[1], self.stride[1], 2 * pad_w, self.dilation[1])
        return self.plan.costs(batch, h, w, max(h_out, 1), max(w_out, 1))

    @classmethod
    def from_dense(cls, module: nn.Conv2d, *, rank: Rank, format: Optional[str] = None,
                   in_shape: Optional[Shape] = None, out_shape: Optional[Shape] = None, strategy: str = "auto",
                   **options: Any) -> "TensorizedConv2d":
        """Build from an ``nn.Conv2d`` by decomposing its weight (``options`` go to the decomposition).

            >>> import torch, tnlayers
            >>> dense = torch.nn.Conv2d(16, 16, 3, padding=1)
            >>> conv = tnlayers.TuckerConv2d.from_dense(dense, rank=8)  # HOOI
            >>> conv.padding, 0 < conv.decomposition_error < 1
            ((1, 1), True)
        """
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"{cls.__name__}.from_dense expects an nn.Conv2d, got {type(module).__name__}")
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, module.bias is not None, module.padding_mode,
                    module.weight.device, module.weight.dtype, rank=rank, format=format, in_shape=in_shape,
                    out_shape=out_shape, strategy=strategy)
        layer.init_from_weight(module.weight, module.bias, **options)
        return layer

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}, " + super().extra_repr()
