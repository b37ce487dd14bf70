"""Decompositions of a dense tensor, in torch (float64 on the CPU when called through the layers): TT-SVD and
TR-SVD (``tensor_train``), Tucker/Tucker-2 by HOSVD + HOOI (``tucker_hooi``), CP-ALS
(``alternating_least_squares``); every truncated SVD is a Gram eigendecomposition of the smaller side of an
unfolding (``subspace``). Each returns a :class:`Decomposition`: the cores and the singular values of each
unfolding it cut, for rank selection.

    >>> import torch
    >>> from tnlayers.decompositions import tt_svd
    >>> out = tt_svd(torch.randn(4, 5, 6, dtype=torch.float64), [2, 3])
    >>> [tuple(c.shape) for c in out.cores], sorted(out.spectra)
    ([(1, 4, 2), (2, 5, 3), (3, 6, 1)], ['r1', 'r2'])
"""
from __future__ import annotations

from .alternating_least_squares import cp_als
from .result import Decomposition, tail_energy
from .subspace import leading_subspace, unfold
from .tensor_train import tr_svd, tt_svd
from .tucker_hooi import hooi, tucker_ranks

__all__ = ["Decomposition", "cp_als", "hooi", "leading_subspace", "tail_energy", "tr_svd", "tt_svd", "tucker_ranks",
           "unfold"]
