"""Tucker (and Tucker-2: some modes left unfactored) by HOSVD and HOOI sweeps.

HOSVD: U_k = leading r_k left singular vectors of the mode-k unfolding A_(k) (n_k x N/n_k), by the Gram
A_(k) A_(k)^T (``mode_subspace``, without copying A): 2 n_k N flops, no SVD of the wide matrix. Its error is
within sqrt(m) of the best Tucker approximation (m factored modes; De Lathauwer et al. 2000).
HOOI sweep: for each factored mode k, Y = A x_{j != k} U_j^T (the other factored modes projected, largest
reduction first), U_k = leading r_k left singular vectors of Y_(k); after the sweep the core is
G = Y x_k U_k^T. With orthonormal factors ||A - [[G; U]]||^2 = ||A||^2 - ||G||^2, so each sweep's error is
read off the core for free, and it never increases (each step maximizes ||G||). A sweep costs sum_k
(N r_j for the projections + a Gram of Y_(k)); memory: A plus one projection, at most A's size.
Stops after ``n_iter_max`` sweeps, or when a sweep lowers the relative error by less than ``tol`` (tol = 0:
all ``n_iter_max`` sweeps).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from .options import check_n_iter_max, check_tol
from .result import Decomposition
from .subspace import mode_product, mode_subspace
from .threads import mostly_one_thread

__all__ = ["hooi", "hooi_cost", "tucker_ranks"]


def tucker_ranks(shape: Sequence[int], ranks: Sequence[Optional[int]]) -> List[Optional[int]]:
    """Ranks that a Tucker decomposition of this shape can fill: r_k <= n_k, and r_k <= the product of the
    core's other sizes (the rank of any unfolding of the core); None (unfactored) stays None.

        >>> tucker_ranks((8, 3, 3, 2), [5, None, None, 4])
        [5, None, None, 2]
    """
    core = [n if r is None else min(r, n) for r, n in zip(ranks, shape)]
    return [None if r is None else min(c, math.prod(core) // c) for r, c in zip(ranks, core)]


def hooi_cost(shape: Sequence[int], ranks: Sequence[Optional[int]], n_iter_max: int = 10) -> int:
    """Multiply-adds of ``hooi`` running all ``n_iter_max`` sweeps, roughly (the projections counted at the
    first, largest product).

        >>> hooi_cost((512, 3, 3, 512), [114, None, None, 114]) > hooi_cost((512, 3, 3, 512), [114, None, None, 114], 0)
        True
    """
    ranks, total = tucker_ranks(shape, ranks), math.prod(shape)
    modes = [k for k, r in enumerate(ranks) if r is not None]
    cost = sum(total * shape[k] + shape[k] ** 3 for k in modes)
    for k in modes:
        others = [j for j in modes if j != k]
        partial = total * math.prod(ranks[j] for j in others) // math.prod(shape[j] for j in others)
        cost += n_iter_max * (total * max((ranks[j] for j in others), default=0) + partial * shape[k] + shape[k] ** 3)
    return cost


def _project(tensor: torch.Tensor, factors: Dict[int, torch.Tensor], skip: Optional[int] = None) -> torch.Tensor:
    """``tensor`` x_j U_j^T over the factored modes j != skip, the most shrinking product first."""
    order = sorted((j for j in factors if j != skip), key=lambda j: factors[j].shape[1] / factors[j].shape[0])
    for j in order:
        tensor = mode_product(tensor, factors[j], j)
    return tensor


@torch.no_grad()
@mostly_one_thread
def hooi(tensor: torch.Tensor, ranks: Sequence[Optional[int]], n_iter_max: int = 10, tol: float = 1e-4
         ) -> Decomposition:
    """Tucker of ``tensor``: ``cores = [core, U_k for each factored mode k in order]`` with ``U_k`` (n_k, r_k)
    orthonormal; ``ranks[k] = None`` leaves mode k unfactored (its full size in the core). Ranks beyond what
    the shape can fill come back smaller (``tucker_ranks``). ``spectra["r<k>"]``: the singular values of A's
    mode-k unfolding. ``n_iter_max=0`` is plain HOSVD.

        >>> A = torch.einsum("abc,ia,kc->ibk", torch.randn(2, 3, 2, dtype=torch.float64),
        ...                  torch.randn(6, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
        >>> d = hooi(A, [2, None, 2])  # a tensor of multilinear rank (2, 3, 2): exact
        >>> [tuple(c.shape) for c in d.cores]
        [(2, 3, 2), (6, 2), (5, 2)]
        >>> float((torch.einsum("abc,ia,kc->ibk", *d.cores) - A).norm() / A.norm()) < 1e-12
        True
    """
    n_iter_max, tol = check_n_iter_max(n_iter_max), check_tol(tol)
    valid = [r is None or (isinstance(r, int) and not isinstance(r, bool) and r >= 1) for r in ranks]
    if (not isinstance(tensor, torch.Tensor) or len(ranks) != tensor.ndim or all(r is None for r in ranks)
            or not all(valid)):
        raise ValueError(f"hooi needs one rank (a positive int, or None for an unfactored mode) per mode of the "
                         f"tensor, at least one int; got {list(ranks)!r} for shape "
                         f"{tuple(getattr(tensor, 'shape', ()))}")
    ranks = tucker_ranks(tensor.shape, ranks)
    modes = [k for k, r in enumerate(ranks) if r is not None]
    factors, spectra = {}, {}
    for k in modes:  # HOSVD start
        factors[k], spectra[f"r{k}"] = mode_subspace(tensor, k, ranks[k])
    norm2 = float(torch.linalg.vector_norm(tensor)) ** 2
    core = _project(tensor, factors)
    error = math.sqrt(max(norm2 - float(torch.linalg.vector_norm(core)) ** 2, 0.0) / norm2) if norm2 > 0 else 0.0
    sweeps, converged = 0, n_iter_max == 0 or error == 0.0
    while sweeps < n_iter_max and not converged:
        for k in modes:
            partial = _project(tensor, factors, skip=k)
            factors[k] = mode_subspace(partial, k, ranks[k])[0]
        core = _project(partial, {modes[-1]: factors[modes[-1]]})
        sweeps += 1
        previous, error = error, math.sqrt(max(norm2 - float(torch.linalg.vector_norm(core)) ** 2, 0.0) / norm2)
        converged = tol > 0 and previous - error < tol
    return Decomposition([core.contiguous()] + [factors[k] for k in modes], spectra, sweeps, converged)
