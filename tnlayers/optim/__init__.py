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

``alpha`` is a different number in each optimizer that takes one: DAS's strength of the deviation-aware
rescale, BAR's rescale rate (each core moves by 1 ± αη), GSAM's surrogate-gap coefficient; and none of them is
an adapter's ``alpha`` (its output scale alpha / rank). The norm metrics the optimizers act on are all in
:mod:`tnlayers.metrics` too (``NormDynamics`` is re-exported there).

    >>> import torch, tnlayers
    >>> model = torch.nn.Sequential(tnlayers.TRLinear(16, 16, rank=2), torch.nn.Linear(16, 1))
    >>> base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> opt = tnlayers.optim.DAS(None, base, alpha=0.5)  # an instance works too: its param groups are shared
    >>> opt.param_groups is base.param_groups, opt.kind
    (True, 'DAS(AdamW)')
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
