"""Is a cached inference weight still the cores' weight? The guard of the no-grad dense-weight cache.

PyTorch's version counter misses writes through ``.data`` (the usual EMA-teacher update) and through numpy
views, so the guard compares the cores' values with a copy taken when the weight was built: exact, and cheap
next to the dense op on CPU (cores are small next to the weight). On an accelerator any comparison the host
reads synchronizes with the device, so there it is one fused comparison per call, and
``with tnlayers.cached():`` skips it (the contract of ``torch.nn.utils.parametrize.cached()``).
Design notes: docs/design.md, 'Inference weight cache'.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..contract import autocast_dtype

__all__ = ["cached", "snapshot", "unchanged", "reuse_or_build"]

Snapshot = Union[List[torch.Tensor], torch.Tensor]
Entry = Tuple[tuple, torch.Tensor, Snapshot]  # (key, weight, the cores' values it was built from)
_NUMPY_MIN = 1 << 15  # entries from which numpy's vectorized == beats torch.equal on CPU (~4x at 128k entries)
_trusted = 0  # depth of open cached() contexts (global, like parametrize.cached's flag)


@contextlib.contextmanager
def cached() -> Iterator[None]:
    """Inside, tensorized layers reuse their no-grad dense weight without comparing the cores' values (the
    version counter, storage, dtype and device are still checked, so optimizer steps, ``copy_`` and
    ``load_state_dict`` are still seen). A write through ``.data`` or numpy inside the context is not: the
    same contract as ``torch.nn.utils.parametrize.cached()``. Worth it on CUDA, where each comparison
    synchronizes with the device; on CPU the comparison costs microseconds.

        >>> import torch, tnlayers
        >>> layer = tnlayers.TTLinear(16, 16, rank=2).eval()
        >>> with torch.no_grad(), tnlayers.cached():
        ...     y = layer(torch.randn(4, 16))
    """
    global _trusted
    _trusted += 1
    try:
        yield
    finally:
        _trusted -= 1


def reuse_or_build(cores: Sequence[torch.Tensor], entry: Optional[Entry],
                   build: Callable[[], torch.Tensor]) -> Entry:
    """``entry`` while it still is the cores' weight, else a new one from ``build()``. Its key holds the
    cores' version counters, storages, dtypes and devices, the autocast dtype and inference mode (a weight
    built in one of them is not the weight of another); then the values are compared (:func:`unchanged`)."""
    key = ([(c._version, c.data_ptr(), c.dtype, c.device) for c in cores],  # (a list: built faster than a tuple)
           autocast_dtype(cores[0].device.type), torch.is_inference_mode_enabled())
    if entry is None or entry[0] != key or not unchanged(cores, entry[2]):
        entry = (key, build().detach(), snapshot(cores))
    return entry


def snapshot(cores: Sequence[torch.Tensor]) -> Snapshot:
    """A copy of the cores' values: per core on CPU; one flat tensor elsewhere (one comparison, one sync)."""
    if cores[0].device.type == "cpu":
        return [c.detach().clone() for c in cores]
    return _flat(cores)


def unchanged(cores: Sequence[torch.Tensor], copy: Snapshot) -> bool:
    """True when every core holds, exactly, the values of ``copy`` (always, inside ``cached()``)."""
    if _trusted:
        return True
    if isinstance(copy, torch.Tensor):
        return torch.equal(_flat(cores), copy)
    for core, kept in zip(cores, copy):  # (a plain loop: ~1 us per core less than all() over a generator)
        if not (torch.equal(core, kept) if kept.numel() < _NUMPY_MIN else _equal_large(core, kept)):
            return False
    return True


def _flat(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([c.detach().reshape(-1) for c in cores])


def _equal_large(core: torch.Tensor, copy: torch.Tensor) -> bool:
    if core.shape != copy.shape:
        return False
    if core.dtype in (torch.float32, torch.float64):
        return bool((core.detach().numpy() == copy.numpy()).all())
    return torch.equal(core, copy)
