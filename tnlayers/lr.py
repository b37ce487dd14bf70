"""Per-core learning rates that make one SGD step on the cores move the weight as far as a dense step.

A tensorized layer's weight W = Φ(G_1..G_K) is multilinear in its cores. One SGD step of size η on the
cores, with the gradients g_k = J_kᵀ G (J_k = ∂W/∂G_k, G = ∂L/∂W), moves W to first order by

    ΔW = -η Σ_k m_k J_k J_kᵀ G          (m_k: core k's learning-rate multiplier; plain SGD: m_k = 1)

against ΔW = -η G for a step on a dense W. ``docs/design.md`` (section "The step size on W") derives the
ratio ρ = ‖ΔW_cores‖ / ‖ΔW_dense‖: each J_k J_kᵀ scales with ‖W‖² / ‖G_k‖² (the product of the other
cores' squared norms), so ρ depends on the format, the rank, the balance of the cores and the init scale,
and ranges from 0.3 to beyond 10 over common layers. :func:`param_groups` picks

    m_k = c · ‖G_k‖² / ‖W‖²,   c such that ρ = ``target`` for a random Gaussian G,

measured once per layer as the root mean square over 8-128 Gaussian probes, as many as its spread needs
(first order, exactly: per probe one backward and K forward contractions of the layer's network).
‖G_k‖²/‖W‖² undoes the scaling of J_k J_kᵀ (so the multipliers follow any rebalancing of the cores), c sets
the overall size.

Opt-in, and measured not to prevent divergence of BN-free CNNs at the dense lr: ρ grows with the weight
scale during training, which a match at init does not follow (``benchmarks/results/lr_transfer.md``,
``docs/design.md``). :func:`tnlayers.precondition_core_grads_` follows it at every step instead (ρ ≤ 1 at
any scale).

    >>> import torch, tnlayers
    >>> model = torch.nn.Sequential(tnlayers.TuckerLinear(16, 16, rank=4), torch.nn.Linear(16, 2))
    >>> opt = torch.optim.SGD(tnlayers.lr.param_groups(model, lr=0.05), momentum=0.9)
    >>> sorted({round(g["lr"] / 0.05, 6) == 1.0 for g in opt.param_groups})  # the cores' lrs differ from 0.05
    [False, True]
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ._caller import warn_user
from .groups import core_groups, group_module

__all__ = ["param_groups", "core_lr_multipliers", "step_ratio"]


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _reconstruct(network, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The network's full tensor (modes in order) from ``cores``: one einsum."""
    return torch.einsum(network.equation(), *cores)


def _first_order_step(network, cores, grads, multipliers) -> torch.Tensor:
    """Σ_k m_k J_k g_k: the directional derivative of the (multilinear) reconstruction along m_k g_k."""
    total = None
    for k, (g, m) in enumerate(zip(grads, multipliers)):
        term = m * _reconstruct(network, [g if j == k else c for j, c in enumerate(cores)])
        total = term if total is None else total + term
    return total


def step_ratio(module: nn.Module, grad: Optional[torch.Tensor] = None, multipliers: Optional[Sequence[float]] = None,
               generator: Optional[torch.Generator] = None) -> float:
    """First-order ‖ΔW_cores‖ / ‖ΔW_dense‖ of one SGD step (any lr) for the core module ``module`` (a
    tnlayers layer, :class:`~tnlayers.FactorizedTensor` or adapter) with per-core lr ``multipliers``
    (default 1). ``grad``: ∂L/∂W in the network's mode order (``layer._weight_to_modes(G)`` for a layer's
    weight-shaped G); default a standard Gaussian drawn from ``generator``. Computed in float64.

        >>> import torch, tnlayers
        >>> layer = tnlayers.TuckerLinear(64, 64, rank=4)
        >>> ratio = tnlayers.lr.step_ratio(layer, generator=torch.Generator().manual_seed(0))
        >>> isinstance(ratio, float) and ratio > 0
        True
    """
    network = module.network
    cores = [c.detach().to(torch.float64).requires_grad_() for c in module.core_parameters()]
    multipliers = [1.0] * len(cores) if multipliers is None else [float(m) for m in multipliers]
    if len(multipliers) != len(cores):
        raise ValueError(f"multipliers: one per core ({len(cores)}), got {len(multipliers)}")
    if grad is None:
        grad = torch.randn(network.modes, generator=generator, dtype=torch.float64).to(cores[0].device)
    grad = grad.to(device=cores[0].device, dtype=torch.float64)
    if tuple(grad.shape) != tuple(network.modes):
        raise ValueError(f"grad must have the network's mode shape {tuple(network.modes)}, got {tuple(grad.shape)}")
    with torch.enable_grad():
        grads = torch.autograd.grad(_reconstruct(network, cores), cores, grad)
    with torch.no_grad():
        step = _first_order_step(network, [c.detach() for c in cores], grads, multipliers)
    return float(torch.linalg.vector_norm(step) / torch.linalg.vector_norm(grad))


def core_lr_multipliers(module: nn.Module, target: float = 1.0, seed: int = 0,
                        probes: Optional[int] = None) -> Optional[List[float]]:
    """The multipliers m_k = c · ‖G_k‖²/‖W‖² of ``module``'s cores (see the module docstring), or ``None``
    when they are undefined: W or a core is zero (a zero-initialized adapter update) or not finite. c makes
    the root mean square of the ratio over Gaussian gradients equal ``target`` (the mean square is what a
    random G sees on average). ``probes``: how many gradients; default: drawn until the mean square's
    standard error is within 4% of it (the root mean square then within ~2%), at least 8 and at most 128 -
    one probe's ratio varies by up to ~30% (std/mean), on small and large layers alike.

        >>> import tnlayers
        >>> layer = tnlayers.TuckerLinear(64, 64, rank=4)
        >>> multipliers = tnlayers.lr.core_lr_multipliers(layer, probes=8)
        >>> len(multipliers) == len(layer.cores), all(m > 0 for m in multipliers)
        (True, True)
    """
    target = _check_positive("target", target)
    network = module.network
    with torch.no_grad():
        cores = [c.detach().to(torch.float64) for c in module.core_parameters()]
        w2 = float(torch.linalg.vector_norm(_reconstruct(network, cores)) ** 2)
        s = [float(torch.linalg.vector_norm(c) ** 2) for c in cores]
    if not (math.isfinite(w2) and w2 > 0 and all(math.isfinite(x) and x > 0 for x in s)):
        return None
    base = [x / w2 for x in s]
    generator = torch.Generator().manual_seed(seed)
    rho = math.sqrt(_mean_square(lambda: step_ratio(module, multipliers=base, generator=generator), probes))
    if not (math.isfinite(rho) and rho > 0):
        return None
    return [target * b / rho for b in base]


def _mean_square(draw, probes: int | None, low: int = 8, high: int = 128, rel_error: float = 0.04) -> float:
    """The mean of ``draw() ** 2`` over ``probes`` draws, or (``probes=None``) over draws until its standard
    error is below ``rel_error`` of it (at least ``low``, at most ``high`` draws)."""
    squares: List[float] = []
    while len(squares) < (probes or high):
        squares.append(draw() ** 2)
        n = len(squares)
        if probes is None and n >= low:
            mean = sum(squares) / n
            variance = sum((x - mean) ** 2 for x in squares) / (n - 1)
            if math.sqrt(variance / n) <= rel_error * mean:
                break
    return sum(squares) / len(squares)


def param_groups(model: nn.Module, lr: float, *, target: float = 1.0, seed: int = 0,
                 **options: Any) -> List[Dict[str, Any]]:
    """torch.optim param groups for ``model`` in which each core of each tensorized layer has its own lr,
    ``lr · m_k``, chosen so that at the cores' current values one SGD step moves every layer's weight as far
    (first order, for a random Gaussian gradient) as a step of size ``lr`` on a dense weight, times ``target``.

    Call it at initialization (or whenever the cores are where the matching should hold); the multipliers
    are fixed numbers afterwards, and LR schedulers scale them all alike. The first group holds every other
    parameter at ``lr``; each core group carries ``lr_multiplier`` (m_k) and ``layer`` (the module's name)
    besides ``lr`` and ``params``. ``options`` (``weight_decay=``, ``momentum=``, ...) go into every group.
    Works with any torch.optim optimizer and with DAS, SAM, BAR (which read each core's ``lr`` from its group:
    DAS's rescale λ_k and BAR's step use that core's lr). A layer whose weight or a core is zero or not
    finite (a zero-initialized adapter update) keeps ``lr`` for its cores, with one warning naming it.

    Example::

        >>> import torch, tnlayers
        >>> model = torch.nn.Sequential(tnlayers.TuckerLinear(16, 16, rank=4), torch.nn.Linear(16, 2))
        >>> groups = tnlayers.lr.param_groups(model, lr=0.05, momentum=0.9)
        >>> [(len(g["params"]), g.get("layer")) for g in groups]  # the dense parameters, then one group per core
        [(3, None), (1, '0'), (1, '0'), (1, '0')]
        >>> opt = torch.optim.SGD(groups, momentum=0.9)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects an nn.Module, got {type(model).__name__}")
    lr = _check_positive("lr", lr)
    target = _check_positive("target", target)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    reserved = {"params", "lr", "lr_multiplier", "layer"} & set(options)
    if reserved:
        raise ValueError(f"param_groups sets {sorted(reserved)} itself; pass the other group options only")
    groups, seen, plain = [], set(), []
    unmatched = []
    for name, cores in core_groups(model):
        if any(id(c) in seen for c in cores):
            continue  # a group shared by two modules: its lrs come from the first
        module = group_module(model, name)
        multipliers = core_lr_multipliers(module, target, seed) if hasattr(module, "network") else None
        if multipliers is None:
            unmatched.append(name or type(module).__name__)
            multipliers = [1.0] * len(cores)
        for core, m in zip(cores, multipliers):
            seen.add(id(core))
            groups.append({"params": [core], "lr": lr * m, "lr_multiplier": m, "layer": name, **options})
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            plain.append(p)
    if unmatched:
        warn_user(f"param_groups: no lr matching for {', '.join(unmatched)} (a zero or non-finite weight or "
                  "core); their cores keep lr")
    return ([{"params": plain, "lr": lr, **options}] if plain else []) + groups
