"""Modules: FactorizedTensor, the generic TensorizedLinear/TensorizedConv1d/2d/3d, and the named layers
({TT, TR, CP, Tucker} x {Conv1d, Conv2d, Conv3d, Linear})."""
from .conv import TensorizedConv1d, TensorizedConv2d, TensorizedConv3d
from .embedding import CPEmbedding, TensorizedEmbedding, TREmbedding, TTEmbedding, TuckerEmbedding
from .embedding_head import TiedEmbeddingHead
from .factorized_tensor import FactorizedTensor
from .linear import TensorizedLinear
from .tensorized import set_recompute
from .batched_weights import set_batched_weights
from .named import (CPConv1d, CPConv2d, CPConv3d, CPLinear, TRConv1d, TRConv2d, TRConv3d, TRLinear, TTConv1d,
                    TTConv2d, TTConv3d, TTLinear, TuckerConv1d, TuckerConv2d, TuckerConv3d, TuckerLinear)
from .weight_cache import cached

__all__ = ["FactorizedTensor", "TensorizedLinear", "TensorizedConv2d", "TTConv2d", "TRConv2d", "CPConv2d",
           "TuckerConv2d", "TTLinear", "TRLinear", "CPLinear", "TuckerLinear", "cached", "set_recompute",
           "set_batched_weights",
           "TensorizedConv1d", "TensorizedConv3d", "TTConv1d", "TRConv1d", "CPConv1d", "TuckerConv1d", "TTConv3d",
           "TRConv3d", "CPConv3d", "TuckerConv3d",
           "TensorizedEmbedding", "TTEmbedding", "TREmbedding", "CPEmbedding", "TuckerEmbedding", "TiedEmbeddingHead"]
