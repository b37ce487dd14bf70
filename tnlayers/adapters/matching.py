"""Which layers ``adapt`` wraps, by ``target_modules`` as PEFT users write it.

Rules, written down once:
- a str is a regular expression that must match a module's whole name (``re.fullmatch``), e.g.
  ``r".*\\.(query|value)"``;
- a list (tuple, set) holds module names: an entry matches a module whose name equals it or ends with
  ``"." + entry`` (``"query"`` matches ``"encoder.layer.0.attention.self.query"``, not ``"my_query"``); an
  entry with glob characters (``*?[``) is matched as ``tensorize`` matches globs (``fnmatch`` on the whole
  name); every entry must match at least one module (a typo is an error listing close matches);
- names are those of ``model.named_modules()``, every name of a module registered in several places
  included; the model itself and the layers already inside an adapter are never targets;
- a module registered in several places is one layer: it is wrapped once and the same adapter goes into
  every place, so ``target_modules`` must match all of its names or none (else a ValueError naming them);
- a matched module must be an ``nn.Linear``, an ``nn.Conv2d`` or a transformers ``Conv1D`` (anything
  else is a TypeError naming it); one that is already an adapter is a ValueError (a layer is wrapped once);
- Hugging Face PEFT's layers (its tuner layers such as LoRA's ``Linear``, and ``modules_to_save`` wrappers)
  already adapt the layer they hold: matching one is a ValueError; what lies inside one (``base_layer``,
  ``lora_A.default``...) is never a target: a glob or regular expression skips it, a name or dotted suffix
  (or a pattern matching nothing else) naming it is a ValueError. PEFT is recognized without importing it.
"""
from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Dict, List, Optional, Tuple

from torch import nn

from ..selection import _close_matches_hint, _is_glob
from .conv import Conv2dAdapter
from ..integrations.peft import loaded as peft_loaded, loaded_class
from .adapter import Adapter
from .linear import LinearAdapter, is_hf_conv1d

__all__ = ["select_targets", "adapter_class", "peft_parameters"]

# PEFT's base class of every tuner layer (LoRA, LoHa, IA3...) and of its whole-module wrappers
_PEFT_CLASSES = (("peft.tuners.tuners_utils", "BaseTunerLayer"), ("peft.utils.other", "AuxiliaryTrainingWrapper"),
                 ("peft.utils.other", "ModulesToSaveWrapper"))


def _peft_kinds() -> Tuple[type, ...]:
    """PEFT's layer classes, as far as the user has imported peft (tnlayers never imports it)."""
    if not peft_loaded():
        return ()
    return tuple(c for c in (loaded_class(module, name) for module, name in _PEFT_CLASSES) if c is not None)


def _is_peft(module: nn.Module, kinds: Tuple[type, ...]) -> bool:
    return bool(kinds) and isinstance(module, kinds)


def peft_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters inside PEFT's layers (its adapters and the base layers it froze): ``adapt`` leaves their
    ``requires_grad`` as PEFT set it."""
    kinds = _peft_kinds()
    if _is_peft(model, kinds):
        return list(model.parameters())
    return [p for m in model.modules() if _is_peft(m, kinds) for p in m.parameters()]


def adapter_class(module: nn.Module) -> Optional[type]:
    """The adapter type for a layer (``nn.Linear`` subclasses too), or None."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return LinearAdapter
    if isinstance(module, nn.Conv2d):
        return Conv2dAdapter
    return None


def _candidates(model: nn.Module) -> Tuple[List[Tuple[str, nn.Module]], Dict[str, Tuple[str, nn.Module]]]:
    """(every named submodule except the model itself and what lies inside an adapter or a PEFT layer,
    {name inside a PEFT layer: (that layer's name, the layer)})."""
    kinds = _peft_kinds()
    out, inside = [], {}
    closed = [("", model)] if _is_peft(model, kinds) else []  # PEFT layers met so far (parents come first)
    adapters = []
    for name, module in model.named_modules(remove_duplicate=False):
        owner = next(((p, m) for p, m in closed if not p or name.startswith(p + ".")), None)
        if owner is not None:
            if name:
                inside[name] = owner
            continue
        if not name or any(name.startswith(prefix + ".") for prefix in adapters):
            continue
        if isinstance(module, Adapter):
            adapters.append(name)
        elif _is_peft(module, kinds):
            closed.append((name, module))
        out.append((name, module))
    return out, inside


def _peft_refusal(what: str, layer: nn.Module) -> ValueError:
    """``what`` (a layer PEFT wrapped, or something inside one) cannot be a target: the error and its fix."""
    return ValueError(f"target_modules: {what} PEFT already adapted ({type(layer).__module__}.{type(layer).__name__}); "
                      f"tnlayers adapts the layers PEFT did not wrap: leave it out of target_modules, or fold PEFT's "
                      f"adapter into the base model first (merge_and_unload()) and adapt the plain layer")


def _peft_error(entry, name: str, owner: Tuple[str, nn.Module]) -> ValueError:
    where, layer = owner
    return _peft_refusal(f"{entry!r} names {name!r}, inside {where or '<model>'!r}, a layer", layer)


def _entry_matches(entry: str, name: str) -> bool:
    if _is_glob(entry):
        return fnmatchcase(name, entry)
    return name == entry or name.endswith("." + entry)


def _matcher(target_modules, names: List[str], known: List[str], inside: Dict[str, Tuple[str, nn.Module]]):
    """``name -> bool`` for ``target_modules``, after checking that each pattern matches something."""
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regular expression ({err})") from None
        if not any(pattern.fullmatch(name) for name in names):
            hidden = next((name for name in inside if pattern.fullmatch(name)), None)
            if hidden is not None:
                raise _peft_error(target_modules, hidden, inside[hidden])
            raise ValueError(f"target_modules: the regular expression {target_modules!r} matches no module name as a "
                             f"whole (re.fullmatch); the model's Linear/Conv modules start {known[:8]}")
        return lambda name: pattern.fullmatch(name) is not None
    if not isinstance(target_modules, (list, tuple, set, frozenset)):
        raise TypeError(f"target_modules must be a list of module names / dotted suffixes / globs, or a regular "
                        f"expression str, got {type(target_modules).__name__}")
    entries = list(target_modules)
    if not entries:
        raise ValueError("target_modules is empty: name the layers to adapt, e.g. ['query', 'value']")
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"target_modules entries must be non-empty str, got {entry!r}")
        found = any(_entry_matches(entry, name) for name in names)
        hidden = next((name for name in inside if _entry_matches(entry, name)), None)
        if hidden is not None and not (found and _is_glob(entry)):  # a glob matching other layers too skips it
            raise _peft_error(entry, hidden, inside[hidden])
        if not found:
            leaves = sorted({name.rsplit(".", 1)[-1] for name in known})
            raise ValueError(f"target_modules: {entry!r} matches no module of the model (by name, dotted suffix or "
                             f"glob); {_close_matches_hint(entry, leaves + known)}")
    return lambda name: any(_entry_matches(entry, name) for entry in entries)


def _why_not(name: str, module: nn.Module, parents: dict) -> Optional[Exception]:
    if _is_peft(module, _peft_kinds()):
        return _peft_refusal(f"{name!r} is a layer", module)
    if isinstance(module, Adapter):
        return ValueError(f"target_modules: {name!r} is already adapted ({type(module).__name__}); a layer is "
                          f"wrapped once: unadapt(model) first (merge=True keeps its update), then adapt again")
    if adapter_class(module) is None:
        return TypeError(f"target_modules matched {name!r}, a {type(module).__name__}; adapt wraps nn.Linear, "
                         f"nn.Conv2d and transformers Conv1D layers (target the layers inside it)")
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return ValueError(f"target_modules: {name!r} has an uninitialized (lazy) weight: run one forward pass first")
    if isinstance(parents.get(name.rpartition(".")[0]), nn.MultiheadAttention):
        return TypeError(f"target_modules matched {name!r} inside nn.MultiheadAttention, which reads its weights "
                         f"directly instead of calling it; an adapter there would be bypassed")
    return None


def select_targets(model: nn.Module, target_modules) -> List[Tuple[str, nn.Module]]:
    """[(name, layer), ...] to wrap, in module order; raises as the module docstring says."""
    if target_modules is None:
        raise TypeError("adapt needs target_modules=: a list of module names or dotted suffixes (e.g. ['query', "
                        "'value']), globs, or a regular expression str")
    candidates, inside = _candidates(model)
    names = [name for name, _ in candidates]
    known = [name for name, module in candidates if adapter_class(module) is not None]
    matches = _matcher(target_modules, names, known, inside)
    parents = {"": model, **dict(candidates)}
    selected = {}
    for name, module in candidates:
        if matches(name):
            error = _why_not(name, module, parents)
            if error is not None:
                raise error
            selected.setdefault(id(module), (name, module))
    _check_every_place(candidates, matches, selected)
    return list(selected.values())


def _check_every_place(candidates: List[Tuple[str, nn.Module]], matches, selected: dict) -> None:
    """A shared module gets one adapter in all its places: a selection of only some places is refused."""
    for name, module in selected.values():
        names = [n for n, m in candidates if m is module]
        missed = [n for n in names if not matches(n)]
        if missed:
            raise ValueError(f"target_modules matches {name!r} but not {missed}, which is the same module object "
                             f"(registered as {names}); adapt wraps it once, with one adapter in every place: target "
                             f"all its names, or give each place its own module (copy.deepcopy) first")
