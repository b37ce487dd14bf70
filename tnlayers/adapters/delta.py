"""The update ΔW of an adapter as a tensor network (formats are data, as for the layers).

Modes are ordered (output modes..., kernel modes..., input modes...), the order the DAS paper writes
LoRETTA's 4096 x 4096 update in: modes [4, 4, 16, 16, 16, 16, 4, 4] are out (4, 4, 16, 16) then
in (16, 16, 4, 4). One core starts at zero, so ΔW = 0 and the adapted model equals the base model: the
first core holding an output mode (LoRA's B, FLoRA's A, the first TT core).

:data:`ADAPTER_FORMATS` maps the names ``adapt(format=...)`` takes to their format modules:

    >>> from tnlayers.adapters import ADAPTER_FORMATS
    >>> sorted(ADAPTER_FORMATS)
    ['cp', 'lora', 'tr', 'tt', 'tucker']
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from types import ModuleType
from typing import Tuple

from ..formats import FORMATS, lookup_format
from ..formats.network import Network, mode_label
from ..layers.base import build_network
from ..shapes import optional_shape
from . import lora

__all__ = ["ADAPTER_FORMATS", "get_adapter_format", "DeltaLayout", "delta_layout"]

# "tucker" of a linear layer is Tucker-2 over (out, in): FLoRA's ΔW = A G Bᵀ; "tt" over split modes: LoRETTA
ADAPTER_FORMATS = {"lora": lora, **FORMATS}


def get_adapter_format(name: str) -> ModuleType:
    """The format module for ``name`` (tensorized layers' formats and "lora"); bad names list the valid ones."""
    return lookup_format(ADAPTER_FORMATS, name)


@dataclass(frozen=True)
class DeltaLayout:
    network: Network
    roles: Tuple[str, ...]  # "out" | "spatial" | "in", per mode
    out_shape: Tuple[int, ...]
    in_shape: Tuple[int, ...]
    zero_core: int  # the core that starts at zero


def delta_layout(fmt: ModuleType, out_dim: int, in_dim: int, kernel: Tuple[int, ...], rank: int,
                 out_shape=None, in_shape=None) -> DeltaLayout:
    """ΔW of an (out_dim, in_dim, *kernel) weight in format ``fmt``. ``out_shape``/``in_shape`` split the
    channel dimensions (default: whole for LoRA and Tucker, ``tensorize_dim`` for CP, TT and TR)."""
    split = fmt.SPLIT_CHANNELS["conv" if kernel else "linear"]
    out_shape = optional_shape(out_shape, out_dim, "out_shape", split)
    in_shape = optional_shape(in_shape, in_dim, "in_shape", split)
    if fmt is lora and (len(out_shape) > 1 or len(in_shape) > 1):
        raise ValueError(f"shapes: format 'lora' is B·A over the whole (out, in) matrix; out_shape={out_shape} and "
                         f"in_shape={in_shape} would split it (use format 'tt' or 'cp' for split modes)")
    spatial = ((prod(kernel),) if fmt.MERGE_SPATIAL else tuple(kernel)) if kernel else ()
    modes = out_shape + spatial + in_shape
    roles = ("out",) * len(out_shape) + ("spatial",) * len(spatial) + ("in",) * len(in_shape)
    net = build_network(fmt, modes, rank, roles, out_dim * in_dim * prod(kernel), "base weight")
    out_labels = {mode_label(i) for i, role in enumerate(roles) if role == "out"}
    zero_core = next(k for k, labels in enumerate(net.cores) if out_labels & set(labels))
    return DeltaLayout(net, roles, out_shape, in_shape, zero_core)
