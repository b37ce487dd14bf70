"""What every tensorized module shares: a network's cores held as one scale-invariant group."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .._caller import warn_user
from ..decompositions.options import check_n_iter_max, check_tol
from ..formats import FORMATS
from ..formats.network import Network
from ..groups import group_of, mark_core_group
from ..strategy import ModuleChoices

__all__ = ["CoreModule", "build_network", "warn_if_larger_than_dense", "check_state_configs"]

# A rank is refused, before anything is allocated, when its parameter count is above MAX_PARAMS (2**31 entries:
# 8 GiB of float32 cores, more than a training step could hold with their gradients and optimizer state)
# AND above MAX_DENSE_RATIO times the dense layer's count. Both: a huge dense layer may have a huge (still
# smaller) factorization, and ranks beyond the useful ones legitimately cost a few hundred times a tiny dense
# layer (TRLinear(64, 64, rank=512): 1500x, 6.3M parameters; it builds, with a warning). When the dense
# count is unknown only ABSOLUTE_MAX_PARAMS applies (no machine holds that many entries).
MAX_PARAMS = 2 ** 31
MAX_DENSE_RATIO = 1000
ABSOLUTE_MAX_PARAMS = 2 ** 48
STATE_CONFIG_KEY = "tnlayers"  # key of a module's config in its state_dict metadata (state_dict._metadata)

_warned = set()  # configurations already warned about: each warning is one-time per configuration


def build_network(fmt, modes, rank, roles, dense_params: Optional[int] = None, dense_name: str = "dense layer"
                  ) -> Network:
    """The format's network for ``modes``; refuses counts that could never be allocated (see MAX_PARAMS),
    warns once per configuration about bonds that cannot help."""
    net = fmt.network(modes, fmt.layer_rank(rank, roles))
    _check_param_count(fmt, net, rank, dense_params, dense_name)
    excess = fmt.excess(net)
    key = ("excess", fmt.NAME, net.modes, tuple(net.ranks.items()))
    if excess and key not in _warned:
        _warned.add(key)
        warn_user(f"{fmt.NAME} network over modes {net.modes}: {', '.join(excess)}. Kept as given: the "
                  f"excess adds parameters but no expressiveness.")
    return net


def _check_param_count(fmt, net: Network, rank, dense_params: Optional[int], dense_name: str) -> None:
    count = net.num_params
    if dense_params is None:
        if count > ABSOLUTE_MAX_PARAMS:
            raise ValueError(f"rank={rank!r} gives {fmt.NAME} cores of shapes {net.shapes} ({count:,} parameters, "
                             f"more than 2**48): rank is out of range")
        return
    if count > MAX_PARAMS and count > MAX_DENSE_RATIO * dense_params:
        raise ValueError(f"rank={rank!r} gives {fmt.NAME} cores of shapes {net.shapes}: {count:,} parameters "
                         f"against {dense_params:,} for the {dense_name}; rank is out of range (refused above "
                         f"2**31 parameters when that is also over {MAX_DENSE_RATIO}x the dense count); lower the "
                         f"rank" + ("" if dense_name == "base weight" else  # adapters take int ranks only
                                    ", or give a float rank in (0, 1], the fraction of the dense count to keep"))


def warn_if_larger_than_dense(owner: str, net: Network, params: int, dense_params: int, dense_name: str) -> None:
    """One warning per configuration when a factorization holds more parameters than what it replaces."""
    key = ("larger", owner, net.modes, tuple(net.ranks.items()), params, dense_params)
    if params > dense_params and key not in _warned:
        _warned.add(key)
        warn_user(f"{owner} over modes {net.modes} with ranks {dict(net.ranks)} has {params:,} parameters, more "
                  f"than the {dense_params:,} of the {dense_name} it replaces ({params / dense_params:.2f}x); "
                  f"a lower rank (or a float rank in (0, 1], the fraction of the dense count to keep) makes it "
                  f"smaller")


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
        allowed |= {p.name for p in list(params)[2:] if p.kind == p.POSITIONAL_OR_KEYWORD}  # after (tensor, net)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {unknown}; the decompositions take {sorted(allowed)}")
    # values too, whichever formats use them: one tensorize call may mix formats, and a bad value must not
    # pass silently just because the first layers' format ignores it
    try:
        if "n_iter_max" in options:
            check_n_iter_max(options["n_iter_max"])
        if "tol" in options:
            check_tol(options["tol"])
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None


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
        # the ParameterList's own dict, in order (hot path: 3x faster than .parameters(), 12x than iterating)
        return [p for p in self.cores._parameters.values() if p is not None]

    def _first_core(self) -> nn.Parameter:
        """Core 0 without ParameterList indexing (~2 us on the hot path)."""
        return next(iter(self.cores._parameters.values()))

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
        if isinstance(state.get("_choices"), dict) and "_config" in state:  # pickled before ModuleChoices
            state["_choices"] = ModuleChoices(state.pop("_config"))  # (its choices are retaken)
        super().__setstate__(state)
        mark_core_group(self.core_parameters())  # deepcopy/unpickling makes new parameter objects without markers

    def _check_materialized(self, what: str) -> None:
        """A clear error instead of a failure deep inside a contraction when the cores have no values."""
        if self._first_core().is_meta:  # (one look: forward calls this)
            raise NotImplementedError(
                f"{type(self).__name__}.{what} needs cores with values, but they are on the meta device; "
                f"materialize first: module.to_empty(device='cpu') then module.reset_parameters()")

    # -- what the cores mean, in the state_dict ------------------------------------------------------------
    def _state_config(self) -> Optional[dict]:
        """What the cores mean beyond their shapes (str/int/tuple values only: ``torch.load(weights_only=True)``
        reads them); None: nothing to record."""
        return None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # in the metadata nn.Module keeps per module (torch.save keeps it; state_dict keys stay tensors only)
        metadata = getattr(destination, "_metadata", None)
        config = self._state_config()
        if config is not None and metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]][STATE_CONFIG_KEY] = config

    def _check_state_config(self, state_dict, prefix: str, local_metadata) -> None:
        """Refuse cores saved by a module of another configuration (same core shapes, other meaning: a 3x3
        kernel read as 1x9). A state_dict without the record (older files, a rebuilt plain dict) loads
        unchecked, as before."""
        saved, own = local_metadata.get(STATE_CONFIG_KEY), self._state_config()
        if not isinstance(saved, dict) or own is None:
            return
        if not any(f"{prefix}cores.{k}" in state_dict for k in range(len(self.cores))):
            return  # none of this module's cores is loaded (strict=False with a partial state_dict)
        differ = [k for k in own if k in saved and _as_tuples(saved[k]) != own[k]]
        if differ:
            where = repr(prefix[:-1]) if prefix else "the state_dict"
            raise ValueError(f"load_state_dict: {where} holds the cores of a module with {_describe(saved)}, but "
                             f"this {type(self).__name__} has {_describe(own)} ({', '.join(differ)} differ): the "
                             f"cores would be read with another meaning; build the module with the saved "
                             f"configuration")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # refused whatever ``strict`` says, as nn refuses a size mismatch: loading would give wrong results
        self._check_state_config(state_dict, prefix, local_metadata)
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


def check_state_configs(model: nn.Module, state_dict) -> None:
    """The configuration check of every tensorized module in ``model`` against a whole ``state_dict``, before
    anything is loaded (``model.load_state_dict`` checks each module just before copying into it)."""
    metadata = getattr(state_dict, "_metadata", None) or {}
    for name, module in model.named_modules():
        if isinstance(module, CoreModule):
            module._check_state_config(state_dict, f"{name}." if name else "", metadata.get(name, {}))


def _as_tuples(value):
    """A config value as saved, with lists (another serializer's tuples) read back as tuples."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _describe(config: dict) -> str:
    return ", ".join(f"{k}={_as_tuples(v)!r}" for k, v in config.items())
