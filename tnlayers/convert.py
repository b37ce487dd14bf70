"""Whole-model transformations: ``tensorize`` (nn.Conv2d/nn.Linear -> tensorized layers), ``summary``
(what was tensorized, and what it saves) and ``to_dense`` (back to plain layers, for export).

Which module becomes which layer is planned in ``tnlayers/conversion_plan.py`` (the per-layer arguments,
``filter`` and ``rank``/``format``/``shapes`` given as a mapping, follow the matching rules of
``tnlayers/selection.py``; by default the classifier stays dense, ``tnlayers/classifier.py``); this module
builds the layers, starts their cores (matched std or decomposition) and swaps them in
(``selection._swap``, shared with ``adapt``).
"""
from __future__ import annotations

import copy
import math
import sys
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ._caller import warn_user
from .conversion_plan import TYPE_MAP, LayerPlan, dense_type, layer_class, plan_layers
from .decompose import decompose_cost
from .layers import TensorizedConv1d, TensorizedConv2d, TensorizedConv3d, TensorizedLinear
from .layers.base import check_decomposition_options, check_tensor_values
from .layers.embedding import TensorizedEmbedding
from .layers.embedding_head import TiedEmbeddingHead, head_to_linear
from .layers.tensorized import TensorizedLayer
from .rank_selection import check_budget
from .tensorize_ranks import PROGRESS_BAR, choose_from_weights, rank_methods
from .selection import _check_eager, _swap
from .sharing import UNTIE_HINT, module_aliases, tied_parameters
from .strategy import check_strategy
from .types import ExampleInputs, Filter, FormatSpec, LayerRank, LayerShapes
from .compression_report import Summary, summary

__all__ = ["tensorize", "summary", "to_dense", "TYPE_MAP", "Summary"]

INITS = ("random", "decompose")
_LAYER_OVERHEAD = 2 * 10 ** 6  # multiply-adds' worth of the fixed per-layer work (checks, error, Python)


def _conv_args(m) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size, stride=m.stride,
                padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode)


def _linear_args(m) -> dict:
    return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)


def _embedding_args(m) -> dict:
    return dict(num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim, padding_idx=m.padding_idx,
                max_norm=m.max_norm, norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse)


# the constructor arguments a layer of either side rebuilds its counterpart from
_ARGS = {nn.Conv1d: _conv_args, nn.Conv2d: _conv_args, nn.Conv3d: _conv_args, nn.Linear: _linear_args,
         TensorizedConv1d: _conv_args, TensorizedConv2d: _conv_args, TensorizedConv3d: _conv_args,
         TensorizedLinear: _linear_args, nn.Embedding: _embedding_args, TensorizedEmbedding: _embedding_args}
_DENSE_OF = {TensorizedConv1d: nn.Conv1d, TensorizedConv2d: nn.Conv2d, TensorizedConv3d: nn.Conv3d,
             TensorizedLinear: nn.Linear, TensorizedEmbedding: nn.Embedding}


def _build(name: str, plan: LayerPlan, strategy: str, weight_std="nn") -> TensorizedLayer:
    module = plan.module
    try:
        layer = layer_class(plan)(**_ARGS[dense_type(module)](module), device=module.weight.device,
                                  dtype=module.weight.dtype, rank=plan.rank, strategy=strategy, weight_std=weight_std,
                                  **plan.shape)
    except (TypeError, ValueError) as err:  # name the layer: "rank must be ..." alone does not say where
        raise type(err)(f"tensorizing {name!r} ({type(module).__name__}): {err}") from err
    return layer.train(module.training)


def _matched_std(module: nn.Module) -> Optional[float]:
    """The std (in float64) of the weight a layer replaces, or None when there is none to match: no values
    (meta device), or no spread (all entries equal, a single entry) or a non-finite one."""
    weight = module.weight
    if weight.is_meta or weight.numel() < 2:
        return None
    std = float(weight.detach().double().std())
    return std if math.isfinite(std) and std > 0 else None


def _random_starts(unique: dict) -> dict:
    """init="random": {plan key: the weight_std its layer starts at}, each replaced weight's own std; the
    ``nn`` default for the module's fan-in where there is none to match (warned when the weight has values:
    cores cannot all start at zero, they would never get a gradient)."""
    stds = {key: _matched_std(plan.module) for key, (_, plan) in unique.items()}
    unmatched = [name or "<model>" for key, (name, plan) in unique.items()
                 if stds[key] is None and not plan.module.weight.is_meta]
    if unmatched:
        warn_user(f"tensorize(init='random'): {len(unmatched)} weight(s) have no spread to match (all entries equal, "
                  f"or non-finite): {unmatched[:5]}; their layers start at nn's default std instead. To start from "
                  f"such a weight itself, use init='decompose'")
    return {key: "nn" if std is None else std for key, std in stds.items()}


@torch.no_grad()
def _copy_bias(layer: TensorizedLayer, module: nn.Module) -> None:
    """A dense bias is kept as it is: it is not factorized, so the new layer can hold it exactly."""
    if getattr(module, "bias", None) is not None:  # (nn.Embedding has none)
        layer.bias.copy_(module.bias)


def _nothing_to_do(already: List[str]) -> str:
    if already:
        return (f"tensorize: the selected layers are already tensorized in the asked format ({already[:5]}); "
                f"nothing changed (their ranks neither). To change ranks, call tnlayers.to_dense(model) first, "
                f"then tensorize(..., init='decompose')")
    return ("tensorize found nothing to tensorize (no selected nn.Conv1d/2d/3d, nn.Linear or nn.Embedding; depthwise convs are only tensorized when selected); the model is "
            "returned unchanged")


def _show_progress(progress: Optional[bool]) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be None (show when stderr is a terminal), True or False, got {progress!r}")
    return progress


def tensorize(model: nn.Module, format: FormatSpec = "tt", rank: Optional[LayerRank] = None, filter: Filter = None,
              init: str = "random", shapes: LayerShapes = None, strategy: str = "auto", inplace: bool = True, *,
              budget: Optional[float] = None, budget_of: str = "params", progress: Optional[bool] = None,
              decomposition_options: Optional[Dict[str, Any]] = None,
              example_inputs: ExampleInputs = None) -> nn.Module:
    """Replace the model's ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``/``nn.Linear``/``nn.Embedding`` modules
    (subclasses too; grouped convs too) by tensorized layers.

    Args:
        format: "tt" | "tr" | "cp" | "tucker", or per layer (mapping / callable, see the module docstring).
        rank: as for the layers (int, per-bond sequence, float in (0, 1] = fraction of the dense
            parameters), or per layer: ``{name_or_glob: rank}`` (e.g. ``tnlayers.models.TABLE9``) or a
            callable ``(name, module) -> rank``. Required. Chosen from the weights (``init="decompose"``):
            ``"auto"`` (with ``budget=``: per-layer error curves, then the allocation with the least total
            relative squared error that fits the budget), ``"energy:0.9"`` (per layer, the smallest rank
            keeping that fraction of the weight's squared norm), ``"vbmf"`` (Tucker-2: EVBMF per channel
            mode); see ``tnlayers.rank_selection``. The choice is kept as ``layer.rank_choice``.
        filter: which modules to tensorize: a callable ``(name, module) -> bool`` or names / globs.
            Default: every Conv1d/2d/3d and Linear except depthwise convs (groups == in_channels: 1.8 % of
            MobileNetV2's weights, see the README) and the classifier (``tnlayers/classifier.py``: the last
            Linear applied, found with ``example_inputs``, else the last registered, with a warning when
            that is not named like a classifier).
        init: "random": random cores whose reconstructed weight has the std of the module's current
            weight (so nn's default, a fan-out He init or a custom init keep their scale; nn's default for
            the fan-in when the weight is on the meta device or has no spread), and the module's bias kept
            as it is; or "decompose": each layer from the module's current weight (TT-SVD, TR-SVD, CP-ALS,
            HOSVD + HOOI: ``tnlayers.decompositions``); the relative error is kept as ``layer.decomposition_error``.
            This is also how a dense checkpoint goes into a tensorized model: load it into the dense
            model, then ``tensorize(..., init="decompose")``.
        shapes: per-layer ``{"in_shape": ..., "out_shape": ...}`` overrides (mapping or callable);
            default automatic (the paper's Table 8 shapes for CIFAR ResNets).
        strategy: "auto" | "flops" | "dense" | "factorized", for every new layer (``tnlayers.strategy``).
        inplace: False deep-copies the model first.
        budget: for ``rank="auto"``: a float in (0, 1], the fraction of the "auto" layers' dense parameters
            (weights and biases) their tensorized parameters may total, or an int, that total itself.
        budget_of: "params" (default) or "flops": the budget counts the "auto" layers' FLOPs at
            ``example_inputs`` (required then), each layer at the cheaper of its dense and factorized paths
            (what ``strategy="flops"`` runs), against the dense layers' FLOPs.
        progress: progress bar over layers for init="decompose" (advancing by each layer's estimated
            cost); default: when stderr is a terminal.
        decomposition_options: passed to each decomposition (``{"n_iter_max": 200, "tol": 0}`` for CP-ALS
            or HOOI; ``random_state`` for CP-ALS's random start columns).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs for one dry
            forward (eval mode, no grad) that finds the classifier the default selection keeps dense.

    Transposed convs that the selection reaches are left dense, with a warning; so are modules sharing a
    parameter with another module (tied weights: one replacement can't serve both). A module registered in several places is tensorized once, the same new layer in each
    place. Selected layers already tensorized in the asked format are left as they are; in another format,
    a ValueError (``to_dense`` first). With nothing to tensorize, warns and returns ``model`` unchanged.

    Example::

        >>> import torch, tnlayers
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
        ...                       nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
        >>> model = tnlayers.tensorize(model, format="tucker", rank=4)  # the classifier (last Linear) stays dense
        >>> [type(m).__name__ for m in model]
        ['TuckerConv2d', 'ReLU', 'TuckerConv2d', 'Flatten', 'Linear']
        >>> model(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 10])
        >>> tnlayers.tensorize(nn.Sequential(nn.Linear(64, 64)), rank={"0": 0.5}, filter=["0"])[0].format
        'tt'
    """
    _check_eager(model, "tensorize")
    if rank is None:
        raise TypeError("tensorize needs rank=: an int, a per-bond sequence, a float in (0, 1], a mapping "
                        "{module name or glob: rank} or a callable (name, module) -> rank")
    if format is None:
        raise TypeError("format must be 'tt', 'tr', 'cp' or 'tucker', a mapping {module name or glob: format} or a "
                        "callable (name, module) -> format; got None")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    check_strategy(strategy)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if decomposition_options is not None and not isinstance(decomposition_options, Mapping):
        raise TypeError(f"decomposition_options must be a dict or None, got {type(decomposition_options).__name__}")
    check_decomposition_options(decomposition_options or {}, "decomposition_options")
    budget = None if budget is None else check_budget(budget, budget_of)
    show = _show_progress(progress)
    plans, left_dense, already = plan_layers(model, format, rank, filter, shapes, example_inputs,
                                             inputs_for_flops=budget_of == "flops")
    if left_dense:
        hint = f"; {UNTIE_HINT}" if any(": tied weights:" in why for why in left_dense) else ""
        warn_user(f"tensorize left {len(left_dense)} module(s) dense: " + "; ".join(left_dense) + hint)
    if not plans:
        warn_user(_nothing_to_do(already))
        return model
    unique = {}  # a module registered under several names is built once
    for name, plan in plans.items():
        unique.setdefault(id(plan), (name, plan))
    methods = rank_methods(unique, init, budget, budget_of)
    if init == "decompose":  # before anything is built: a meta or NaN weight has nothing to decompose
        for name, plan in plans.items():
            check_tensor_values(f"init='decompose': the weight of {name or '<model>'!r}", plan.module.weight)
    chosen = choose_from_weights(model, unique, methods, budget, budget_of, lambda name, plan: _build(name, plan, strategy),
                                 dict(decomposition_options or {}), show, example_inputs) if methods else {}
    # every layer is built (and decomposed) before the first swap: a bad rank or a failing decomposition
    # leaves the user's model as it was
    starts = _random_starts(unique) if init == "random" else {}
    built = {key: _build(name, plan, strategy, starts.get(key, "nn")) for key, (name, plan) in unique.items()}
    layers = {name: built[id(plan)] for name, plan in plans.items()}
    for key, (_, plan) in unique.items():  # output heads tied to an embedding: on its cores, the tie kept
        for head, names in plan.heads:
            layers.update(dict.fromkeys(names, TiedEmbeddingHead.from_dense(head, built[key])))
    for key, choice in chosen.items():
        built[key].rank_choice = choice
    if init == "random":
        for key, (_, plan) in unique.items():
            _copy_bias(built[key], plan.module)
    if init == "decompose":
        from tqdm.auto import tqdm  # only when decomposing: keeps `import tnlayers` light

        options = dict(decomposition_options or {})
        # the bar advances by each layer's estimated cost, not by one per layer: a 512x512x3x3 conv takes
        # ~1000x a 64x64x1x1 one, and a per-layer count would make the remaining time meaningless
        costs = {key: decompose_cost(built[key].network, **options) + _LAYER_OVERHEAD for key in unique}
        with tqdm(total=sum(costs.values()), desc="tensorize", disable=not show, bar_format=PROGRESS_BAR) as bar:
            for done, (key, (name, plan)) in enumerate(unique.items(), 1):
                layer = built[key]
                bar.set_postfix_str(f"{done - 1}/{len(unique)} layers, decomposing {name}")
                layer.init_from_weight(plan.module.weight, getattr(plan.module, "bias", None), **options)
                bar.set_postfix_str(f"{done}/{len(unique)} layers, {name} err={layer.decomposition_error:.3g}",
                                    refresh=False)
                bar.update(costs[key])
    if "" in layers:  # the model itself is a Conv2d/Linear: it is replaced, not walked into
        return layers[""]
    if not inplace:
        model = copy.deepcopy(model)
    _swap(model, lambda name, child: layers.get(name))
    return model


@torch.no_grad()
def to_dense(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every tensorized layer by a plain ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``/``nn.Linear``/
    ``nn.Embedding`` holding its reconstructed weight (same stride/padding/dilation/groups/padding_mode/bias/
    padding_idx/max_norm/device/dtype): for export and deployment. An output head tied to a tensorized embedding
    (``TiedEmbeddingHead``) becomes an ``nn.Linear`` whose weight is the dense embedding's Parameter.
    A layer registered in several places becomes one dense module in all of them; layers sharing cores
    or a bias with another module stay tensorized, with a warning (two dense copies would untie them).

        >>> import torch, tnlayers
        >>> layer = tnlayers.TRConv2d(16, 16, 3, padding=1, rank=4)
        >>> dense = tnlayers.to_dense(torch.nn.Sequential(layer))[0]
        >>> type(dense).__name__, torch.allclose(dense.weight, layer.weight)
        ('Conv2d', True)
    """
    _check_eager(model, "to_dense")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if not inplace:
        model = copy.deepcopy(model)
    layers = module_aliases(model, tuple(_DENSE_OF) + (TiedEmbeddingHead,))
    tied = tied_parameters(model, layers)
    if tied:
        kept = [f"{names[0]}: tied weights: {tied[id(m)]}" for m, names in layers if id(m) in tied]
        warn_user(f"to_dense left {len(kept)} layer(s) tensorized: " + "; ".join(kept) + f"; {UNTIE_HINT}")
    # a head tied to an embedding becomes an nn.Linear sharing the dense embedding's weight Parameter, and stays
    # as it is (with a warning) when its embedding does (not in the model, or tied otherwise)
    converted = {id(m) for m, _ in layers if isinstance(m, TensorizedEmbedding) and id(m) not in tied}
    heads = [names[0] for m, names in layers if isinstance(m, TiedEmbeddingHead) and id(m.embedding) not in converted]
    if heads:
        warn_user(f"to_dense left {len(heads)} output head(s) tensorized: {heads[:5]}: each is tied to a tensorized "
                  f"embedding that is not converted (outside the model, or tied otherwise); a dense copy would untie it")
    made: Dict[int, nn.Module] = {}  # id(layer) -> its dense module, which a tied head shares the weight of
    first_name = {id(m): aliases[0] for m, aliases in layers}

    def replace(name: str, layer: nn.Module) -> Optional[nn.Module]:
        if isinstance(layer, TiedEmbeddingHead):
            embedding = layer.embedding
            return head_to_linear(layer, dense(first_name[id(embedding)], embedding)) if id(embedding) in converted else None
        kind = next((t for t in _DENSE_OF if isinstance(layer, t)), None)
        if kind is None or id(layer) in tied:
            return None
        return dense(name, layer)

    def dense(name: str, layer: nn.Module) -> nn.Module:
        if id(layer) in made:
            return made[id(layer)]
        kind = next(t for t in _DENSE_OF if isinstance(layer, t))
        if layer.cores[0].is_meta:
            raise NotImplementedError(f"to_dense: {name or '<model>'!r} has its cores on the meta device, so there is "
                                      f"no weight to copy; materialize the model first (to_empty, then "
                                      f"reset_parameters or load_state_dict)")
        weight = layer.weight.detach()
        module = _DENSE_OF[kind](**_ARGS[kind](layer), device=weight.device, dtype=weight.dtype)
        module.weight.copy_(weight)
        if layer.bias is not None:
            module.bias.copy_(layer.bias)
        made[id(layer)] = module.train(layer.training)
        return made[id(layer)]

    root = replace("", model)
    if root is not None:
        return root
    _swap(model, replace)
    return model
