"""Which ``nn.Linear`` ``tensorize`` keeps dense by default: the classifier, i.e. the last Linear the
forward pass applies (as in the paper, the classifier stays dense).

The forward order is known only by running the model, so:
- with ``example_inputs=``, one dry forward (eval mode, ``torch.no_grad()``, forward hooks) finds the last
  applied Linear; the model's parameters, buffers and train/eval flags are left as they were;
- without it, the last *registered* Linear is taken. Registration order is usually forward order, and that
  choice is silent when it is sure (every module above the layer is an ``nn.Sequential``, which applies its
  children in registration order) or likely (the layer is named like a classifier, a name component among
  ``HEAD_NAMES``: ``fc``, ``classifier.6``, ``heads.head``, ``lm_head``, and no other Linear is); otherwise
  a UserWarning names the layer kept dense and how to choose (``example_inputs=`` or ``filter=``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ._caller import warn_user

__all__ = ["default_classifier", "HEAD_NAMES"]

HEAD_NAMES = frozenset({"fc", "head", "heads", "classifier", "lm_head", "score", "logits"})


def _call_args(example_inputs) -> Tuple[tuple, dict]:
    """``model(*args, **kwargs)`` from a tensor, a tuple/list of positional inputs or a mapping of keyword inputs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    raise TypeError(f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
                    f"got {type(example_inputs).__name__}")


def dry_forward(model: nn.Module, hooks: List[Tuple[nn.Module, Callable]], example_inputs) -> None:
    """One forward of ``example_inputs`` in eval mode without gradients, ``hooks`` (module, forward hook
    returning None) registered for it; the modes are restored after."""
    args, kwargs = _call_args(example_inputs)
    hooks = [m.register_forward_hook(hook) for m, hook in hooks]
    # eval mode: a dry run must not update BatchNorm statistics or draw dropout masks
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
        for m, flag in flags:
            m.training = flag


def last_applied(model: nn.Module, linears: List[nn.Module], example_inputs) -> Optional[nn.Module]:
    """The Linear of ``linears`` whose forward ran last in one dry forward of ``model`` (None if none ran)."""
    order: List[nn.Module] = []
    dry_forward(model, [(m, lambda mod, inp, out: order.append(mod)) for m in {id(m): m for m in linears}.values()],
                example_inputs)
    return order[-1] if order else None


def _looks_like_head(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


def _sequential_path(model: nn.Module, name: str) -> bool:
    """Every module above ``name`` (the model too) is an nn.Sequential with its own forward: then the last
    registered Linear is the last applied one."""
    module = model
    for part in [None] + name.split(".")[:-1]:
        module = module if part is None else getattr(module, part)
        if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
            return False
    return True


def default_classifier(model: nn.Module, linears: List[Tuple[str, nn.Module]],
                       example_inputs) -> Optional[nn.Module]:
    """The Linear kept dense by default (None: none), by the rules of the module docstring."""
    if example_inputs is not None:
        return last_applied(model, [m for _, m in linears], example_inputs)
    if not linears:
        return None
    name, module = linears[-1]
    if _sequential_path(model, name):
        return module
    others = [n for n, _ in linears[:-1] if n.rsplit(".", 1)[-1] in HEAD_NAMES]
    if not _looks_like_head(name) or others:
        also = f" (the model also has {others[:3]}, named like a classifier)" if others else ""
        warn_user(f"tensorize keeps {name!r} dense as the classifier because it is the last nn.Linear the model "
                  f"registers{also}; registration order need not be the forward order. Pass example_inputs= "
                  f"(one dry forward finds the last applied Linear) or filter= to choose")
    return module
