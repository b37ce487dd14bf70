"""One optimizer step of any of our optimizers, written once for the examples and the demo."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ._common import disable_running_stats
from .sam import SAM

__all__ = ["training_step"]


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                  compute_loss: Callable[[], torch.Tensor]) -> torch.Tensor:
    """zero_grad, forward + backward through ``compute_loss()``, then the step; returns the loss (detached).

    For SAM this is its two passes, the second one inside :func:`disable_running_stats` so BatchNorm
    statistics are updated once per step, from the unperturbed weights.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss()
    loss.backward()
    if isinstance(optimizer, SAM):
        optimizer.first_step()
        with disable_running_stats(model):
            compute_loss().backward()
    optimizer.step()
    return loss.detach()
