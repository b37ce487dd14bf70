"""tnlayers: tensor-network layers with Deviation-Aware Scaling.

Importing tnlayers initializes neither CUDA nor Triton (kernels load lazily).
"""
import sys

from .formats import FORMATS
from .groups import core_groups
from .layers import (CPConv2d, CPLinear, FactorizedTensor, TensorizedConv2d, TensorizedLinear, TRConv2d,
                     TRLinear, TTConv2d, TTLinear, TuckerConv2d, TuckerLinear, cached)
from .metrics import norm_deviation, norm_report
from .core_precondition import precondition_core_grads_
from . import lr, models, optim, training
from .optim import BAR, DAS, GSAM, SAM, XSAM
from .shapes import tensorize_dim
from .strategy import get_strategy, set_strategy
from . import compression_report, convert
from .convert import summary, tensorize, to_dense
from .adapters import adapt, trainable_parameters
from .adapters import merge as merge_adapters, unmerge as unmerge_adapters

# tnlayers.tensorize and tnlayers.summary are the functions; their modules are tnlayers.convert and
# tnlayers.compression_report. The old import paths (`from tnlayers.tensorize import to_dense`) still find
# those modules, without a module shadowing a function or the other way round.
sys.modules[__name__ + ".tensorize"] = convert
sys.modules[__name__ + ".summary"] = compression_report

__version__ = "0.1.0"

__all__ = ["FactorizedTensor", "TensorizedLinear", "TensorizedConv2d", "TTConv2d", "TRConv2d", "CPConv2d",
           "TuckerConv2d", "TTLinear", "TRLinear", "CPLinear", "TuckerLinear", "core_groups", "norm_deviation",
           "norm_report", "tensorize_dim", "FORMATS", "SAM", "XSAM", "GSAM", "DAS", "BAR", "tensorize", "summary",
           "to_dense",
           "set_strategy", "get_strategy", "lr", "models", "optim", "training", "adapt", "merge_adapters",
           "unmerge_adapters", "trainable_parameters", "cached", "precondition_core_grads_"]
