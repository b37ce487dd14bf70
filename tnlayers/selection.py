"""Module selection and swapping, shared by the whole-model transformations (``tensorize``/``to_dense`` in
``convert.py``, ``adapt``/``unadapt`` in ``adapters/model.py``): which modules a per-layer argument names,
and the tree walk that swaps them (:func:`_swap`, on eager models only: :func:`_check_eager`).

The selection rules, written down once (they apply to ``tensorize``'s
``filter``, to ``rank``/``format``/``shapes`` given as a mapping, and to ``adapt``'s ``shapes``):

- keys are module names as ``model.named_modules()`` spells them (``"layer1.0.conv1"``) or glob patterns
  (``fnmatch``, case-sensitive; ``*`` also crosses dots: ``"layer1.*"``); ``"*"`` in a mapping is the
  default for layers no other key matches;
- in a mapping, an exact name wins over globs, and globs are tried in the mapping's order;
- a key naming no Conv/Linear module of the model, or a glob matching none, is an error (close matches
  are listed): nothing is silently ignored;
- a ``rank`` or ``format`` mapping without ``"*"`` selects: only the layers it matches are tensorized
  (the classifier too, if named). Without such a mapping and without ``filter``, the default selection is
  every Conv2d and Linear except the classifier, kept dense as in the paper (``classifier.py``).
- A value of ``None`` (in a mapping, or returned by a callable) leaves that layer dense.
- A module registered under several names (one object in several places) answers to each of them; all
  of its names must get the same setting (it is one layer), else ``tensorize`` raises a ValueError.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Callable, List, Optional

import torch
from torch import nn

_SHAPE_KEYS = ("in_shape", "out_shape")


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


def _check_eager(model, what: str) -> None:
    if isinstance(model, torch.jit.ScriptModule):  # its submodules are compiled: setattr cannot swap them
        raise TypeError(f"{what} needs an eager nn.Module, got a {type(model).__name__} (TorchScript); a "
                        f"ScriptModule's submodules can't be swapped: {what} the eager model before scripting")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} expects an nn.Module, got {type(model).__name__}")
