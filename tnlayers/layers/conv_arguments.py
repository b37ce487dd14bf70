"""The arguments of ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` as a tensorized conv checks them: sizes as an int or
an n-tuple (numpy integers too, as nn takes them), padding as ints or ``'same'``/``'valid'``, the padding mode and
``groups``; and the padding amounts in the order ``F.pad`` takes them. Pure functions of the arguments, so each
check is testable without building a layer.

    >>> from tnlayers.layers.conv_arguments import padding_amounts, positive_tuple
    >>> positive_tuple(3, 3, "kernel_size"), padding_amounts("same", (3, 4), (1, 1), (1, 1))
    ((3, 3, 3), (1, 2, 1, 1))
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

from torch.nn.modules.utils import _ntuple

from ..shapes import as_int

__all__ = ["PADDING_MODES", "int_tuple", "positive_tuple", "check_padding", "padding_amounts", "check_groups"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_TUPLE = {1: "a 1-tuple", 2: "a pair", 3: "a triple"}  # as the messages name an n-tuple


def int_tuple(value, n: int, low: int) -> Optional[Tuple[int, ...]]:
    """``value`` (an int or an n-tuple of ints) as n plain ints >= ``low``, or None."""
    values = tuple(as_int(v) for v in _ntuple(n)(value))
    if len(values) != n or any(v is None or v < low for v in values):
        return None
    return values


def positive_tuple(value, n: int, name: str) -> Tuple[int, ...]:
    """``kernel_size``, ``stride``, ``dilation``: n ints >= 1; anything else is a ValueError naming ``name``."""
    values = int_tuple(value, n, 1)
    if values is None:
        raise ValueError(f"{name} must be a positive int or {_TUPLE[n]} of positive ints, got {value!r}")
    return values


def check_padding(padding, n: int) -> Union[str, Tuple[int, ...]]:
    """``padding`` as the layer keeps it: ``'same'``, ``'valid'`` or n ints >= 0."""
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, {_TUPLE[n]} of ints, 'same' or 'valid', got {padding!r}")
        return padding
    values = int_tuple(padding, n, 0)
    if values is None:
        raise ValueError(f"padding must be a non-negative int, {_TUPLE[n]} of them, 'same' or 'valid', got {padding!r}")
    return values


def padding_amounts(padding, kernel: Tuple[int, ...], dilation: Tuple[int, ...], stride: Tuple[int, ...]
                    ) -> Tuple[int, ...]:
    """(before, after) per spatial dim, last dim first, as ``F.pad`` takes them, for a checked ``padding``.
    ``'same'`` puts the odd unit after, as ``nn.Conv2d`` does."""
    n = len(kernel)
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions (stride must be 1)")
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        before, after = [t // 2 for t in total], [t - t // 2 for t in total]
    else:
        before = after = (0,) * n if padding == "valid" else padding
    return tuple(v for i in reversed(range(n)) for v in (before[i], after[i]))


def check_groups(groups, in_channels=None, out_channels=None) -> int:
    """``groups`` as a plain int >= 1; with the channel counts, one that divides both (as nn requires)."""
    g = as_int(groups)
    if g is None:
        raise TypeError(f"groups must be an int dividing in_channels and out_channels, got {groups!r}")
    if g < 1:
        raise ValueError(f"groups must be a positive int dividing in_channels and out_channels, got {groups!r}")
    if in_channels is not None and (in_channels % g or out_channels % g):
        raise ValueError(f"groups={g} must divide in_channels={in_channels} and out_channels={out_channels} "
                         f"(as nn's convs require)")
    return g
