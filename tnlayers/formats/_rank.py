"""Validation of rank arguments, shared by the formats (errors name the argument and what is allowed)."""
from __future__ import annotations

from numbers import Integral
from typing import List, Sequence

__all__ = ["check_int_rank", "rank_list"]


def check_int_rank(value, name: str = "rank", allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        allowed = "a positive int" + (" or None" if allow_none else "")
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value!r}")
    return int(value)


def rank_list(rank, length: int, fmt: str, allow_none: bool = False) -> List:
    """An int (uniform) or a sequence of ``length`` entries -> list of validated ints."""
    if isinstance(rank, Sequence) and not isinstance(rank, (str, bytes)):
        if len(rank) != length:
            raise ValueError(f"rank for format {fmt!r} needs {length} entries here, got {len(rank)}: {list(rank)!r}")
        return [check_int_rank(r, f"rank[{i}]", allow_none) for i, r in enumerate(rank)]
    if isinstance(rank, float):
        raise TypeError(f"a float rank (fraction of parameters) must be resolved before building the "
                        f"{fmt!r} network; got {rank!r}")
    return [check_int_rank(rank, "rank")] * length
