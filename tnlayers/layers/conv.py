"""Tensorized convolutions over 1, 2 or 3 spatial dims: ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` with a factorized
weight. :class:`TensorizedConvNd` does all the work; ``TensorizedConv1d/2d/3d`` only fix the number of spatial dims
(and the ``nn`` class they stand for). Argument checks and padding amounts: ``conv_arguments.py``."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import CONV_FUNCTIONS, ConvPlan
from ..shapes import output_size, positive_int
from ..types import Device, DType, IntOrTuple, Padding, Rank, Shape
from .conv_arguments import PADDING_MODES, check_groups, check_padding, padding_amounts, positive_tuple
from .tensorized import TensorizedLayer

__all__ = ["TensorizedConvNd", "TensorizedConv1d", "TensorizedConv2d", "TensorizedConv3d", "PADDING_MODES"]

_SPATIAL = {1: "L", 2: "H, W", 3: "D, H, W"}  # the spatial dims as the input-shape message names them


class TensorizedConvNd(TensorizedLayer):
    """The generic tensorized conv; use :class:`TensorizedConv1d`, :class:`TensorizedConv2d` or
    :class:`TensorizedConv3d` (or a named one, ``TTConv1d`` ...). Same arguments as the ``nn`` conv, plus
    ``rank``, ``format``, ``in_shape``/``out_shape``, ``strategy`` and ``weight_std`` (see
    :class:`TensorizedConv2d`).

    ``groups`` > 1: the cores hold the stacked weight (C_out, C_in / groups, k...) as ``nn`` stores it, one network
    for all groups (the input-side cores are shared by the groups, the output-side ones span every group's
    output channels). Depthwise (``groups == in_channels``): one input channel per group, so the network has no
    input modes, only the kernel's and the output channels': it factorizes across channels (TT: a rank-r
    factorization of the (k..., C_out) kernels), and always runs dense (any chain through the cores would apply
    the kernel to every channel before mixing them: rank x the dense conv's work at least).

        >>> import torch
        >>> from tnlayers.layers import TensorizedConv1d, TensorizedConv3d
        >>> conv = TensorizedConv1d(16, 32, 5, padding="same", groups=4, rank=4, format="tucker")
        >>> conv(torch.randn(2, 16, 40)).shape, conv.weight.shape
        (torch.Size([2, 32, 40]), torch.Size([32, 4, 5]))
        >>> TensorizedConv3d(8, 8, 3, rank=2, format="cp")(torch.randn(1, 8, 5, 6, 7)).shape
        torch.Size([1, 8, 3, 4, 5])
    """

    KIND = "conv"
    SPATIAL_DIMS: int  # 1, 2 or 3: set by TensorizedConv1d/2d/3d
    DENSE: type  # nn.Conv1d / nn.Conv2d / nn.Conv3d

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 padding: Padding = 0, dilation: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: Device = None, dtype: DType = None, *, rank: Rank,
                 format: Optional[str] = None, in_shape: Optional[Shape] = None, out_shape: Optional[Shape] = None,
                 strategy: str = "auto", weight_std: Union[float, str] = "nn"):
        super().__init__()
        n = getattr(self, "SPATIAL_DIMS", None)
        if n is None:
            raise TypeError(f"{type(self).__name__} sets no SPATIAL_DIMS: build a TensorizedConv1d, TensorizedConv2d or "
                            f"TensorizedConv3d (or a named class: TTConv1d, ...)")
        groups = check_groups(groups)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        in_channels = positive_int(in_channels, "in_channels")
        out_channels = positive_int(out_channels, "out_channels")
        check_groups(groups, in_channels, out_channels)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = positive_tuple(kernel_size, n, "kernel_size")
        self.stride = positive_tuple(stride, n, "stride")
        self.dilation = positive_tuple(dilation, n, "dilation")
        self.padding = check_padding(padding, n)
        self.padding_mode = padding_mode
        self._pad = padding_amounts(self.padding, self.kernel_size, self.dilation, self.stride)  # F.pad's order
        before, after = self._pad[-2::-2], self._pad[::-2]  # per dim, first dim first
        # zero padding that is symmetric goes to the conv itself; anything else is an explicit F.pad first
        self._explicit_pad = padding_mode != "zeros" or before != after
        self._conv_args = dict(stride=self.stride, dilation=self.dilation,
                               padding=(0,) * n if self._explicit_pad else before)
        depthwise = groups > 1 and in_channels == groups
        self._setup(format, in_channels // groups, out_channels, self.kernel_size, rank, in_shape, out_shape, bias,
                    strategy, device, dtype, weight_std, depthwise=depthwise)
        self.plan = ConvPlan(self.network, self.roles, self.kernel_size, groups)
        if strategy == "factorized" and depthwise:
            raise ValueError(f"strategy='factorized': {type(self).__name__} is depthwise (one input channel per group), "
                             f"which has no factorized chain (it would cost rank x the dense conv); use 'dense' or "
                             f"'auto' (both run dense)")
        if strategy == "factorized" and not self.plan.supported:
            raise ValueError(f"strategy='factorized' is not available for this {self.format!r} layout; "
                             f"use 'dense' or 'auto'")
        self.reset_parameters()

    def _weight_shape(self):
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        n, name = self.SPATIAL_DIMS, type(self).__name__
        if x.dim() not in (n + 1, n + 2) or x.shape[-n - 1] != self.in_channels:
            raise ValueError(f"{name} expects input of shape (N, {self.in_channels}, {_SPATIAL[n]}) or "
                             f"({self.in_channels}, {_SPATIAL[n]}), got {tuple(x.shape)}")
        if any(s < least for s, least in zip(x.shape[-n:], self._least_size())):
            size = tuple(x.shape[-n:])
            padded = tuple(s + self._pad[2 * (n - 1 - i)] + self._pad[2 * (n - 1 - i) + 1] for i, s in enumerate(size))
            need = tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel_size))
            raise ValueError(f"{name}: input of spatial size {size} (padded {padded}) is smaller than the dilated "
                             f"kernel {need}")
        unbatched = x.dim() == n + 1
        if unbatched:
            x = x.unsqueeze(0)
        if self._explicit_pad:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        y = self._apply_cores(x)
        return y.squeeze(0) if unbatched else y

    def _least_size(self) -> tuple:
        """The smallest input size per spatial dim (first dim first): the dilated kernel less the padding.
        Computed once (the forward's shape check would otherwise redo it per call)."""
        least = self.__dict__.get("_least")
        if least is None:
            n = self.SPATIAL_DIMS
            least = tuple(d * (k - 1) + 1 - self._pad[2 * (n - 1 - i)] - self._pad[2 * (n - 1 - i) + 1]
                          for i, (d, k) in enumerate(zip(self.dilation, self.kernel_size)))
            self.__dict__["_least"] = least
        return least

    def _state_config(self):
        return {**super()._state_config(), "kernel_size": self.kernel_size, "groups": self.groups}

    def _apply_config(self):
        return (self.kernel_size, tuple(sorted(self._conv_args.items())), self.groups)

    def _dense(self, x, weight, bias):
        return CONV_FUNCTIONS[self.SPATIAL_DIMS](x, weight, bias, groups=self.groups, **self._conv_args)

    def _factorized(self, x, cores, bias):
        return self.plan.factorized(x, cores, self._conv_args, bias)

    def _costs(self, x):
        size = x.shape[2:]
        out = [max(output_size(s, k, st, 2 * p, d), 1) for s, k, st, p, d in
               zip(size, self.kernel_size, self.stride, self._conv_args["padding"], self.dilation)]
        return self.plan.costs(x.shape[0], *size, *out)

    @classmethod
    def from_dense(cls, module: nn.Module, *, rank: Rank, format: Optional[str] = None,
                   in_shape: Optional[Shape] = None, out_shape: Optional[Shape] = None, strategy: str = "auto",
                   **options: Any) -> "TensorizedConvNd":
        """Build from the ``nn`` conv of the same dims by decomposing its weight (``options`` go to the
        decomposition).

            >>> import torch, tnlayers
            >>> dense = torch.nn.Conv2d(16, 16, 3, padding=1)
            >>> conv = tnlayers.TuckerConv2d.from_dense(dense, rank=8)  # HOOI
            >>> conv.padding, 0 < conv.decomposition_error < 1
            ((1, 1), True)
        """
        if not isinstance(module, cls.DENSE):
            raise TypeError(f"{cls.__name__}.from_dense expects an nn.{cls.DENSE.__name__}, got "
                            f"{type(module).__name__}")
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, module.bias is not None, module.padding_mode,
                    module.weight.device, module.weight.dtype, rank=rank, format=format, in_shape=in_shape,
                    out_shape=out_shape, strategy=strategy)
        layer.init_from_weight(module.weight, module.bias, **options)
        return layer

    def extra_repr(self) -> str:
        n = self.SPATIAL_DIMS
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding not in ((0,) * n, "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1,) * n:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}, " + super().extra_repr()


class TensorizedConv1d(TensorizedConvNd):
    """``nn.Conv1d`` (same arguments) whose (C_out, C_in / groups, k) weight is a tensor network; as
    :class:`TensorizedConv2d` otherwise.

        >>> import torch
        >>> from tnlayers.layers import TensorizedConv1d
        >>> conv = TensorizedConv1d(16, 32, 3, padding=1, rank=4, format="tt")  # = TTConv1d(...)
        >>> conv(torch.randn(2, 16, 50)).shape, [tuple(c.shape) for c in conv.cores]
        (torch.Size([2, 32, 50]), [(16, 4), (4, 3, 4), (4, 32)])
    """

    SPATIAL_DIMS, DENSE = 1, nn.Conv1d


class TensorizedConv2d(TensorizedConvNd):
    """``nn.Conv2d`` (same arguments) whose (C_out, C_in / groups, kh, kw) weight is a tensor network over (in
    modes..., spatial modes..., out modes...) (``groups``: see :class:`TensorizedConvNd`). ``rank``: int, per-bond
    sequence, or float in (0, 1] (fraction of the dense parameter count). ``strategy``: "dense" (rebuild W, one
    conv), "factorized" (1x1 maps -> small k x k conv -> 1x1 maps), "flops" (fewer FLOPs) or "auto" (FLOPs,
    refined by timing both once per input shape: :mod:`tnlayers.strategy`). Without gradients
    (``torch.no_grad``, ``eval`` inference) the dense weight is cached until a core changes, so inference costs
    one conv.

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

    SPATIAL_DIMS, DENSE = 2, nn.Conv2d


class TensorizedConv3d(TensorizedConvNd):
    """``nn.Conv3d`` (same arguments) whose (C_out, C_in / groups, kd, kh, kw) weight is a tensor network; as
    :class:`TensorizedConv2d` otherwise.

        >>> import torch
        >>> from tnlayers.layers import TensorizedConv3d
        >>> conv = TensorizedConv3d(8, 16, 3, padding=1, rank=4, format="tucker")  # = TuckerConv3d(...)
        >>> conv(torch.randn(2, 8, 4, 6, 6)).shape, [tuple(c.shape) for c in conv.cores]
        (torch.Size([2, 16, 4, 6, 6]), [(4, 3, 3, 3, 4), (8, 4), (16, 4)])
    """

    SPATIAL_DIMS, DENSE = 3, nn.Conv3d
