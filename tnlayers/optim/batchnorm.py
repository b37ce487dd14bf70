"""BatchNorm around the optimizers' extra passes: SAM's second forward pass and the Hessian's power
iteration must not update the running statistics a second time."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["disable_running_stats", "batchnorm_modules"]


def batchnorm_modules(model: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    return (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


@contextlib.contextmanager
def disable_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, BatchNorm layers of ``model`` normalize with batch statistics but leave
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched.

    Use it around SAM's second forward pass, so each step updates the running statistics once, from the
    unperturbed weights. (Setting momentum to 0, the common trick, still counts the batch in
    ``num_batches_tracked`` and breaks ``momentum=None``; not tracking for the pass does neither.)

        >>> import torch
        >>> from torch import nn
        >>> from tnlayers.optim import disable_running_stats
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> with disable_running_stats(model):
        ...     _ = model(torch.randn(8, 4))
        >>> int(model[1].num_batches_tracked), model[1].track_running_stats
        (0, True)
    """
    modules = [m for m in batchnorm_modules(model) if m.track_running_stats]
    for module in modules:
        module.track_running_stats = False
    try:
        yield model
    finally:
        for module in modules:
            module.track_running_stats = True
