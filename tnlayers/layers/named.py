"""The eight named layers: thin names over the two generic ones, fixing the format."""
from __future__ import annotations

from .conv import TensorizedConv2d
from .linear import TensorizedLinear

__all__ = ["TTConv2d", "TRConv2d", "CPConv2d", "TuckerConv2d", "TTLinear", "TRLinear", "CPLinear", "TuckerLinear"]


class TTConv2d(TensorizedConv2d):
    """Tensor-Train Conv2d: cores (C_in, r1), (r1, kh*kw, r2), (r2, C_out); rank [1, r1, r2, 1] or int."""
    FORMAT = "tt"


class TRConv2d(TensorizedConv2d):
    """Tensor-Ring Conv2d over (in modes..., kh*kw, out modes...), one (r, n, r) core per mode."""
    FORMAT = "tr"


class CPConv2d(TensorizedConv2d):
    """CP Conv2d: 4-way CP, factors (C_in, R), (kh, R), (kw, R), (C_out, R)."""
    FORMAT = "cp"


class TuckerConv2d(TensorizedConv2d):
    """Tucker-2 Conv2d: factors (C_in, R_in), (C_out, R_out), core (R_in, kh, kw, R_out)."""
    FORMAT = "tucker"


class TTLinear(TensorizedLinear):
    """Tensor-Train Linear over (in modes..., out modes...)."""
    FORMAT = "tt"


class TRLinear(TensorizedLinear):
    """Tensor-Ring Linear over (in modes..., out modes...)."""
    FORMAT = "tr"


class CPLinear(TensorizedLinear):
    """CP Linear over (in modes..., out modes...)."""
    FORMAT = "cp"


class TuckerLinear(TensorizedLinear):
    """Tucker Linear; unsplit (the default) it is FLoRA's A G B^T."""
    FORMAT = "tucker"
