"""tnlayers: tensor-network layers with Deviation-Aware Scaling.

Importing tnlayers initializes neither CUDA nor Triton (kernels load lazily).

Where things are: the layers, ``tensorize``/``to_dense``/``summary``, the optimizers and the adapter functions
are here at the top level; ``tnlayers.optim`` adds the optimizers' helpers (``NormDynamics``,
``training_step``, ``DivergenceWarning``, Hessian eigenvalues); ``tnlayers.metrics`` holds every norm metric
(``norm_deviation``, ``norm_report``, ``squared_norms`` and ``NormDynamics``); ``tnlayers.adapters`` every adapter
name (``merge``/``unmerge``, which are ``tnlayers.merge_adapters``/``unmerge_adapters``, ``PAPER_PRESETS``,
the adapter classes); ``tnlayers.types`` the type aliases of the signatures (``Rank``, ``Params``, ...).

Four arguments are called ``alpha`` and mean four unrelated things: DAS's strength (how strongly the core
rescale acts), BAR's rescale rate (each core moves by 1 ± αη), GSAM's surrogate-gap coefficient, and an
adapter's output scale (it adds (alpha / rank)·ΔW x).

    >>> import torch, tnlayers
    >>> model = tnlayers.tensorize(tnlayers.models.cifar_resnet(8, widths=(4, 8, 16)), format="tr", rank=4)
    >>> opt = tnlayers.DAS(model.parameters(), torch.optim.SGD, alpha=0.05, lr=0.1, momentum=0.9)
    >>> model(torch.randn(2, 3, 8, 8)).shape
    torch.Size([2, 10])
"""
import sys

from .formats import FORMATS
from .groups import core_groups
from .layers import (CPConv2d, CPLinear, FactorizedTensor, TensorizedConv2d, TensorizedLinear, TRConv2d,
                     TRLinear, TTConv2d, TTLinear, TuckerConv2d, TuckerLinear, cached, set_recompute,
                     set_batched_weights)
from .layers import (CPConv1d, CPConv3d, TensorizedConv1d, TensorizedConv3d, TRConv1d, TRConv3d, TTConv1d,
                     TTConv3d, TuckerConv1d, TuckerConv3d)
from .layers import (CPEmbedding, TensorizedEmbedding, TiedEmbeddingHead, TREmbedding, TTEmbedding,
                     TuckerEmbedding)
from .metrics import norm_deviation, norm_report
from .core_precondition import precondition_core_grads_
from . import lr, metrics, models, optim, training
from .optim import BAR, DAS, GSAM, SAM, XSAM
from .shapes import tensorize_dim
from .strategy import get_strategy, set_strategy
from . import adapters, compression_report, convert
from .convert import summary, tensorize, to_dense
from .adapters import adapt, load_adapters, save_adapters, trainable_parameters, unadapt
from .adapters import merge as merge_adapters, unmerge as unmerge_adapters

# tnlayers.tensorize and tnlayers.summary are the functions; their modules are tnlayers.convert and
# tnlayers.compression_report. The old import paths (`from tnlayers.tensorize import to_dense`) still find
# those modules, without a module shadowing a function or the other way round.
sys.modules[__name__ + ".tensorize"] = convert
sys.modules[__name__ + ".summary"] = compression_report

__version__ = "0.1.0"

__all__ = ["FactorizedTensor", "TensorizedLinear", "TensorizedConv2d", "TTConv2d", "TRConv2d", "CPConv2d",
           "TuckerConv2d", "TTLinear", "TRLinear", "CPLinear", "TuckerLinear", "TensorizedConv1d", "TensorizedConv3d",
           "TTConv1d", "TRConv1d", "CPConv1d", "TuckerConv1d", "TTConv3d", "TRConv3d", "CPConv3d", "TuckerConv3d",
           "core_groups", "norm_deviation",
           "norm_report", "tensorize_dim", "FORMATS", "SAM", "XSAM", "GSAM", "DAS", "BAR", "tensorize", "summary",
           "to_dense",
           "set_strategy", "get_strategy", "lr", "models", "optim", "training", "adapters", "metrics",
           "adapt", "unadapt", "merge_adapters", "unmerge_adapters", "save_adapters", "load_adapters",
           "trainable_parameters", "cached", "set_recompute", "set_batched_weights",
           "precondition_core_grads_",
           "TensorizedEmbedding", "TTEmbedding", "TREmbedding", "CPEmbedding", "TuckerEmbedding", "TiedEmbeddingHead"]
