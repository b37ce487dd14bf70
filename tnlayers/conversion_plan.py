"""Which modules of a model ``tensorize`` turns into which tensorized layers: the per-layer arguments
(``filter``, and ``format``/``rank``/``shapes`` given as a mapping or callable) resolved per module name by
the matching rules of ``tnlayers/selection.py``, the classifier (``tnlayers/classifier.py``) and depthwise convs
kept dense by default, and what is left dense and why. Only reads the model; ``convert.py`` builds
and swaps the layers the plan names."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn
from torch.nn.modules.conv import _ConvNd

from .adapters.adapter import Adapter
from .classifier import default_classifier
from .formats import get_format
from .layers import (CPConv1d, CPConv2d, CPConv3d, CPLinear, TensorizedConv1d, TensorizedConv2d, TensorizedConv3d,
                     TensorizedLinear, TRConv1d, TRConv2d, TRConv3d, TRLinear, TTConv1d, TTConv2d, TTConv3d, TTLinear,
                     TuckerConv1d, TuckerConv2d, TuckerConv3d, TuckerLinear)
from .layers.embedding import CPEmbedding, TensorizedEmbedding, TREmbedding, TTEmbedding, TuckerEmbedding
from .layers.embedding_head import embedding_heads
from .layers.tensorized import TensorizedLayer
from .selection import _SHAPE_KEYS, _filter_fn, _PerLayer
from .sharing import module_aliases, tied_parameters

__all__ = ["TYPE_MAP", "NAMED_LAYERS", "LayerPlan", "plan_layers", "layer_class", "dense_type", "is_depthwise"]

# dense type -> tensorized type (subclasses of the dense types map too); the format then picks the named
# subclass, so a tensorized model prints and isinstance-checks as TTConv2d, TRLinear, ...
TYPE_MAP = {nn.Conv1d: TensorizedConv1d, nn.Conv2d: TensorizedConv2d, nn.Conv3d: TensorizedConv3d,
            nn.Linear: TensorizedLinear, nn.Embedding: TensorizedEmbedding}
NAMED_LAYERS = {
    TensorizedConv1d: {"tt": TTConv1d, "tr": TRConv1d, "cp": CPConv1d, "tucker": TuckerConv1d},
    TensorizedConv2d: {"tt": TTConv2d, "tr": TRConv2d, "cp": CPConv2d, "tucker": TuckerConv2d},
    TensorizedConv3d: {"tt": TTConv3d, "tr": TRConv3d, "cp": CPConv3d, "tucker": TuckerConv3d},
    TensorizedLinear: {"tt": TTLinear, "tr": TRLinear, "cp": CPLinear, "tucker": TuckerLinear},
    TensorizedEmbedding: {"tt": TTEmbedding, "tr": TREmbedding, "cp": CPEmbedding, "tucker": TuckerEmbedding},
}


def dense_type(module: nn.Module) -> type:
    """The key of TYPE_MAP a (supported) module is an instance of: nn.Conv1d/2d/3d or nn.Linear."""
    return next(t for t in TYPE_MAP if isinstance(module, t))


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise conv: one input channel per group (``groups == in_channels > 1``), as in MobileNets."""
    return isinstance(module, _ConvNd) and module.groups > 1 and module.in_channels == module.groups


def layer_class(plan: "LayerPlan") -> type:
    """The named tensorized class a plan builds (TTConv2d, CPLinear, ...)."""
    return NAMED_LAYERS[TYPE_MAP[dense_type(plan.module)]][plan.format]


def why_unsupported(module: nn.Module) -> Optional[str]:
    """Why a Conv/Linear module has no tensorized counterpart (None if it has one)."""
    if not isinstance(module, tuple(TYPE_MAP)):
        return f"{type(module).__name__} (no tensorized counterpart)"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return f"{type(module).__name__} with uninitialized (lazy) weight: run one forward pass first"
    if isinstance(module, nn.Embedding) and module.sparse:
        return "Embedding with sparse=True (a tensorized table has small dense core gradients, no sparse rows)"
    return None


@dataclass
class LayerPlan:
    """One module to tensorize: the named format, the rank as given, the in/out shape overrides; for an
    embedding, the output heads tied to it, [(nn.Linear, its names)], which become TiedEmbeddingHeads on it."""
    module: nn.Module
    format: str
    rank: object
    shape: dict = field(default_factory=dict)
    heads: list = field(default_factory=list)


def _choice(name: str, module: nn.Module, select, selecting, format_opt, rank_opt, shapes_opt):
    """What the arguments ask for the module under this name: None (leave it), or (format, rank, shape)."""
    if select is not None and not select(name, module):
        return None
    if not all(opt.matches(name) for opt in selecting):
        return None
    if isinstance(module, TensorizedLayer):  # only its format matters: it is checked, not rebuilt
        fmt = format_opt.get(name, module)
        return None if fmt is None else (get_format(fmt).NAME, None, {})
    if why_unsupported(module) is not None:  # reported (left dense) by the caller
        return ("", None, {})
    fmt, layer_rank = format_opt.get(name, module), rank_opt.get(name, module)
    if fmt is None or layer_rank is None:  # explicitly left dense
        return None
    shape = shapes_opt.get(name, module) or {}
    if not isinstance(shape, Mapping) or set(shape) - set(_SHAPE_KEYS):
        raise ValueError(f"shapes for {name!r} must be a dict with keys among {_SHAPE_KEYS}, got {shape!r}")
    return get_format(fmt).NAME, layer_rank, dict(shape)  # unknown format names fail here, listing the valid ones


def _one_choice(names: List[str], choices: list):
    """A module registered under several names is one layer: every name must ask for the same thing."""
    if any(repr(c) != repr(choices[0]) for c in choices[1:]):
        asked = {n: ("left as it is" if c is None else f"format {c[0]!r}, rank {c[1]!r}")
                 for n, c in zip(names, choices)}
        raise ValueError(f"one module is registered as {names}, and the arguments treat its names differently "
                         f"({asked}); it is one layer, tensorized once for all its places: give all its names the "
                         f"same setting, or give each place its own module (copy.deepcopy) first")
    return choices[0]


def _check_formats(already: List[Tuple[str, str, str]]) -> None:
    """Selected layers that are tensorized already: a different format is refused (no silent no-op)."""
    other = [(n, have, want) for n, have, want in already if have != want]
    if other:
        listed = "; ".join(f"{n or '<model>'!r} is format {have!r}, asked {want!r}" for n, have, want in other[:5])
        raise ValueError(f"tensorize: {len(other)} selected layer(s) are already tensorized in another format "
                         f"({listed}); tensorize does not convert between formats: call tnlayers.to_dense(model) "
                         f"first, then tensorize(model, ..., init='decompose') to start from the current weights")


def plan_layers(model: nn.Module, format, rank, filter, shapes, example_inputs=None, inputs_for_flops: bool = False
                ) -> Tuple[Dict[str, LayerPlan], List[str], List[str]]:
    """Which modules become which layers: ({name: plan}, ["name: why left dense", ...], [names already
    tensorized in the asked format]). A module registered under several names gets one plan under each
    (the same plan object). Raises for arguments that name modules inconsistently or ask a tensorized
    layer for another format; changes nothing in ``model``."""
    modules = module_aliases(model, (_ConvNd, nn.Linear, nn.Embedding, TensorizedLayer))
    known = [n for _, names in modules for n in names]
    rank_opt, format_opt = _PerLayer("rank", rank, known), _PerLayer("format", format, known)
    shapes_opt = _PerLayer("shapes", {} if shapes is None else shapes, known)
    if shapes is not None and not (shapes_opt.is_mapping or shapes_opt.is_callable):
        raise TypeError(f"shapes must be None, a mapping {{name/glob: {{'in_shape': ..., 'out_shape': ...}}}} or a "
                        f"callable (name, module) -> such a dict, got {type(shapes).__name__}")
    select = _filter_fn(filter, known)
    selecting = [opt for opt in (rank_opt, format_opt) if opt.selects]
    # an embedding whose weight is only output heads' (a language model's tie) is tensorized with its heads,
    # which are looked at after it: they follow it, or stay dense and tied when it does
    heads = embedding_heads(model)
    is_head = {id(head) for ties in heads.values() for head, _ in ties}
    if select is None and not selecting:
        linears = [(names[0], m) for m, names in modules if isinstance(m, nn.Linear)]
        classifier = default_classifier(model, linears, example_inputs)
        # an embedding tied to the classifier is the classifier's weight: it stays dense with it by default
        classifier_tables = {e for e, ties in heads.items() if any(head is classifier for head, _ in ties)}
        # depthwise convs stay dense by default too: 1.8% of MobileNetV2's weights; tensorizing them saved 1.5-2.6% of
        # the tensorized model's parameters for 3.6-4.3% more step time (docs/design.md, 'Layer layouts')
        select = lambda name, module: (module is not classifier and not is_depthwise(module)  # noqa: E731
                                       and id(module) not in classifier_tables)
    elif example_inputs is not None and not inputs_for_flops:
        raise ValueError("example_inputs= only finds the classifier that the default selection keeps dense; with "
                         "filter= or a rank/format mapping without '*' the selection is yours: drop example_inputs")
    adapters = tuple(n + "." for n, m in model.named_modules() if isinstance(m, Adapter))
    tied = tied_parameters(model, [(m, names) for m, names in modules if not isinstance(m, TensorizedLayer)])
    plans, left_dense, already, followed = {}, [], [], set()
    for module, names in sorted(modules, key=lambda m: id(m[0]) in is_head):  # (stable: model order otherwise)
        name = names[0]
        if id(module) in followed:
            continue  # becomes a TiedEmbeddingHead on its tensorized embedding
        if name.startswith(adapters):
            left_dense.append(f"{name}: the frozen base of an adapter (tnlayers.adapt): merge or unadapt first")
            continue
        choice = _one_choice(names, [_choice(n, module, select, selecting, format_opt, rank_opt, shapes_opt)
                                     for n in names])
        if choice is None:
            continue
        if isinstance(module, TensorizedLayer):
            already.append((name, module.format, choice[0]))
            continue
        why = why_unsupported(module)
        if why is None and id(module) in tied and id(module) not in heads:
            why = f"tied weights: {tied[id(module)]}; tensorizing it would untie them"
        if why is not None:
            left_dense.append(f"{name or '<model>'}: {why}")
            continue
        plans.update(dict.fromkeys(names, LayerPlan(module, *choice, heads=heads.get(id(module), []))))
        followed.update(id(head) for head, _ in heads.get(id(module), []))
    _check_formats(already)
    return plans, left_dense, [n for n, _, _ in already]
