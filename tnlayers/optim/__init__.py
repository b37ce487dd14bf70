"""Optimizers over scale-invariant core groups (docs/design.md, 'Norm deviation: s_k, γ_k, Q and Cov').

* :class:`SAM`: sharpness-aware minimization (two forward/backward passes per step); ASAM is
  ``SAM(adaptive=True)``.
* :class:`XSAM`: SAM with its gradient corrected along the top Hessian eigenvector (X-SAM, our reading).
* :class:`GSAM`: SAM plus GSAM's surrogate-gap term (descends the part of g orthogonal to SAM's gradient).
* :class:`DAS`: deviation-aware scaling, SAM's norm balancing at one pass per step.
* :class:`BAR`: balancedness-aware rescaling (nBAR/oBAR), generalized to K cores.
* :class:`NormDynamics`: per-group s_k, γ_k, Q, Cov and applied λ_k, for logging.
* :class:`DivergenceWarning`: what every optimizer here warns, once, at a step that leaves cores NaN/inf.
* :func:`disable_running_stats`: keeps BatchNorm statistics out of SAM's second pass.
* :func:`training_step`: one step of any of them (SAM's two passes, X-SAM's eigen-updates included).
* :func:`top_eigenvector`, :func:`max_hessian_eigenvalue`: power iteration on Hessian-vector products
  (``tnlayers.optim.hessian``), for sharpness reports.

All wrap any ``torch.optim`` optimizer (class or instance) and share its param groups and state, so LR
schedulers, GradScaler and ``state_dict`` work as with the base optimizer.
"""
from .batchnorm import disable_running_stats
from ._divergence import DivergenceWarning
from .bar import BAR
from .das import DAS
from .dynamics import NormDynamics
from .gsam import GSAM
from .hessian import max_hessian_eigenvalue, top_eigenvector
from .sam import SAM
from .passes import training_step
from .xsam import XSAM

__all__ = ["SAM", "XSAM", "GSAM", "DAS", "BAR", "NormDynamics", "disable_running_stats", "training_step",
           "top_eigenvector", "max_hessian_eigenvalue", "DivergenceWarning"]
