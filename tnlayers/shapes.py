"""Tensorization of feature sizes and resolution of the ``rank`` argument."""
from __future__ import annotations

import operator
from math import prod
from numbers import Integral, Real
from typing import Callable, Optional, Sequence, Tuple

from ._caller import warn_user

__all__ = ["tensorize_dim", "check_shape", "resolve_rank", "as_int", "positive_int"]


def as_int(value) -> Optional[int]:
    """``value`` as a plain int if it is an integer other than a bool (``np.int64(4)``, a 0-d integer tensor:
    anything ``operator.index`` takes, as ``nn.Conv2d``/``nn.Linear`` accept), else None."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        return None
    try:
        return operator.index(value)
    except TypeError:  # e.g. a tensor with more than one element
        return None


def positive_int(value, name: str) -> int:
    """A size argument (channels, features) as a plain int >= 1; anything else is a ValueError naming it."""
    n = as_int(value)
    if n is None or n < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return n


def _prime_factors(n: int):
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def tensorize_dim(n: int, max_modes: int = 3) -> Tuple[int, ...]:
    """Split ``n`` into at most ``max_modes`` balanced factors, largest first, dropping 1s.

    Prime factors, largest first, each go to the currently smallest factor:
    16 -> (4, 2, 2), 32 -> (4, 4, 2), 64 -> (4, 4, 4), 3 -> (3,)  (the paper's Table 8 shapes).

        >>> import tnlayers
        >>> tnlayers.tensorize_dim(64), tnlayers.tensorize_dim(48), tnlayers.tensorize_dim(30, max_modes=2)
        ((4, 4, 4), (4, 4, 3), (6, 5))
    """
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise ValueError(f"a dimension to tensorize must be a positive int, got {n!r}")
    bins = [1] * max_modes
    for p in sorted(_prime_factors(int(n)), reverse=True):
        bins[bins.index(min(bins))] *= p
    return tuple(sorted((b for b in bins if b > 1), reverse=True)) or (1,)


def check_shape(shape, dim: int, name: str) -> Tuple[int, ...]:
    """A user's ``in_shape``/``out_shape``: positive ints whose product is ``dim``."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of positive ints, got {shape!r}")
    if any(isinstance(n, bool) or not isinstance(n, Integral) or n < 1 for n in shape):
        raise ValueError(f"{name} must hold positive ints, got {tuple(shape)!r}")
    if prod(shape) != dim:
        raise ValueError(f"{name}={tuple(shape)!r} has product {prod(shape)}, but the dimension it "
                         f"tensorizes is {dim}")
    return tuple(int(n) for n in shape)


def resolve_rank(rank, num_params: Callable[[int], int], dense_params: int, where: str = "") -> object:
    """Turn a float rank (fraction of ``dense_params`` to keep) into the largest uniform int rank whose
    parameter count fits; ints and sequences pass through (validated later by the format)."""
    if isinstance(rank, bool) or rank is None:
        raise TypeError(f"rank must be an int, a sequence of ints or a float in (0, 1], got {rank!r}")
    if isinstance(rank, Real) and not isinstance(rank, Integral):
        rank = float(rank)
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"a float rank is the fraction of the dense layer's parameters to keep and "
                             f"must be in (0, 1], got {rank!r}")
        budget = rank * dense_params
        if num_params(1) > budget:
            warn_user(f"rank={rank}{where}: even rank 1 needs {num_params(1)} parameters, more than "
                      f"{budget:.0f}; using rank 1")
            return 1
        lo, hi = 1, 2
        while num_params(hi) <= budget:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # num_params(lo) fits, num_params(hi) does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if num_params(mid) <= budget else (lo, mid)
        return lo
    if isinstance(rank, str) and (rank in ("auto", "vbmf") or rank.startswith("energy:")):
        raise TypeError(f"rank={rank!r} is chosen from a model's weights by tnlayers.tensorize(model, rank={rank!r}, "
                        f"init='decompose'); a layer takes an int, a sequence of ints or a float in (0, 1]")
    if isinstance(rank, (str, bytes)) or not isinstance(rank, (Integral, Sequence)):
        raise TypeError(f"rank must be an int, a sequence of ints or a float in (0, 1], got {rank!r}")
    return rank


def output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


def optional_shape(shape: Optional[Sequence[int]], dim: int, name: str, split: bool) -> Tuple[int, ...]:
    if shape is not None:
        return check_shape(shape, dim, name)
    return tensorize_dim(dim) if split else (dim,)
