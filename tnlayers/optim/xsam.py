"""X-SAM (arXiv 2601.10251): SAM whose update is corrected along the top Hessian eigenvector.

Only the paper's abstract was available; the correction below is *our reading of the abstract*, stated
exactly in :class:`XSAM`'s docstring (and in docs/design.md, 'The SAM family: SAM, ASAM, GSAM, X-SAM'),
and reduces to SAM bit for bit with ``xi=0``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..types import BaseOptimizer, Params
from .validation import check_non_negative
from .buckets import dot, foreach_mul
from .hessian import HessianOperator, check_positive_int, power_iteration, random_unit_vector
from .sam import SAM

__all__ = ["XSAM"]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class XSAM(SAM):
    r"""X-SAM around any ``torch.optim`` optimizer: a SAM step whose gradient is corrected along v, the
    Hessian's top eigenvector (largest |λ|), re-estimated every ``eig_every`` steps by power iteration.

    The correction (our reading of the abstract). With g = ∇f(w) (first pass), g̃ = ∇f(w̃) (SAM's gradient,
    second pass), v the stored unit eigenvector and the orthogonal decomposition g̃ = (g̃·v) v + g̃_⊥:

        if (g·v)(g̃·v) ≥ 0:   g_X = g̃_⊥ + (1 + ξ)(g̃·v) v  =  g̃ + ξ (g̃·v) v
        otherwise:          g_X = g̃

    and the base optimizer steps with g_X. The test is the abstract's angle condition with v oriented along
    g (v is only defined up to sign): the angle between that v and SAM's gradient is ≤ 90°, i.e. the
    perturbation did not cross the valley along v. Then SAM's pull along the sharpest direction — the v
    component, (g·v)(1 + ρλ/||g||) on a quadratic — is amplified by (1 + ξ), so minima whose curvature λ
    along v is too large for the step size are left sooner (linear stability: along v the step is
    η(1 + ξ)λ(1 + ρλ/||g||) instead of ηλ(1 + ρλ/||g||)). When the SAM gradient's v component has the
    opposite sign to g's, SAM already steps back across the valley and is left as it is. Everything is
    invariant to the sign of v and linear in g̃ (so GradScaler's scale passes through). ``xi=0`` gives
    exactly SAM (the correction is skipped, the trajectory is SAM's bit for bit); ``adaptive=True`` is
    X-SAM on ASAM's perturbation. ξ ≥ 0 (a float, one for the whole optimizer).

    Eigenvector: ``eig_iters`` power-iteration steps with Hessian-vector products of ``loss_fn()`` at w
    (double backward, :mod:`tnlayers.optim.hessian`), warm-started from the previous v (first estimate:
    a fixed random direction), on steps 0, eig_every, 2·eig_every, ... (a step is one ``second_step``).
    v, its eigenvalue and the step counter live in ``state_dict()``, so a resumed run continues exactly.
    Extra cost per eigen-update: 1 forward + 1 backward (with graph) + ``eig_iters`` double-backward passes
    (each about two backward passes), i.e. roughly 1 + 1.5·eig_iters SAM-pass equivalents, amortized over
    ``eig_every`` steps; between updates a step costs what a SAM step costs plus two dot products.

    API: as :class:`SAM`, plus ``loss_fn``, a callable that *returns* the loss at the current weights
    (forward only, no ``backward``), needed on eigen-update steps:

    * ``opt.step(closure, loss_fn=...)``; ``loss_fn`` may be given on every step (it is only called when
      ``opt.eigen_update_due``), and is required on eigen-update steps.
    * by hand: ``if opt.eigen_update_due: opt.update_eigenvector(loss_fn)``, then the SAM passes with
      ``first_step()`` / ``second_step()``; ``first_step()`` on an eigen-update step without it raises.
    * :func:`~tnlayers.optim.training_step` does this (with BatchNorm statistics frozen in ``loss_fn``).

    (PyTorch Lightning's automatic optimization passes only a closure: use manual optimization there.)

    Run ``loss_fn``'s forward with BatchNorm statistics frozen (``disable_running_stats(model)``) so they are
    updated once per step. Distributed: each H v is averaged over the ranks (one all-reduce per power
    iteration), so all ranks share v; with ``sync_first_pass=False`` the first-pass g·v is summed over the
    ranks too (one scalar all-reduce per step), so all ranks take the same branch. Under DDP let ``loss_fn`` call the wrapped module (``ddp.module``),
    or run it inside ``ddp.no_sync()`` (``training_step`` does).

    Example::

        >>> import torch, tnlayers
        >>> from torch import nn
        >>> model = nn.Sequential(tnlayers.TTLinear(16, 16, rank=2), nn.ReLU(), nn.Linear(16, 1))
        >>> x, y = torch.randn(32, 16), torch.randn(32, 1)
        >>> def closure():
        ...     loss = nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss_fn = lambda: nn.functional.mse_loss(model(x), y)  # returns the loss, no backward
        >>> opt = tnlayers.XSAM(model.parameters(), torch.optim.SGD, rho=0.05, xi=0.5, eig_every=10, eig_iters=3,
        ...                     lr=0.1)
        >>> opt.eigen_update_due  # step 0 estimates v: it needs loss_fn
        True
        >>> loss = opt.step(closure, loss_fn=loss_fn)
        >>> opt.eigen_update_due, isinstance(opt.eigenvalue, float)
        (False, True)
    """

    def __init__(self, params: Optional[Params], base_optimizer: BaseOptimizer, rho: float = 0.05, xi: float = 0.5,
                 eig_every: int = 10, eig_iters: int = 5, adaptive: bool = False, perturb_eps: float = 1e-12,
                 sync_first_pass: bool = True, model: Optional[nn.Module] = None, **base_kwargs: Any):
        self.xi = check_non_negative("xi", xi)
        self.eig_every = check_positive_int("eig_every", eig_every)
        self.eig_iters = check_positive_int("eig_iters", eig_iters)
        self._eigenvector: Optional[List[torch.Tensor]] = None
        self._eigenvalue: Optional[torch.Tensor] = None
        self._steps = 0
        self._updated_at = -1
        self._first_dot: Optional[torch.Tensor] = None
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, perturb_eps=perturb_eps,
                         sync_first_pass=sync_first_pass, model=model, **base_kwargs)

    def _params(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _param_groups_changed(self) -> None:
        super()._param_groups_changed()
        # A stored v no longer matches the parameter list: the next step re-estimates it.
        if self._eigenvector is not None and len(self._eigenvector) != len(self._params()):
            self._eigenvector = self._eigenvalue = None
            self._updated_at = -1

    @property
    def eigen_update_due(self) -> bool:
        """Whether this step re-estimates v (and so needs ``loss_fn``)."""
        if self._updated_at == self._steps:
            return False
        return self._eigenvector is None or self._steps % self.eig_every == 0

    @property
    def eigenvalue(self) -> Optional[float]:
        """The eigenvalue of the stored v at its last update (the sharpness λ_max), or None before one."""
        return None if self._eigenvalue is None else float(self._eigenvalue)

    @property
    def eigenvector(self) -> Optional[List[torch.Tensor]]:
        """The stored unit v, one tensor per parameter in param-group order (a copy)."""
        return None if self._eigenvector is None else [v.clone() for v in self._eigenvector]

    def update_eigenvector(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        """Re-estimate v at the current weights: ``eig_iters`` power-iteration steps on H of ``loss_fn()``,
        warm-started from the previous v. Gradients in ``.grad`` are not touched."""
        if self._saved is not None:
            raise RuntimeError("XSAM.update_eigenvector() between first_step() and second_step(): the model "
                               "holds the perturbed weights; call it before first_step()")
        params = self._params()
        hvp = HessianOperator(loss_fn, params, average_over_ranks=_distributed())
        init = self._eigenvector if self._eigenvector is not None else random_unit_vector(params)
        self._eigenvalue, self._eigenvector = power_iteration(hvp, init, self.eig_iters)
        self._updated_at = self._steps

    def _with_eigenvector(self):
        """(gradients, matching parts of v) over the parameters that have a gradient now."""
        pairs = [(p.grad, v) for p, v in zip(self._params(), self._eigenvector) if p.grad is not None]
        return [g for g, _ in pairs], [v for _, v in pairs]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        first_dot = None
        if self._saved is None:  # (otherwise SAM's first_step reports the double call)
            if self.eigen_update_due:
                raise RuntimeError(
                    f"XSAM step {self._steps} re-estimates the top Hessian eigenvector: call "
                    "update_eigenvector(loss_fn) before first_step(), or step(closure, loss_fn=...)")
            if self.xi != 0:
                first_dot = dot(*self._with_eigenvector())
                if not self.sync_first_pass and _distributed():  # local first passes: share the test
                    import torch.distributed as dist

                    dist.all_reduce(first_dot)
        super().first_step(zero_grad)
        self._first_dot = first_dot

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        self._drop_unreached_flag()  # before the correction reads the gradients
        if self._saved is not None and self._first_dot is not None:
            self._correct_gradients()
        self._first_dot = None
        super().second_step(zero_grad)
        self._steps += 1

    def _correct_gradients(self) -> None:
        """g̃ ← g̃ + ξ (g̃·v) v where (g·v)(g̃·v) ≥ 0 (see the class docstring); on the device, no host read.
        A non-finite g̃·v adds nothing (the gradient is already non-finite; GradScaler skips such steps)."""
        grads, vector = self._with_eigenvector()
        if not grads:
            return
        along = dot(grads, vector)
        apply = (self._first_dot.to(along) * along >= 0) & torch.isfinite(along)
        coefficient = torch.where(apply, self.xi * along, 0.0)
        torch._foreach_add_(grads, foreach_mul(vector, coefficient))

    def step(self, closure: Optional[Callable[[], Any]] = None,
             loss_fn: Optional[Callable[[], torch.Tensor]] = None) -> Any:
        """With ``closure``: a whole X-SAM step (an eigen-update with ``loss_fn`` when due, then SAM's two
        closure calls); returns the loss at w. Without: ``second_step()``."""
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable returning the loss, got {type(loss_fn).__name__}")
        if closure is not None and self.eigen_update_due:
            if loss_fn is None:
                raise TypeError(f"XSAM step {self._steps} re-estimates the top Hessian eigenvector (every "
                                f"eig_every={self.eig_every} steps) and needs loss_fn=, a callable returning "
                                "the loss (no backward)")
            self.update_eigenvector(loss_fn)
        return super().step(closure)

    def _extra_state(self) -> Dict[str, Any]:
        extra = {"xsam_steps": self._steps, "xsam_updated_at": self._updated_at}
        if self._eigenvector is not None:
            extra["eigenvector"] = [v.detach().clone() for v in self._eigenvector]
            extra["eigenvalue"] = self._eigenvalue.detach().clone()
        return extra

    def _check_extra_state(self, extra: Dict[str, Any]) -> None:
        vector = extra.get("eigenvector")
        if vector is None:
            return
        params = self._params()
        if not isinstance(vector, (list, tuple)) or len(vector) != len(params) or \
                any(not isinstance(v, torch.Tensor) or v.shape != p.shape for v, p in zip(vector, params)):
            raise ValueError("state_dict: the stored X-SAM eigenvector does not match this optimizer's parameters")
        if not all(bool(torch.isfinite(v).all()) for v in vector):
            raise ValueError("state_dict: the stored X-SAM eigenvector holds non-finite values")
        if "eigenvalue" not in extra:
            raise ValueError("state_dict: the stored X-SAM eigenvector comes without its eigenvalue")

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        self._steps = int(extra.get("xsam_steps", 0))
        self._updated_at = int(extra.get("xsam_updated_at", -1))
        self._eigenvector = self._eigenvalue = None
        vector = extra.get("eigenvector")
        if vector is None:
            return
        params = self._params()
        self._eigenvector = [v.to(device=p.device, dtype=p.dtype) for v, p in zip(vector, params)]
        self._eigenvalue = torch.as_tensor(extra["eigenvalue"]).to(params[0].device)
