"""Modules: FactorizedTensor, the generic TensorizedLinear/TensorizedConv2d, and the eight named layers."""
from .conv import TensorizedConv2d
from .factorized_tensor import FactorizedTensor
from .linear import TensorizedLinear
from .named import (CPConv2d, CPLinear, TRConv2d, TRLinear, TTConv2d, TTLinear, TuckerConv2d,
                    TuckerLinear)
from .weight_cache import cached

__all__ = ["FactorizedTensor", "TensorizedLinear", "TensorizedConv2d", "TTConv2d", "TRConv2d", "CPConv2d",
           "TuckerConv2d", "TTLinear", "TRLinear", "CPLinear", "TuckerLinear", "cached"]
