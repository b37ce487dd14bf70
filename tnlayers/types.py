"""The type aliases of tnlayers' public signatures, in one place: what ``rank=``, ``in_shape=``, ``params=``,
``base_optimizer=``, ``filter=``, ``target_modules=``, ``alpha=`` ... accept. They are plain ``typing``
aliases (usable in your own annotations) and describe what the functions take; the functions still check
their arguments at run time, with the errors ``docs/errors.md`` lists.

This module imports nothing from tnlayers (a leaf of the import graph), so any module may use it.

    >>> import tnlayers
    >>> from tnlayers.types import Rank
    >>> def make(rank: Rank) -> tnlayers.TTLinear:
    ...     return tnlayers.TTLinear(16, 16, rank=rank)
    >>> make(2).ranks
    {'r1': 2, 'r2': 2, 'r3': 2, 'r4': 2, 'r5': 2}
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

__all__ = ["Device", "DType", "IntOrPair", "IntOrTuple", "Padding", "Shape", "Rank", "TensorRank", "LayerRank",
           "FormatSpec", "Filter", "LayerShapes", "ExampleInputs", "TargetModules", "Params", "BaseOptimizer", "Alpha",
           "LossFn", "PathLike"]

# -- layers ------------------------------------------------------------------------------------------------
Device = Union[torch.device, str, int, None]
"""Where parameters are created, as ``nn.Linear(..., device=)`` takes it."""
DType = Optional[torch.dtype]
"""A floating-point dtype, or None for the default one."""
IntOrPair = Union[int, Tuple[int, int]]
"""``kernel_size``, ``stride``, ``dilation``: an int or an (h, w) pair, as ``nn.Conv2d`` takes them."""
IntOrTuple = Union[int, Tuple[int, ...]]
"""``kernel_size``, ``stride``, ``dilation`` of a conv of any dims: an int or one int per spatial dim, as
``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` take them."""
Padding = Union[int, Tuple[int, ...], str]
"""An int, one int per spatial dim, ``"same"`` or ``"valid"``, as ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` take it."""
Shape = Sequence[int]
"""A tensorization of a dimension (``in_shape=(4, 4, 2)`` for 32 channels): positive ints, product = dim."""
Rank = Union[int, float, Sequence[Optional[int]]]
"""A layer's rank: an int (every bond), a per-bond sequence (TT also as ``[1, r1, ..., 1]``; Tucker per mode,
``None`` = mode left unfactored), or a float in (0, 1]: the fraction of the dense parameter count to keep."""
TensorRank = Union[Rank, str]
""":class:`~tnlayers.FactorizedTensor`'s rank: a :data:`Rank`, or ``"same"`` (as many parameters as the full
tensor at most)."""

# -- whole-model transformations (per layer: a value, a {name or glob: value} mapping, or a callable) ------
LayerRank = Union[Rank, Mapping[str, Rank], Callable[[str, nn.Module], Rank]]
"""``tensorize``'s ``rank``: one :data:`Rank` for every layer, ``{name or glob: rank}``, or
``(name, module) -> rank``; with ``init="decompose"`` also ``"auto"`` (with ``budget=``), ``"energy:0.9"`` or
``"vbmf"`` (``tnlayers.rank_selection``)."""
FormatSpec = Union[str, Mapping[str, str], Callable[[str, nn.Module], str]]
"""``tensorize``'s ``format``: ``"tt"``, ``"tr"``, ``"cp"`` or ``"tucker"``, per layer as :data:`LayerRank`."""
Filter = Union[Callable[[str, nn.Module], bool], str, Sequence[str], None]
"""``tensorize``'s ``filter``: ``(name, module) -> bool``, or module names / globs; None: the default selection."""
LayerShapes = Union[Mapping[str, Mapping[str, Shape]], Callable[[str, nn.Module], Optional[Mapping[str, Shape]]],
                    None]
"""``shapes`` of ``tensorize`` and ``adapt``: ``{name or glob or "*": {"in_shape": ..., "out_shape": ...}}`` or
``(name, module) -> such a dict``."""
ExampleInputs = Union[torch.Tensor, Tuple[Any, ...], Dict[str, Any], None]
"""One forward's inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs."""
TargetModules = Union[str, Sequence[str], None]
"""``adapt``'s ``target_modules`` (PEFT's rules): module names, dotted suffixes or globs, or one regular
expression str matched against the whole name."""

# -- optimizers --------------------------------------------------------------------------------------------
Params = Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]], Iterable[Tuple[str, torch.Tensor]]]
"""What ``torch.optim`` optimizers take: ``model.parameters()``, param-group dicts, or
``model.named_parameters()`` (the optimizers then name layers in their warnings)."""
BaseOptimizer = Union[Type[torch.optim.Optimizer], torch.optim.Optimizer]
"""An optimizer class (built on the same params with the remaining keyword arguments) or a built instance."""
Alpha = Union[float, Callable[[int], float]]
"""DAS's / BAR's ``alpha``: a number, or a callable ``step -> alpha`` (``step`` counts from 0)."""
LossFn = Callable[[], torch.Tensor]
"""A callable that *returns* the loss at the current weights (forward only, no ``backward``)."""
PathLike = Union[str, os.PathLike]
"""A file path: a str or a ``pathlib.Path``."""
