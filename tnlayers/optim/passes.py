"""How a training loop drives the optimizers' passes: :func:`training_step` runs one step of any of them
(one forward/backward for DAS, BAR and a plain optimizer; SAM's two, the second with BatchNorm statistics
frozen; X-SAM's power iteration on its eigen-update steps), written once for the examples and the demo.
(Checkpointing a run is ``tnlayers/training.py``.)"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .batchnorm import disable_running_stats
from .sam import SAM
from .xsam import XSAM

__all__ = ["training_step"]


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                  compute_loss: Callable[[], torch.Tensor]) -> torch.Tensor:
    """zero_grad, forward + backward through ``compute_loss()``, then the step; returns the loss (detached).

    For SAM this is its two passes, the second one inside :func:`disable_running_stats` so BatchNorm
    statistics are updated once per step, from the unperturbed weights (and, with ``sync_first_pass=False``,
    the first pass inside ``model.no_sync()``, as ``SAM.step(closure)`` does). For X-SAM, on eigen-update steps the
    power iteration runs first, on ``compute_loss`` with BatchNorm statistics frozen too (and inside
    ``model.no_sync()`` under DDP, whose reducer expects a backward pass after each synchronized forward).

        >>> import torch, tnlayers
        >>> from torch import nn
        >>> from tnlayers.optim import training_step
        >>> model = nn.Sequential(tnlayers.TTLinear(16, 16, rank=2), nn.ReLU(), nn.Linear(16, 1))
        >>> x, y = torch.randn(32, 16), torch.randn(32, 1)
        >>> compute_loss = lambda: nn.functional.mse_loss(model(x), y)
        >>> for opt in (tnlayers.DAS(model.parameters(), torch.optim.SGD, alpha=0.05, lr=0.1),
        ...             tnlayers.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)):
        ...     loss = training_step(model, opt, compute_loss)  # the same loop for one pass or two
        >>> loss.requires_grad, loss.shape
        (False, torch.Size([]))
    """
    if isinstance(optimizer, XSAM) and optimizer.eigen_update_due:
        local = model.no_sync() if callable(getattr(model, "no_sync", None)) else contextlib.nullcontext()
        with disable_running_stats(model), local:
            optimizer.update_eigenvector(compute_loss)
    optimizer.zero_grad(set_to_none=True)
    # SAM(sync_first_pass=False, model=ddp_model): the first pass stays local to each rank, as in step(closure).
    sync_model = getattr(optimizer, "_sync_model", None) if isinstance(optimizer, SAM) else None
    with sync_model.no_sync() if sync_model is not None else contextlib.nullcontext():
        loss = compute_loss()
        loss.backward()
    if isinstance(optimizer, SAM):
        optimizer.first_step()
        with disable_running_stats(model):
            compute_loss().backward()
    optimizer.step()
    return loss.detach()
