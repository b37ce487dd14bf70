"""Rank allocation under a parameter budget: pick one candidate per layer so that the cores' parameters fit
the budget and the total loss is smallest, the loss of a layer being

    loss_l = -n_l * log(1 - e_l)        (n_l: the weight's entries, e_l: its relative squared error)

i.e. the log of the energy the layer keeps, per weight entry. Why this normalization:
- relative, not absolute: after a normalization (BatchNorm, LayerNorm) a layer's output does not depend on its
  weight's scale, so what a truncation does downstream is set by the relative error;
- the log: as e_l -> 1 the layer passes nothing on, and no other layer can make up for it; the plain sum of
  e_l would trade a starved large layer against many cheap improvements of small ones (on weights without
  structure it puts every large layer at rank 1). For small errors the log is e_l itself;
- per weight entry: for a weight without structure (a flat spectrum, e_l ~ 1 - p_l / n_l), the optimum is then
  p_l proportional to n_l, i.e. the uniform fraction; ``rank="auto"`` departs from uniform only where the
  spectra say it pays.

This is a multiple-choice knapsack. Greedy on marginal error per parameter is optimal only when every curve
is convex, which CP's measured curves and the small-rank end of most spectra are not; the dynamic program
below is exact up to the budget's discretization (``units`` steps; each candidate's size rounded up, so the
result never exceeds the budget, and undershoots it by at most one step per layer) and costs
layers x candidates x units additions, vectorized over the budget axis: well under a second for ResNet-18.

Why the sum of *relative* squared errors: after a normalization (BatchNorm, LayerNorm) a layer's output is
invariant to its weight's scale, so what a truncation does to the next layer is set by the relative error;
each layer counts alike, whatever its size.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np

from .curves import LayerCurve

__all__ = ["allocate", "loss", "minimum_params"]


def minimum_params(curves: Sequence[LayerCurve]) -> int:
    """The parameters of rank 1 everywhere: the smallest budget any allocation can meet."""
    return int(sum(int(c.params[0]) for c in curves))


def loss(curve: LayerCurve) -> np.ndarray:
    """Each candidate's loss ``-n log(1 - e)`` (see the module docstring)."""
    return -float(curve.dense_params) * np.log1p(-np.minimum(curve.error, 1.0 - 1e-12))


def allocate(curves: Sequence[LayerCurve], budget: int, units: int = 8000) -> List[int]:
    """Index of the chosen candidate per curve, minimizing the total :func:`loss` with ``sum(params) <= budget``.

        >>> import numpy as np
        >>> flat = LayerCurve([1, 2], np.array([10, 20]), np.array([0.5, 0.4]), 100)
        >>> steep = LayerCurve([1, 2], np.array([10, 20]), np.array([0.9, 0.1]), 100)
        >>> allocate([flat, steep], budget=30)  # the 10 extra parameters go where they remove the most error
        [0, 1]
    """
    if budget < minimum_params(curves):
        raise ValueError(f"budget of {budget:,} parameters is below rank 1 in every layer "
                         f"({minimum_params(curves):,})")
    units = max(1, min(units, int(budget)))
    step = budget / units
    best = np.zeros(units + 1)  # best[b]: least error of the layers so far within b steps
    choices = []
    for curve in curves:
        sizes = np.ceil(curve.params / step - 1e-9).astype(np.int64)
        new = np.full(units + 1, np.inf)
        pick = np.full(units + 1, -1, dtype=np.int32)
        for i, (size, error) in enumerate(zip(sizes, loss(curve))):
            if size > units:
                break
            trial = best[:units + 1 - size] + error
            better = trial < new[size:]
            new[size:][better] = trial[better]
            pick[size:][better] = i
        best = new
        choices.append(pick)
    if not np.isfinite(best[units]):  # the rounding up made rank 1 everywhere not fit: a finer grid fits it
        return allocate(curves, budget, units * 4) if units < budget else [0] * len(curves)
    chosen, left = [], units
    for curve, pick in zip(reversed(curves), reversed(choices)):
        i = int(pick[left])
        chosen.append(i)
        left -= int(np.ceil(curve.params[i] / step - 1e-9))
    return chosen[::-1]
