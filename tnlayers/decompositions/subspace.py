"""Truncated SVD by a Gram eigendecomposition of the smaller side of a matrix, and the unfolding helpers.

For an m x n matrix A with m <= n, the left singular vectors are the eigenvectors of A A^T (m x m), and
the singular values the square roots of its eigenvalues: one matmul (2 m^2 n flops) and one m x m
eigendecomposition, against a full SVD that LAPACK's gesdd takes ~70x longer for on a 512 x 4608 unfolding
(9 s against 0.13 s here, float64, 2 threads). For m > n the Gram is A^T A (n x n), its leading
eigenvectors V give A V, and a QR of that the orthonormal basis. Squaring A squares its condition number:
singular values below ~1e-8 of the largest (float64) come out inaccurate, but they are the ones cut, and the
kept subspace is what the truncation needs: the reconstruction error stays within ~1e-8 of the optimum.
Mode Grams and mode products work on an (a, n, b) view of the tensor: no unfolding is ever copied.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .threads import mostly_one_thread, threads_for

__all__ = ["leading_subspace", "mode_gram", "mode_product", "mode_subspace", "subspace_cost", "unfold", "fix_signs"]


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-``mode`` unfolding: that mode's index along the rows, the others (in order) along the columns.

        >>> unfold(torch.arange(24.0).reshape(2, 3, 4), 1).shape
        torch.Size([3, 8])
    """
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def fix_signs(basis: torch.Tensor) -> torch.Tensor:
    """Flip columns so that each one's entry of largest magnitude is positive: eigenvectors are defined up to
    sign, and this makes the result independent of the LAPACK build.

        >>> fix_signs(torch.tensor([[-2.0, 1.0], [1.0, 0.5]]))
        tensor([[ 2.0000,  1.0000],
                [-1.0000,  0.5000]])
    """
    if basis.numel() == 0:
        return basis
    pivot = basis.gather(0, basis.abs().argmax(0, keepdim=True))
    return basis * torch.where(pivot < 0, -1.0, 1.0).to(basis.dtype)


def mode_gram(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """``unfold(tensor, mode) @ unfold(tensor, mode).T`` without unfolding (which would copy the tensor):
    the tensor viewed as (a, n, b), summed over a in batches of n x n products.

        >>> A = torch.randn(3, 4, 5, dtype=torch.float64)
        >>> bool(torch.allclose(mode_gram(A, 1), unfold(A, 1) @ unfold(A, 1).T))
        True
    """
    n = tensor.shape[mode]
    a, b = math.prod(tensor.shape[:mode]), math.prod(tensor.shape[mode + 1:])
    view = tensor.reshape(a, n, b)
    with threads_for(tensor.numel() * n):
        if b == 1:
            return view[:, :, 0].T @ view[:, :, 0]
        if a == 1:
            return view[0] @ view[0].T
        gram = torch.zeros(n, n, dtype=tensor.dtype, device=tensor.device)
        if n >= 128:  # big products: summed into the Gram as they come (no batch of them is held)
            return gram.addbmm_(view, view.transpose(1, 2))
        step = max(1, (1 << 20) // (n * n))  # small ones batched: at most 1M entries of products at a time
        for start in range(0, a, step):
            chunk = view[start:start + step]
            gram += torch.bmm(chunk, chunk.transpose(1, 2)).sum(0)
        return gram


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor`` with mode ``mode`` (size n) contracted against the rows of ``matrix`` (n x r), the new
    index of size r in its place; one matmul over the (a, n, b) view, so ``tensor`` is never copied
    (``torch.tensordot`` would permute it first).

        >>> A, U = torch.randn(3, 4, 5), torch.randn(4, 2)
        >>> bool(torch.allclose(mode_product(A, U, 1), torch.einsum("inj,nr->irj", A, U), atol=1e-6))
        True
    """
    shape = tensor.shape
    n, r = matrix.shape
    a, b = math.prod(shape[:mode]), math.prod(shape[mode + 1:])
    view = tensor.reshape(a, n, b)
    with threads_for(tensor.numel() * r):
        if b == 1:
            out = view[:, :, 0] @ matrix
        elif a == 1:
            out = matrix.T @ view[0]
        else:
            out = torch.matmul(matrix.T, view)
    return out.reshape(*shape[:mode], r, *shape[mode + 1:])


def _top_eigenvectors(gram: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The leading k eigenvectors of a PSD ``gram`` (columns, descending, signs fixed) and the square roots of
    all its eigenvalues (descending): the singular values of the matrix it is the Gram of."""
    values, vectors = torch.linalg.eigh(gram)
    return fix_signs(vectors[:, gram.shape[0] - k:].flip(1).contiguous()), values.flip(0).clamp_min(0.0).sqrt()


@torch.no_grad()
@mostly_one_thread
def leading_subspace(matrix: torch.Tensor, rank: int, reuse: bool = False, overwrite: bool = False
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(basis, carry, spectrum)`` for an m x n ``matrix``: ``basis`` (m x k, orthonormal columns,
    k = min(rank, m, n)) spans its leading k left singular vectors, ``carry = basis^T matrix`` (k x n), so
    ``basis @ carry`` is the best rank-k approximation; ``spectrum``: all min(m, n) singular values, descending.
    A 3-d ``matrix`` (a, m, n) stands for the m x (a n) matrix [C_0, ..., C_{a-1}] of its blocks, without
    forming it (TR-SVD's unfoldings, whose column index ends with r_0, are such); ``carry`` is then (a, k, n).
    ``reuse=True`` (for callers that own ``matrix``): when every row is kept (k = m <= the columns) the basis is
    the identity and ``carry`` is ``matrix`` itself, not a rotated copy of it — the full-rank first cuts of
    TT-SVD/TR-SVD then cost no memory. ``overwrite=True`` (for callers that own ``matrix`` and need it no more, as
    scipy's ``overwrite_a``): when every row is kept (k = m) the rotated carry is written over ``matrix``, a block
    of columns at a time, instead of into a second tensor of its size.

        >>> A = torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 9, dtype=torch.float64)
        >>> basis, carry, spectrum = leading_subspace(A, 2)
        >>> basis.shape, carry.shape, bool(torch.allclose(basis @ carry, A)), bool(spectrum[2:].max() < 1e-6)
        (torch.Size([6, 2]), torch.Size([2, 9]), True, True)
    """
    blocks = matrix if matrix.ndim == 3 else matrix[None]
    a, m, n = blocks.shape
    k = min(rank, m, a * n)
    if reuse and k == m <= a * n:  # nothing is cut: any orthonormal basis is optimal, the identity is free
        spectrum = torch.linalg.eigvalsh(mode_gram(blocks, 1)).flip(0).clamp_min(0.0).sqrt()
        return torch.eye(m, dtype=blocks.dtype, device=blocks.device), matrix, spectrum
    if m <= a * n:
        basis, spectrum = _top_eigenvectors(mode_gram(blocks, 1), k)  # the sum of the C_i C_i^T
    else:  # tall: the Gram of the (fewer) columns; forming the unfolding copies at most A
        whole = unfold(blocks, 1)
        with threads_for(m * a * n * a * n):
            gram = whole.T @ whole
        vectors, spectrum = _top_eigenvectors(gram, k)
        with threads_for(m * a * n * k):
            spanning = whole @ vectors  # A V spans the leading left singular subspace
        # QR makes A V orthonormal even where a kept singular value is zero (its column of A V is then zero,
        # and Q still completes an orthonormal basis)
        basis = fix_signs(torch.linalg.qr(spanning).Q)
    if overwrite and k == m and blocks.is_contiguous():
        _rotate_rows_(blocks, basis.T)
        return basis, matrix, spectrum
    with threads_for(m * a * n * k):
        carry = torch.matmul(basis.T, blocks)
    return basis, carry if matrix.ndim == 3 else carry[0], spectrum


def _rotate_rows_(blocks: torch.Tensor, rotation: torch.Tensor, chunk: int = 1 << 18) -> None:
    """``blocks[i] = rotation @ blocks[i]`` in place (rotation m x m), ``chunk`` entries of columns at a time."""
    a, m, n = blocks.shape
    step = max(1, chunk // m)
    with threads_for(m * m * min(n, step)):
        for i in range(a):
            for start in range(0, n, step):
                part = blocks[i, :, start:start + step]
                part.copy_(rotation @ part)


@torch.no_grad()
@mostly_one_thread
def mode_subspace(tensor: torch.Tensor, mode: int, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(basis, spectrum)``: the leading min(rank, n, N / n) left singular vectors of the mode-``mode``
    unfolding (n x N / n) and all its singular values, from its n x n Gram when n <= N / n (no copy of the
    tensor), else from ``leading_subspace`` of the unfolding.

        >>> basis, spectrum = mode_subspace(torch.randn(3, 4, 5, dtype=torch.float64), 1, 2)
        >>> tuple(basis.shape), tuple(spectrum.shape)
        ((4, 2), (4,))
    """
    n = tensor.shape[mode]
    if n * n > tensor.numel():
        basis, _, spectrum = leading_subspace(unfold(tensor, mode), rank)
        return basis, spectrum
    return _top_eigenvectors(mode_gram(tensor, mode), min(rank, n))


def subspace_cost(m: int, n: int, k: int) -> int:
    """Multiply-adds of ``leading_subspace`` on an m x n matrix keeping k (Gram, eigh, carry), roughly.

        >>> subspace_cost(512, 4608, 114)
        1611137024
    """
    small = min(m, n)
    return small * small * max(m, n) + small ** 3 + m * n * min(k, small) * (1 if m <= n else 2)
