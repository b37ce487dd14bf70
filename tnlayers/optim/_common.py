"""Plumbing shared by the optimizer wrappers: argument checks, alpha schedules, the base-optimizer wrapper
and the BatchNorm helper.

The wrappers follow one pattern (davda54/sam, timm Lookahead): the wrapper *is* a ``torch.optim.Optimizer``
whose ``param_groups`` and ``state`` are the base optimizer's own objects. LR schedulers, ``zero_grad`` and
GradScaler therefore see a single list of groups, and a checkpoint holds a single state.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch import nn

from ._divergence import DivergenceWatch

__all__ = ["disable_running_stats"]

ALPHA_SCHEDULES = ("constant", "linear", "cosine")
# Key under which a wrapper's own counters travel inside the base optimizer's state_dict.
EXTRA_STATE_KEY = "tnlayers"
# Key naming the optimizer kind that saved a state_dict ({"optimizer": "DAS", "base_optimizer": "SGD"}).
KIND_KEY = "tnlayers_kind"


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


def check_schedule(schedule: str, total_steps: Optional[int]) -> None:
    check_choice("alpha_schedule", schedule, ALPHA_SCHEDULES)
    if schedule != "constant":
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"alpha_schedule={schedule!r} needs total_steps, a positive int; got {total_steps!r}")


def schedule_factor(schedule: str, step: int, total_steps: Optional[int]) -> float:
    """Multiplier of alpha at ``step`` (0-based): 1 at step 0, decaying to 0 at ``total_steps`` (no warm-up,
    as in the DAS authors' released code), and 0 after it."""
    if schedule == "constant":
        return 1.0
    progress = min(step, total_steps) / total_steps
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


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


def check_not_meta(wrapper: str, params) -> None:
    """Parameters on the meta device hold no values, and materializing the model (``to_empty``) replaces
    them: an optimizer built on them would never update the real parameters."""
    meta = [p for p in params if p.is_meta]
    if meta:
        raise ValueError(
            f"{wrapper}: {len(meta)} of the {len(params)} parameters given are on the meta device; materialize "
            "the model first (model.to_empty(device=...), then reset_parameters() or load a checkpoint) and "
            "build the optimizer on its parameters afterwards (to_empty() replaces the parameter objects)")


class WrappedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that does extra work around a base optimizer's step.

    ``base_optimizer`` is an optimizer class (built here on this wrapper's param groups, with
    ``base_kwargs``) or an instance (whose param groups become this wrapper's; ``params`` is then ``None`` or
    the same parameters). ``wrapper_defaults`` are this wrapper's per-group options (``rho``, ``alpha``...).
    Subclasses keep counters that must survive a checkpoint in :meth:`_extra_state`, and check their
    per-group options in :meth:`_check_group`.
    """

    def __init__(self, params, base_optimizer, wrapper_defaults: Dict[str, Any], base_kwargs: Dict[str, Any]):
        kind = resolve_base_optimizer(base_optimizer, base_kwargs)
        self._divergence = DivergenceWatch()  # subclasses call _after_update() once per step
        self._wrapper_defaults = dict(wrapper_defaults)
        base_class = type(base_optimizer) if kind == "instance" else base_optimizer
        base_defaults = base_optimizer.defaults if kind == "instance" else _class_defaults(base_class)
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
        from ._state import check_state_dict

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


def _class_defaults(optimizer_class: type) -> Dict[str, Any]:
    """The keyword defaults of ``optimizer_class.__init__`` (its hyper-parameter names), without building it."""
    try:
        parameters = inspect.signature(optimizer_class.__init__).parameters
    except (TypeError, ValueError):
        return {}
    return {name: p.default for name, p in parameters.items()
            if name not in ("self", "params") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def batchnorm_modules(model: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    return (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


@contextlib.contextmanager
def disable_running_stats(model: nn.Module):
    """Within the block, BatchNorm layers of ``model`` normalize with batch statistics but leave
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched.

    Use it around SAM's second forward pass, so each step updates the running statistics once, from the
    unperturbed weights. (Setting momentum to 0, the common trick, still counts the batch in
    ``num_batches_tracked`` and breaks ``momentum=None``; not tracking for the pass does neither.)
    """
    modules = [m for m in batchnorm_modules(model) if m.track_running_stats]
    for module in modules:
        module.track_running_stats = False
    try:
        yield model
    finally:
        for module in modules:
            module.track_running_stats = True


AlphaLike = Any  # float or Callable[[int], float]


def split_alpha(alpha: AlphaLike, alpha_schedule: str) -> tuple:
    """``(group_default, alpha_fn)``: a float alpha is a per-group default, a callable one is global."""
    if callable(alpha):
        if alpha_schedule != "constant":
            raise ValueError("alpha is a callable (its own schedule); alpha_schedule must then be 'constant'")
        return None, alpha
    return check_non_negative("alpha", alpha), None


def alpha_at(group_alpha: Optional[float], alpha_fn: Optional[Callable[[int], float]], schedule: str,
             step: int, total_steps: Optional[int]) -> float:
    """The alpha one param group uses at ``step``."""
    if group_alpha is None:
        return check_non_negative(f"alpha({step})", alpha_fn(step))
    return group_alpha * schedule_factor(schedule, step, total_steps)
