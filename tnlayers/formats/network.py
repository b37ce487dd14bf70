"""A tensor network as plain data: cores named by their index labels, and the sizes of those labels.

Mode labels are ``m0, m1, ...`` (the modes of the full tensor, in order); every other label is a bond
between cores. A format module only has to say which labels each core carries (see ``tt.py`` etc.);
equations, shapes and parameter counts follow from that here, once, for all formats.
Design notes: docs/design.md, 'Contraction planning'.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Dict, Iterable, List, Sequence, Tuple

from opt_einsum import get_symbol

__all__ = ["Network", "mode_label", "check_modes", "einsum_equation"]


def mode_label(i: int) -> str:
    return f"m{i}"


def einsum_equation(operands: Sequence[Sequence[str]], output: Sequence[str]) -> str:
    """Einsum equation for operands given by their label tuples (labels may be any strings)."""
    symbols: Dict[str, str] = {}

    def sym(label):
        if label not in symbols:
            symbols[label] = get_symbol(len(symbols))
        return symbols[label]

    terms = ["".join(sym(label) for label in labels) for labels in operands]
    return ",".join(terms) + "->" + "".join(sym(label) for label in output)


def check_modes(modes: Sequence[int], name: str = "shape") -> Tuple[int, ...]:
    """Validate a tensor shape: a sequence of at least two positive ints."""
    if isinstance(modes, (str, bytes)) or not isinstance(modes, Iterable):
        raise TypeError(f"{name} must be a sequence of positive ints, got {modes!r}")
    modes = tuple(modes)
    for n in modes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must hold positive ints, got {modes!r}")
    if len(modes) < 2:
        raise ValueError(f"{name} must have at least 2 modes to be factorized, got {modes!r}")
    return modes


@dataclass(frozen=True)
class Network:
    """A tensor network: ``cores[k]`` is the tuple of labels of core k; ``sizes`` maps label -> size."""

    format: str
    modes: Tuple[int, ...]
    cores: Tuple[Tuple[str, ...], ...]
    sizes: Dict[str, int]

    @property
    def shapes(self) -> List[Tuple[int, ...]]:
        return [tuple(self.sizes[label] for label in core) for core in self.cores]

    @property
    def num_params(self) -> int:
        return sum(prod(shape) for shape in self.shapes)

    @property
    def bonds(self) -> List[str]:
        """Labels that are not modes, in order of first appearance."""
        seen = []
        for core in self.cores:
            for label in core:
                if not label.startswith("m") and label not in seen:
                    seen.append(label)
        return seen

    @property
    def ranks(self) -> Dict[str, int]:
        return {b: self.sizes[b] for b in self.bonds}

    def equation(self, output: Sequence[str] | None = None) -> str:
        """Einsum equation of the cores; ``output`` defaults to the modes in order (the full tensor)."""
        output = [mode_label(i) for i in range(len(self.modes))] if output is None else output
        return einsum_equation(self.cores, output)
