"""Norm-dynamics diagnostics per core group, as flat dicts of floats for logging.

The quantities: docs/design.md, 'Norm deviation: s_k, γ_k, Q and Cov'.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from ..groups import core_groups
from .buckets import squared_norms, to_device
from .norms import stat_dtype

__all__ = ["NormDynamics"]


class NormDynamics:
    """Records, per core group of ``model``: the core norms s_k = ||G_k||², the gradient norms γ_k =
    ||g_k||², Q = Σ_k (s_k − mean s)², Cov(s, γ) = mean_k (s_k − mean s)(γ_k − mean γ), and, when
    ``optimizer`` is a DAS/BAR optimizer, the λ_k it applied at its last step.

    ``record()`` returns ``{"<layer>/Q": .., "<layer>/cov": .., "<layer>/s0": .., "<layer>/grad0": ..,
    "<layer>/lambda0": .., ...}`` (floats). It reads everything back from the device in one transfer, so
    it costs a few small kernels and one sync: call it every N steps, after ``backward()`` (for γ).
    A core without a gradient reports γ = NaN (and so does its group's Cov); a core the optimizer did not
    rescale reports λ = 0. The root module's group is named ``"model"``. Also importable as
    ``tnlayers.metrics.NormDynamics``, next to :func:`~tnlayers.norm_deviation` and :func:`~tnlayers.norm_report`.

    Example::

        >>> import torch, tnlayers
        >>> from torch import nn
        >>> model = nn.Sequential(tnlayers.TTLinear(16, 16, rank=2), nn.ReLU(), nn.Linear(16, 1))
        >>> x, y = torch.randn(32, 16), torch.randn(32, 1)
        >>> opt = tnlayers.DAS(model.parameters(), torch.optim.SGD, alpha=0.05, lr=0.1)
        >>> dynamics = tnlayers.optim.NormDynamics(model, opt)
        >>> nn.functional.mse_loss(model(x), y).backward()
        >>> opt.step()
        >>> row = dynamics.record(keep=True)  # after backward(): γ_k are this step's gradient norms
        >>> sorted(k for k in row if k.endswith("0"))
        ['0/grad0', '0/lambda0', '0/s0']
        >>> row["0/Q"] >= 0, len(dynamics.history)
        (True, 1)
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.history: List[Dict[str, float]] = []

    @torch.no_grad()
    def record(self, keep: bool = False) -> Dict[str, float]:
        """The diagnostics now; with ``keep=True`` also appended to ``self.history``."""
        groups = core_groups(self.model)
        if not groups:
            return {}
        cores = [c for _, cs in groups for c in cs]
        dtype = stat_dtype(cores)
        s = squared_norms(cores, dtype)  # on the first core's device, wherever (and of whatever dtype) the cores are
        with_grad = [c for c in cores if c.grad is not None]
        gamma = torch.full_like(s, float("nan"))
        if with_grad:
            positions = torch.tensor([i for i, c in enumerate(cores) if c.grad is not None], device=s.device)
            gamma[positions] = to_device(squared_norms([c.grad for c in with_grad], dtype), s.device)
        lambdas = self._applied_lambdas(cores, s)

        rows = []
        start = 0
        for _, cs in groups:
            part = slice(start, start + len(cs))
            s_dev = s[part] - s[part].mean()
            rows.append(torch.stack([s_dev.square().sum(), (s_dev * (gamma[part] - gamma[part].mean())).mean()]))
            start += len(cs)
        q_cov = torch.stack(rows).tolist()
        s, gamma, lambdas = s.tolist(), gamma.tolist(), lambdas.tolist()

        out: Dict[str, float] = {}
        start = 0
        for (name, cs), (q, cov) in zip(groups, q_cov):
            name = name or "model"
            out[f"{name}/Q"] = q
            out[f"{name}/cov"] = cov
            for k in range(len(cs)):
                out[f"{name}/s{k}"] = s[start + k]
                out[f"{name}/grad{k}"] = gamma[start + k]
                out[f"{name}/lambda{k}"] = lambdas[start + k]
            start += len(cs)
        if keep:
            self.history.append(out)
        return out

    __call__ = record

    def _applied_lambdas(self, cores: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        lambdas = torch.zeros_like(like)
        applied = getattr(self.optimizer, "last_lambdas", None)
        if applied is None:
            return lambdas
        position = {id(c): i for i, c in enumerate(cores)}
        rescaled, values = applied
        pairs = [(position[id(c)], j) for j, c in enumerate(rescaled) if id(c) in position]
        if pairs:
            where, which = zip(*pairs)
            lambdas[torch.tensor(where, device=like.device)] = values[torch.tensor(which, device=values.device)].to(like)
        return lambdas
