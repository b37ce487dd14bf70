"""Checks of the refinement options the iterative decompositions share (HOOI sweeps, CP-ALS iterations)."""
from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = ["check_n_iter_max", "check_tol"]


def check_n_iter_max(value) -> int:
    """``value`` as an int >= 0 (0: no refinement, the SVD start as it is), else a TypeError/ValueError.

        >>> check_n_iter_max(5)
        5
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"n_iter_max must be an int >= 0 (0: no refinement after the SVD start), got {value!r}")
    if value < 0:
        raise ValueError(f"n_iter_max must be an int >= 0 (0: no refinement after the SVD start), got {value!r}")
    return int(value)


def check_tol(value) -> float:
    """``value`` as a finite float >= 0 (0: run all ``n_iter_max`` iterations), else a TypeError/ValueError.

        >>> check_tol(1e-4)
        0.0001
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"tol must be a finite number >= 0 (0: always run all n_iter_max iterations), got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"tol must be a finite number >= 0 (0: always run all n_iter_max iterations), got {value!r}")
    return float(value)
