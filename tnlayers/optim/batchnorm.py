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
def disable_running_stats(model: nn.Module):
    """Within the block, BatchNorm layers of ``model`` normalize with batch statistics but leave
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched.

    Use it around SAM's second forward pass, so each step updates the running statistics once, from the
    unperturbed weights. (Setting momentum to 0, the common trick, still counts the batch in
    ``num_batches_tracked`` and breaks ``momentum=None``; not tracking for the pass does neither.)
    """
    modules = [m for m in batchnorm_modules(model) if m.track_running_stats]
    for module in modules:
        module.track_running_stats = False
    try:
        yield model
    finally:
        for module in modules:
            module.track_running_stats = True
