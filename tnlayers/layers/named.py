"""The named layers: thin names over the generic ones, fixing the format. Every name is
{TT, TR, CP, Tucker} x {Conv1d, Conv2d, Conv3d, Linear}: one rule, nothing to look up."""
from __future__ import annotations

from .conv import TensorizedConv1d, TensorizedConv2d, TensorizedConv3d
from .linear import TensorizedLinear

__all__ = ["TTConv2d", "TRConv2d", "CPConv2d", "TuckerConv2d", "TTLinear", "TRLinear", "CPLinear", "TuckerLinear",
           "TTConv1d", "TRConv1d", "CPConv1d", "TuckerConv1d", "TTConv3d", "TRConv3d", "CPConv3d", "TuckerConv3d"]


class TTConv2d(TensorizedConv2d):
    """Tensor-Train Conv2d: cores (C_in, r1), (r1, kh*kw, r2), (r2, C_out); rank [1, r1, r2, 1] or int.

        >>> import torch, tnlayers
        >>> conv = tnlayers.TTConv2d(16, 32, 3, padding=1, rank=[1, 8, 8, 1])
        >>> [tuple(c.shape) for c in conv.cores]
        [(16, 8), (8, 9, 8), (8, 32)]
        >>> conv(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """
    FORMAT = "tt"


class TRConv2d(TensorizedConv2d):
    """Tensor-Ring Conv2d over (in modes..., kh*kw, out modes...), one (r, n, r) core per mode.

        >>> import tnlayers
        >>> conv = tnlayers.TRConv2d(16, 32, 3, rank=4)  # 16 -> (4, 2, 2), 32 -> (4, 4, 2)
        >>> [tuple(c.shape) for c in conv.cores]
        [(4, 4, 4), (4, 2, 4), (4, 2, 4), (4, 9, 4), (4, 4, 4), (4, 4, 4), (4, 2, 4)]
    """
    FORMAT = "tr"


class CPConv2d(TensorizedConv2d):
    """CP Conv2d: 4-way CP, factors (C_in, R), (kh, R), (kw, R), (C_out, R).

        >>> import tnlayers
        >>> [tuple(c.shape) for c in tnlayers.CPConv2d(16, 32, 3, rank=4).cores]
        [(16, 4), (3, 4), (3, 4), (32, 4)]
    """
    FORMAT = "cp"


class TuckerConv2d(TensorizedConv2d):
    """Tucker-2 Conv2d: factors (C_in, R_in), (C_out, R_out), core (R_in, kh, kw, R_out).

        >>> import tnlayers
        >>> [tuple(c.shape) for c in tnlayers.TuckerConv2d(16, 32, 3, rank=4).cores]
        [(4, 3, 3, 4), (16, 4), (32, 4)]
    """
    FORMAT = "tucker"


class TTLinear(TensorizedLinear):
    """Tensor-Train Linear over (in modes..., out modes...).

        >>> import torch, tnlayers
        >>> fc = tnlayers.TTLinear(64, 32, rank=4)  # 64 -> (4, 4, 4), 32 -> (4, 4, 2)
        >>> [tuple(c.shape) for c in fc.cores]
        [(4, 4), (4, 4, 4), (4, 4, 4), (4, 4, 4), (4, 4, 4), (4, 2)]
        >>> fc(torch.randn(8, 64)).shape
        torch.Size([8, 32])
    """
    FORMAT = "tt"


class TRLinear(TensorizedLinear):
    """Tensor-Ring Linear over (in modes..., out modes...).

        >>> import tnlayers
        >>> fc = tnlayers.TRLinear(64, 32, rank=4)
        >>> len(fc.cores), tuple(fc.cores[0].shape)
        (6, (4, 4, 4))
    """
    FORMAT = "tr"


class CPLinear(TensorizedLinear):
    """CP Linear over (in modes..., out modes...).

        >>> import tnlayers
        >>> [tuple(c.shape) for c in tnlayers.CPLinear(64, 32, rank=4).cores]
        [(4, 4), (4, 4), (4, 4), (4, 4), (4, 4), (2, 4)]
    """
    FORMAT = "cp"


class TuckerLinear(TensorizedLinear):
    """Tucker Linear; unsplit (the default) it is FLoRA's A G B^T.

        >>> import tnlayers
        >>> fc = tnlayers.TuckerLinear(64, 32, rank=(8, 4))  # G (8, 4), A (64, 8), B (32, 4)
        >>> [tuple(c.shape) for c in fc.cores]
        [(8, 4), (64, 8), (32, 4)]
    """
    FORMAT = "tucker"


class TTConv1d(TensorizedConv1d):
    """Tensor-Train Conv1d: cores (C_in / groups, r1), (r1, k, r2), (r2, C_out).

        >>> import torch
        >>> from tnlayers.layers import TTConv1d
        >>> conv = TTConv1d(16, 32, 5, padding=2, rank=4)
        >>> [tuple(c.shape) for c in conv.cores], conv(torch.randn(2, 16, 20)).shape
        ([(16, 4), (4, 5, 4), (4, 32)], torch.Size([2, 32, 20]))
    """
    FORMAT = "tt"


class TRConv1d(TensorizedConv1d):
    """Tensor-Ring Conv1d over (in modes..., k, out modes...), one (r, n, r) core per mode.

        >>> from tnlayers.layers import TRConv1d
        >>> [tuple(c.shape) for c in TRConv1d(16, 8, 3, rank=2).cores]
        [(2, 4, 2), (2, 2, 2), (2, 2, 2), (2, 3, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    """
    FORMAT = "tr"


class CPConv1d(TensorizedConv1d):
    """CP Conv1d: 3-way CP, factors (C_in / groups, R), (k, R), (C_out, R).

        >>> from tnlayers.layers import CPConv1d
        >>> [tuple(c.shape) for c in CPConv1d(16, 32, 3, rank=4).cores]
        [(16, 4), (3, 4), (32, 4)]
    """
    FORMAT = "cp"


class TuckerConv1d(TensorizedConv1d):
    """Tucker-2 Conv1d: factors (C_in / groups, R_in), (C_out, R_out), core (R_in, k, R_out).

        >>> from tnlayers.layers import TuckerConv1d
        >>> [tuple(c.shape) for c in TuckerConv1d(16, 32, 3, rank=4).cores]
        [(4, 3, 4), (16, 4), (32, 4)]
    """
    FORMAT = "tucker"


class TTConv3d(TensorizedConv3d):
    """Tensor-Train Conv3d: cores (C_in / groups, r1), (r1, kd*kh*kw, r2), (r2, C_out).

        >>> import torch
        >>> from tnlayers.layers import TTConv3d
        >>> conv = TTConv3d(8, 16, 3, padding=1, rank=4)
        >>> [tuple(c.shape) for c in conv.cores], conv(torch.randn(1, 8, 4, 5, 6)).shape
        ([(8, 4), (4, 27, 4), (4, 16)], torch.Size([1, 16, 4, 5, 6]))
    """
    FORMAT = "tt"


class TRConv3d(TensorizedConv3d):
    """Tensor-Ring Conv3d over (in modes..., kd*kh*kw, out modes...), one (r, n, r) core per mode.

        >>> from tnlayers.layers import TRConv3d
        >>> [tuple(c.shape) for c in TRConv3d(8, 4, 3, rank=2).cores]
        [(2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 27, 2), (2, 2, 2), (2, 2, 2)]
    """
    FORMAT = "tr"


class CPConv3d(TensorizedConv3d):
    """CP Conv3d: 5-way CP, factors (C_in / groups, R), (kd, R), (kh, R), (kw, R), (C_out, R).

        >>> from tnlayers.layers import CPConv3d
        >>> [tuple(c.shape) for c in CPConv3d(8, 16, 3, rank=4).cores]
        [(8, 4), (3, 4), (3, 4), (3, 4), (16, 4)]
    """
    FORMAT = "cp"


class TuckerConv3d(TensorizedConv3d):
    """Tucker-2 Conv3d: factors (C_in / groups, R_in), (C_out, R_out), core (R_in, kd, kh, kw, R_out).

        >>> from tnlayers.layers import TuckerConv3d
        >>> [tuple(c.shape) for c in TuckerConv3d(8, 16, 3, rank=4).cores]
        [(4, 3, 3, 3, 4), (8, 4), (16, 4)]
    """
    FORMAT = "tucker"
