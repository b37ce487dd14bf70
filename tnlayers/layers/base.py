"""What every tensorized module shares: a network's cores held as one scale-invariant group."""
from __future__ import annotations

import warnings
from typing import List, Sequence

import torch
from torch import nn

from ..formats import FORMATS
from ..formats.network import Network
from ..groups import group_of, mark_core_group

__all__ = ["CoreModule", "build_network"]

# no machine holds more entries than this: a rank asking for more is a typo, not a model
MAX_PARAMS = 2 ** 48

_warned = set()  # (format, excess message) pairs already reported: the excess warning is one-time


def build_network(fmt, modes, rank, roles) -> Network:
    """The format's network for ``modes``; warns once per configuration about bonds that cannot help."""
    net = fmt.network(modes, fmt.layer_rank(rank, roles))
    if net.num_params > MAX_PARAMS:
        raise ValueError(f"rank={rank!r} gives {fmt.NAME} cores of shapes {net.shapes} ({net.num_params:.3g} "
                         f"parameters, more than 2**48): rank is out of range")
    excess = fmt.excess(net)
    key = (fmt.NAME, net.modes, tuple(net.ranks.items()))
    if excess and key not in _warned:
        _warned.add(key)
        warnings.warn(f"{fmt.NAME} network over modes {net.modes}: {', '.join(excess)}. Kept as given: the "
                      f"excess adds parameters but no expressiveness.", UserWarning, stacklevel=4)
    return net


def check_dtype(dtype) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex)):
        raise TypeError(f"dtype must be None or a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")


def check_tensor_values(name: str, tensor, shape=None) -> None:
    """A dense tensor to decompose: a torch.Tensor of ``shape``, with values (not meta), all finite."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} of shape {tuple(tensor.shape)} does not fit: expected shape {tuple(shape)}")
    if tensor.is_meta:
        raise ValueError(f"{name} is on the meta device: it has no values to decompose; load real weights "
                         f"first, or start from a random initialization (tensorize's init='random')")
    if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} holds non-finite values (NaN or inf): it cannot be decomposed")


def check_decomposition_options(options, name: str = "decomposition options") -> None:
    """Option names any format's decomposition takes (plus ``seed``): a typo is an error, not ignored."""
    import inspect

    allowed = {"seed"}
    for module in FORMATS.values():
        params = inspect.signature(module.decompose).parameters.values()
        allowed |= {p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD} - {"array", "net"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {unknown}; the decompositions take {sorted(allowed)}")


class CoreModule(nn.Module):
    """Holds ``self.cores`` (an ``nn.ParameterList`` in the network's core order) as one core group."""

    network: Network

    def _init_cores(self, net: Network, device=None, dtype=None) -> None:
        check_dtype(dtype)
        self.network = net
        self.format = net.format
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(shape, device=device, dtype=dtype)) for shape in net.shapes])
        mark_core_group(self.core_parameters())

    def core_parameters(self) -> List[nn.Parameter]:
        """The cores, in order: the parameters of this module's scale-invariant group."""
        return list(self.cores.parameters(recurse=False))  # 4x faster than iterating the ParameterList (hot path)

    @property
    def ranks(self) -> dict:
        """Bond label -> size, e.g. ``{'r1': 64, 'r2': 64}`` for a TT conv."""
        return dict(self.network.ranks)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_weight_cache", None)  # a cached weight belongs to the old storage
        out = super()._apply(fn, *args, **kwargs)
        cores = self.core_parameters()
        if any(group_of(c) is None for c in cores):  # e.g. to_empty() from meta made new parameter objects
            mark_core_group(cores)
        return out

    def __setstate__(self, state):
        state.pop("_weight_cache", None)  # deepcopy/unpickling: the copy rebuilds its own
        super().__setstate__(state)
        mark_core_group(self.core_parameters())  # deepcopy/unpickling makes new parameter objects without markers

    def _check_materialized(self, what: str) -> None:
        """A clear error instead of a failure deep inside a contraction when the cores have no values."""
        if self.cores[0].is_meta:  # (one look: forward calls this)
            raise NotImplementedError(
                f"{type(self).__name__}.{what} needs cores with values, but they are on the meta device; "
                f"materialize first: module.to_empty(device='cpu') then module.reset_parameters()")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # refuse non-finite cores before this module copies anything (its parameters stay as they were)
        for k in range(len(self.cores)):
            key = f"{prefix}cores.{k}"
            value = state_dict.get(key)
            if isinstance(value, torch.Tensor) and not value.is_meta and (
                    value.is_floating_point() or value.is_complex()):
                local = value.to_local() if hasattr(value, "to_local") else value
                if not bool(torch.isfinite(local).all()):
                    raise ValueError(f"load_state_dict: {key!r} (core {k} of {type(self).__name__}) holds non-finite "
                                     f"values (NaN or inf); refusing to load it into the cores")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def _load_cores(self, cores: Sequence[torch.Tensor]) -> None:
        for param, value in zip(self.cores, cores):
            param.copy_(value.to(param.dtype))
