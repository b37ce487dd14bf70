"""The strength ``alpha`` of DAS and BAR over a run: a per-group float decayed by ``alpha_schedule``
("constant", "linear", "cosine" to 0 at ``total_steps``), or a callable ``step -> alpha`` of the user's."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

from .validation import check_choice, check_non_negative

__all__ = ["ALPHA_SCHEDULES", "check_schedule", "schedule_factor", "split_alpha", "alpha_at"]

ALPHA_SCHEDULES = ("constant", "linear", "cosine")


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
