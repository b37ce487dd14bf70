"""GSAM-style surrogate-gap correction (Zhuang et al. 2022, "Surrogate Gap Minimization Improves
Sharpness-Aware Training", Algorithm 1, the gradient-decomposition step) on top of :class:`SAM`.
Design notes: docs/design.md, 'The SAM family: SAM, ASAM, GSAM, X-SAM'.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..types import BaseOptimizer, Params
from .validation import check_non_negative
from .buckets import dot, foreach_mul, foreach_mul_
from .sam import SAM

__all__ = ["GSAM"]


class GSAM(SAM):
    r"""SAM whose update also descends the surrogate gap f(w̃) − f(w).

    With g = ∇f(w) (first pass) and SAM's g̃ = ∇f(w̃) (second pass), g is split into its part along g̃
    and the rest, g_⊥ = g − (g·g̃ / ||g̃||²) g̃, and the base optimizer steps with

        g_GSAM = g̃ − α g_⊥

    Moving against g_⊥ lowers f(w) without changing f(w̃) to first order, so the gap shrinks. ``alpha=0``
    is SAM exactly (the trajectory is SAM's bit for bit); ``adaptive=True`` is GSAM on ASAM's perturbation.
    The paper also ties ρ to the learning-rate schedule; here ρ is SAM's per-group ``rho`` (schedule it as
    you would the lr). Only parameters with a gradient in both passes are corrected.

    Cost over SAM: one copy of the first-pass gradient (memory of one gradient), two dot products and two
    multi-tensor updates per step; no extra forward/backward. Drive it exactly as :class:`SAM`.
    Limits: the first pass must be synchronized (``sync_first_pass=False`` would give each rank its own g
    and so its own update); under ``torch.amp.GradScaler`` let ``scaler.step(opt)`` unscale (no
    ``scaler.unscale_(opt)`` before it: g̃ would be unscaled while the saved g is not).

    ``alpha`` here is GSAM's surrogate-gap coefficient α (how much of −g_⊥ is added to SAM's gradient;
    the paper's α). It is unrelated to DAS's ``alpha`` (the strength of its core rescale), BAR's ``alpha``
    (its rescale rate) and an adapter's ``alpha`` (its output scale alpha / rank).

    Example::

        >>> import torch, tnlayers
        >>> from torch import nn
        >>> model = nn.Sequential(tnlayers.TTLinear(16, 16, rank=2), nn.ReLU(), nn.Linear(16, 1))
        >>> x, y = torch.randn(32, 16), torch.randn(32, 1)
        >>> def closure():
        ...     loss = nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> opt = tnlayers.GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.1, lr=0.1)
        >>> loss = opt.step(closure)
        >>> opt.alpha, opt.param_groups[0]["rho"]
        (0.1, 0.05)
    """

    def __init__(self, params: Optional[Params], base_optimizer: BaseOptimizer, rho: float = 0.05,
                 alpha: float = 0.1, adaptive: bool = False, perturb_eps: float = 1e-12,
                 sync_first_pass: bool = True, model: Optional[nn.Module] = None, **base_kwargs: Any):
        self.alpha = check_non_negative("alpha", alpha)
        if sync_first_pass is False:
            raise ValueError("sync_first_pass=False is not supported by GSAM: its update uses the first-pass "
                             "gradient, which must then be the same on every rank")
        self._first_grads = None
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, perturb_eps=perturb_eps,
                         sync_first_pass=sync_first_pass, model=model, **base_kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        first = None
        if self._saved is None and self.alpha != 0:
            first = {p: p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                     if p.grad is not None}
        super().first_step(zero_grad)
        self._first_grads = first

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        self._drop_unreached_flag()  # before the correction reads the gradients
        first, self._first_grads = self._first_grads, None
        if self._saved is not None and first is not None:
            if self.__dict__.get("found_inf") is not None and self.__dict__.get("grad_scale") is None:
                self._restore()
                raise RuntimeError("GSAM under GradScaler: scaler.unscale_(optimizer) was called before "
                                   "scaler.step(optimizer), so the second-pass gradient is unscaled but the "
                                   "saved first-pass one is not; let scaler.step() unscale (the step was not "
                                   "taken)")
            self._correct_gradients(first)
        super().second_step(zero_grad)

    def _correct_gradients(self, first) -> None:
        """g̃ ← g̃ − α (g − (g·g̃/||g̃||²) g̃) = (1 + α g·g̃/||g̃||²) g̃ − α g; linear in (g, g̃) jointly, so a
        common GradScaler scale passes through. A non-finite or zero g̃ is left as it is."""
        pairs = [(p.grad, first[p]) for g in self.param_groups for p in g["params"]
                 if p.grad is not None and p in first]
        if not pairs:
            return
        grads, firsts = [g for g, _ in pairs], [f for _, f in pairs]
        squared = dot(grads, grads)
        ratio = dot(firsts, grads) / squared
        usable = torch.isfinite(ratio) & (squared > 0)
        # the scalars live on the first gradient's device: foreach_mul(_) copies them once to each other one
        foreach_mul_(grads, torch.where(usable, 1.0 + self.alpha * ratio, 1.0))
        torch._foreach_add_(grads, foreach_mul(firsts, usable.to(ratio.dtype) * -self.alpha))
