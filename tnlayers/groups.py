"""Scale-invariant core groups: which parameters are the cores of one tensorized layer.

A tensorized layer's weight is multilinear in its cores, so scaling one core by c and another by 1/c
leaves the layer unchanged. Optimizers (SAM, DAS, BAR) and metrics work per such *group*. Each core
parameter carries a small marker (``_tn_group``: a token unique to its layer, ``_tn_core``: its index in
the group, ``_tn_group_size``: how many cores the group has), so an optimizer handed plain ``model.parameters()`` can still tell the groups apart.

Markers live on the parameter objects, which ``copy.deepcopy`` does not preserve; the layers re-mark
themselves after unpickling/deepcopy, and :func:`core_groups` re-marks every group it finds.
"""
from __future__ import annotations

import itertools
import sys
from typing import Iterable, List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["mark_core_group", "core_groups", "group_of", "split_by_group"]

GROUP_ATTR = "_tn_group"
INDEX_ATTR = "_tn_core"
SIZE_ATTR = "_tn_group_size"
_tokens = itertools.count(1)


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
    :class:`~tnlayers.FactorizedTensor` does). The markers of each group are refreshed, so the result
    is right even after the model was deep-copied or its parameters replaced. Call it after FSDP's
    ``fully_shard``: it also turns the layers' no-grad weight cache off there.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"core_groups expects an nn.Module, got {type(model).__name__}")
    sharded = _fsdp_sharded(model)
    groups = []
    for name, module in model.named_modules():
        get_cores = getattr(module, "core_parameters", None)
        if callable(get_cores):
            if sharded and hasattr(module, "cache_weight"):
                # FSDP re-gathers parameters without bumping their version counters, which the no-grad
                # weight cache keys on: under FSDP the layers rebuild the weight on every call
                module.cache_weight = False
            cores = list(get_cores())
            if [group_of(c) for c in cores] != [group_of(cores[0])] * len(cores) or group_of(cores[0]) is None:
                mark_core_group(cores)
            groups.append((name, cores))
    return groups


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
