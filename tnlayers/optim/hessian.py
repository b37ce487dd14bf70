"""Hessian-vector products and the top Hessian eigenpair by power iteration (X-SAM, sharpness reports).

H v comes from double backward (Pearlmutter's trick): g = ∂L/∂w is taken with ``create_graph=True``, then
∂(g·v)/∂w = H v. Everything goes through ``torch.autograd.grad``, so no parameter's ``.grad`` is read or
written; BatchNorm running statistics are left alone when ``model`` is given (the forward pass then runs
inside :func:`~tnlayers.optim.disable_running_stats`).

Cost: building the operator is one forward and one backward pass (with graph); each H v after that is one
double-backward pass through the gradient's graph (about two backward passes' worth of work).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from .batchnorm import disable_running_stats
from .buckets import dot, global_norm, to_device

__all__ = ["HessianOperator", "Eigenpair", "power_iteration", "top_eigenvector", "max_hessian_eigenvalue"]

LossFn = Callable[[], torch.Tensor]


def _check_params(params) -> List[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        params = [params]
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"params must be a tensor or an iterable of tensors, got {type(params).__name__}") from None
    if not params or not all(isinstance(p, torch.Tensor) for p in params):
        raise TypeError("params must be a non-empty iterable of tensors")
    return params


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value}")
    return value


def mean_over_ranks(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors averaged over the default process group (one packed all-reduce); unchanged without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class HessianOperator:
    """v ↦ H v, H the Hessian of ``loss_fn()`` at the current values of ``params``.

    ``loss_fn`` is called once, here, and must *return* the scalar loss (not call ``backward``). Parameters
    the loss does not depend on, or depends on only linearly, have zero rows in H; parameters that do not
    require grad are treated as constants (zero rows too). ``average_over_ranks``: under
    ``torch.distributed`` each H v is averaged over the ranks (one all-reduce), so every rank works with the
    Hessian of the global batch.
    """

    def __init__(self, loss_fn: LossFn, params, average_over_ranks: bool = False):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable returning the loss, got {type(loss_fn).__name__}")
        self.params = _check_params(params)
        self.average_over_ranks = average_over_ranks
        with torch.enable_grad():
            loss = loss_fn()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise TypeError("loss_fn must return the loss as a one-element tensor that requires grad "
                                f"(return it, do not call backward), got {loss!r}")
            self._wrt = [i for i, p in enumerate(self.params) if p.requires_grad]
            grads = torch.autograd.grad(loss.reshape(()), [self.params[i] for i in self._wrt], create_graph=True,
                                        allow_unused=True)
        self.loss = loss.detach().reshape(())
        # Only gradients that still depend on the weights carry curvature.
        self._curved = [(i, g) for i, g in zip(self._wrt, grads) if g is not None and g.requires_grad]
        self.gradient = [torch.zeros_like(p) for p in self.params]
        for i, g in zip(self._wrt, grads):
            if g is not None:
                self.gradient[i] = g.detach()

    def __call__(self, vector: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        vector = list(vector)
        if len(vector) != len(self.params):
            raise ValueError(f"vector must have one tensor per parameter ({len(self.params)}), got {len(vector)}")
        out = [torch.zeros_like(p) for p in self.params]
        if self._curved:
            with torch.enable_grad():
                    parts = torch.autograd.grad([g for _, g in self._curved], [self.params[i] for i in self._wrt],
                                            grad_outputs=[vector[i].to(g.dtype) for i, g in self._curved],
                                            retain_graph=True, allow_unused=True)
            for i, part in zip(self._wrt, parts):
                if part is not None:
                    out[i] = part.detach()
        return mean_over_ranks(out) if self.average_over_ranks else out


def random_unit_vector(params: Sequence[torch.Tensor], seed: int = 0) -> List[torch.Tensor]:
    """A reproducible random direction of unit norm over all of ``params`` (drawn on the CPU, then moved)."""
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    return _divided(vector, global_norm(vector))


def _divided(vector: List[torch.Tensor], norm: torch.Tensor) -> List[torch.Tensor]:
    """Each tensor divided by the 0-d ``norm`` (cast to its dtype, copied once to each of its devices)."""
    on = {}
    for v in vector:
        if (v.device, v.dtype) not in on:
            on[v.device, v.dtype] = to_device(norm, v.device).to(v.dtype)
    return [v / on[v.device, v.dtype] for v in vector]


def _power_iterate(hvp: HessianOperator, vector: List[torch.Tensor]):
    """One step: (Rayleigh quotient v·Hv, Hv/||Hv||). Where Hv is 0 or non-finite v is kept, so the result
    stays a finite unit vector (decided on the device, no host read)."""
    product = hvp(vector)
    value = dot(vector, product)
    norm = global_norm(product)
    usable = torch.isfinite(norm) & (norm > 0)
    scale = torch.where(usable, 1.0 / norm, 0.0)
    on = {}  # (usable, scale) copied once to each device the parameters are on
    for h in product:
        if h.device not in on:
            on[h.device] = (to_device(usable, h.device), to_device(scale, h.device))
    nxt = [torch.where(on[h.device][0], h * on[h.device][1].to(h.dtype), v) for h, v in zip(product, vector)]
    return value, nxt


def power_iteration(hvp: HessianOperator, init: Sequence[torch.Tensor], iters: int):
    """``iters`` power-iteration steps from ``init`` (normalized here): returns (eigenvalue estimate as a
    0-dim tensor, unit eigenvector as a list). No host synchronization; the eigenvalue is the Rayleigh
    quotient of the last vector multiplied, the one of largest magnitude |λ| (signed)."""
    check_positive_int("iters", iters)
    vector = _divided(list(init), global_norm(init))
    value = None
    for _ in range(iters):
        value, vector = _power_iterate(hvp, vector)
    return value, vector


class Eigenpair(NamedTuple):
    value: float                 # eigenvalue of largest magnitude (the sharpness λ_max near a minimum)
    vector: List[torch.Tensor]   # unit norm over all parameters, one tensor per parameter
    iterations: int              # H v products taken


def top_eigenvector(loss_fn: LossFn, params: Union[torch.Tensor, Iterable[torch.Tensor]], iters: int = 20,
                    init: Optional[Sequence[torch.Tensor]] = None, tol: Optional[float] = None, seed: int = 0,
                    model: Optional[nn.Module] = None) -> Eigenpair:
    """The Hessian's eigenpair of largest |λ| at the current weights, by power iteration.

    ``init`` warm-starts from a previous eigenvector (default: a random direction from ``seed``). Stops
    after ``iters`` products, or earlier once the eigenvalue estimate moves by at most ``tol`` (relative)
    between two iterations (one host read per iteration then). ``model``: run ``loss_fn`` with BatchNorm
    running statistics frozen. Gradients (``.grad``) are never touched.

        >>> import torch
        >>> from tnlayers.optim import top_eigenvector
        >>> w = torch.tensor([1.0, 1.0], requires_grad=True)
        >>> loss_fn = lambda: 3.0 * w[0] ** 2 + 0.5 * w[1] ** 2  # Hessian diag(6, 1)
        >>> pair = top_eigenvector(loss_fn, [w], iters=50, tol=1e-8)
        >>> round(pair.value, 4), [round(abs(float(v)), 3) for v in pair.vector[0]]
        (6.0, [1.0, 0.0])
    """
    params = _check_params(params)
    check_positive_int("iters", iters)
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0
                            or not math.isfinite(tol)):
        raise ValueError(f"tol must be None or a finite number >= 0, got {tol!r}")
    if init is not None:
        init = list(init)
        if len(init) != len(params) or any(v.shape != p.shape for v, p in zip(init, params)):
            raise ValueError("init must hold one tensor per parameter, of the parameter's shape")
        if not bool(torch.isfinite(global_norm(init))) or float(global_norm(init)) == 0:
            raise ValueError("init must be a finite, non-zero vector")
    frozen = disable_running_stats(model) if model is not None else contextlib.nullcontext()
    with frozen:
        hvp = HessianOperator(loss_fn, params)
    vector = list(init) if init is not None else random_unit_vector(params, seed)
    value, vector = power_iteration(hvp, vector, 1)
    done = 1
    while done < iters:
        previous = value
        value, vector = _power_iterate(hvp, vector)
        done += 1
        if tol is not None and abs(float(value) - float(previous)) <= tol * abs(float(value)):
            break
    return Eigenpair(float(value), vector, done)


def max_hessian_eigenvalue(model: nn.Module, loss_fn: LossFn,
                           params: Union[torch.Tensor, Iterable[torch.Tensor], None] = None, iters: int = 50,
                           tol: Optional[float] = 1e-4, seed: int = 0) -> float:
    """The sharpness λ_max of ``loss_fn()`` at ``model``'s current weights: the Hessian eigenvalue of largest
    magnitude over ``params`` (default: every parameter of ``model`` that requires grad).

    Runs in the module's current mode (call ``model.eval()`` first for a Dropout-free loss); BatchNorm
    running statistics and ``.grad`` are left as they were. Costs one forward, one backward and up to
    ``iters`` double-backward passes.

        >>> import torch
        >>> from torch import nn
        >>> from tnlayers.optim import max_hessian_eigenvalue
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> loss_fn = lambda: model(x).pow(2).sum()  # Hessian 2 xᵀx = diag(8, 2)
        >>> round(max_hessian_eigenvalue(model, loss_fn, tol=1e-8), 4)
        8.0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    return top_eigenvector(loss_fn, params, iters=iters, tol=tol, seed=seed, model=model).value
