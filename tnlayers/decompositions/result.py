"""What a decomposition routine returns: the cores, and the spectra it met on the way (the singular values of
every unfolding it truncated), so that rank selection can read error-versus-rank curves without a second pass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch

__all__ = ["Decomposition", "tail_energy"]


@dataclass
class Decomposition:
    """``cores`` in the routine's own layout; ``spectra[name]``: all singular values (descending) of the
    unfolding cut at bond ``name``; ``sweeps``: refinement sweeps run (0 for one-pass SVD methods);
    ``converged``: whether the tolerance stopped the refinement (True for one-pass methods).

        >>> d = Decomposition([torch.ones(2, 1)], {"r1": torch.tensor([2.0, 1.0])})
        >>> d.sweeps, d.converged, tail_energy(d.spectra["r1"], 1)
        (0, True, 1.0)
    """

    cores: List[torch.Tensor]
    spectra: Dict[str, torch.Tensor] = field(default_factory=dict)
    sweeps: int = 0
    converged: bool = True


def tail_energy(spectrum: torch.Tensor, rank: int) -> float:
    """Sum of the squared singular values past the first ``rank``: the squared error of the best rank-``rank``
    approximation of that unfolding (Eckart-Young).

        >>> tail_energy(torch.tensor([3.0, 2.0, 1.0]), 1)
        5.0
    """
    return float((spectrum[rank:].double() ** 2).sum())
