"""A tensor ring contracted into its dense weight with no intermediate larger than the weight.

Any pairwise contraction of a ring ends by joining two arcs over two bonds, and carries both open bonds
of an arc through its intermediates: for a 512x512x3x3 TR conv at rank 64, opt_einsum's best path
holds a 16.8M-entry intermediate, 7x the 2.4M-entry weight (and ``torch.einsum`` copies operands on top).

Here the ring, rotated so that the weight's modes run in ring order, is cut at one bond ``b_s`` into a left
arc (modes of the weight's rows) and a right arc (modes of its columns), and the closing bond ``b_0`` is
sliced into chunks. The arcs' inner cores (all but the two holding ``b_0``) are contracted once; one matmul
closes an arc on a slice of ``b_0``, and ``W (N_L x N_R) += L (N_L x chunk*b_s) @ R (chunk*b_s x N_R)``
accumulates in place. An arc small enough is closed on all of ``b_0`` at once and only sliced (views), so
that per chunk one arc is built: fewer, larger kernels, which matters more than FLOPs on a busy CPU. The cut,
the chunk size and which arc is whole are chosen so that no tensor made is larger than the weight (where the
ranks allow it: else the least excess); the multiply-adds are about those of the unchunked contraction (the
final join, N b_0 b_s, dominates either way). Every step is a differentiable torch op (chunks are ``split``
views, whose backward is one concatenation), so gradients flow to the cores and ``torch.compile(fullgraph=True)``
traces it.

Without a graph to keep (no grad: the inference cache, the error of a decomposition) nothing made needs to
outlive its chunk, so a leaner plan runs instead: each chunk of ``b_0`` is carried through its arcs from the
closed end (one open bond at a time, no inner arc with two open bonds is ever made), at the cut that makes the
arcs smallest (N_L + N_R least), with chunks small enough that everything made besides the weight adds up to at
most the weight. It repeats the arcs' inner products once per chunk (0.02% more multiply-adds on a
512x512x3x3 conv at rank 64, whose final join dominates) for a peak of about twice the weight instead of ~5x.
Design notes: docs/design.md, 'Contraction planning'.
"""
from __future__ import annotations

from math import prod
from typing import List, Optional, Sequence, Tuple

import torch

from .formats.network import Network

__all__ = ["RingWeight", "ring_order"]


def ring_order(net: Network, output: Sequence[str]) -> Optional[List[int]]:
    """Core indices in ring order starting at the core holding ``output[0]``, when ``net`` is a ring of
    ``(bond, mode, bond)`` cores whose modes, in that order, are ``output``; else None.

        >>> from tnlayers.formats import get_format
        >>> ring_order(get_format("tr").network((2, 3, 4), 2), ["m1", "m2", "m0"])
        [1, 2, 0]
        >>> ring_order(get_format("tr").network((2, 3, 4), 2), ["m1", "m0", "m2"]) is None
        True
    """
    cores, d = net.cores, len(net.cores)
    if d < 2 or any(len(core) != 3 for core in cores) or len(output) != d:
        return None
    modes, bonds = [core[1] for core in cores], [core[0] for core in cores]
    if any(cores[k][2] != bonds[(k + 1) % d] for k in range(d)) or len(set(modes) | set(bonds)) != 2 * d:
        return None
    if output[0] not in modes:
        return None
    start = modes.index(output[0])
    order = [(start + j) % d for j in range(d)]
    return order if [modes[k] for k in order] == list(output) else None


class RingWeight:
    """The plan for one ring: rotation ``order``, cut ``split`` (the left arc is the first ``split`` cores of
    the rotated ring), ``chunk`` (slices of the closing bond per step), ``whole`` ("left", "right" or None: the
    arc built at once), ``cost`` (FLOPs, 2 per multiply-add, as opt_einsum counts) and ``largest`` (entries
    of the largest tensor made, the weight included). Called with the cores in network order, it returns the
    weight with its modes in ring order.

        >>> from tnlayers.formats import get_format
        >>> net = get_format("tr").network((8, 8, 8, 9, 8, 8, 8), 64)
        >>> plan = RingWeight(net, [4, 5, 6, 0, 1, 2, 3])
        >>> plan.largest <= prod(net.modes), plan.chunk < 64
        (True, True)
    """

    def __init__(self, net: Network, order: Sequence[int]):
        cores = [net.cores[k] for k in order]
        self.order = tuple(order)
        n = [net.sizes[core[1]] for core in cores]
        b = [net.sizes[core[0]] for core in cores]  # core j of the rotated ring: (b[j], n[j], b[j + 1 mod d])
        self.modes = tuple(n)
        options = [_option(n, b, split, whole) for split in range(1, len(n)) for whole in (None, "left", "right")]
        _, self.split, self.whole, self.chunk, self.largest, self.cost = min(options, key=lambda o: o[0])
        self.lean_split, self.lean_chunk, self.lean_live, self.lean_cost = _lean_option(n, b)

    def __call__(self, *cores: torch.Tensor) -> torch.Tensor:
        ring = [cores[k] for k in self.order]
        if not (torch.is_grad_enabled() and any(c.requires_grad for c in ring)):
            return self._lean(ring)
        s, first, last = self.split, ring[0], ring[-1]
        bs = ring[s].shape[0]
        inner_left, inner_right = _chain(ring[1:s]), _chain(ring[s:-1])  # (b_1, ..., b_s), (b_s, ..., b_{d-1})

        def left(part):  # (m, n_0, b_1), a slice of b_0 leading -> the left arc as (N_L, m * b_s)
            m = part.shape[0]
            if inner_left is not None:
                part = torch.mm(part.reshape(-1, part.shape[2]), inner_left.reshape(part.shape[2], -1))
            return part.reshape(m, -1, bs).transpose(0, 1).reshape(-1, m * bs)  # a copy, the pairs (a, b_s)

        def right(part):  # (b_{d-1}, n_{d-1}, m), a slice of b_0 trailing -> the right arc as (m * b_s, N_R)
            m = part.shape[2]
            if inner_right is not None:
                part = torch.mm(inner_right.reshape(-1, part.shape[0]), part.reshape(part.shape[0], -1))
            return part.reshape(bs, -1, m).permute(2, 0, 1).reshape(m * bs, -1)

        firsts, lasts = first.split(self.chunk, 0), last.split(self.chunk, 2)
        lefts = left(first).split(self.chunk * bs, 1) if self.whole == "left" else None
        rights = right(last).split(self.chunk * bs, 0) if self.whole == "right" else None
        weight = None
        for k in range(len(firsts)):
            lmat = left(firsts[k]) if lefts is None else lefts[k]
            rmat = right(lasts[k]) if rights is None else rights[k]
            weight = torch.mm(lmat, rmat) if weight is None else weight.addmm_(lmat, rmat)
            del lmat, rmat  # (no-grad) this chunk's operands go before the next one's are made
        return weight.reshape(self.modes)

    def _lean(self, ring: List[torch.Tensor]) -> torch.Tensor:
        """No graph to keep: per chunk of b_0, each arc carried from its closed end (see the module's doc)."""
        s, chunk = self.lean_split, self.lean_chunk
        bs = ring[s].shape[0]
        weight = None
        for start in range(0, ring[0].shape[0], chunk):
            part = ring[0][start:start + chunk]  # (m, n_0, b_1)
            m = part.shape[0]
            for core in ring[1:s]:  # (m, n_0..n_k, b) @ (b, n_{k+1} b') -> (m, n_0..n_{k+1}, b')
                part = torch.mm(part.reshape(-1, core.shape[0]), core.reshape(core.shape[0], -1))
            lmat = part.reshape(m, -1, bs).transpose(0, 1).reshape(-1, m * bs)  # (N_L, (a, b_s))
            part = ring[-1][..., start:start + chunk]  # (b_{d-1}, n_{d-1}, m)
            for core in reversed(ring[s:-1]):  # (b, n, b') @ (b', n..., m) -> (b, n n..., m)
                part = torch.mm(core.reshape(-1, core.shape[2]), part.reshape(core.shape[2], -1))
            rmat = part.reshape(bs, -1, m).permute(2, 0, 1).reshape(m * bs, -1)  # ((a, b_s), N_R)
            weight = torch.mm(lmat, rmat) if weight is None else weight.addmm_(lmat, rmat)
            del part, lmat, rmat
        return weight.reshape(self.modes)


def _lean_option(n: Sequence[int], b: Sequence[int]) -> Tuple[int, int, int, int]:
    """(split, chunk, entries live besides the weight at most, FLOPs) of the no-grad plan: the cut with the
    smallest arcs, then the largest chunk whose arcs (each made twice: the chain's end and its reordered copy)
    and chain steps fit in the weight's size (at least one slice of b_0)."""
    d, b0, total = len(n), b[0], prod(n)

    def arcs(split: int) -> Tuple[int, int]:  # (entries per slice of b_0 made at most at once, multiply-adds per slice)
        steps = [prod(n[:k + 1]) * b[k + 1] for k in range(split)]  # left: (1, n_0..n_k, b_{k+1})
        steps += [b[k] * prod(n[k:]) for k in range(split, d)]  # right: (b_k, n_k.., 1)
        macs = sum(prod(n[:k]) * b[k] * n[k] * b[k + 1] for k in range(1, split))
        macs += sum(b[k] * n[k] * b[k + 1] * prod(n[k + 1:]) for k in range(split, d - 1))
        ends = b[split] * (prod(n[:split]) + prod(n[split:]))
        return max(2 * ends, max(steps) + ends), macs

    split = min(range(1, d), key=lambda s: (arcs(s)[0], s))
    per_slice, macs = arcs(split)
    chunk = max(1, min(b0, total // per_slice))
    chunk = -(-b0 // -(-b0 // chunk))  # equal chunks
    return split, chunk, chunk * per_slice, 2 * (b0 * macs + total * b0 * b[split])


def _chain(cores: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """An open chain of (b, n, b') cores contracted left to right, as (b_first, n..., b_last); None if empty."""
    if not cores:
        return None
    out = cores[0]
    for core in cores[1:]:
        out = torch.mm(out.reshape(-1, core.shape[0]), core.reshape(core.shape[0], -1))
    return out.reshape(cores[0].shape[0], -1, cores[-1].shape[2])


def _chain_steps(n: Sequence[int], b: Sequence[int], i: int, j: int) -> Tuple[List[int], int]:
    """(entries of each tensor it makes, multiply-adds) of ``_chain`` over cores i..j-1 of the rotated ring."""
    d = len(n)
    sizes = [b[i] * prod(n[i:k + 1]) * b[(k + 1) % d] for k in range(i, j)]
    macs = sum(b[i] * prod(n[i:k]) * b[k] * n[k] * b[(k + 1) % d] for k in range(i + 1, j))
    return sizes, macs


KERNEL_MACS = 1 << 22  # what one more kernel launch (parallel region, dispatch) costs, in multiply-adds, about


def _option(n: Sequence[int], b: Sequence[int], split: int, whole: Optional[str]) -> tuple:
    """(sort key, split, whole, chunk, largest, FLOPs) of cutting the rotated ring before core ``split``."""
    d, b0, bs, total = len(n), b[0], b[split], prod(n)
    sides = {"left": prod(n[:split]), "right": total // prod(n[:split])}
    left, left_macs = _chain_steps(n, b, 1, split)
    right, right_macs = _chain_steps(n, b, split, d - 1)
    made = left + right + ([b0 * bs * sides[whole]] if whole else [])  # made once
    sliced = [size for side, size in sides.items() if side != whole]  # made per chunk, per slice of b_0
    chunk = max(1, min(b0, total // (bs * max(sliced))))
    chunk = -(-b0 // -(-b0 // chunk))  # equal chunks: the same count, the last one not a sliver
    chunks = -(-b0 // chunk)
    largest = max([total, chunk * bs * max(sliced)] + made)
    closing = (b0 * b[1] * sides["left"] * bs if split > 1 else 0) + (b0 * b[d - 1] * sides["right"] * bs
                                                                      if split < d - 1 else 0)
    macs = left_macs + right_macs + closing + total * b0 * bs
    kernels = len(left) + len(right) + chunks * (1 + 3 * len(sliced)) + (3 if whole else 0)
    excess = largest - total
    # within bounds first (else the smallest excess), then FLOPs with each kernel priced in
    return (excess > 0, max(excess, 0), macs + kernels * KERNEL_MACS), split, whole, chunk, largest, 2 * macs
