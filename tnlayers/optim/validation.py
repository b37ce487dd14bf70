"""Argument checks shared by the optimizer wrappers: numbers and choices, and which base optimizers a
wrapper can drive (an error names the argument and says what to pass instead)."""
from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Dict, Tuple

import torch

__all__ = ["check_non_negative", "check_choice", "resolve_base_optimizer", "check_base_compatible", "check_base_kwargs",
           "check_not_meta", "keyword_defaults"]


def check_non_negative(name: str, value: Any) -> float:
    """``value`` as a float, or a ValueError/TypeError that names the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def resolve_base_optimizer(base_optimizer: Any, base_kwargs: Dict[str, Any]) -> str:
    """``"class"`` or ``"instance"``; a TypeError naming ``base_optimizer`` for anything else."""
    if isinstance(base_optimizer, torch.optim.Optimizer):
        if base_kwargs:
            raise TypeError(
                "base_optimizer is an already-built optimizer, so the keyword arguments "
                f"{sorted(base_kwargs)} would be ignored; pass the optimizer class instead"
            )
        return "instance"
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
        return "class"
    raise TypeError(
        "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) or an instance of one, "
        f"got {base_optimizer!r}"
    )


def _needs_closure(optimizer_class: type) -> bool:
    """Whether ``optimizer_class.step`` has a required ``closure`` (torch.optim.LBFGS)."""
    try:
        closure = inspect.signature(optimizer_class.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def check_base_compatible(wrapper: str, base_class: type, base_defaults: Dict[str, Any],
                          wrapper_defaults: Dict[str, Any]) -> None:
    """Refuse base optimizers the wrapper would silently misuse (a TypeError/ValueError naming both)."""
    if _needs_closure(base_class):
        raise TypeError(
            f"base_optimizer {base_class.__name__} needs a closure in step() (it re-evaluates the loss several "
            f"times per step), but {wrapper} calls the base optimizer's step() without one after its own work; "
            "use a first-order optimizer such as torch.optim.SGD or torch.optim.AdamW")
    # The wrapper's options live in the same param-group dicts as the base optimizer's hyper-parameters.
    shared = sorted(set(wrapper_defaults) & set(base_defaults))
    if shared:
        raise ValueError(
            f"{wrapper}'s per-group option {shared[0]!r} has the same name as a hyper-parameter of "
            f"{base_class.__name__} ({shared[0]}={base_defaults[shared[0]]!r}), so both would read one value; "
            f"{wrapper} cannot wrap {base_class.__name__}")


def keyword_defaults(function) -> Tuple[Dict[str, Any], bool]:
    """``({name: default}, takes **kwargs)`` of ``function``'s keyword parameters, ``self`` and ``params`` left
    out (a signature that cannot be read: ``({}, True)``, i.e. anything may be accepted).

        >>> keyword_defaults(torch.optim.SGD.__init__)[0]["momentum"], keyword_defaults(torch.optim.SGD.__init__)[1]
        (0, False)
    """
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return {}, True
    defaults = {p.name: p.default for p in parameters
                if p.name not in ("self", "params") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return defaults, any(p.kind is p.VAR_KEYWORD for p in parameters)


def check_base_kwargs(wrapper_class: type, base_class: type, base_kwargs: Dict[str, Any]) -> None:
    """A keyword that is neither the wrapper's nor the base optimizer's: a TypeError naming both and the closest
    of the wrapper's own options (``SAM(..., SGD, eps=...)``: SAM's is ``perturb_eps``), before anything is built
    (the base optimizer's own TypeError would not say which options the wrapper takes)."""
    accepted, any_keyword = keyword_defaults(base_class.__init__)
    unknown = [] if any_keyword else sorted(set(base_kwargs) - set(accepted))
    if not unknown:
        return
    own = sorted(set(keyword_defaults(wrapper_class.__init__)[0]) - {"base_optimizer"})
    names = {**{name: f"{wrapper_class.__name__}'s" for name in own},
             **{name: f"{base_class.__name__}'s" for name in accepted}}
    close = [name for name in own if unknown[0] in name.split("_")]  # eps -> perturb_eps
    close = close or difflib.get_close_matches(unknown[0], list(names), n=1, cutoff=0.6)
    hint = f"; did you mean {names[close[0]]} {close[0]}=?" if close else ""
    raise TypeError(f"{unknown[0]}= is neither an option of {wrapper_class.__name__} ({', '.join(own)}) nor a "
                    f"hyper-parameter of base_optimizer {base_class.__name__}{hint}")


def check_not_meta(wrapper: str, params) -> None:
    """Parameters on the meta device hold no values, and materializing the model (``to_empty``) replaces
    them: an optimizer built on them would never update the real parameters."""
    meta = [p for p in params if p.is_meta]
    if meta:
        raise ValueError(
            f"{wrapper}: {len(meta)} of the {len(params)} parameters given are on the meta device; materialize "
            "the model first (model.to_empty(device=...), then reset_parameters() or load a checkpoint) and "
            "build the optimizer on its parameters afterwards (to_empty() replaces the parameter objects)")
