"""One pairwise einsum step (``"abc,cd->dab"``) as the few ops ``torch.einsum`` would dispatch for it:
a permute of each operand, a reshape of each into a matrix (or a batch of matrices), one ``mm``/``bmm``, a
reshape and, where the output's order asks for it, a permute.

Why: a tensorized layer's weight is rebuilt, and a factorized input carried through its cores, by a handful
of small pairwise steps on every training step. On such small tensors ``torch.einsum`` costs far more than
its matmul: it parses the equation on every call and unsqueezes every operand to the union of all labels
(~20 aten ops, and as many autograd nodes, per step; ~60 us on a 2-core CPU for a 16x16x3x3 TR conv's
steps, against ~15 us for the ops below). The plan is worked out once, when the step is planned; the sizes
are read from the operands on each call, so a step planned for one batch size runs on any.
"""
from __future__ import annotations

from math import prod
from typing import Optional, Tuple

import torch

__all__ = ["PairStep"]


class PairStep:
    """``PairStep(equation)(x, y) == torch.einsum(equation, x, y)`` for a two-operand equation with an
    explicit output; labels in both operands and in the output are batch indices (``bmm``). Equations this
    does not cover (a repeated label in one term, a label summed within one operand) run through
    ``torch.einsum`` unchanged.

        >>> x, y = torch.randn(2, 3, 4), torch.randn(4, 5, 2)
        >>> bool(torch.allclose(PairStep("abc,cda->dab")(x, y), torch.einsum("abc,cda->dab", x, y)))
        True
    """

    def __init__(self, equation: str):
        self.equation = equation
        terms, _, out = equation.replace(" ", "").partition("->")
        a, _, b = terms.partition(",")
        self.fallback = not _plain(a, b, out)
        if self.fallback:
            return
        batch = [c for c in out if c in a and c in b]
        left = [c for c in out if c in a and c not in b]
        right = [c for c in out if c in b and c not in a]
        summed = [c for c in a if c in b and c not in out]
        self.perm_x = _permutation([a.index(c) for c in batch + left + summed])
        self.perm_y = _permutation([b.index(c) for c in batch + summed + right])
        self.counts = (len(batch), len(left), len(summed))
        made = batch + left + right
        self.perm_out = _permutation([made.index(c) for c in out])

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fallback:
            return torch.einsum(self.equation, x, y)
        nb, nl, ns = self.counts
        if self.perm_x is not None:
            x = x.permute(self.perm_x)
        if self.perm_y is not None:
            y = y.permute(self.perm_y)
        xs, ys = x.shape, y.shape
        batch, left, right = xs[:nb], xs[nb:nb + nl], ys[nb + ns:]
        k = prod(xs[nb + nl:])
        if nb:
            b = prod(batch)
            out = torch.bmm(x.reshape(b, prod(left), k), y.reshape(b, k, prod(right)))  # (sizes, not -1: 0 allowed)
        else:
            out = torch.mm(x.reshape(prod(left), k), y.reshape(k, prod(right)))
        out = out.reshape((*batch, *left, *right))
        return out if self.perm_out is None else out.permute(self.perm_out)

    def __repr__(self) -> str:
        return f"PairStep({self.equation!r})"


def _plain(a: str, b: str, out: str) -> bool:
    """Each label once per term, every output label from an operand, none summed within one operand."""
    if any(len(set(t)) != len(t) for t in (a, b, out)) or not set(out) <= set(a) | set(b):
        return False
    return all(c in out or (c in a and c in b) for c in a + b)


def _permutation(order) -> Optional[Tuple[int, ...]]:
    """``order`` as a permute argument, or None where it is the identity (no op to dispatch)."""
    order = tuple(order)
    return None if order == tuple(range(len(order))) else order
