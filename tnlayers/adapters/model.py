"""Whole-model adapter operations: ``adapt`` (wrap the target layers), ``merge`` / ``unmerge`` (add ΔW into
the base weights and take it out again), ``unadapt`` (back to plain layers) and ``trainable_parameters``."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn

from .._caller import warn_user
from ..selection import _SHAPE_KEYS, _check_eager, _PerLayer, _swap
from ..sharing import UNTIE_HINT, module_aliases, tied_parameters
from ..types import LayerShapes, TargetModules
from .adapter import Adapter, check_adapter_options
from .matching import adapter_class, peft_parameters, select_targets

__all__ = ["adapt", "merge", "unmerge", "unadapt", "trainable_parameters", "named_adapters", "ParameterCount"]


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def named_adapters(model: nn.Module) -> List[Tuple[str, Adapter]]:
    """[(name, adapter), ...] of the model's adapters, in module order.

        >>> import torch, tnlayers
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> _ = tnlayers.adapt(model, rank=4, target_modules=["0", "2"])
        >>> [(name, type(a).__name__) for name, a in tnlayers.adapters.named_adapters(model)]
        [('0', 'LinearAdapter'), ('2', 'LinearAdapter')]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Adapter)]


def adapt(model: nn.Module, format: str = "tucker", rank: int = 8, target_modules: TargetModules = None,
          alpha: float = 16.0, *, init: str = "zero", dropout: float = 0.0, shapes: LayerShapes = None,
          strategy: str = "auto", freeze_model: bool = True, inplace: bool = True) -> nn.Module:
    """Wrap each target layer in an adapter computing ``base(x) + (alpha / rank)·ΔW x``.

    Args:
        format: ΔW's format: "tucker" (Tucker-2, FLoRA's A·G·Bᵀ for a linear layer), "tt" (LoRETTA's
            tensor train over split (out modes, in modes)), "lora" (B·A), "cp" or "tr".
        rank: the adapter rank r, a positive int (every bond of the format).
        target_modules: which layers (``nn.Linear``, ``nn.Conv2d``, transformers ``Conv1D``): a list of
            module names / dotted suffixes / globs, or a regular expression str (rules: ``matching.py``).
        alpha: scale numerator, finite and > 0: the adapter adds (alpha / rank)·ΔW x (LoRA's ``lora_alpha``).
            This ``alpha`` is a fixed output scale; it is unrelated to the ``alpha`` of the optimizers
            (DAS's strength, BAR's rescale rate, GSAM's surrogate-gap coefficient), which you set separately
            (the paper's presets hold both: ``PAPER_PRESETS["flora"]["training"]["das_alpha"]``).
        init: "zero": one core (the first holding an output mode) starts at zero, so the adapted model equals
            the base model; "random": every core random (ΔW ≠ 0; for tests and experiments).
        dropout: on the adapter's input, in [0, 1) (LoRA's ``lora_dropout``).
        shapes: how ΔW's channel dimensions split, per layer as for ``tensorize``: a mapping
            ``{name or glob or "*": {"out_shape": ..., "in_shape": ...}}`` or a callable ``(name, layer) -> dict``.
            LoRETTA on 4096 x 4096: ``{"*": {"out_shape": (4, 4, 16, 16), "in_shape": (16, 16, 4, 4)}}``.
        strategy: "auto" | "dense" | "factorized" (see ``adapter.py``).
        freeze_model: True (as PEFT): every parameter except the adapters' cores stops requiring gradients,
            but for those inside Hugging Face PEFT's own layers, which keep the flags PEFT gave them;
            False: only the wrapped layers are frozen.
        inplace: False deep-copies the model first.

    The cores of each adapter are one scale-invariant group (``tnlayers.core_groups``), so DAS, SAM and BAR
    act on them. Everything is checked and built before the model changes. A layer registered in several
    places gets one adapter, in every place. A layer whose weight is tied to another module's (an output
    head tied to the embedding) is adapted with a warning: ΔW applies where that layer is called, and
    :func:`merge` refuses it, since folding ΔW in would change the other module too. On a model that
    already carries Hugging Face PEFT adapters, the layers PEFT did not wrap can be adapted; PEFT's layers
    and what lies inside them (``base_layer``, ``lora_A``...) are skipped by globs and regular expressions,
    and naming one is a ValueError.

    Example::

        >>> import torch, tnlayers
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> x = torch.randn(8, 32)
        >>> before = model(x)
        >>> model = tnlayers.adapt(model, format="tucker", rank=4, alpha=8, target_modules=["0"])
        >>> type(model[0]).__name__, model[0].scale  # scale = alpha / rank
        ('LinearAdapter', 2.0)
        >>> torch.equal(model(x), before)  # one core starts at zero: ΔW = 0
        True
        >>> print(tnlayers.trainable_parameters(model))  # only the adapter's cores train
        trainable params: 272 || all params: 1,460 || trainable%: 18.6301
    """
    _check_eager(model, "adapt")
    fmt, rank, alpha, dropout = check_adapter_options(format, rank, alpha, dropout, init, strategy)
    _check_bool("freeze_model", freeze_model)
    _check_bool("inplace", inplace)
    if not inplace:
        model = copy.deepcopy(model)
    targets = select_targets(model, target_modules)
    tied = _tied(model, {id(layer) for _, layer in targets})
    if tied:
        warn_user(f"adapt: {len(tied)} target(s) have tied weights ({'; '.join(tied)}): each adapter's update "
                  f"applies only where its layer is called, and merge() will refuse them (it would change the "
                  f"other module as well); {UNTIE_HINT}")
    shapes_opt = _PerLayer("shapes", {} if shapes is None else shapes, [name for name, _ in targets])
    if shapes is not None and not (shapes_opt.is_mapping or shapes_opt.is_callable):
        raise TypeError(f"shapes must be None, a mapping {{name/glob/'*': {{'out_shape': ..., 'in_shape': ...}}}} or a "
                        f"callable (name, layer) -> such a dict, got {type(shapes).__name__}")
    # an adapter freezes its base when built: put the flags back if a later layer fails
    flags = [(p, p.requires_grad) for _, layer in targets for p in layer.parameters()]
    try:
        built = {id(layer): _build(name, layer, shapes_opt, fmt.NAME, rank, alpha, dropout, init, strategy)
                 for name, layer in targets}
    except (TypeError, ValueError):
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    _swap(model, lambda name, child: built.get(id(child)))
    if freeze_model:
        keep = {id(p) for _, a in named_adapters(model) for p in a.cores} | {id(p) for p in peft_parameters(model)}
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    for adapter in built.values():
        adapter.base.requires_grad_(False)
        adapter.cores.requires_grad_(True)
    return model


def _tied(model: nn.Module, ids: set) -> List[str]:
    """'name: its weight is also ...' for each module of ``ids`` sharing a parameter with another module."""
    candidates = [(m, names) for m, names in module_aliases(model) if id(m) in ids]
    tied = tied_parameters(model, candidates)
    return [f"{names[0]!r}: {tied[id(m)]}" for m, names in candidates if id(m) in tied]


def _build(name: str, layer: nn.Module, shapes_opt: _PerLayer, fmt: str, rank: int, alpha: float, dropout: float,
           init: str, strategy: str) -> Adapter:
    shape = shapes_opt.get(name, layer) or {}
    if not isinstance(shape, Mapping) or set(shape) - set(_SHAPE_KEYS):
        raise ValueError(f"shapes for {name!r} must be a dict with keys among {_SHAPE_KEYS}, got {shape!r}")
    try:
        adapter = adapter_class(layer)(layer, fmt, rank, alpha, dropout=dropout, init=init, strategy=strategy, **shape)
    except (TypeError, ValueError) as err:  # name the layer: "out_shape=... has product ..." alone does not say where
        raise type(err)(f"adapting {name!r} ({type(layer).__name__}): {err}") from err
    return adapter.train(layer.training)


def _adapters_of(model: nn.Module, what: str) -> List[Adapter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} expects an nn.Module, got {type(model).__name__}")
    adapters = [a for _, a in named_adapters(model)]
    if not adapters:
        raise ValueError(f"{what}: the model has no adapters (tnlayers.adapt wraps its layers first)")
    return adapters


def merge(model: nn.Module, keep_original: bool = False) -> nn.Module:
    """Add every adapter's scale·ΔW into its base weight, in place; the adapters then add nothing.
    ``tnlayers.merge_adapters`` is this function.

    Layer by layer, ΔW is built in blocks of output rows and each block is added into the weight in place:
    beyond the model, merge holds one block (at most 1/8 of a layer's weight; 1/n when ΔW's first output
    mode has n < 8 entries) and the contraction's intermediates, never a copy of a weight. Measured on
    2048 x 2048 layers at rank 16: 1/8 of a layer for LoRA, Tucker, TT and CP, 0.4 for TR (its partial
    products carry two bonds). All or nothing: a non-finite ΔW anywhere is a ValueError before any weight
    changes.

    :func:`unmerge` subtracts the same ΔW again, so the weight it gives back carries the round-off of
    W + ΔW − ΔW in the weight's dtype: per entry at most u·(|W| + |W + scale·ΔW|), half an ulp of each sum,
    u = 2⁻²⁴ (float32), 2⁻⁸ (bfloat16), 2⁻¹¹ (float16), 2⁻⁵³ (float64); about 2% of the entries differ from
    W when ΔW is 1% of W (``benchmarks/results/adapter_merge.md``; docs/design.md, 'Merging adapters').
    ``keep_original=True`` keeps a copy of each weight merge changes (one more copy of every adapted layer in
    memory), and unmerge puts it back bit for bit.

        >>> import torch, tnlayers
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> model = tnlayers.adapt(model, rank=4, target_modules=["0"], init="random")
        >>> x = torch.randn(8, 32)
        >>> y = model(x)
        >>> model = tnlayers.adapters.merge(model)
        >>> model[0].merged, torch.allclose(model(x), y, atol=1e-5)  # forward is now base(x) alone
        (True, True)
    """
    _check_bool("keep_original", keep_original)
    _merge_all(model, _adapters_of(model, "merge"), keep_original)
    return model


def _merge_all(model: nn.Module, adapters: List[Adapter], keep_original: bool) -> None:
    tied = _tied(model, {id(a.base) for a in adapters if not a.merged})
    if tied:  # checked before any weight changes: all or nothing
        raise ValueError(f"merge: {len(tied)} adapted layer(s) have tied weights ({'; '.join(tied)}); folding ΔW "
                         f"into a shared weight would change the other module too. Keep these adapters unmerged, "
                         f"or {UNTIE_HINT}")
    # a first pass builds each ΔW to check it (one at a time), so a refusal leaves every weight untouched
    bad = [name for name, a in named_adapters(model) if not a._mergeable()]
    if bad:
        raise ValueError(f"merge: the update of {len(bad)} adapter(s) holds non-finite values (NaN or inf): {bad}; "
                         f"nothing was merged, every base weight is as it was")
    with torch.no_grad():
        for adapter in adapters:
            if not adapter.merged:
                adapter._merge_checked(keep_original)


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter's ΔW out of its base weight again. ``tnlayers.unmerge_adapters`` is this
    function. After ``merge(model, keep_original=True)`` each weight comes back bit for bit; otherwise the
    same ΔW is subtracted and each entry is within the round-off :func:`merge` states. Refused (ValueError,
    before any weight changes) when an adapter's cores changed in place since merge (an optimizer step,
    ``load_state_dict`` of the cores alone, an edit under ``no_grad``), since their ΔW is not the one in the
    weight; a copy kept by ``keep_original=True`` is restored whatever the cores.

        >>> import torch, tnlayers
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> weight = model[0].weight.clone()
        >>> model = tnlayers.adapt(model, rank=4, target_modules=["0"], init="random")
        >>> model = tnlayers.unmerge_adapters(tnlayers.merge_adapters(model, keep_original=True))
        >>> torch.equal(model[0].base.weight, weight)  # the kept copy, bit for bit
        True
        >>> model = tnlayers.unmerge_adapters(tnlayers.merge_adapters(model))  # W + ΔW - ΔW
        >>> model[0].merged, torch.allclose(model[0].base.weight, weight, rtol=0, atol=1e-6)
        (False, True)
    """
    _adapters_of(model, "unmerge")
    _unmerge_all(named_adapters(model))
    return model


def _unmerge_all(named: List[Tuple[str, Adapter]]) -> None:
    """All or nothing: every refusal is raised before any weight changes."""
    for name, adapter in named:
        if adapter.merged and adapter.weight_before_merge is None:
            adapter._check_cores_unchanged(name)
    for _, adapter in named:
        adapter.unmerge()


def unadapt(model: nn.Module, merge: bool = False) -> nn.Module:
    """Replace every adapter by its base layer: with ``merge=True`` the base weight keeps scale·ΔW
    (PEFT's ``merge_and_unload``), else ΔW is taken out of a merged one as :func:`unmerge` does. The
    cores are dropped.

        >>> import torch, tnlayers
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> model = tnlayers.adapt(model, rank=4, target_modules=["0"], init="random")
        >>> model = tnlayers.adapters.unadapt(model, merge=True)  # ΔW kept in the weight
        >>> [type(m).__name__ for m in model]
        ['Linear', 'ReLU', 'Linear']
    """
    _check_bool("merge", merge)
    adapters = _adapters_of(model, "unadapt")
    if merge:
        _merge_all(model, adapters, keep_original=False)
    else:
        _unmerge_all(named_adapters(model))
    if isinstance(model, Adapter):
        return model.base
    _swap(model, lambda name, child: child.base if isinstance(child, Adapter) else None)
    return model


@dataclass(frozen=True)
class ParameterCount:
    """Returned by :func:`trainable_parameters`: ``trainable`` and ``total`` counts, ``fraction`` of them.

        >>> from tnlayers.adapters import ParameterCount
        >>> count = ParameterCount(trainable=25, total=1000)
        >>> count.fraction
        0.025
        >>> print(count)
        trainable params: 25 || all params: 1,000 || trainable%: 2.5000
    """

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {100 * self.fraction:.4f}"


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Trainable (``requires_grad``) and total parameter counts, each shared parameter counted once.

        >>> import tnlayers
        >>> from torch import nn
        >>> model = nn.Linear(10, 10)
        >>> _ = model.bias.requires_grad_(False)
        >>> tnlayers.trainable_parameters(model)
        ParameterCount(trainable=100, total=110)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trainable_parameters expects an nn.Module, got {type(model).__name__}")
    params = {id(p): p for p in model.parameters()}.values()
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
