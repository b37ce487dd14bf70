"""A tensorized layer's layout, from its constructor arguments alone: the checked format, the tensorization
of the channels, the modes and their roles, the network the rank gives, and the dense counterpart's size.
A pure function of the arguments (no module, no tensor), so each check is testable without building a
layer; ``TensorizedLayer`` allocates and initializes the cores from it. The adapters' counterpart is
``tnlayers/adapters/delta.py``."""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from types import ModuleType
from typing import Optional, Sequence, Tuple

from ..formats import get_format
from ..formats.network import Network
from ..shapes import optional_shape, resolve_rank
from .base import build_network, warn_if_larger_than_dense

__all__ = ["LayerLayout", "layer_layout", "layer_format", "KINDS"]

KINDS = ("linear", "conv")


@dataclass(frozen=True)
class LayerLayout:
    fmt: ModuleType
    network: Network
    roles: Tuple[str, ...]  # "in" | "spatial" | "out", per mode (modes are ordered in, spatial, out)
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    fan_in: int  # in_dim * kernel area: what the init's std is scaled by
    dense_params: int  # weight and bias of the nn.Linear / nn.Conv1d/2d/3d the layer stands for


def layer_format(owner: str, fixed_format: Optional[str], format: Optional[str]) -> ModuleType:
    """The format module of class ``owner``: the ``format=`` given to a generic class, or the one a named class
    fixes (``format=`` may repeat it, not contradict it)."""
    if format is None:
        if fixed_format is None:
            raise TypeError(f"{owner} needs format=, one of 'cp', 'tucker', 'tt', 'tr'")
        format = fixed_format
    elif fixed_format is not None and format != fixed_format:
        raise ValueError(f"{owner} is format {fixed_format!r}; got format={format!r}")
    return get_format(format)


def layer_layout(owner: str, fixed_format: Optional[str], kind: str, format: Optional[str], in_dim: int,
                 out_dim: int, kernel: Sequence[int], rank, in_shape, out_shape, bias: bool, *,
                 depthwise: bool = False) -> LayerLayout:
    """The layout of layer class ``owner`` (its name, for messages) of ``kind`` ("linear"/"conv") whose
    class fixes ``fixed_format`` (None for the generic classes). ``in_dim``/``out_dim`` are plain positive
    ints (checked by the caller; a grouped conv's ``in_dim`` is its channels per group); ``kernel`` is () for a
    linear layer, one size per spatial dim for a conv. ``depthwise``: one input channel per group, so the
    network has no input modes (over the kernel and the output channels only: it factorizes across
    channels). Warns once per configuration when the factorization is larger than the dense layer."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    fmt = layer_format(owner, fixed_format, format)
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be True or False, got {bias!r}")
    split = fmt.SPLIT_CHANNELS[kind]
    if depthwise and in_shape is not None:
        raise ValueError(f"in_shape: {owner} is depthwise (one input channel per group), its network has no input "
                         f"modes; leave in_shape out, got {in_shape!r}")
    in_shape = () if depthwise else optional_shape(in_shape, in_dim, "in_shape", split)
    out_shape = optional_shape(out_shape, out_dim, "out_shape", split)
    kernel = tuple(kernel)
    spatial = ((prod(kernel),) if fmt.MERGE_SPATIAL else kernel) if kernel else ()
    modes = in_shape + spatial + out_shape
    roles = ("in",) * len(in_shape) + ("spatial",) * len(spatial) + ("out",) * len(out_shape)
    dense_weight, bias_params = in_dim * out_dim * prod(kernel), (out_dim if bias else 0)
    dense_params = dense_weight + bias_params
    dense_name = f"dense nn.{'Linear' if kind == 'linear' else f'Conv{len(kernel)}d'}"
    rank = resolve_rank(rank, lambda r: fmt.network(modes, fmt.layer_rank(r, roles)).num_params,
                        dense_weight, where=f" for {owner}")
    net = build_network(fmt, modes, rank, roles, dense_params, dense_name)
    warn_if_larger_than_dense(owner, net, net.num_params + bias_params, dense_params, dense_name)
    return LayerLayout(fmt, net, roles, in_shape, out_shape, in_dim * prod(kernel), dense_params)
