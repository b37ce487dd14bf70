"""CP by alternating least squares, with MTTKRPs that never form a Khatri-Rao product.

Model: A ~ sum_r lambda_r a^1_r o ... o a^d_r. Updating mode n solves the normal equations
F_n V_n = M_n, where V_n = Hadamard product of the Grams F_j^T F_j (j != n; R x R) and
M_n = A_(n) (Khatri-Rao of the other factors) is the MTTKRP (n_n x R). M_n is computed by contracting A with
one factor at a time (the largest mode first: a matmul on a view of A, no copy), then the rank index shared
(an einsum per mode), so the largest intermediate is (N / n_max) x R, cut into column blocks to stay within
A's size.
Two MTTKRP trees per iteration instead of d: the modes are split into two groups of balanced size products;
T = A contracted with the factors of the other group (N R flops) holds (group modes..., R), and each mode of
the group is read off T (prod(group) R flops) after the previous one's update. Per iteration: ~4 N R flops;
memory: A plus max((N / n_max) x block, prod(group) x R).
The error needs no reconstruction: ||A - model||^2 = ||A||^2 - 2 <M_n, F_n> + sum(V_n * F_n^T F_n) for the
last mode updated. Start: leading left singular vectors of each mode's unfolding (``mode_subspace``),
random columns where R exceeds a mode's size. Stops after ``n_iter_max`` iterations or when one lowers the
relative error by less than ``tol``. A matrix (d = 2) is cut by its truncated SVD, which is optimal.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

from .options import check_n_iter_max, check_tol
from .result import Decomposition
from .subspace import leading_subspace, mode_product, mode_subspace, subspace_cost
from .threads import mostly_one_thread

__all__ = ["cp_als", "cp_als_cost"]


def _groups(shape: Sequence[int]) -> Tuple[List[int], List[int]]:
    """Two groups of modes whose size products are as even as a greedy pass makes them (largest first)."""
    groups, products = ([], []), [1, 1]
    for k in sorted(range(len(shape)), key=lambda k: -shape[k]):
        g = 0 if products[0] <= products[1] else 1
        groups[g].append(k)
        products[g] *= shape[k]
    return sorted(groups[0]), sorted(groups[1])


_RANK = -1  # the label of the rank axis among the mode labels of a partial contraction


def _contract(tensor: torch.Tensor, axes: List[int], factors: List[torch.Tensor], modes: Sequence[int]
              ) -> Tuple[torch.Tensor, List[int]]:
    """Contract ``tensor`` (its axes labelled by ``axes``: modes, and ``_RANK`` once there is a rank axis) with
    ``factors[j]`` over each mode j in ``modes``, the largest first, the rank index shared; returns the result
    and its labels."""
    axes = list(axes)
    for j in sorted(modes, key=lambda j: -factors[j].shape[0]):
        p = axes.index(j)
        if _RANK not in axes:  # the first contraction: a matmul that puts the rank axis in mode j's place
            tensor, axes[p] = mode_product(tensor, factors[j], p), _RANK
            continue
        letters = {label: chr(ord("a") + i) for i, label in enumerate(axes)}
        term = "".join(letters[label] for label in axes)
        kept = "".join(letters[label] for label in axes if label != j)
        tensor = torch.einsum(f"{term},{letters[j]}{letters[_RANK]}->{kept}", tensor, factors[j])
        axes.pop(p)
    return tensor, axes


def _partial(tensor: torch.Tensor, factors: List[torch.Tensor], keep: List[int], budget: int
             ) -> Tuple[torch.Tensor, List[int]]:
    """A contracted with the factors of every mode not in ``keep``: the kept modes and the rank axis (with
    their labels), computed in column blocks so that no intermediate exceeds ``budget`` entries."""
    other = [j for j in range(tensor.ndim) if j not in keep]
    rank = factors[0].shape[1]
    first = max(tensor.shape[j] for j in other)
    block = max(1, min(rank, budget * first // tensor.numel()))
    parts, axes = [], []
    for start in range(0, rank, block):
        columns = [f[:, start:start + block] for f in factors]
        part, axes = _contract(tensor, list(range(tensor.ndim)), columns, other)
        parts.append(part)
    return (torch.cat(parts, axes.index(_RANK)) if len(parts) > 1 else parts[0]), axes


def _solve(gram: torch.Tensor, mttkrp: torch.Tensor) -> torch.Tensor:
    """F with F gram = mttkrp; a ridge of 1e-13 of the mean diagonal keeps a singular Gram (repeated or zero
    columns) solvable without visibly moving a well-posed solution."""
    ridge = 1e-13 * float(gram.diagonal().mean()) + torch.finfo(gram.dtype).tiny
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram + ridge * eye)
    if int(info) == 0:
        return torch.cholesky_solve(mttkrp.T, chol).T
    return mttkrp @ torch.linalg.pinv(gram, hermitian=True)


def cp_als_cost(shape: Sequence[int], rank: int, n_iter_max: int = 100) -> int:
    """Multiply-adds of ``cp_als`` running all ``n_iter_max`` iterations, roughly (SVD start, then two
    N x R contractions per iteration).

        >>> cp_als_cost((512, 3, 3, 512), 229) > cp_als_cost((512, 3, 3, 512), 229, 10)
        True
    """
    total = math.prod(shape)
    if len(shape) == 2:
        return subspace_cost(shape[0], shape[1], rank)
    start = sum(total * min(n, total // n) + min(n, total // n) ** 3 for n in shape)
    return start + n_iter_max * (2 * total * rank + len(shape) * rank ** 3)


@torch.no_grad()
@mostly_one_thread
def cp_als(tensor: torch.Tensor, rank: int, n_iter_max: int = 100, tol: float = 1e-6, seed: int = 0) -> Decomposition:
    """CP factors ``(n_k, rank)`` of ``tensor``, one per mode, the weights spread evenly over them
    (|lambda_r|^(1/d) each). ``spectra["m<k>"]``: singular values of the mode-k unfolding (the SVD start);
    ``seed`` draws the random start columns where ``rank`` exceeds a mode's size.

        >>> g = torch.Generator().manual_seed(0)
        >>> factors = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (6, 5, 4)]
        >>> A = torch.einsum("ir,jr,kr->ijk", *factors)
        >>> d = cp_als(A, 3, n_iter_max=500, tol=0)  # a rank-3 tensor: recovered
        >>> float((torch.einsum("ir,jr,kr->ijk", *d.cores) - A).norm() / A.norm()) < 1e-8
        True
    """
    n_iter_max, tol = check_n_iter_max(n_iter_max), check_tol(tol)
    if not isinstance(tensor, torch.Tensor) or tensor.ndim < 2:
        raise ValueError(f"cp_als needs a tensor with at least 2 modes, got {getattr(tensor, 'shape', tensor)!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"cp_als: rank must be a positive int, got {rank!r}")
    d = tensor.ndim
    if d == 2:  # Eckart-Young: the truncated SVD is the best rank-R fit
        basis, carry, spectrum = leading_subspace(tensor, rank)
        root = carry.norm(dim=1).sqrt()
        return Decomposition([basis * root, (carry / root.clamp_min(1e-300)[:, None]).T], {"m0": spectrum,
                             "m1": spectrum})
    generator = torch.Generator().manual_seed(seed)
    factors, spectra = [], {}
    for k, n in enumerate(tensor.shape):
        basis, spectra[f"m{k}"] = mode_subspace(tensor, k, rank)
        if basis.shape[1] < rank:
            extra = torch.randn(n, rank - basis.shape[1], generator=generator, dtype=torch.float64)
            basis = torch.cat([basis, (extra / math.sqrt(n)).to(basis)], 1)
        factors.append(basis)
    grams = [f.T @ f for f in factors]
    norm2 = float(torch.linalg.vector_norm(tensor)) ** 2
    budget = max(tensor.numel(), 1 << 20)
    weights = torch.ones(rank, dtype=tensor.dtype, device=tensor.device)
    error, iterations, converged = math.inf, 0, n_iter_max == 0
    while iterations < n_iter_max and not converged:
        for group in _groups(tensor.shape):
            partial, axes = _partial(tensor, factors, group, budget)  # the N R step
            for n in group:
                mttkrp, left = _contract(partial, axes, factors, [j for j in group if j != n])
                mttkrp = mttkrp if left[0] == n else mttkrp.T
                gram = math.prod(grams[j] for j in range(d) if j != n)
                update = _solve(gram, mttkrp)
                norms = update.norm(dim=0)
                weights = torch.where(norms > 0, norms, torch.ones_like(norms))
                factors[n] = update / weights
                grams[n] = factors[n].T @ factors[n]
        iterations += 1
        fit = norm2 - 2 * float((mttkrp * update).sum()) + float((gram * (update.T @ update)).sum())
        previous, error = error, math.sqrt(max(fit, 0.0) / norm2) if norm2 > 0 else 0.0
        converged = tol > 0 and previous - error < tol
    spread = weights.abs() ** (1.0 / d)
    return Decomposition([f * spread for f in factors], spectra, iterations, converged)
