"""DAS's step through the fused Triton kernels (``tnlayers.kernels.das_triton``).

Two launches per step: one reduction of s_k, γ_k for every core, one that computes λ_k and applies
G ← (1+λ)G fused with the base optimizer's update of the cores when that optimizer is ``torch.optim.SGD``
or ``torch.optim.AdamW`` with one set of hyper-parameters over the cores' param groups and its state
already created (its first step runs unfused, which creates the state). Otherwise the kernel rescales
only and the base optimizer's own step follows. Non-core parameters always take the base step: the cores'
gradients are hidden from it for that call, so it skips them.
Design notes: docs/design.md, 'Triton kernels for DAS'.
"""
from __future__ import annotations

import os
import weakref
from typing import Optional, Tuple

import torch

from ..kernels import triton_available

SGD_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")
ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "capturable", "differentiable", "fused")


def triton_usable(device: torch.device, interpreter_ok: bool) -> bool:
    """The kernels run on CUDA tensors, and (when asked for explicitly) on CPU tensors under the Triton
    interpreter; "auto" never picks the interpreter, which is for tests."""
    if not triton_available():
        return False
    return device.type == "cuda" or (interpreter_ok and os.environ.get("TRITON_INTERPRET") == "1")


def _same_options(base, used_groups, keys) -> Optional[dict]:
    options = [{k: g.get(k) for k in keys} for g in (base.param_groups[i] for i in used_groups)]
    return options[0] if all(o == options[0] for o in options) else None


def _base_update(base: torch.optim.Optimizer, layout) -> Tuple[str, dict, list, list, int]:
    """(kind, hyper-parameters, state a, state b, AdamW step) of the update the kernel can fuse."""
    from ..kernels.das_triton import UPDATE_ADAMW, UPDATE_NONE, UPDATE_SGD

    used = sorted(set(layout.param_group_list))
    none = (UPDATE_NONE, {}, [], [], 0)
    states = [base.state.get(c, {}) for c in layout.cores]
    if type(base) is torch.optim.SGD:
        options = _same_options(base, used, SGD_KEYS)
        if options is None or options["maximize"]:
            return none
        if options["momentum"] != 0:
            buffers = [s.get("momentum_buffer") for s in states]
            if any(b is None for b in buffers):
                return none
            return UPDATE_SGD, options, buffers, [], 0
        return UPDATE_SGD, options, [], [], 0
    if type(base) is torch.optim.AdamW:
        options = _same_options(base, used, ADAMW_KEYS)
        if options is None or any(options[k] for k in ("amsgrad", "maximize", "capturable", "differentiable",
                                                        "fused")):
            return none
        if any(not {"step", "exp_avg", "exp_avg_sq"} <= s.keys() for s in states):
            return none
        steps = [s["step"] for s in states]
        if any(t.device.type != "cpu" for t in steps):
            return none  # reading a device step counter would wait for the device
        counts = torch.stack(steps)
        if bool(counts.min() != counts.max()):
            return none
        options["steps"] = steps
        return UPDATE_ADAMW, options, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], \
            int(counts[0]) + 1
    return none


class FusedDASStep:
    """Plans (pointer tables) per core layout; ``__call__`` does a whole DAS step, or returns False when
    these cores cannot take the fused path (the caller then runs the torch path)."""

    def __init__(self):
        self._plans = weakref.WeakKeyDictionary()

    @staticmethod
    def unsupported(cores, grads, forced: bool) -> Optional[str]:
        """Why these cores (or a rank's local shards of them) and their gradients cannot take the kernels;
        None when they can."""
        tensors = (*cores, *grads)
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.bfloat16, torch.float16):
            return f"cores and gradients of one dtype among float32/bfloat16/float16 (got {sorted(map(str, dtypes))})"
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
        plan = self._plans.get(layout)
        if plan is None:
            plan = self._plans[layout] = FusedDASPlan(layout.cores, layout.segment, layout.counts)
        cores = layout.cores
        grads = [c.grad for c in cores]
        kind, options, state_a, state_b, adam_step = _base_update(base, layout)
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
