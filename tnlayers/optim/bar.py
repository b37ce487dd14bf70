"""Balancedness-aware rescaling (BAR; arXiv 2410.14802), generalized from two-core groups (LoRA's X, Y)
to K cores. The paper has no official code; the rule below is ours (docs/design.md,
'BAR: balancedness-aware rescaling').
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from ..types import Alpha, BaseOptimizer, Params
from .alpha_schedule import alpha_at
from .core_scaling import CoreLayout, CoreScalingOptimizer
from .validation import check_choice

__all__ = ["BAR"]

VARIANTS = ("nbar", "obar")


class BAR(CoreScalingOptimizer):
    r"""BAR around any ``torch.optim`` optimizer: each core moves by a factor (1 ± αη), then the base step.

    Two-core group (X, Y), as in the paper:

    * ``variant="nbar"``: if ||g_X|| ≥ ||g_Y||, X ← (1+αη)X and Y ← (1−αη)Y, else the reverse: the core
      with the larger gradient grows, which is the direction SAM moves the balancedness (Theorem 2 of the
      DAS paper: d(s_i − s_j)/dt ∝ γ_i − γ_j).
    * ``variant="obar"``: the same test on ||X|| ≥ ||Y|| with the signs flipped: the larger core shrinks.

    K cores (our generalization): core k gets G_k ← (1 + αη·σ_k)·G_k with

        nBAR: σ_k = sign(γ_k − mean γ),    oBAR: σ_k = −sign(s_k − mean s)

    i.e. each core is compared with its group's mean rather than with one partner. For K = 2 this is the
    paper's rule (the core above the mean of two is the larger one), except on an exact tie, where both
    cores are left alone instead of the paper's arbitrary choice of X. Unlike DAS, the amount does not
    depend on how unbalanced the cores are, only on the sign; α is meant to decrease over training: by
    default (``alpha_schedule=None``) it follows a cosine decay to 0 at ``total_steps`` when that is given,
    and stays constant when it is not (no end of training to decay towards).

    αη < 1 is required: the shrinking core is multiplied by 1 − αη, an explicit Euler step of the flow
    dG/dt = −α G, whose exact factor e^(−αη) is always positive; at αη ≥ 1 the step would zero the core
    (and so the layer) or flip its sign. This is a step size outside the rule's range, like an lr that
    diverges, so it is refused rather than clamped (a clamp would silently change α): a ValueError at
    construction, and at each step (before anything changes) since schedulers change η.

    Arguments are those of :class:`~tnlayers.optim.DAS` (``params``, ``base_optimizer``, ``alpha`` as a
    float or a callable of the step, ``alpha_schedule``, ``total_steps``, ``**base_kwargs``) plus
    ``variant``. η is the core's param-group learning rate at this step. One forward/backward per step.
    Non-finite norms leave the group unchanged.

    ``alpha`` here is BAR's rescale rate α: every core moves by the fixed factor 1 ± αη, whatever its imbalance
    (the paper's α). It is unrelated to DAS's ``alpha`` (the strength of a rescale proportional to the
    deviation), GSAM's ``alpha`` (its surrogate-gap coefficient) and an adapter's ``alpha`` (its output scale
    alpha / rank).

    Example::

        >>> import torch, tnlayers
        >>> from torch import nn
        >>> model = nn.Sequential(tnlayers.TTLinear(16, 16, rank=2), nn.ReLU(), nn.Linear(16, 1))
        >>> x, y = torch.randn(32, 16), torch.randn(32, 1)
        >>> opt = tnlayers.BAR(model.parameters(), torch.optim.SGD, alpha=0.1, lr=0.1, total_steps=100)
        >>> opt.alpha_schedule  # total_steps given: α decays by cosine to 0 at step 100
        'cosine'
        >>> nn.functional.mse_loss(model(x), y).backward()
        >>> opt.step()  # each core scaled by 1 ± αη (αη = 0.01 here), then SGD's step
        >>> tnlayers.BAR(model.parameters(), torch.optim.SGD, alpha=20.0, lr=0.1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: BAR needs alpha * lr < 1 ...
    """

    def __init__(self, params: Optional[Params], base_optimizer: BaseOptimizer, alpha: Alpha = 0.1,
                 variant: str = "nbar", alpha_schedule: Optional[str] = None, total_steps: Optional[int] = None,
                 **base_kwargs: Any):
        self.variant = check_choice("variant", variant, VARIANTS)
        if alpha_schedule is None:  # the paper's decreasing α where the end of training is known
            alpha_schedule = "constant" if total_steps is None else "cosine"
        super().__init__(params, base_optimizer, alpha, alpha_schedule, total_steps, {}, base_kwargs)
        if self._alpha_fn is None:
            self._check_step_sizes([float(g["lr"]) * g["alpha"] for g in self.param_groups],
                                   range(len(self.param_groups)))

    def _check_step_sizes(self, per_group: List[float], used) -> None:
        for index in used:
            if per_group[index] >= 1.0:
                group = self.param_groups[index]
                alpha = alpha_at(group.get("alpha"), self._alpha_fn, self.alpha_schedule, self.steps_taken,
                                 self.total_steps)
                raise ValueError(
                    f"BAR needs alpha * lr < 1 (each core is scaled by 1 ± alpha * lr; at 1 - alpha * lr <= 0 the "
                    f"shrinking core would be zeroed or flip sign): param group {index} has alpha={alpha!r} (at "
                    f"step {self.steps_taken}) and lr={float(group['lr'])!r}, alpha * lr = {per_group[index]!r}; "
                    "lower alpha or lr")

    def _lambdas(self, layout: CoreLayout, s: torch.Tensor, gamma: torch.Tensor, step_size) -> torch.Tensor:
        measured = gamma if self.variant == "nbar" else s
        deviation = measured - layout.segment_mean(measured)[layout.segment]
        direction = torch.sign(deviation) if self.variant == "nbar" else -torch.sign(deviation)
        lambdas = step_size * direction
        return torch.where(torch.isfinite(deviation), lambdas, 0.0)
