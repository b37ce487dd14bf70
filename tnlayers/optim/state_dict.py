"""Checks of a state_dict before a wrapper loads it, so a bad one changes nothing (all or nothing).

A wrapper's state_dict is its base optimizer's, plus the kind that saved it (``KIND_KEY``) and the wrapper's
own counters (``EXTRA_STATE_KEY``). Dicts saved before the kind was stored are recognized by their param
groups: a wrapper's groups hold its options (``rho`` for SAM and its variants, ``alpha`` for DAS and BAR).
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Tuple

# Key under which a wrapper's own counters travel inside the base optimizer's state_dict.
EXTRA_STATE_KEY = "tnlayers"
# Key naming the optimizer kind that saved a state_dict ({"optimizer": "DAS", "base_optimizer": "SGD"}).
KIND_KEY = "tnlayers_kind"

# The per-group options of every tnlayers wrapper, to tell their state_dicts from plain torch.optim ones.
WRAPPER_OPTIONS = {"rho": "SAM, GSAM or XSAM", "alpha": "DAS or BAR"}


def check_state_dict(optimizer, state_dict: Any) -> None:
    """Every reason ``state_dict`` cannot be loaded into ``optimizer`` (a WrappedOptimizer), before any change."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict (from {optimizer.kind}.state_dict()), got "
                        f"{type(state_dict).__name__}")
    groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(state, Mapping) or not isinstance(groups, list) or \
            not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
        raise ValueError("state_dict is not an optimizer state_dict: it needs 'state' (a dict) and "
                         "'param_groups' (a list of dicts with 'params')")
    _check_kind(optimizer, state_dict.get(KIND_KEY), groups, EXTRA_STATE_KEY in state_dict)
    _check_group_sizes(optimizer, groups)
    for index, group in enumerate(groups):
        try:
            optimizer._check_group(dict(group))
        except (TypeError, ValueError) as error:
            raise type(error)(f"state_dict param group {index}: {error}") from error
    extra = state_dict.get(EXTRA_STATE_KEY, {})
    if not isinstance(extra, Mapping):
        raise ValueError(f"state_dict[{EXTRA_STATE_KEY!r}] must be a dict, got {type(extra).__name__}")
    optimizer._check_extra_state(dict(extra))


def _kind_name(saved: Tuple[Optional[str], Optional[str]]) -> str:
    return f"{saved[0]}({saved[1]})"


def _check_kind(optimizer, kind: Any, groups: List[Mapping], has_extra: bool) -> None:
    mine = (type(optimizer).__name__, type(optimizer.base_optimizer).__name__)
    if kind is not None:
        saved = (kind.get("optimizer"), kind.get("base_optimizer")) if isinstance(kind, Mapping) else (None, None)
        if saved != mine:
            raise ValueError(f"state_dict was saved by {_kind_name(saved)} but this optimizer is {optimizer.kind}; "
                             f"load it into the same kind of optimizer it was saved from")
        return
    # Saved by a plain torch.optim optimizer, or by an earlier tnlayers: tell them apart by the groups' keys.
    found = [name for name in WRAPPER_OPTIONS if any(name in g for g in groups)]
    if not found and not has_extra:
        raise ValueError(
            f"state_dict looks like a plain torch.optim optimizer's (it names no tnlayers optimizer kind and its "
            f"param groups have no {' or '.join(map(repr, optimizer._wrapper_defaults))}), but this optimizer is "
            f"{optimizer.kind}; to load a {mine[1]} state into the base optimizer alone, call "
            "optimizer.base_optimizer.load_state_dict(state_dict)")
    missing = [name for name in optimizer._wrapper_defaults if any(name not in g for g in groups)]
    if missing:
        saver = " / ".join(WRAPPER_OPTIONS[name] for name in found) or "another optimizer"
        raise ValueError(f"state_dict was saved by {saver} (its param groups have no {missing[0]!r}) but this "
                         f"optimizer is {optimizer.kind}; load it into the same kind of optimizer it was saved from")
    _check_base_keys(optimizer, groups)


def _check_base_keys(optimizer, groups: List[Mapping]) -> None:
    """A state_dict without the kind key must hold the base optimizer's hyper-parameters. Flags (bool or None
    defaults such as ``foreach``) are left out: torch versions add them, and loading fills them in."""
    base = optimizer.base_optimizer
    needed = [k for k, v in base.defaults.items() if not isinstance(v, bool) and v is not None]
    missing = [k for k in needed if any(k not in g for g in groups)]
    if missing:
        raise ValueError(f"state_dict's param groups have no {missing} (hyper-parameters of "
                         f"{type(base).__name__}): it was saved around another base optimizer, but this optimizer "
                         f"is {optimizer.kind}; load it into the same kind of optimizer it was saved from")


def _check_group_sizes(optimizer, groups: List[Mapping]) -> None:
    saved = [len(g["params"]) for g in groups]
    own = [len(g["params"]) for g in optimizer.param_groups]
    if saved != own:
        raise ValueError(f"state_dict does not fit {optimizer.kind}: its param groups hold {saved} parameters, "
                         f"this optimizer's hold {own}")
