"""Whole-model transformations: ``tensorize`` (nn.Conv2d/nn.Linear -> tensorized layers), ``summary``
(what was tensorized, and what it saves) and ``to_dense`` (back to plain layers, for export).

Matching rules, written down once (they apply to ``filter``, and to ``rank``/``format``/``shapes``
given as a mapping):
- keys are module names as ``model.named_modules()`` spells them (``"layer1.0.conv1"``) or glob patterns
  (``fnmatch``, case-sensitive; ``*`` also crosses dots: ``"layer1.*"``); ``"*"`` in a mapping is the
  default for layers no other key matches;
- in a mapping, an exact name wins over globs, and globs are tried in the mapping's order;
- a key naming no Conv/Linear module of the model, or a glob matching none, is an error (close matches
  are listed): nothing is silently ignored;
- a ``rank`` or ``format`` mapping without ``"*"`` selects: only the layers it matches are tensorized
  (the classifier too, if named). Without such a mapping and without ``filter``, the default selection is
  every Conv2d and Linear except the model's last Linear (the classifier, kept dense as in the paper).
- A value of ``None`` (in a mapping, or returned by a callable) leaves that layer dense.
"""
from __future__ import annotations

import copy
import difflib
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from math import prod
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .formats import get_format
from .layers import (CPConv2d, CPLinear, TensorizedConv2d, TensorizedLinear, TRConv2d, TRLinear, TTConv2d,
                     TTLinear, TuckerConv2d, TuckerLinear)
from .layers.base import check_decomposition_options, check_tensor_values
from .layers.layer import STRATEGIES, TensorizedLayer
from .metrics import norm_deviation

__all__ = ["tensorize", "summary", "to_dense", "TYPE_MAP", "Summary"]

# dense type -> tensorized type (subclasses of the dense types map too); the format then picks the named
# subclass, so a tensorized model prints and isinstance-checks as TTConv2d, TRLinear, ...
TYPE_MAP = {nn.Conv2d: TensorizedConv2d, nn.Linear: TensorizedLinear}
NAMED_LAYERS = {
    TensorizedConv2d: {"tt": TTConv2d, "tr": TRConv2d, "cp": CPConv2d, "tucker": TuckerConv2d},
    TensorizedLinear: {"tt": TTLinear, "tr": TRLinear, "cp": CPLinear, "tucker": TuckerLinear},
}
INITS = ("random", "decompose")
_SHAPE_KEYS = ("in_shape", "out_shape")


def _conv_args(m) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size, stride=m.stride,
                padding=m.padding, dilation=m.dilation, bias=m.bias is not None, padding_mode=m.padding_mode)


def _linear_args(m) -> dict:
    return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)


# the constructor arguments a layer of either side rebuilds its counterpart from
_ARGS = {nn.Conv2d: _conv_args, nn.Linear: _linear_args, TensorizedConv2d: _conv_args,
         TensorizedLinear: _linear_args}
_DENSE_OF = {TensorizedConv2d: nn.Conv2d, TensorizedLinear: nn.Linear}


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


def _close_matches_hint(key: str, known: List[str]) -> str:
    """What to tell a user whose module name matched nothing: the close matches, else the first names."""
    close = difflib.get_close_matches(key, known, n=5, cutoff=0.5)
    return f"close matches: {close}" if close else f"its Conv/Linear modules start {known[:8]}"


def _check_keys(keys, known: List[str], arg: str) -> None:
    """Every name must be a Conv/Linear module of the model and every glob must match one."""
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"{arg}: module names and patterns must be str, got {key!r}")
        if key == "*":
            continue
        if _is_glob(key):
            if not any(fnmatchcase(name, key) for name in known):
                raise ValueError(f"{arg}: pattern {key!r} matches no Conv/Linear module of the model; "
                                 f"its Conv/Linear modules start {known[:8]}")
        elif key not in known:
            raise ValueError(f"{arg}: the model has no Conv/Linear module named {key!r}; "
                             f"{_close_matches_hint(key, known)}")


def _lookup(table: Mapping, name: str):
    """(matched, value) by the rules above: exact name, then globs in order, then "*"."""
    if name in table:
        return True, table[name]
    for key, value in table.items():
        if key != "*" and _is_glob(key) and fnmatchcase(name, key):
            return True, value
    return ("*" in table), table.get("*")


class _PerLayer:
    """One ``tensorize`` argument that may be given per layer: a plain value, a ``{name/glob: value}``
    mapping, or a callable ``(name, module) -> value``."""

    def __init__(self, arg: str, value, known: List[str]):
        self.arg, self.value = arg, value
        self.is_mapping, self.is_callable = isinstance(value, Mapping), callable(value)
        if self.is_mapping:
            _check_keys(value, known, arg)
        # a mapping without a default decides which layers are tensorized at all
        self.selects = self.is_mapping and "*" not in value

    def matches(self, name: str) -> bool:
        return _lookup(self.value, name)[0] if self.is_mapping else True

    def get(self, name: str, module: nn.Module):
        if self.is_mapping:
            return _lookup(self.value, name)[1]
        return self.value(name, module) if self.is_callable else self.value


def _filter_fn(filter, known: List[str]) -> Optional[Callable[[str, nn.Module], bool]]:
    if filter is None or callable(filter):
        return filter
    patterns = [filter] if isinstance(filter, str) else filter
    if not isinstance(patterns, (list, tuple, set, frozenset)):
        raise TypeError(f"filter must be None, a callable (name, module) -> bool, or a list of module names / "
                        f"glob patterns, got {type(filter).__name__}")
    _check_keys(patterns, known, "filter")
    return lambda name, module: any(name == p or fnmatchcase(name, p) for p in patterns)


def _why_unsupported(module: nn.Module) -> Optional[str]:
    """Why a Conv/Linear module has no tensorized counterpart (None if it has one)."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"Conv2d with groups={module.groups} (tensorized convs support groups=1 only)"
    if not isinstance(module, tuple(TYPE_MAP)):
        return f"{type(module).__name__} (no tensorized counterpart)"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return f"{type(module).__name__} with uninitialized (lazy) weight: run one forward pass first"
    return None


@dataclass
class _LayerPlan:
    module: nn.Module
    format: str
    rank: object
    shape: dict = field(default_factory=dict)


def _plan(model: nn.Module, format, rank, filter, shapes) -> Tuple[Dict[str, _LayerPlan], List[str]]:
    """Which modules become which layers: ({name: plan}, ["name: why left dense", ...])."""
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, (_ConvNd, nn.Linear, TensorizedLayer))]
    known = [n for n, _ in modules]
    rank_opt, format_opt = _PerLayer("rank", rank, known), _PerLayer("format", format, known)
    shapes_opt = _PerLayer("shapes", {} if shapes is None else shapes, known)
    if shapes is not None and not (shapes_opt.is_mapping or shapes_opt.is_callable):
        raise TypeError(f"shapes must be None, a mapping {{name/glob: {{'in_shape': ..., 'out_shape': ...}}}} or a "
                        f"callable (name, module) -> such a dict, got {type(shapes).__name__}")
    select = _filter_fn(filter, known)
    selecting = [opt for opt in (rank_opt, format_opt) if opt.selects]
    if select is None and not selecting:
        linears = [n for n, m in modules if isinstance(m, nn.Linear)]
        classifier = linears[-1] if linears else None
        select = lambda name, module: name != classifier  # noqa: E731
    from .adapters.layer import Adapter  # (here: the adapters package imports this module)

    adapters = [n + "." for n, m in model.named_modules() if isinstance(m, Adapter)]
    plans, left_dense = {}, []
    for name, module in modules:
        if isinstance(module, TensorizedLayer):  # already done (as torchao's default filter skips)
            continue
        if any(name.startswith(prefix) for prefix in adapters):
            left_dense.append(f"{name}: the frozen base of an adapter (tnlayers.adapt): merge or unadapt first")
            continue
        if select is not None and not select(name, module):
            continue
        if not all(opt.matches(name) for opt in selecting):
            continue
        why = _why_unsupported(module)
        if why is not None:
            left_dense.append(f"{name or '<model>'}: {why}")
            continue
        fmt, layer_rank = format_opt.get(name, module), rank_opt.get(name, module)
        if fmt is None or layer_rank is None:  # explicitly left dense
            continue
        fmt = get_format(fmt).NAME  # unknown format names fail here, listing the valid ones
        shape = shapes_opt.get(name, module) or {}
        if not isinstance(shape, Mapping) or set(shape) - set(_SHAPE_KEYS):
            raise ValueError(f"shapes for {name!r} must be a dict with keys among {_SHAPE_KEYS}, got {shape!r}")
        plans[name] = _LayerPlan(module, fmt, layer_rank, dict(shape))
    return plans, left_dense


def _dense_type(module: nn.Module):
    return next(t for t in TYPE_MAP if isinstance(module, t))


def _build(name: str, plan: _LayerPlan, strategy: str) -> TensorizedLayer:
    module = plan.module
    dense_type = _dense_type(module)
    layer_type = NAMED_LAYERS[TYPE_MAP[dense_type]][plan.format]
    try:
        layer = layer_type(**_ARGS[dense_type](module), device=module.weight.device, dtype=module.weight.dtype,
                           rank=plan.rank, strategy=strategy, **plan.shape)
    except (TypeError, ValueError) as err:  # name the layer: "rank must be ..." alone does not say where
        raise type(err)(f"tensorizing {name!r} ({type(module).__name__}): {err}") from err
    return layer.train(module.training)


def _swap(parent: nn.Module, replace: Callable[[str, nn.Module], Optional[nn.Module]], prefix: str = "",
          done: Optional[dict] = None) -> None:
    """The tree walk (as torchao's ``quantize_``): each child, by fully-qualified name, is either replaced
    or walked into. A module shared by several parents is replaced once, by the same new module."""
    done = {} if done is None else done
    # _modules, not named_children(): the latter yields a module shared by two slots of one parent only once
    for child_name, child in list(parent._modules.items()):
        if child is None:
            continue
        name = f"{prefix}.{child_name}" if prefix else child_name
        if id(child) not in done:
            done[id(child)] = replace(name, child)
            if done[id(child)] is None:
                _swap(child, replace, name, done)
        if done[id(child)] is not None:
            setattr(parent, child_name, done[id(child)])


def _show_progress(progress: Optional[bool]) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be None (show when stderr is a terminal), True or False, got {progress!r}")
    return progress


def tensorize(model: nn.Module, format="tt", rank=None, filter=None, init: str = "random", shapes=None,
              strategy: str = "auto", inplace: bool = True, *, progress: Optional[bool] = None,
              decomposition_options: Optional[dict] = None) -> nn.Module:
    """Replace the model's ``nn.Conv2d``/``nn.Linear`` modules (subclasses too) by tensorized layers.

    Args:
        format: "tt" | "tr" | "cp" | "tucker", or per layer (mapping / callable, see the module docstring).
        rank: as for the layers (int, per-bond sequence, float in (0, 1] = fraction of the dense
            parameters), or per layer: ``{name_or_glob: rank}`` (e.g. ``tnlayers.models.TABLE9``) or a
            callable ``(name, module) -> rank``. Required.
        filter: which modules to tensorize: a callable ``(name, module) -> bool`` or names / globs.
            Default: every Conv2d and Linear except the last Linear.
        init: "random" (variance-preserving) or "decompose": each layer from the module's current weight
            (TT-SVD, TR-SVD, CP-ALS, HOOI); the relative error is kept as ``layer.decomposition_error``.
            This is also how a dense checkpoint goes into a tensorized model: load it into the dense
            model, then ``tensorize(..., init="decompose")``.
        shapes: per-layer ``{"in_shape": ..., "out_shape": ...}`` overrides (mapping or callable);
            default automatic (the paper's Table 8 shapes for CIFAR ResNets).
        strategy: "auto" | "dense" | "factorized", for every new layer.
        inplace: False deep-copies the model first.
        progress: progress bar over layers for init="decompose"; default: when stderr is a terminal.
        decomposition_options: passed to each decomposition (e.g. ``{"n_iter_max": 200}`` for CP-ALS).

    Grouped convs, Conv1d/Conv3d and transposed convs that the selection reaches are left dense, with a
    warning. With nothing to tensorize, warns and returns ``model`` unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tensorize expects an nn.Module, got {type(model).__name__}")
    if rank is None:
        raise TypeError("tensorize needs rank=: an int, a per-bond sequence, a float in (0, 1], a mapping "
                        "{module name or glob: rank} or a callable (name, module) -> rank")
    if format is None:
        raise TypeError("format must be 'tt', 'tr', 'cp' or 'tucker', a mapping {module name or glob: format} or a "
                        "callable (name, module) -> format; got None")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if decomposition_options is not None and not isinstance(decomposition_options, Mapping):
        raise TypeError(f"decomposition_options must be a dict or None, got {type(decomposition_options).__name__}")
    check_decomposition_options(decomposition_options or {}, "decomposition_options")
    show = _show_progress(progress)
    plans, left_dense = _plan(model, format, rank, filter, shapes)
    if left_dense:
        warnings.warn(f"tensorize left {len(left_dense)} module(s) dense: " + "; ".join(left_dense), UserWarning,
                      stacklevel=2)
    if not plans:
        warnings.warn("tensorize found nothing to tensorize (no selected nn.Conv2d/nn.Linear with groups=1); "
                      "the model is returned unchanged", UserWarning, stacklevel=2)
        return model
    if init == "decompose":  # before anything is built: a meta or NaN weight has nothing to decompose
        for name, plan in plans.items():
            check_tensor_values(f"init='decompose': the weight of {name or '<model>'!r}", plan.module.weight)
    # every layer is built (and decomposed) before the first swap: a bad rank or a failing decomposition
    # leaves the user's model as it was
    layers = {name: _build(name, plan, strategy) for name, plan in plans.items()}
    if init == "decompose":
        from tqdm.auto import tqdm  # only when decomposing: keeps `import tnlayers` light

        options = dict(decomposition_options or {})
        with tqdm(layers.items(), desc="tensorize", unit="layer", disable=not show) as bar:
            for name, layer in bar:
                layer.init_from_weight(plans[name].module.weight, plans[name].module.bias, **options)
                bar.set_postfix_str(f"{name} err={layer.decomposition_error:.3g}")
    if "" in layers:  # the model itself is a Conv2d/Linear: it is replaced, not walked into
        return layers[""]
    if not inplace:
        model = copy.deepcopy(model)
    _swap(model, lambda name, child: layers.get(name))
    return model


@dataclass
class Summary:
    """Returned by :func:`summary`: one row (a dict) per tensorized layer, and the model's totals."""

    rows: List[dict]
    params: int  # the model's parameter count as it is
    dense_params: int  # the count if every tensorized layer were its dense counterpart

    @property
    def compression(self) -> float:
        return self.dense_params / max(self.params, 1)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        header = ("layer", "format", "shape", "ranks", "params", "dense", "ratio", "error", "Q")
        lines = [header]
        for r in self.rows:
            ranks = list(r["ranks"].values())
            ranks = str(ranks[0]) if len(set(ranks)) == 1 else str(ranks)
            error = "-" if r["error"] is None else f"{r['error']:.3g}"
            lines.append((r["name"], r["format"], "x".join(map(str, r["shape"])), ranks, f"{r['params']:,}",
                          f"{r['dense_params']:,}", f"{r['compression']:.1f}x", error, f"{r['Q']:.3g}"))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
        text.append(f"total: {self.params:,} parameters (dense: {self.dense_params:,}, "
                    f"{self.compression:.2f}x smaller)")
        return "\n".join(text)


@torch.no_grad()
def summary(model: nn.Module, print_table: bool = True) -> Summary:
    """Every tensorized layer (name, format, tensorized shape, ranks, parameters, compression, decomposition
    error if decomposed, norm deviation Q) and the totals, dense vs tensorized. Prints the table unless
    ``print_table=False``; returns it as a :class:`Summary` (``rows``, ``params``, ``dense_params``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"summary expects an nn.Module, got {type(model).__name__}")
    if not isinstance(print_table, bool):
        raise TypeError(f"print_table must be True or False, got {print_table!r}")
    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, TensorizedLayer):
            continue
        bias = 0 if layer.bias is None else layer.bias.numel()
        params = layer.network.num_params + bias
        dense = prod(layer._weight_shape()) + bias
        rows.append(dict(name=name or "<model>", format=layer.format, shape=tuple(layer.network.modes),
                         ranks=layer.ranks, params=params, dense_params=dense, compression=dense / params,
                         error=getattr(layer, "decomposition_error", None),
                         Q=float("nan") if layer.cores[0].is_meta else float(norm_deviation(layer.cores))))
    total = sum(p.numel() for p in model.parameters())
    dense_total = total + sum(r["dense_params"] - r["params"] for r in rows)
    result = Summary(rows, total, dense_total)
    if print_table:
        print(result)
    return result


@torch.no_grad()
def to_dense(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every tensorized layer by a plain ``nn.Conv2d``/``nn.Linear`` holding its reconstructed
    weight (same stride/padding/dilation/padding_mode/bias/device/dtype): for export and deployment."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_dense expects an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if not inplace:
        model = copy.deepcopy(model)

    def replace(name: str, layer: nn.Module) -> Optional[nn.Module]:
        kind = next((t for t in _DENSE_OF if isinstance(layer, t)), None)
        if kind is None:
            return None
        if layer.cores[0].is_meta:
            raise NotImplementedError(f"to_dense: {name or '<model>'!r} has its cores on the meta device, so there is "
                                      f"no weight to copy; materialize the model first (to_empty, then "
                                      f"reset_parameters or load_state_dict)")
        weight = layer.weight.detach()
        dense = _DENSE_OF[kind](**_ARGS[kind](layer), device=weight.device, dtype=weight.dtype)
        dense.weight.copy_(weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
        return dense.train(layer.training)

    root = replace("", model)
    if root is not None:
        return root
    _swap(model, replace)
    return model
