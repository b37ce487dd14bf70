"""Tensor formats as data: each module says which labels its cores carry (``network``), how a layer's
rank maps onto its modes (``layer_rank``), which bonds are larger than useful (``excess``), and how to
decompose a dense tensor into it (``decompose``, with the routines of ``tnlayers.decompositions``; its cost in
multiply-adds, ``decompose_cost``).

:data:`FORMATS` maps each format's name to its module:

    >>> import tnlayers
    >>> sorted(tnlayers.FORMATS)
    ['cp', 'tr', 'tt', 'tucker']
    >>> tnlayers.formats.get_format("TT") is tnlayers.FORMATS["tt"]
    True
"""
from __future__ import annotations

from types import ModuleType
from typing import Mapping

from . import cp, tr, tt, tucker
from .network import Network, check_modes, mode_label

__all__ = ["FORMATS", "get_format", "Network", "check_modes", "mode_label"]

FORMATS = {m.NAME: m for m in (cp, tucker, tt, tr)}


def lookup_format(table: Mapping[str, ModuleType], name: str) -> ModuleType:
    """``table[name]`` (case-insensitive) for a table of format modules; bad names list the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"format must be a str, one of {sorted(table)}, got {name!r}")
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; format must be one of {sorted(table)}") from None


def get_format(name: str) -> ModuleType:
    """The format module for ``name``; an unknown name lists the valid ones."""
    return lookup_format(FORMATS, name)
