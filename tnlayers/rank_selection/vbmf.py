"""The rank empirical variational Bayesian matrix factorization (EVBMF) finds in a noisy matrix, from its
singular values alone — the rank estimate Kim et al. (arXiv 1511.06530) use for the Tucker-2 ranks of a conv
layer, one per channel-mode unfolding.

Nakajima, Sugiyama, Babacan and Tomioka (JMLR 14, 2013, "Global analytic solution of fully-observed
variational Bayesian matrix factorization") show that for an L x M matrix (L <= M, alpha = L / M) with noise
variance sigma^2, EVBMF keeps exactly the components whose singular value exceeds
``sqrt(M sigma^2 (1 + tau) (1 + alpha / tau))``, tau = 2.5129 sqrt(alpha), and give the free energy as a function
of sigma^2 in closed form; sigma^2 is the minimizer of that free energy, found here by a log-spaced grid then a
golden-section refinement (the free energy is not convex in sigma^2)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["evbmf_rank"]

_TAU_FACTOR = 2.5129  # the root of the threshold equation in Nakajima et al., as a multiple of sqrt(alpha)


def _free_energy(sigma2: float, squares: np.ndarray, rows: int, cols: int) -> float:
    """2 F / (L M) up to a constant, for noise variance ``sigma2`` (``squares``: all L squared singular values)."""
    alpha = rows / cols
    x = squares / (cols * sigma2)
    x_bar = (1 + _TAU_FACTOR * math.sqrt(alpha)) * (1 + alpha / (_TAU_FACTOR * math.sqrt(alpha)))
    kept, dropped = x[x > x_bar], x[x <= x_bar]
    # tau(x): the positive root of tau^2 - (x - 1 - alpha) tau + alpha = 0 (the kept components' shrinkage)
    gap = kept - (1 + alpha)
    tau = 0.5 * (gap + np.sqrt(np.maximum(gap ** 2 - 4 * alpha, 0.0)))
    return float(np.sum(dropped - np.log(dropped)) + np.sum(kept - tau) + np.sum(np.log((tau + 1) / kept))
                 + alpha * np.sum(np.log(tau / alpha + 1)))


def evbmf_rank(singular_values: Sequence[float], rows: int, cols: int) -> int:
    """The number of components EVBMF keeps in a ``rows`` x ``cols`` matrix with these singular values (all of
    them, min(rows, cols) values).

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> signal = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 60)) * 3
        >>> evbmf_rank(np.linalg.svd(signal + rng.standard_normal((40, 60)), compute_uv=False), 40, 60)
        3
    """
    rows, cols = min(rows, cols), max(rows, cols)
    s = np.sort(np.abs(np.asarray(singular_values, dtype=np.float64)))[::-1][:rows]
    if s.size < rows:
        s = np.concatenate([s, np.zeros(rows - s.size)])
    squares = np.maximum(s ** 2, 1e-300)
    alpha = rows / cols
    tau_bar = _TAU_FACTOR * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    # sigma^2 lies between the mean of the squares (all noise) and where the weaker half alone is noise
    upper = float(squares.sum()) / (rows * cols)
    half = max(int(math.ceil(rows / (1 + alpha))) - 1, 1)
    lower = max(float(squares[min(half, rows - 1)]) / (cols * x_bar), float(squares[half:].mean()) / cols
                if half < rows else 0.0, upper * 1e-12)
    if not lower < upper:
        return 0
    grid = np.exp(np.linspace(math.log(lower), math.log(upper), 200))
    values = [_free_energy(v, squares, rows, cols) for v in grid]
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):  # golden section within the bracketing grid cells
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if _free_energy(c, squares, rows, cols) < _free_energy(d, squares, rows, cols):
            b = d
        else:
            a = c
    sigma2 = (a + b) / 2
    threshold = math.sqrt(cols * sigma2 * x_bar)
    return int(np.sum(s > threshold))
