"""Sharpness-Aware Minimization (Foret et al. 2021, Algorithm 1; DAS paper Algorithm 1), with ASAM's
adaptive perturbation, as a drop-in ``torch.optim`` optimizer.
Design notes: docs/design.md, 'The SAM family: SAM, ASAM, GSAM, X-SAM'.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..types import BaseOptimizer, Params
from .buckets import foreach_mul, foreach_mul_, global_norm, one_bucket
from .validation import check_non_negative
from .wrapper import WrappedOptimizer

__all__ = ["SAM"]


class SAM(WrappedOptimizer):
    r"""SAM around any ``torch.optim`` optimizer.

    One step: g = ∇f(w); w̃ = w + ρ·g/||g|| (``adaptive=True``: w̃ = w + ρ·|w|²g/|| |w|g ||, ASAM);
    g̃ = ∇f(w̃); restore w; base step with g̃. ||·|| runs over all parameters of the optimizer; ρ and
    ``adaptive`` may be set per param group. Parameters may be spread over devices and dtypes (complex ones
    count |z|²), as ``torch.optim`` allows: one norm per (device, dtype), summed on the first parameter's device.

    Two ways to drive it:

    * ``opt.step(closure)``: ``closure`` computes the loss and calls ``backward()`` (it may zero the
      gradients first, as Lightning's does); it is called at w (its loss is returned, as in ``torch.optim``)
      and at w̃. This is the ``torch.optim`` contract that PyTorch Lightning and HF Trainer rely on.
    * ``loss.backward(); opt.first_step(); loss2.backward(); opt.second_step()`` (``opt.step()`` without a
      closure equals ``second_step()``), which leaves room for gradient clipping or ``no_sync`` between.

    ``first_step`` zeroes the gradients (``zero_grad=True``) so the second backward starts clean. Wrap the
    second forward in :func:`~tnlayers.optim.disable_running_stats` so BatchNorm statistics are updated once.

    AMP: with ``torch.amp.GradScaler``, call ``first_step()`` on the *scaled* gradients (the direction
    g/||g|| does not depend on the scale, so nothing is unscaled twice) and ``scaler.step(opt)`` after the
    second backward (``scaler.unscale_(opt)`` before it if you clip). The scaler then always reaches
    ``step()``: w is restored in every case, and the base step is skipped when either pass had an inf/NaN
    gradient. A non-finite first-pass gradient never reaches w̃ (the perturbation is then zero); instead
    ``first_step`` seeds one second-pass gradient with NaN, so the scaler skips and backs off as for any
    overflow (without a scaler, the base step then sees a NaN gradient, as a plain optimizer would).

    The perturbation lives only between ``first_step`` and ``second_step`` and is never in ``state_dict``.
    ``perturb_eps`` guards the division by ||g|| (davda54/sam's fixed 1e-12); every keyword that is not SAM's
    own goes to the base optimizer, so ``eps=`` is Adam's ``eps``, as in davda54/sam.

    DDP: under ``DistributedDataParallel`` both backward passes average the gradients over the ranks, so
    every rank takes the same perturbation and SAM equals single-process SAM on the global batch (the
    default, ``sync_first_pass=True``). ``sync_first_pass=False, model=ddp_model`` runs the first closure
    call inside ``model.no_sync()``: each rank perturbs its weights along its *own* gradient (the
    per-device "m-sharpness" of the SAM paper, and one all-reduce fewer per step); the second pass is
    averaged as usual, so the base step is the same on every rank. With ``first_step``/``second_step``
    driven by hand, wrap the first forward and backward in ``model.no_sync()`` yourself instead.

    Example::

        >>> import torch, tnlayers
        >>> from torch import nn
        >>> model = nn.Sequential(tnlayers.TTLinear(16, 16, rank=2), nn.ReLU(), nn.Linear(16, 1))
        >>> x, y = torch.randn(32, 16), torch.randn(32, 1)
        >>> def closure():
        ...     loss = nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> opt = tnlayers.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> loss = opt.step(closure)  # two forward/backward passes: at w, then at w + e(w)
        >>> nn.functional.mse_loss(model(x), y).backward()  # or drive the two halves by hand:
        >>> opt.first_step()
        >>> nn.functional.mse_loss(model(x), y).backward()
        >>> opt.second_step()
        >>> opt.kind
        'SAM(SGD)'
    """

    # GradScaler then calls step() even on an overflow (with ``found_inf``/``grad_scale`` attributes set),
    # so the weights are restored from w̃ on skipped steps too.
    _step_supports_amp_scaling = True

    def __init__(self, params: Optional[Params], base_optimizer: BaseOptimizer, rho: float = 0.05,
                 adaptive: bool = False, perturb_eps: float = 1e-12, sync_first_pass: bool = True,
                 model: Optional[nn.Module] = None, **base_kwargs: Any):
        rho = check_non_negative("rho", rho)
        if not isinstance(sync_first_pass, bool):
            raise TypeError(f"sync_first_pass must be a bool, got {type(sync_first_pass).__name__}")
        if not sync_first_pass and not callable(getattr(model, "no_sync", None)):
            raise ValueError("sync_first_pass=False needs model=, the DistributedDataParallel module (or any "
                             f"module with no_sync()), whose first backward pass is kept local; got {model!r}")
        if sync_first_pass and model is not None:
            raise ValueError("model= is only used with sync_first_pass=False (the default synchronizes both passes)")
        self.sync_first_pass = sync_first_pass
        self._sync_model = None if sync_first_pass else model
        self.perturb_eps = check_non_negative("perturb_eps", perturb_eps)
        self._perturbed: Optional[List[torch.Tensor]] = None
        self._saved: Optional[List[torch.Tensor]] = None
        self._first_pass_finite: Optional[torch.Tensor] = None
        self._flag_watch: Optional[tuple] = None
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
        super().__init__(params, base_optimizer, {"rho": rho, "adaptive": adaptive}, base_kwargs)

    def _check_group(self, group: Dict[str, Any]) -> Dict[str, Any]:
        if not isinstance(group.get("adaptive"), bool):
            raise TypeError(f"adaptive must be a bool, got {group.get('adaptive')!r}")
        return {"rho": check_non_negative("rho", group.get("rho")), "adaptive": group["adaptive"]}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Move the weights to w̃ = w + e(w), remembering w; then (by default) zero the gradients."""
        if self._saved is not None:
            raise RuntimeError("SAM.first_step() called twice without second_step() in between")
        per_group = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        params = [p for ps in per_group for p in ps]
        if not params:
            raise RuntimeError("SAM.first_step(): no parameter has a gradient; call backward() first")
        # |w|·g for adaptive groups, g otherwise: the vector whose norm normalizes the perturbation.
        scaled = []
        for group, ps in zip(self.param_groups, per_group):
            grads = [p.grad for p in ps]
            scaled.append(torch._foreach_mul(grads, torch._foreach_abs(ps)) if group["adaptive"] else grads)
        flat = [t for ts in scaled for t in ts]
        one = one_bucket(flat)  # else over devices and dtypes: one norm per bucket, summed on params[0]'s device
        grad_norm = global_norm(flat, one)
        self._first_pass_finite = torch.isfinite(grad_norm)

        saved = [p.detach().clone() for p in params]
        for group, ps, ts in zip(self.param_groups, per_group, scaled):
            if not ps:
                continue
            scale = group["rho"] / (grad_norm + self.perturb_eps)
            # A non-finite gradient gives no perturbation rather than writing inf/NaN into the weights:
            # the scale is 0 then, and the entries 0·inf = NaN are zeroed (no host read needed to decide).
            scale = torch.where(self._first_pass_finite, scale, torch.zeros_like(scale))
            perturbation = torch._foreach_mul(ts, scale) if one else foreach_mul(ts, scale)
            if group["adaptive"]:
                torch._foreach_mul_(perturbation, torch._foreach_abs(ps))
            for e in perturbation:
                torch.nan_to_num_(e, nan=0.0, posinf=0.0, neginf=0.0)
            torch._foreach_add_(ps, perturbation)
        self._perturbed, self._saved = params, saved
        if zero_grad:
            self.zero_grad(set_to_none=True)
            # A non-finite first pass must make the whole step non-finite: one gradient of the second pass
            # starts at NaN instead of 0, so GradScaler skips the step *and lowers its scale* (it never saw
            # the first pass). Decided on the device, without a host read.
            flag = params[0].grad = torch.zeros_like(params[0])
            flag.add_(torch.where(self._first_pass_finite, 0.0, float("nan")).to(flag.dtype))
            self._watch_flag(params[0], flag)

    def _watch_flag(self, param: torch.Tensor, flag: torch.Tensor) -> None:
        """Notice whether the second backward pass reaches ``param``, which holds the flag gradient; if it
        does not, :meth:`_drop_unreached_flag` takes the flag away before the base step."""
        reached = {"yes": False}

        def hook(_):
            reached["yes"] = True

        # a weak reference: holding the flag would make autograd accumulate out of place
        self._flag_watch = (param, weakref.ref(flag), reached, param.register_post_accumulate_grad_hook(hook))

    def _drop_unreached_flag(self) -> None:
        """A parameter the second pass gave no gradient keeps no gradient (davda54/sam leaves it alone):
        otherwise momentum or weight decay would move it on the zero flag. Kept only when it carries a
        non-finite first pass to a base step without GradScaler (which then sees a NaN, as documented)."""
        watch, self._flag_watch = self._flag_watch, None
        if watch is None:
            return
        param, flag, reached, handle = watch
        handle.remove()
        if reached["yes"] or param.grad is None or param.grad is not flag():
            return  # reached by backward, or the gradient was set by hand
        under_scaler = self.__dict__.get("found_inf") is not None
        if under_scaler or self._first_pass_finite is None or bool(self._first_pass_finite):
            param.grad = None

    @torch.no_grad()
    def _restore(self) -> None:
        if self._saved is None:
            raise RuntimeError("SAM.second_step()/step() without a closure needs first_step() first")
        torch._foreach_copy_(self._perturbed, self._saved)
        self._perturbed = self._saved = None

    def _skip_for_amp(self) -> bool:
        """Under GradScaler (which set ``found_inf``/``grad_scale``): unscale, or say the step is skipped."""
        found_inf = self.__dict__.get("found_inf")
        if found_inf is None:
            return False
        skip = found_inf != 0
        if self._first_pass_finite is not None:
            skip = skip | ~self._first_pass_finite.to(skip.device)
        if bool(skip):  # one host read per step, as GradScaler's own skip test makes
            return True
        grad_scale = self.__dict__.get("grad_scale")
        if grad_scale is not None:  # the scaler left the gradients scaled (no unscale_ before step)
            inv_scale = grad_scale.double().reciprocal().float()
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            foreach_mul_(grads, inv_scale)
        return False

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w and take the base optimizer's step with the gradients computed at w̃."""
        self._drop_unreached_flag()
        self._restore()
        skip = self._skip_for_amp()
        self._first_pass_finite = None
        if not skip:
            self.base_optimizer.step()
            self._after_update()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """With ``closure``: a whole SAM step (two closure calls); returns the loss at w.
        Without: the second half, after ``first_step()`` and the second backward."""
        if closure is None:
            self.second_step()
            return None
        local = contextlib.nullcontext() if self._sync_model is None else self._sync_model.no_sync()
        with torch.enable_grad(), local:
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss
