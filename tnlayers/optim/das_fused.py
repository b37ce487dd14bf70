"""DAS's step through the fused Triton kernels (``tnlayers.kernels.das_triton``).

Two launches per step: one reduction of s_k, γ_k for every core, one that computes λ_k and applies
G ← (1+λ)G fused with the base optimizer's update of the cores when that optimizer is ``torch.optim.SGD``,
``torch.optim.AdamW`` or ``torch.optim.Adam`` whose options are all in ``FUSABLE`` with values the kernels
implement, one set of them over the cores' param groups, and its state already created (its first step
runs unfused, which creates the state). Otherwise the kernel rescales only and the base optimizer's own
step follows (with backend="triton", one warning per reason names the option that prevents fusion).
Non-core parameters always take the base step: the cores' gradients are hidden from it for that call, so
it skips them.
Design notes: docs/design.md, 'Triton kernels for DAS'.
"""
from __future__ import annotations

import os
import weakref
from typing import Optional, Tuple

import torch

from .._caller import warn_user
from ..kernels import triton_available

# The contract with torch.optim: a base optimizer's update is fused exactly when it is one of these classes
# (not a subclass), every option in its ``defaults`` is listed here, and the options hold values the kernels
# implement; anything else (a future torch option included) keeps the base optimizer's own step. "read":
# what the kernels compute with; "off": must be False/None; "free": selects torch's own implementation
# (foreach or not), which the kernels replace. tests/test_das_fused_contract.py checks these lists against
# torch.optim's defaults and the fused update against torch.optim's step for every option.
_ADAM = dict(read=("lr", "betas", "eps", "weight_decay"),
             off=("amsgrad", "maximize", "capturable", "differentiable", "fused"),
             free=("foreach", "decoupled_weight_decay"))
FUSABLE = {
    torch.optim.SGD: dict(read=("lr", "momentum", "dampening", "nesterov", "weight_decay"),
                          off=("maximize", "differentiable", "fused"), free=("foreach",)),
    torch.optim.AdamW: _ADAM,
    torch.optim.Adam: _ADAM,  # with decoupled weight decay, or none: then its update is AdamW's
}


def unfusable_options(base: torch.optim.Optimizer, used_groups) -> Optional[str]:
    """Why the options of ``base`` over the param groups ``used_groups`` keep the kernels from fusing its
    update (a phrase naming the option); None when they can fuse it."""
    kind = type(base)
    name = kind.__name__
    spec = FUSABLE.get(kind)
    if spec is None:
        return f"a base optimizer the kernels implement (SGD, Adam, AdamW), not {name}"
    known = set(spec["read"]) | set(spec["off"]) | set(spec["free"])
    unknown = sorted(set(base.defaults) - known)
    if unknown:
        return f"{name} options the kernels implement; {name} has option {unknown[0]!r} that they do not know"
    groups = [base.param_groups[i] for i in used_groups]
    for key in spec["read"]:
        values = [g.get(key) for g in groups]
        if any(isinstance(v, torch.Tensor) or (isinstance(v, tuple) and any(isinstance(b, torch.Tensor) for b in v))
               for v in values):
            return f"{name} option {key} as a number, not a Tensor"
        if any(v != values[0] for v in values):
            return f"one value of {name} option {key} over the cores' param groups (they differ)"
    for key in spec["off"]:
        for g in groups:
            if g.get(key):
                return f"{name} option {key} off (it is {g.get(key)!r})"
    if kind is torch.optim.Adam:
        for g in groups:
            if g.get("weight_decay") and not g.get("decoupled_weight_decay", False):
                return "Adam with decoupled_weight_decay=True or weight_decay=0 (its weight decay is added to the " \
                       "gradient; the kernels implement AdamW's)"
    if kind is torch.optim.AdamW and any(g.get("decoupled_weight_decay") is False for g in groups):
        return "AdamW option decoupled_weight_decay=True"
    return None


def triton_usable(device: torch.device, interpreter_ok: bool) -> bool:
    """The kernels run on CUDA tensors, and (when asked for explicitly) on CPU tensors under the Triton
    interpreter; "auto" never picks the interpreter, which is for tests."""
    if not triton_available():
        return False
    return device.type == "cuda" or (interpreter_ok and os.environ.get("TRITON_INTERPRET") == "1")


def _base_update(base: torch.optim.Optimizer, layout, used, unfusable: Optional[str]
                 ) -> Tuple[str, dict, list, list, int]:
    """(kind, hyper-parameters, state a, state b, Adam step) of the update the kernel fuses; none when
    ``unfusable`` (``unfusable_options`` of ``base`` over the param groups ``used``) gives a reason."""
    from ..kernels.das_triton import UPDATE_ADAMW, UPDATE_NONE, UPDATE_SGD

    none = (UPDATE_NONE, {}, [], [], 0)
    if unfusable is not None:
        return none
    group = base.param_groups[used[0]]
    options = {k: group[k] for k in FUSABLE[type(base)]["read"]}
    states = [base.state.get(c, {}) for c in layout.cores]
    if type(base) is torch.optim.SGD:
        if options["momentum"] != 0:
            buffers = [s.get("momentum_buffer") for s in states]
            if any(b is None for b in buffers):
                return none  # the first step creates them
            return UPDATE_SGD, options, buffers, [], 0
        return UPDATE_SGD, options, [], [], 0
    if any(not {"step", "exp_avg", "exp_avg_sq"} <= s.keys() for s in states):
        return none  # the first step creates them
    steps = [s["step"] for s in states]
    if any(t.device.type != "cpu" for t in steps):
        return none  # reading a device step counter would wait for the device
    counts = torch.stack(steps)
    if bool(counts.min() != counts.max()):
        return none
    options["steps"] = steps
    return UPDATE_ADAMW, options, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], \
        int(counts[0]) + 1


class FusedDASStep:
    """Plans (pointer tables) per core layout; ``__call__`` does a whole DAS step, or returns False when
    these cores cannot take the fused path (the caller then runs the torch path)."""

    def __init__(self):
        self._plans = weakref.WeakKeyDictionary()
        self._warned = set()

    @staticmethod
    def unsupported(cores, grads, forced: bool) -> Optional[str]:
        """Why these cores (or a rank's local shards of them) and their gradients cannot take the kernels;
        None when they can."""
        tensors = (*cores, *grads)
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.bfloat16, torch.float16):
            return f"cores and gradients of one dtype among float32/bfloat16/float16 (got {sorted(map(str, dtypes))})"
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            return f"cores and gradients on one device (got {sorted(map(str, devices))})"
        if not all(t.is_contiguous() for t in tensors):
            return "contiguous cores and gradients"
        if sum(t.numel() for t in cores) == 0:
            return "cores with elements on this rank"
        if not triton_usable(cores[0].device, interpreter_ok=forced):
            return "triton installed and CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        return None

    @torch.no_grad()
    def __call__(self, das, layout, step_size) -> bool:
        from ..kernels.das_triton import UPDATE_ADAMW, UPDATE_NONE, FusedDASPlan

        if isinstance(step_size, torch.Tensor):
            return False  # learning rates or alphas differ between the cores' param groups: torch path
        base = das.base_optimizer
        used = sorted(set(layout.param_group_list))
        reason = unfusable_options(base, used)
        if reason is not None and das.backend == "triton" and type(base) in FUSABLE and reason not in self._warned:
            self._warned.add(reason)
            warn_user(f"DAS backend='triton': the base optimizer's update is not fused (the kernels need "
                      f"{reason}); the kernels rescale the cores and {type(base).__name__}'s own step follows")
        plan = self._plans.get(layout)
        if plan is None:
            plan = self._plans[layout] = FusedDASPlan(layout.cores, layout.segment, layout.counts)
        cores = layout.cores
        grads = [c.grad for c in cores]
        kind, options, state_a, state_b, adam_step = _base_update(base, layout, used, reason)
        stats = plan.reduce(cores, grads)
        hyper = {}
        if kind != UPDATE_NONE:
            hyper = dict(lr=options["lr"], weight_decay=options["weight_decay"])
            if kind == UPDATE_ADAMW:
                hyper.update(beta1=options["betas"][0], beta2=options["betas"][1], eps=options["eps"],
                             step=adam_step)
            else:
                hyper.update(momentum=options["momentum"], dampening=options["dampening"],
                             nesterov=options["nesterov"])
        lambdas = plan.update(cores, grads, stats, step_size, das.normalization, das.denominator,
                              update=kind, state_a=state_a, state_b=state_b, max_scale=das.max_scale, **hyper)
        # the kernels write through raw pointers: tell autograd and the layers' weight caches (which key
        # on version counters) that the cores and their state changed
        torch.autograd.graph.increment_version([*cores, *state_a, *state_b])
        if kind == UPDATE_NONE:
            base.step()
        else:
            for c in cores:  # the cores are updated: the base step must skip them
                c.grad = None
            try:
                base.step()
            finally:
                for c, g in zip(cores, grads):
                    c.grad = g
            if kind == UPDATE_ADAMW:
                torch._foreach_add_(options["steps"], 1)
        das.last_lambdas = (cores, lambdas)
        return True
