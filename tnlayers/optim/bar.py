"""Balancedness-aware rescaling (BAR; arXiv 2410.14802, summary in shared/reference/), generalized from
two-core groups (LoRA's X, Y) to K cores. The paper has no official code; the rule below is ours.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ._common import check_choice
from ._cores import CoreLayout, CoreScalingOptimizer

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
    depend on how unbalanced the cores are, only on the sign; α is meant to decrease over training
    (``alpha_schedule="cosine"`` by default, which needs ``total_steps``).

    Arguments are those of :class:`~tnlayers.optim.DAS` (``params``, ``base_optimizer``, ``alpha`` as a
    float or a callable of the step, ``alpha_schedule``, ``total_steps``, ``**base_kwargs``) plus
    ``variant``. η is the core's param-group learning rate at this step. One forward/backward per step.
    Non-finite norms leave the group unchanged.
    """

    def __init__(self, params, base_optimizer, alpha: Union[float, Callable[[int], float]] = 0.1,
                 variant: str = "nbar", alpha_schedule: str = "cosine", total_steps: Optional[int] = None,
                 **base_kwargs):
        self.variant = check_choice("variant", variant, VARIANTS)
        super().__init__(params, base_optimizer, alpha, alpha_schedule, total_steps, {}, base_kwargs)

    def _lambdas(self, layout: CoreLayout, s: torch.Tensor, gamma: torch.Tensor, step_size) -> torch.Tensor:
        measured = gamma if self.variant == "nbar" else s
        deviation = measured - layout.segment_mean(measured)[layout.segment]
        direction = torch.sign(deviation) if self.variant == "nbar" else -torch.sign(deviation)
        lambdas = step_size * direction
        return torch.where(torch.isfinite(deviation), lambdas, 0.0)
