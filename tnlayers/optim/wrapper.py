"""The base-optimizer wrapper every optimizer here is built on: :class:`WrappedOptimizer`.

The wrappers follow one pattern (davda54/sam, timm Lookahead): the wrapper *is* a ``torch.optim.Optimizer``
whose ``param_groups`` and ``state`` are the base optimizer's own objects. LR schedulers, ``zero_grad`` and
GradScaler therefore see a single list of groups, and a checkpoint holds a single state (``state_dict.py``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ._divergence import DivergenceWatch
from ..groups import mark_peft_groups
from .state_dict import EXTRA_STATE_KEY, KIND_KEY, check_state_dict
from ..types import BaseOptimizer, Params
from .validation import (check_base_compatible, check_base_kwargs, check_not_meta, keyword_defaults,
                         resolve_base_optimizer)

__all__ = ["WrappedOptimizer"]


def _param_ids(params) -> set:
    """ids of the tensors in ``params`` given as a tensor, an iterable of tensors or of param-group dicts."""
    if isinstance(params, torch.Tensor):
        return {id(params)}
    ids = set()
    for item in params:
        if isinstance(item, dict):
            ids |= _param_ids(item["params"])
        else:
            ids.add(id(item))
    return ids


class WrappedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that does extra work around a base optimizer's step.

    ``base_optimizer`` is an optimizer class (built here on this wrapper's param groups, with
    ``base_kwargs``) or an instance (whose param groups become this wrapper's; ``params`` is then ``None`` or
    the same parameters). ``wrapper_defaults`` are this wrapper's per-group options (``rho``, ``alpha``...).
    Subclasses keep counters that must survive a checkpoint in :meth:`_extra_state`, and check their
    per-group options in :meth:`_check_group`.
    """

    def __init__(self, params: Optional[Params], base_optimizer: BaseOptimizer, wrapper_defaults: Dict[str, Any],
                 base_kwargs: Dict[str, Any]):
        kind = resolve_base_optimizer(base_optimizer, base_kwargs)
        self._divergence = DivergenceWatch()  # subclasses call _after_update() once per step
        self._wrapper_defaults = dict(wrapper_defaults)
        base_class = type(base_optimizer) if kind == "instance" else base_optimizer
        base_defaults = base_optimizer.defaults if kind == "instance" else keyword_defaults(base_class.__init__)[0]
        check_base_compatible(type(self).__name__, base_class, base_defaults, self._wrapper_defaults)
        if kind == "instance":
            if params is not None:
                held = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
                given = _param_ids(params)
                if given != held:
                    raise ValueError(
                        "params must be None or exactly the parameters of the base_optimizer instance; "
                        f"{len(given - held)} of the {len(given)} given are not in base_optimizer and "
                        f"{len(held - given)} of its {len(held)} are not given (build the base optimizer on "
                        "the same parameters, or pass params=None)")
            check_not_meta(type(self).__name__, [p for g in base_optimizer.param_groups for p in g["params"]])
            # The instance's group dicts are adopted (and given this wrapper's defaults) rather than copied,
            # so the base optimizer keeps reading the same dicts.
            super().__init__(base_optimizer.param_groups, self._wrapper_defaults)
            self.base_optimizer = base_optimizer
        else:
            if params is None:
                raise TypeError("params is required when base_optimizer is an optimizer class")
            check_base_kwargs(type(self), base_class, base_kwargs)
            super().__init__(params, self._wrapper_defaults)
            check_not_meta(type(self).__name__, [p for g in self.param_groups for p in g["params"]])
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._link_base()

    def __getstate__(self) -> Dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults/state/param_groups, which would drop the base optimizer
        # (and this wrapper's options) from a pickled or deep-copied wrapper.
        return self.__dict__.copy()

    @property
    def kind(self) -> str:
        """``"DAS(SGD)"``: this wrapper's class and its base optimizer's, as named in state_dict errors."""
        return f"{type(self).__name__}({type(self.base_optimizer).__name__})"

    def _link_base(self) -> None:
        """Share the base optimizer's groups and state (again after ``load_state_dict`` replaced them)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = {**self.base_optimizer.defaults, **self._wrapper_defaults}
        self._param_groups_changed()

    def _check_group(self, group: Dict[str, Any]) -> Dict[str, Any]:
        """This wrapper's options of one param group, checked (an error names the option) and normalized;
        the group itself is not changed."""
        return {}

    def _param_groups_changed(self) -> None:
        """Check every group's options; subclasses that cache anything derived from the groups extend it."""
        for group in self.param_groups:
            group.update(self._check_group(group))
        # PEFT adapter factors carry no markers until core_groups(model) sets them: mark them here (peft imported
        # only), so every wrapper (its divergence warning, DAS/BAR's rescale) sees the LoRA/LoHa/LoKr groups
        mark_peft_groups(p for g in self.param_groups for p in g["params"])
        self._divergence.forget_cores()

    def _after_update(self) -> None:
        """After a step that updated the parameters: warn, once, if it left cores non-finite."""
        self._divergence.after_step(self.param_groups)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:  # called by Optimizer.__init__ before the base optimizer exists
            super().add_param_group(param_group)
            return
        for key, value in self._wrapper_defaults.items():
            param_group.setdefault(key, value)
        base.add_param_group(param_group)
        self._param_groups_changed()

    def _extra_state(self) -> Dict[str, Any]:
        return {}

    def _check_extra_state(self, extra: Dict[str, Any]) -> None:
        """Raise when ``extra`` (from :meth:`_extra_state`) cannot be loaded here; changes nothing."""

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        state = self.base_optimizer.state_dict()
        extra = self._extra_state()
        if extra:
            state[EXTRA_STATE_KEY] = extra
        state[KIND_KEY] = {"optimizer": type(self).__name__, "base_optimizer": type(self.base_optimizer).__name__}
        return state

    def check_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Raise a ValueError (TypeError for a non-dict) when ``state_dict`` cannot be loaded into this
        optimizer: saved by another kind (``"state_dict was saved by SAM(SGD) but this optimizer is
        DAS(SGD)"``), a plain ``torch.optim`` optimizer's, other param groups, bad options or extra state.
        Changes nothing; :meth:`load_state_dict` runs it first."""
        check_state_dict(self, state_dict)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """All or nothing: everything is checked (:meth:`check_state_dict`) before anything changes."""
        self.check_state_dict(state_dict)
        state_dict = dict(state_dict)
        extra = state_dict.pop(EXTRA_STATE_KEY, {})
        state_dict.pop(KIND_KEY, None)
        backup = self.base_optimizer.state_dict()
        try:
            self.base_optimizer.load_state_dict(state_dict)
            self._link_base()
            self._load_extra_state(extra)
            self._divergence = DivergenceWatch()  # a run resumed from a checkpoint is told of its own divergence
        except Exception:
            # something the checks did not foresee: leave the optimizer as it was
            self.base_optimizer.load_state_dict(backup)
            self._link_base()
            raise
