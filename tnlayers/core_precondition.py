"""Preconditioned core gradients: a step on the cores that moves W no further than a dense step would.

One SGD step of size η on the cores of W = Φ(G_1..G_K) moves W, to first order, by -η Σ_k J_k J_kᵀ G
(G = ∂L/∂W, J_k = ∂W/∂G_k). J_k J_kᵀ grows with the other cores' norms, so the step on W grows as W does:
a feedback a dense layer does not have, which is what makes BN-free tensorized nets diverge at the dense
lr (docs/design.md, "The step size on W"). Replacing each core's gradient g_k = J_kᵀ G by

    g̃_k = (1/K) (J_kᵀ J_k + δ)⁻¹ g_k

turns the first-order step into -η (1/K) Σ_k Π_k G, Π_k the orthogonal projection onto the directions core
k can reach (damped by δ): **‖ΔW‖ ≤ η ‖G‖ at any scale and balance of the cores**, equal to the dense step
along W itself (every Π_k contains W). This is the scaled gradient of ScaledGD (Tong, Ma, Chi,
arXiv 2005.08898) for any tensor network, with the 1/K of an additive Schwarz method so the K overlapping
projections never add up beyond one dense step.

J_kᵀ J_k needs no Jacobian: it is the identity on core k's mode indices times a small matrix over its bond
indices, the network of the other cores contracted with a copy of itself over all their modes. When the
other cores fall into separate pieces once core k is removed (a TT core's left and right halves, a Tucker
core's factors) that matrix is the Kronecker product of one Gram matrix per piece, each over the bonds that
piece touches, so it is solved piece by piece: r x r systems for TT, Tucker and CP, (r_{k-1} r_k)² for TR.
δ = ``damping`` x the mean diagonal of each piece's Gram, so the preconditioner is scale-free.

The 1/K is safe but short: directions that several cores can reach are taken 1/K of the way.
``overlap="project"`` instead solves for all cores together, (JᵀJ) x = Jᵀ G with J = [J_1 … J_K], by a few
steps of conjugate gradients preconditioned by the per-core solves above (``iterations``, default 4; one
JVP and one VJP of W's contraction each). From x = 0 every iterate moves W by the orthogonal projection of G
onto a growing subspace of the tangent space, so ‖ΔW‖ ≤ η ‖G‖ still holds at every iteration, and the limit
is the projection onto the whole tangent space: the longest step within the bound (G along W, undamped:
the dense step after one iteration). The iteration stops by itself once its residual reaches rounding level.

Use it between ``backward()`` and ``optimizer.step()``, as ``torch.nn.utils.clip_grad_norm_``::

    loss.backward()
    tnlayers.precondition_core_grads_(model)
    optimizer.step()
"""
from __future__ import annotations

import math
from functools import lru_cache
from numbers import Integral, Real
from typing import List, Sequence, Tuple

import torch
from torch import nn

from .contract import Contraction, expression
from .formats.network import einsum_equation
from .groups import core_groups, group_module
from .layers.factorized_tensor import FactorizedTensor
from .layers.tensorized import TensorizedLayer

__all__ = ["precondition_core_grads_", "precondition_grads"]

# One piece of core k's environment: the other cores it holds, the bonds of core k it touches, and the
# planned contraction of the piece with its copy (output: those bonds, then their primed copies).
Piece = Tuple[Tuple[int, ...], Tuple[str, ...], Contraction]


def _is_bond(label: str) -> bool:
    return not label.startswith("m")  # network.py: modes are m0, m1, ...; everything else is a bond


def _prime(labels) -> Tuple[str, ...]:
    return tuple(x + "'" for x in labels)


def _bra(labels) -> Tuple[str, ...]:
    """A core's labels for its copy in a Gram contraction: bonds primed, modes shared with the original."""
    return tuple(x + "'" if _is_bond(x) else x for x in labels)


def _pieces(cores: Tuple[Tuple[str, ...], ...], sizes: Tuple[Tuple[str, int], ...], k: int) -> List[Piece]:
    """The connected pieces of the network without core k that touch one of core k's bonds."""
    size = dict(sizes)
    own = [label for label in cores[k] if _is_bond(label)]
    others = [j for j in range(len(cores)) if j != k]
    piece_of = {j: j for j in others}  # union-find over the other cores, joined by any shared bond

    def root(j):
        while piece_of[j] != j:
            j = piece_of[j]
        return j

    for a in others:
        for b in others:
            if a < b and {x for x in cores[a] if _is_bond(x)} & set(cores[b]):
                piece_of[root(a)] = root(b)
    pieces = {}
    for j in others:
        pieces.setdefault(root(j), []).append(j)
    out = []
    for members in pieces.values():
        bonds = tuple(b for b in own if any(b in cores[j] for j in members))
        if not bonds:
            continue
        ket = [cores[j] for j in members]
        bra = [_bra(labels) for labels in ket]
        equation = einsum_equation(ket + bra, list(bonds) + list(_prime(bonds)))
        shapes = tuple(tuple(size[x.rstrip("'")] for x in labels) for labels in ket + bra)
        out.append((tuple(members), bonds, Contraction(equation, shapes)))
    return out


@lru_cache(maxsize=1024)
def _plan(cores: Tuple[Tuple[str, ...], ...], sizes: Tuple[Tuple[str, int], ...]) -> Tuple[List[Piece], ...]:
    return tuple(_pieces(cores, sizes, k) for k in range(len(cores)))


def _is_chain(cores: Tuple[Tuple[str, ...], ...]) -> bool:
    """A train or a ring in core order (TT, TR): at most two bonds per core, each bond joins two cores,
    neighbours share one."""
    bonds = [{x for x in labels if _is_bond(x)} for labels in cores]
    counts = {}
    for b in bonds:
        for x in b:
            counts[x] = counts.get(x, 0) + 1
    return (all(n == 2 for n in counts.values())  # no hyperedge (CP's shared rank)
            and all(len(b) <= 2 for b in bonds) and all(a & b for a, b in zip(bonds, bonds[1:])))


@lru_cache(maxsize=4096)
def _join_equation(left: Tuple[str, ...], right: Tuple[str, ...], out: Tuple[str, ...]) -> str:
    return einsum_equation([left, right], out)


def _chain_grams(net, cores: Sequence[torch.Tensor]) -> dict:
    """{(k, bonds): Gram} for a train or ring, from prefix and suffix products of the cores' transfer
    tensors T_j = G_j contracted with itself over its modes: 3K joins per call instead of K environments
    contracted from scratch (TR: K(K-2) products of r² x r² matrices)."""
    labels = net.cores
    K = len(labels)
    bonds = [tuple(x for x in ls if _is_bond(x)) for ls in labels]
    transfer = []
    for j, core in enumerate(cores):
        out = bonds[j] + _prime(bonds[j])
        transfer.append((torch.einsum(_join_equation(labels[j], _bra(labels[j]), out), core, core), out))

    def needed(outside):  # the (ket and bra) bond labels still shared with the cores in ``outside``
        keep = {x for j in outside for x in bonds[j]}
        return keep | set(_prime(keep))

    def join(a, b, keep, order=None):
        seen = list(dict.fromkeys(a[1] + b[1]))
        out = tuple(order) if order is not None else tuple(x for x in seen if x in keep)
        return torch.einsum(_join_equation(a[1], b[1], out), a[0], b[0]), out

    prefix, suffix = [transfer[0]], [transfer[-1]]
    for i in range(1, K - 1):
        prefix.append(join(prefix[-1], transfer[i], needed(range(i + 1, K))))
        suffix.append(join(transfer[K - 1 - i], suffix[-1], needed(range(0, K - 1 - i))))
    suffix.reverse()  # suffix[i] covers cores i+1..K-1 for i in 0..K-2
    grams = {}
    for k in range(K):
        parts = ([prefix[k - 1]] if k > 0 else []) + ([suffix[k]] if k < K - 1 else [])
        if len(parts) == 2 and set(parts[0][1]) & set(parts[1][1]) - set(bonds[k]) - set(_prime(bonds[k])):
            # a ring: the two halves meet around the back, one piece over both bonds
            parts = [join(parts[0], parts[1], None, bonds[k] + _prime(bonds[k]))]
        for tensor, have in parts:  # each part holds exactly the bonds of core k it touches, ket and bra
            own = tuple(b for b in bonds[k] if b in have)
            grams[(k, own)] = tensor.permute([have.index(x) for x in own + _prime(own)])
    return grams


def _inverse(gram: torch.Tensor, damping: float) -> Tuple[str, torch.Tensor]:
    """How to apply (gram + damping · mean diag · I)⁻¹, factored once (conjugate gradients apply it every
    iteration): a Cholesky factor, or the pseudo-inverse when ``damping`` is 0 (still a projection where the
    Gram is singular, a rank above a mode)."""
    d = gram.shape[0]
    if damping > 0:
        gram = gram + (damping * gram.diagonal().mean()) * torch.eye(d, dtype=gram.dtype, device=gram.device)
        factor, _ = torch.linalg.cholesky_ex(gram)  # no host sync; a failed factor gives non-finite values
        return "cholesky", factor
    return "pinv", torch.linalg.pinv(gram, hermitian=True)


def _solve_along(grad: torch.Tensor, labels: Sequence[str], bonds: Sequence[str], inverse) -> torch.Tensor:
    """``grad`` with its ``bonds`` axes multiplied by the ``inverse`` of :func:`_inverse` (gram symmetric)."""
    kind, matrix = inverse
    d = matrix.shape[0]
    order = [i for i, x in enumerate(labels) if x not in bonds] + [labels.index(b) for b in bonds]
    moved = grad.permute(order)
    rows = moved.reshape(-1, d)
    if kind == "cholesky":
        solved = torch.cholesky_solve(rows.T, matrix).T.reshape(moved.shape)
    else:
        solved = (rows @ matrix).reshape(moved.shape)
    return solved.permute([order.index(i) for i in range(len(order))])


OVERLAPS = ("mean", "project")


def _checked(damping, overlap, iterations) -> Tuple[float, int]:
    """The options as float and int, or a TypeError/ValueError naming the bad one."""
    if isinstance(damping, bool) or not isinstance(damping, Real):
        raise TypeError(f"damping must be a number >= 0, got {type(damping).__name__}")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {', '.join(map(repr, OVERLAPS))}, got {overlap!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, Integral):
        raise TypeError(f"iterations must be an int >= 1, got {type(iterations).__name__}")
    if iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    return float(damping), int(iterations)


def _grams(module: nn.Module, cores: Sequence[torch.Tensor], live: Sequence[int]) -> dict:
    """{k: [(bonds, Gram over those bonds)] for each piece of core k's environment} for the cores in ``live``."""
    net = module.network
    plan = _plan(tuple(net.cores), tuple(sorted(net.sizes.items())))
    chain = _chain_grams(net, cores) if _is_chain(tuple(net.cores)) else None  # all at once: prefix/suffix
    out = {}
    for k in live:
        pieces = []
        for members, bonds, contraction in plan[k]:
            d = math.prod(net.sizes[b] for b in bonds)
            if chain is not None:
                gram = chain[(k, bonds)].reshape(d, d)
            else:
                ops = [cores[j] for j in members]
                gram = contraction(*ops, *ops).reshape(d, d)
            pieces.append((bonds, gram))
        out[k] = pieces
    return out


def _project(net, cores, grads, solve, iterations: int) -> List[torch.Tensor]:
    """Preconditioned conjugate gradients on (JᵀJ) x = Jᵀ G over the cores with a gradient, from x = 0, with
    the block-diagonal solves as preconditioner: J x tends to the orthogonal projection of G onto the span of
    all the cores' directions (the tangent space), and every iterate has ‖J x‖ ≤ ‖G‖ (J x is G's projection
    onto a subspace of it)."""
    live = [k for k, g in enumerate(grads) if g is not None]
    contract = expression(net.equation(), tuple(tuple(c.shape) for c in cores))[0]  # path searched once

    def weight(*moving):
        full = list(cores)
        for k, c in zip(live, moving):
            full[k] = c
        return contract(*full)

    _, pullback = torch.func.vjp(weight, *[cores[k] for k in live])

    def normal(x):  # (JᵀJ) x
        _, jx = torch.func.jvp(weight, tuple(cores[k] for k in live), tuple(x))
        return list(pullback(jx))

    def dot(a, b):
        return sum((u * v).sum() for u, v in zip(a, b))

    def precondition(k, t):  # a block that cannot be solved (all-zero environment: J_k = 0) sits out
        t = solve(k, t)
        return torch.where(torch.isfinite(t).all(), t, torch.zeros_like(t))

    def ratio(a, b):  # a / b, 0 where b is 0: no host sync, no 0/0
        return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))

    r = [grads[k] for k in live]
    x = [torch.zeros_like(t) for t in r]
    z = [precondition(k, t) for k, t in zip(live, r)]
    p, rz = list(z), dot(r, z)
    # Stop (alpha = 0 from then on) once the residual is at rounding level: past it, JᵀJ's null space (the
    # gauge freedom of the cores) lets rounding errors grow the iterate without bound.
    floor = rz * (100 * torch.finfo(rz.dtype).eps)
    for _ in range(iterations):
        ap = normal(p)
        alpha = torch.where(rz > floor, ratio(rz, dot(p, ap)), torch.zeros_like(rz))
        x = [u + alpha * v for u, v in zip(x, p)]
        r = [u - alpha * v for u, v in zip(r, ap)]
        z = [precondition(k, t) for k, t in zip(live, r)]
        rz, old = dot(r, z), rz
        p = [u + ratio(rz, old) * v for u, v in zip(z, p)]
    out = [None] * len(grads)
    for k, t in zip(live, x):
        out[k] = t
    return out


def precondition_grads(module: nn.Module, grads: Sequence[torch.Tensor | None], damping: float = 1e-2,
                       overlap: str = "mean", iterations: int = 4) -> List[torch.Tensor | None]:
    """The preconditioned gradients (1/K)(J_kᵀJ_k + δ)⁻¹ g_k of ``module``'s cores (a tnlayers layer or
    :class:`~tnlayers.FactorizedTensor`), from ``grads`` (one per core, ``None`` kept). Computed in float32
    at least. ``damping=0`` uses the pseudo-inverse (the exact projection, also where a Gram is singular); a
    core whose result is not finite (an all-zero environment under damping) keeps its gradient.
    ``overlap`` chooses how the K corrections are combined (see :func:`precondition_core_grads_`); with
    ``"project"`` such a core sits out of the iteration instead and gets a zero step (its raw gradient is
    zero too: J_k = 0). Bad options raise as in :func:`precondition_core_grads_`."""
    damping, iterations = _checked(damping, overlap, iterations)
    net = module.network
    live = [k for k, g in enumerate(grads) if g is not None]
    if not live:
        return list(grads)
    dtype = torch.promote_types(grads[live[0]].dtype, torch.float32)
    cores = [c.detach().to(dtype) for c in module.core_parameters()]
    inverses = {k: [(bonds, _inverse(gram, damping)) for bonds, gram in pieces]
                for k, pieces in _grams(module, cores, live).items()}

    def solve(k, tensor):
        for bonds, inverse in inverses[k]:
            tensor = _solve_along(tensor, net.cores[k], bonds, inverse)
        return tensor

    work = [None if g is None else g.to(dtype) for g in grads]
    if overlap == "project":
        steps = _project(net, cores, work, solve, iterations)
    else:
        steps = [None if g is None else solve(k, g) / len(cores) for k, g in enumerate(work)]
    return [None if g is None else torch.where(torch.isfinite(s).all(), s, w).to(g.dtype)
            for g, s, w in zip(grads, steps, work)]


def precondition_core_grads_(model: nn.Module, damping: float = 1e-2, overlap: str = "mean", iterations: int = 4
                             ) -> None:
    """Replace, in place, the ``.grad`` of every tensorized layer's cores in ``model`` by the preconditioned
    gradient of this module's docstring, so that the next optimizer step moves each layer's weight at most as
    far as a step of the same lr on a dense weight (to first order; momentum and weight decay act on the
    result as usual). Call it after ``backward()`` and before ``optimizer.step()``; for use with
    ``torch.optim`` optimizers (tnlayers' SAM/DAS/BAR compute their own steps from the raw gradients).

    Acts on :class:`~tnlayers.TensorizedLinear`/:class:`~tnlayers.TensorizedConv2d` (all named formats) and
    :class:`~tnlayers.FactorizedTensor`; adapters (tnlayers' and PEFT's) are left alone (their zero-initialized
    update makes the Gram matrices vanish, and the scaled step of a vanishing core is unbounded). ``damping``
    (δ ≥ 0, relative to each Gram matrix's mean diagonal) bounds the step where a core's environment is
    rank-deficient (a rank above a mode's size). ``overlap`` is ``"mean"`` (each core's own projection, times
    1/K) or ``"project"`` (the projection onto what all cores reach together, by ``iterations`` >= 1 steps of
    preconditioned conjugate gradients: longer steps, same bound, ~``2 * iterations`` extra contractions
    of the weight per layer).

    Example::

        >>> import torch, tnlayers
        >>> model = torch.nn.Sequential(tnlayers.TTLinear(16, 16, rank=2), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model(torch.randn(8, 16)).pow(2).mean().backward()
        >>> raw = [c.grad.clone() for c in model[0].cores]
        >>> tnlayers.precondition_core_grads_(model)  # between backward() and step()
        >>> any(not torch.equal(c.grad, g) for c, g in zip(model[0].cores, raw))  # the cores' gradients, rescaled
        True
        >>> opt.step()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"precondition_core_grads_ expects an nn.Module, got {type(model).__name__}")
    damping, iterations = _checked(damping, overlap, iterations)
    seen = set()
    for name, cores in core_groups(model):
        module = group_module(model, name)
        if not isinstance(module, (TensorizedLayer, FactorizedTensor)) or id(cores[0]) in seen:
            continue  # a layer shared by two parents is preconditioned once
        seen.add(id(cores[0]))
        grads = [c.grad for c in cores]
        if all(g is None for g in grads):
            continue
        with torch.no_grad():
            for core, new in zip(cores, precondition_grads(module, grads, damping, overlap, iterations)):
                if new is not None:
                    core.grad.copy_(new)
