"""Optimizers over scale-invariant core groups (DESIGN.md §1–2).

* :class:`SAM`: sharpness-aware minimization (two forward/backward passes per step).
* :class:`DAS`: deviation-aware scaling, SAM's norm balancing at one pass per step.
* :class:`BAR`: balancedness-aware rescaling (nBAR/oBAR), generalized to K cores.
* :class:`NormDynamics`: per-group s_k, γ_k, Q, Cov and applied λ_k, for logging.
* :func:`disable_running_stats`: keeps BatchNorm statistics out of SAM's second pass.
* :func:`training_step`: one step of any of them (SAM's two passes included).

All wrap any ``torch.optim`` optimizer (class or instance) and share its param groups and state, so LR
schedulers, GradScaler and ``state_dict`` work as with the base optimizer.
"""
from ._common import disable_running_stats
from .bar import BAR
from .das import DAS
from .dynamics import NormDynamics
from .sam import SAM
from .train_step import training_step

__all__ = ["SAM", "DAS", "BAR", "NormDynamics", "disable_running_stats", "training_step"]
