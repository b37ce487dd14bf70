"""Modules and parameters used in several places of one model, for the whole-model transformations
(``tensorize``, ``to_dense``, ``adapt``): a swap must not silently turn one shared thing into two.

Two kinds of sharing, treated differently:
- one *module object* registered in several slots (``model.a = model.b = layer``): it is one layer applied
  in several places; it is replaced once and the same new module goes into every slot, so it stays shared;
- distinct modules sharing a *parameter* (weight tying: ``model.head.weight = model.embed.weight``): no one
  replacement can serve both, so the callers leave them as they are and say so.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Tuple

from torch import nn

__all__ = ["module_aliases", "tied_parameters", "UNTIE_HINT"]

UNTIE_HINT = ("untie them first if they should train separately, e.g. "
              "`model.head.weight = nn.Parameter(model.head.weight.detach().clone())`")


def module_aliases(model: nn.Module, kinds: Tuple[type, ...] = (nn.Module,)) -> List[Tuple[nn.Module, List[str]]]:
    """[(module, [every name it is registered under]), ...] for the model's modules of ``kinds``, in
    ``named_modules`` order; the first name is the one ``named_modules()`` (deduplicated) gives."""
    names: Dict[int, List[str]] = {}
    modules: Dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, kinds):
            names.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    return [(modules[key], names[key]) for key in names]


def tied_parameters(model: nn.Module, candidates: List[Tuple[nn.Module, List[str]]]) -> Dict[int, str]:
    """{id(module): "its weight is also 'embed.weight'"} for each candidate (module, its names) holding a
    parameter that the model also reaches outside that module (through another module). A parameter
    reached only through the module's own aliases is not a tie: the module stays one object."""
    owners: Dict[int, List[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)].append(name)
    tied = {}
    for module, names in candidates:
        prefixes = tuple(n + "." for n in names if n)
        if not prefixes:  # the model itself: everything is inside it
            continue
        for pname, param in module.named_parameters():
            outside = [n for n in owners[id(param)] if not n.startswith(prefixes)]
            if outside:
                tied[id(module)] = f"its {pname} is also {outside[0]!r} (one Parameter shared by two modules)"
                break
    return tied
