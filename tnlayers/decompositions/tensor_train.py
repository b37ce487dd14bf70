"""TT-SVD and TR-SVD: one sweep of truncated SVDs over sequential unfoldings (Oseledets 2011; Zhao et al. 2016).

TT-SVD: C_1 = A reshaped (n_1, n_2...n_d); at step k, C_k (r_{k-1} n_k x rest) = U_k carry_k with U_k the
leading r_k left singular vectors; core k is U_k reshaped (r_{k-1}, n_k, r_k), and carry_k = U_k^T C_k goes on.
Each step projects orthogonally, so the squared error is exactly the sum over steps of the discarded squared
singular values, and at most sum_k sum_{i > r_k} sigma_i(A_<k>)^2 over the unfoldings A_<k> of A itself.
Cost: one Gram of each unfolding's smaller side (``leading_subspace``); memory: A plus one carry, at most A's size.

TR-SVD: the first unfolding (n_1 x rest) keeps r_0 r_1 vectors; core 1 is them reshaped (n_1, r_0, r_1) and
moved to (r_0, n_1, r_1); TT-SVD continues on the carry (r_1, n_2, ..., n_d) with r_0 riding along as the last
column index, which the last core (r_{d-1}, n_d, r_0) closes. The carry is kept as r_0 blocks side by side
(a leading batch index): each Gram sums the blocks' Grams, and nothing is permuted (copied).
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch

from .result import Decomposition
from .subspace import leading_subspace, subspace_cost
from .threads import mostly_one_thread

__all__ = ["tt_svd", "tr_svd", "tt_svd_cost", "tr_svd_cost"]


def _check_ranks(tensor: torch.Tensor, ranks: Sequence[int], count: int, name: str) -> List[int]:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim < 2:
        raise ValueError(f"{name} needs a tensor with at least 2 modes, got "
                         f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
    ranks = list(ranks)
    if len(ranks) != count or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"{name} of a {tensor.ndim}-mode tensor needs {count} positive int ranks, got {ranks!r}")
    return ranks


def _owned(core: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``core``, copied if it is a view of the input (every cut kept all rows: the carry was the input itself)."""
    same = core.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
    return core.clone() if same else core


def _sweep(carry: torch.Tensor, modes: Sequence[int], ranks: Sequence[int], first_bond: int,
           cores: List[torch.Tensor], spectra: dict) -> torch.Tensor:
    """TT-SVD steps over ``modes[:-1]``; ``carry`` is (a, r_prev * n, rest): a blocks side by side (TR-SVD's
    r_0, 1 for TT-SVD), which stay a leading batch index, so no step permutes (copies) the carry.
    Returns the last carry (a, r, n_last)."""
    a = carry.shape[0]
    for k, (n, rank) in enumerate(zip(modes[:-1], ranks)):
        # a cut keeping every row may take any orthonormal basis: the next unfolding's rows are then rotated,
        # which changes none of its singular values; the identity costs no copy
        basis, carry, spectrum = leading_subspace(carry, rank, reuse=True)
        r = basis.shape[1]
        cores.append(basis.reshape(-1, n, r))
        spectra[f"r{first_bond + k}"] = spectrum
        carry = carry.reshape(a, r * modes[k + 1], -1)  # a view: the next unfolding
    return carry.reshape(a, -1, modes[-1])


def tt_svd_cost(shape: Sequence[int], ranks: Sequence[int], first_rank: int = 1, tail: int = 1) -> int:
    """Multiply-adds of ``tt_svd``, roughly (``first_rank``, ``tail``: the bonds ``tr_svd`` sweeps with).

        >>> tt_svd_cost((64, 9, 64), [14, 14]) > tt_svd_cost((64, 9, 64), [4, 4])
        True
    """
    cost, rows, rest = 0, first_rank, math.prod(shape) * tail
    for n, rank in zip(shape[:-1], ranks):
        rows, rest = rows * n, rest // n
        cost += subspace_cost(rows, rest, rank)
        rows = min(rank, rows, rest)
    return cost


def tr_svd_cost(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Multiply-adds of ``tr_svd``, roughly.

        >>> tr_svd_cost((4, 4, 9, 4, 4), [2, 2, 8, 8, 8]) > 0
        True
    """
    n, rest = shape[0], math.prod(shape[1:])
    return subspace_cost(n, rest, ranks[0] * ranks[1]) + tt_svd_cost(shape[1:], ranks[2:], ranks[1], ranks[0])


@torch.no_grad()
@mostly_one_thread
def tt_svd(tensor: torch.Tensor, ranks: Sequence[int]) -> Decomposition:
    """TT cores ``(1, n_1, r_1), (r_1, n_2, r_2), ..., (r_{d-1}, n_d, 1)`` of ``tensor`` (d modes) with bonds
    ``ranks`` (d - 1 ints; a bond comes back smaller where its unfolding is smaller). The singular values sit in
    the last core; ``spectra["r<k>"]`` holds those of the k-th sequential unfolding.

        >>> A = torch.randn(4, 5, 6, dtype=torch.float64)
        >>> d = tt_svd(A, [4, 6])  # full ranks: exact
        >>> [tuple(c.shape) for c in d.cores], float((torch.einsum("aib,bjc,ckd->ijk", *d.cores) - A).norm()) < 1e-12
        ([(1, 4, 4), (4, 5, 6), (6, 6, 1)], True)
    """
    ranks = _check_ranks(tensor, ranks, tensor.ndim - 1 if isinstance(tensor, torch.Tensor) else 0, "tt_svd")
    cores: List[torch.Tensor] = []
    spectra: dict = {}
    last = _sweep(tensor.reshape(1, tensor.shape[0], -1), tensor.shape, ranks, 1, cores, spectra)
    cores.append(_owned(last.permute(1, 2, 0), tensor))
    return Decomposition(cores, spectra)


@torch.no_grad()
@mostly_one_thread
def tr_svd(tensor: torch.Tensor, ranks: Sequence[int], overwrite: bool = False) -> Decomposition:
    """TR cores ``(r_0, n_1, r_1), ..., (r_{d-1}, n_d, r_0)`` of ``tensor`` (d modes) with bonds ``ranks``
    (r_0, ..., r_{d-1}); the first unfolding keeps r_0 r_1 singular vectors, so r_0 r_1 <= min(n_1, n_2...n_d)
    is required. ``spectra["r1"]`` holds the first unfolding's singular values (that cut fixes r_0 r_1), and
    ``spectra["r<k>"]`` (k >= 2) those of the k-th sequential unfolding. ``overwrite=True`` lets the first cut
    write its carry over ``tensor`` (contiguous) where it keeps every row (r_0 r_1 = n_1): no second tensor of
    its size; ``tensor`` then holds garbage.

        >>> A = torch.randn(4, 5, 6, dtype=torch.float64)
        >>> d = tr_svd(A, [2, 2, 30])
        >>> [tuple(c.shape) for c in d.cores]
        [(2, 4, 2), (2, 5, 10), (10, 6, 2)]
        >>> float((torch.einsum("aib,bjc,cka->ijk", *d.cores) - A).norm()) < 1e-12
        True
    """
    ranks = _check_ranks(tensor, ranks, tensor.ndim if isinstance(tensor, torch.Tensor) else 0, "tr_svd")
    n, rest = tensor.shape[0], tensor.numel() // tensor.shape[0]
    r0, r1 = ranks[0], ranks[1]
    if r0 * r1 > min(n, rest):
        raise ValueError(f"tr_svd: rank[0] * rank[1] = {r0 * r1} is larger than the first unfolding allows "
                         f"(min({n}, {rest}) = {min(n, rest)}); lower rank[0] or rank[1]")
    # not reuse=True: which r_0 r_1 vectors the first cut keeps, and how they split into r_0 and r_1, shapes
    # the later cuts even when nothing is truncated
    basis, carry, spectrum = leading_subspace(tensor.reshape(n, rest), r0 * r1, overwrite=overwrite)
    cores = [basis.reshape(n, r0, r1).permute(1, 0, 2).contiguous()]
    spectra = {"r1": spectrum}
    # carry rows are (r_0, r_1): r_0 becomes the batch of blocks, r_1 n_2 the next unfolding's rows
    carry = carry.reshape(r0, r1 * tensor.shape[1], -1)
    last = _sweep(carry, tensor.shape[1:], ranks[2:], 2, cores, spectra)
    cores.append(_owned(last.permute(1, 2, 0).contiguous(), tensor))  # (r_{d-1}, n_d, r_0)
    return Decomposition(cores, spectra)
