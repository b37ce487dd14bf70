"""Deviation-Aware Scaling (DAS; arXiv 2508.10435, Algorithm 2): SAM's norm balancing of tensor cores
without SAM's second forward/backward pass. Formulas: docs/design.md, 'DAS: deviation-aware scaling'.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Optional

import torch

from ..kernels import triton_available
from ..types import Alpha, BaseOptimizer, Params
from .core_scaling import CoreLayout, CoreScalingOptimizer
from .das_fused import FusedDASStep
from .validation import check_choice

__all__ = ["DAS"]

NORMALIZATIONS = ("global", "layer")
DENOMINATORS = ("squared", "norm")
BACKENDS = ("auto", "torch", "triton")


# Bound of the per-step factor 1 + λ (see ``max_scale``). Measured unbounded: |λ| < 1e-2 on tensorized
# ResNet-20s at the paper's CIFAR settings, but factors up to ~90 in a few early steps when adapters grow
# their zero-initialized core at the paper's adapter α (0.1-2, Adam); 1e4 leaves a wide margin over both
# and still stops the 1e10-fold jumps of a core that is tiny next to its gradient.
DEFAULT_MAX_SCALE = 1e4


def check_max_scale(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"max_scale must be a number, got {type(value).__name__}")
    if math.isnan(value) or value <= 1:
        raise ValueError(f"max_scale must be a number > 1 (math.inf for no bound), got {value!r}")
    return float(value)


class DAS(CoreScalingOptimizer):
    r"""Deviation-Aware Scaling around any ``torch.optim`` optimizer.

    Each step, for every core group (the cores of one tensorized layer) with K cores:

        ḡ = mean_k γ_k,   λ_k = η α u (γ_k − ḡ) / s_k,   G_k ← (1 + λ_k) G_k

    then the base optimizer steps with the unchanged gradients. s_k = ||G_k||², γ_k = ||g_k||², η is the
    current ``lr`` of the core's param group. Cores with a large gradient norm grow and small ones shrink,
    which is the first-order effect SAM has on the norm deviation Q (Theorem 3); one forward/backward per
    step. Derivation and the differences from the paper: docs/design.md, 'DAS: deviation-aware scaling'.
    Parameters that are not cores (biases, BatchNorm, dense layers) only take the base step.

    Args:
        params: ``model.parameters()`` (core groups are recognized by the markers the tnlayers layers set)
            or param-group dicts; a group may set its own ``alpha``. ``None`` when ``base_optimizer`` is an
            instance.
        base_optimizer: an optimizer class, built on these param groups with ``**base_kwargs``, or an
            already-built instance.
        alpha: DAS strength α ≥ 0: how strongly each step rescales the cores by their deviation (the α of
            λ_k = η α u (γ_k − ḡ)/s_k; paper: 0.001–0.1 for CNNs, 0.1–2 for adapters), or a callable
            ``step -> alpha`` (``step`` counts from 0). ``alpha=0`` reproduces the base optimizer exactly.
            Not the ``alpha`` of BAR (a fixed rescale rate), of GSAM (its surrogate-gap coefficient) or of an
            adapter (its output scale alpha / rank): four unrelated numbers that share a name.
        normalization: ``"global"``: u = (Σ over all cores of all groups γ)^(-1/2), SAM's u_D (Theorem 5,
            the multi-layer case); ``"layer"``: u = (K ḡ)^(-1/2) per group, Algorithm 2 as printed.
        denominator: ``"squared"``: divide by s_k = ||G_k||² (Algorithm 2); ``"norm"``: by ||G_k||, as in
            the authors' released CNN/adapter code.
        alpha_schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay of α from its value at step 0
            to 0 at ``total_steps`` (no warm-up, as the released code).
        backend: ``"torch"``: vectorized torch ops (``_foreach``); ``"triton"``: two fused kernel launches
            per step (reduction, then rescale fused with an SGD/Adam/AdamW update whose options the kernels
            implement, ``das_fused.FUSABLE``; other base optimizers, and SGD/Adam/AdamW with other options
            (one warning naming the option), get the rescale fused and their own step), on CUDA tensors or,
            for tests, CPU tensors under ``TRITON_INTERPRET=1``; it raises where the kernels cannot run
            (another dtype, cores over several devices or dtypes, per-group learning rates or alphas over the
            cores); ``"auto"``: triton for CUDA cores when triton is installed and the kernels can run, else
            torch, silently.
        max_scale: the factor 1 + λ_k of one step is kept within [1/max_scale, max_scale] (default 1e4), so
            a core whose norm is tiny next to its gradient cannot jump by ten orders of magnitude, and no
            core is zeroed or flips sign (1 + λ ≤ 0), in one step. The default is not active at the paper's
            settings (CNNs: |λ| < 1e-2; adapters growing a zero-initialized core: factors up to ~90 in early
            steps). A number > 1; ``math.inf`` turns the bound off.

    Guards: a group whose ḡ is 0 or non-finite, or a core with s_k = 0 (a zero-initialized adapter core),
    is not rescaled; nothing non-finite is ever written into a core. A core without a gradient this step
    is neither rescaled nor counted. Under ``torch.amp.GradScaler``, a step it skips is not taken at all,
    so the cores are not rescaled either. The λ applied last are in ``last_lambdas`` (cores, vector).

    Devices and dtypes: cores may be spread over devices (a model placed with ``device_map``, a group split
    between devices included) and be of several dtypes (float32, bfloat16, float64, complex) in one optimizer,
    as ``torch.optim`` allows: one norm reduction per (device, dtype), s and γ gathered on the first core's
    device in float32 (float64 if any core is float64 or complex128), λ sent back to each device; complex cores
    count |z|². Such cores take the torch path (``"auto"``); the Triton kernels need one device and one dtype.

    Distributed: under ``DistributedDataParallel`` the gradients are averaged before the step, so every
    rank computes the same λ. Sharded cores (FSDP2 ``fully_shard``: DTensors) are reduced shard by shard
    and the packed partial sums [s; γ] are summed over the mesh by one all-reduce before λ is computed; the
    rescale multiplies the local shards (the Triton backend runs its two kernels on the local shards, with
    the base step unfused). ``fully_shard`` creates new parameter objects: call
    ``tnlayers.core_groups(model)`` after it, before building DAS, so the cores are recognized.

    Example::

        >>> import torch, tnlayers
        >>> from torch import nn
        >>> model = nn.Sequential(tnlayers.TTLinear(16, 16, rank=2), nn.ReLU(), nn.Linear(16, 1))
        >>> x, y = torch.randn(32, 16), torch.randn(32, 1)
        >>> opt = tnlayers.DAS(model.parameters(), torch.optim.SGD, alpha=0.05, lr=0.1, momentum=0.9)
        >>> nn.functional.mse_loss(model(x), y).backward()
        >>> opt.step()  # rescale each core by 1 + λ_k, then SGD's step: one forward/backward per step
        >>> cores, lambdas = opt.last_lambdas
        >>> len(cores), lambdas.shape
        (6, torch.Size([6]))
    """

    def __init__(self, params: Optional[Params], base_optimizer: BaseOptimizer, alpha: Alpha = 0.01,
                 normalization: str = "global", denominator: str = "squared",
                 alpha_schedule: str = "constant", total_steps: Optional[int] = None,
                 backend: str = "auto", max_scale: float = DEFAULT_MAX_SCALE, **base_kwargs: Any):
        self.max_scale = check_max_scale(max_scale)
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        self.denominator = check_choice("denominator", denominator, DENOMINATORS)
        self.backend = check_choice("backend", backend, BACKENDS)
        if backend == "triton" and not triton_available():
            raise RuntimeError("DAS backend='triton' needs the triton package (pip install 'tnlayers[triton]')")
        self._fused = FusedDASStep()
        self._sharded_plans = weakref.WeakKeyDictionary()
        super().__init__(params, base_optimizer, alpha, alpha_schedule, total_steps, {}, base_kwargs)

    def _lambdas(self, layout: CoreLayout, s: torch.Tensor, gamma: torch.Tensor, step_size) -> torch.Tensor:
        group_sum = layout.segment_sum(gamma)
        if self.normalization == "global":
            # Only groups with finite gradients count, so one overflowing layer cannot zero every λ.
            u = torch.nan_to_num(group_sum, nan=0.0, posinf=0.0).sum().rsqrt()
        else:
            u = group_sum.rsqrt()[layout.segment]
        gamma_mean = (group_sum / layout.counts)[layout.segment]
        denominator = s if self.denominator == "squared" else s.sqrt()
        lambdas = step_size * u * (gamma - gamma_mean) / denominator
        # λ = 0 where it is not finite, before the clamp (which would turn ±inf into a bound): a group whose
        # gradients overflowed (γ̄ inf/NaN), one without gradient (0·inf or 0/0), a core of norm 0 (x/0) or inf.
        # Fewer ops than masking each case (this runs every step; on the CPU each op costs microseconds).
        return self._bounded(torch.nan_to_num(lambdas, nan=0.0, posinf=0.0, neginf=0.0))

    def _bounded(self, lambdas: torch.Tensor) -> torch.Tensor:
        """λ with 1 + λ within [1/max_scale, max_scale]; values inside are returned bit for bit."""
        if math.isinf(self.max_scale):
            return lambdas
        return lambdas.clamp(1.0 / self.max_scale - 1.0, self.max_scale - 1.0)

    def _fused_step(self, layout: Optional[CoreLayout]) -> bool:
        if self.backend == "torch" or layout is None:
            return False
        if layout.sharded:
            return self._fused_sharded_step(layout)
        if self.backend == "auto" and (layout.cores[0].device.type != "cuda" or layout.buckets is not None):
            # "auto" fuses CUDA cores of one device and one dtype only: skip the per-tensor checks (~50 us a
            # step on CPU); cores over several devices or dtypes take the torch path's per-bucket reduction
            return False
        reason = FusedDASStep.unsupported(layout.cores, [c.grad for c in layout.cores], self.backend == "triton")
        if reason is not None:
            if self.backend == "triton":
                raise RuntimeError(f"DAS backend='triton' needs {reason}; use backend='torch' or 'auto'")
            return False  # auto: CPU tensors, float64 cores, ...
        step_size = self._step_sizes(layout)
        self._refuse_per_group_step_sizes(step_size)
        self.last_lambdas = None
        if isinstance(step_size, float) and step_size == 0.0:
            return False  # alpha or lr is 0: the torch path leaves the cores bit-for-bit untouched
        return self._fused(self, layout, step_size)

    def _refuse_per_group_step_sizes(self, step_size) -> None:
        """The kernels take one step size α·lr: per-group ones take the torch path, which backend='triton'
        does not allow."""
        if self.backend == "triton" and isinstance(step_size, torch.Tensor):
            raise RuntimeError("DAS backend='triton' needs one learning rate and one alpha over the cores' param "
                               "groups (the kernels take one step size alpha*lr; these groups differ); use "
                               "backend='torch' or 'auto'")

    def _fused_sharded_step(self, layout: CoreLayout) -> bool:
        """DTensor cores through the kernels, on each rank's local shards: the reduction kernel, one all-reduce
        of the packed [s; γ], the rescale kernel, then the base optimizer's own step (not fused here)."""
        forced = self.backend == "triton"
        layout.check_sharded_grads()
        local = layout.local_cores()
        grads = [c.grad.to_local() for c in layout.cores]
        reason = FusedDASStep.unsupported(local, grads, forced)
        if reason is not None:
            if forced:
                raise RuntimeError(f"DAS backend='triton' needs {reason}; use backend='torch' or 'auto'")
            return False
        step_size = self._step_sizes(layout)
        self._refuse_per_group_step_sizes(step_size)
        self.last_lambdas = None
        if isinstance(step_size, torch.Tensor) or step_size == 0.0:
            return False  # per-group step sizes, or nothing to rescale: the torch path
        from ..kernels.das_triton import FusedDASPlan

        plan = self._sharded_plans.get(layout)  # its pointer tables follow the shards' addresses
        if plan is None:
            plan = self._sharded_plans[layout] = FusedDASPlan(local, layout.segment, layout.counts)
        with torch.no_grad():
            s, gamma, _ = plan.reduce(local, grads)
            s, gamma = layout.all_reduce_stats(torch.cat([s, gamma]))
            group = layout.segment_sum(gamma)
            plan.update(local, grads, (s.contiguous(), gamma.contiguous(), group), step_size, self.normalization,
                        self.denominator)
            # λ as applied, for last_lambdas (a rank whose shard of a core is empty runs no program for it)
            lambdas = self._lambdas(layout, s, gamma, step_size)
        self.base_optimizer.step()
        self.last_lambdas = (layout.cores, torch.where(torch.isfinite(lambdas), lambdas, 0.0))
        return True
