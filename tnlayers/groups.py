"""Scale-invariant core groups: which parameters are the cores of one tensorized layer.

A tensorized layer's weight is multilinear in its cores, so scaling one core by c and another by 1/c
leaves the layer unchanged. Optimizers (SAM, DAS, BAR) and metrics work per such *group*. Each core
parameter carries a small marker (``_tn_group``: a token unique to its layer, ``_tn_core``: its index in
the group, ``_tn_group_size``: how many cores the group has), so an optimizer handed plain ``model.parameters()`` can still tell the groups apart.

PEFT adapters (LoRA, LoHa, LoKr) are groups too, recognized only when the user has imported peft
(:mod:`tnlayers.integrations.peft`, loaded lazily from here).

Markers live on the parameter objects, which ``copy.deepcopy`` does not preserve; the layers re-mark
themselves after unpickling/deepcopy, and :func:`core_groups` re-marks every group it finds.
"""
from __future__ import annotations

import itertools
import sys
import weakref
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["mark_core_group", "core_groups", "group_of", "split_by_group"]

GROUP_ATTR = "_tn_group"
INDEX_ATTR = "_tn_core"
SIZE_ATTR = "_tn_group_size"
_tokens = itertools.count(1)
# parameters a PEFT scan found in no adapter group: id -> weak reference (a parameter never joins a group later;
# a new adapter brings new parameters), so repeated optimizer constructions and load_state_dict skip the scan
_not_peft: Dict[int, "weakref.ref[torch.Tensor]"] = {}


def mark_core_group(cores: Sequence[torch.Tensor]) -> int:
    """Mark ``cores`` as one scale-invariant group; returns the group's token."""
    token = next(_tokens)
    for index, core in enumerate(cores):
        setattr(core, GROUP_ATTR, token)
        setattr(core, INDEX_ATTR, index)
        setattr(core, SIZE_ATTR, len(cores))
    return token


def group_of(param: torch.Tensor):
    """The group token of a core parameter, or ``None`` for a parameter in no group."""
    return getattr(param, GROUP_ATTR, None)


def core_groups(model: nn.Module) -> List[Tuple[str, List[nn.Parameter]]]:
    """``[(module_name, [core, ...]), ...]`` for every module holding a core group, in module order.

    A module holds a group when it defines ``core_parameters()`` (every tnlayers layer and
    :class:`~tnlayers.FactorizedTensor` does). When peft is imported, a PEFT LoRA, LoHa or LoKr layer holds one
    group per adapter, named ``"<layer>[<adapter>]"`` (:mod:`tnlayers.integrations.peft` says which factors
    and why). The markers of each group are refreshed, so the result
    is right even after the model was deep-copied or its parameters replaced. Call it after FSDP's
    ``fully_shard``: it also turns the layers' no-grad weight cache off there.

        >>> import torch, tnlayers
        >>> model = torch.nn.Sequential(tnlayers.TTLinear(16, 16, rank=2), torch.nn.Linear(16, 4))
        >>> [(name, len(cores)) for name, cores in tnlayers.core_groups(model)]
        [('0', 6)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"core_groups expects an nn.Module, got {type(model).__name__}")
    sharded = _fsdp_sharded(model)
    if sharded:  # torch < 2.9 sums FSDP2 gradients over gloo instead of averaging them: refuse to go on
        from ._fsdp_check import check_fsdp2_gradient_averaging
        check_fsdp2_gradient_averaging(model)
    peft = _peft_integration()
    groups = []
    for name, module in model.named_modules():
        get_cores = getattr(module, "core_parameters", None)
        if callable(get_cores):
            if sharded and hasattr(module, "cache_weight"):
                # FSDP re-gathers parameters without bumping their version counters, which the no-grad
                # weight cache keys on: under FSDP the layers rebuild the weight on every call
                module.cache_weight = False
            cores = list(get_cores())
            _refresh_markers(cores)
            groups.append((name, cores))
        elif peft is not None:  # a PEFT LoRA/LoHa/LoKr layer: one group per adapter, named "layer[adapter]"
            for adapter, cores in peft.adapter_groups(module):
                _refresh_markers(cores)
                groups.append((f"{name}[{adapter}]", cores))
    return groups


def _refresh_markers(cores: Sequence[torch.Tensor]) -> None:
    """Mark ``cores`` as one group unless they already carry one group's markers."""
    if [group_of(c) for c in cores] != [group_of(cores[0])] * len(cores) or group_of(cores[0]) is None:
        mark_core_group(cores)


def group_module(model: nn.Module, name: str) -> nn.Module:
    """The module of ``model`` holding the group ``name`` of :func:`core_groups`; for a PEFT group
    ``"<layer>[<adapter>]"``, the PEFT layer."""
    if name.endswith("]") and "[" in name:
        name = name[:name.rindex("[")]
    return model.get_submodule(name) if name else model


def _peft_integration():
    """``tnlayers.integrations.peft`` when the user has imported peft, else None (tnlayers never imports peft)."""
    if "peft" not in sys.modules:
        return None
    from .integrations import peft
    return peft


def mark_peft_groups(params: Iterable[torch.Tensor]) -> int:
    """Mark the PEFT adapter groups holding any unmarked parameter of ``params``; returns how many were marked.

    Every tnlayers optimizer calls it at construction (and on ``add_param_group``/``load_state_dict``), so plain
    ``model.parameters()`` of a PEFT model finds its groups without
    a prior :func:`core_groups`; it scans the live PEFT layers (:func:`tnlayers.integrations.peft.live_tuner_layers`),
    only when peft is imported and some parameter is unmarked.
    """
    peft = _peft_integration()
    if peft is None:
        return 0
    unmarked = {id(p): p for p in params if group_of(p) is None and not _known_not_peft(p)}
    if not unmarked:
        return 0
    marked = 0
    for layer in peft.live_tuner_layers():
        for _, cores in peft.adapter_groups(layer):
            if any(id(c) in unmarked for c in cores):
                _refresh_markers(cores)
                marked += 1
    for key, p in unmarked.items():
        if group_of(p) is None:
            _not_peft[key] = weakref.ref(p, lambda _, key=key: _not_peft.pop(key, None))
    return marked


def _known_not_peft(p: torch.Tensor) -> bool:
    ref = _not_peft.get(id(p))
    return ref is not None and ref() is p


def _fsdp_sharded(model: nn.Module) -> bool:
    """Whether FSDP (``fully_shard`` or ``FullyShardedDataParallel``) manages any part of ``model``; looked up
    only when the user has imported FSDP, so this never imports torch.distributed itself."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return False
    kinds = tuple(k for k in (getattr(fsdp, "FSDPModule", None), getattr(fsdp, "FullyShardedDataParallel", None))
                  if k is not None)
    return bool(kinds) and any(isinstance(m, kinds) for m in model.modules())


def split_by_group(params: Iterable[torch.Tensor]) -> Tuple[List[List[torch.Tensor]], List[torch.Tensor]]:
    """Split parameters into core groups (in order of first appearance) and the rest."""
    groups: dict = {}
    rest = []
    for p in params:
        token = group_of(p)
        if token is None:
            rest.append(p)
        else:
            groups.setdefault(token, []).append(p)
    return list(groups.values()), rest
