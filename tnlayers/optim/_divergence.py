"""Divergence told at the step it happens: after each step the optimizer wrappers check that the cores are
still finite, and warn once (a :class:`DivergenceWarning`) naming the layers whose cores are not.

The check is one multi-tensor norm over the cores (``torch._foreach_norm``: NaN or inf in a core makes its
norm non-finite) and one read of a vector with one entry per core. On CPU it is the 2-norm (2.5x faster
there than the max-abs norm), read at once; a 2-norm that overflowed on finite values (entries beyond ~1e19
in float32) is not taken for a divergence: flagged cores are confirmed entry by entry before any warning
(this rare path reads the cores themselves). On CUDA it is the max-abs norm, which cannot overflow, so its
verdict needs no confirmation from cores that later steps have changed: the vector is copied to pinned host
memory without waiting, and read at a later step once its copy is done, so the host never waits for the
device; the warning then comes a step or two late, but names the step it is about.
GradScaler's skipped steps change no core, so they never warn.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from .._caller import user_stacklevel
from ..groups import group_of
from .buckets import Buckets, one_bucket
from .norms import stat_dtype

__all__ = ["DivergenceWarning"]

_MAX_PENDING = 4  # CUDA: reads not yet done after this many steps are waited for (bounds the host copies)


class DivergenceWarning(RuntimeWarning):
    """A step of a tnlayers optimizer (SAM, GSAM, XSAM, DAS, BAR) left cores non-finite (NaN or inf): training
    has diverged. ``warnings.simplefilter("error", DivergenceWarning)`` turns it into an exception that stops
    the run at that step.

        >>> import warnings, torch, tnlayers
        >>> from tnlayers.optim import DivergenceWarning
        >>> layer = tnlayers.TTLinear(16, 16, rank=2)
        >>> opt = tnlayers.DAS(layer.named_parameters(), torch.optim.SGD, alpha=0.05, lr=0.1)
        >>> layer.cores[0].grad = torch.full_like(layer.cores[0], float("nan"))  # a gradient gone NaN
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     opt.step()  # writes NaN into core 0
        >>> [(w.category.__name__, str(w.message)[:56]) for w in caught]
        [('DivergenceWarning', 'training diverged: step 1 of this optimizer left NaN/inf')]
        >>> issubclass(DivergenceWarning, RuntimeWarning)
        True
    """


class _Core:
    __slots__ = ("tensor", "token", "name")

    def __init__(self, tensor: torch.Tensor, token: Any, name: Optional[str]):
        self.tensor, self.token, self.name = tensor, token, name


class DivergenceWatch:
    """One per optimizer: :meth:`after_step` once each step, after the parameters are updated."""

    def __init__(self):
        self.steps = 0
        self.warned = False
        self._cores: Optional[List[_Core]] = None  # rebuilt when the param groups change
        self._buckets: Optional[Buckets] = None  # with _cores: cores over several devices or dtypes
        self._tensors: Optional[List[torch.Tensor]] = None  # with _cores: the cores, when not sharded
        self._dtype = torch.float32  # with _cores: the dtype of their norms
        self._pending: List[Tuple[Any, torch.Tensor, int, List[_Core]]] = []  # CUDA: (event, host copy, step, cores)

    def __getstate__(self) -> Dict[str, Any]:  # deepcopy/pickle of the optimizer: no CUDA events, no stale list
        return {**self.__dict__, "_cores": None, "_buckets": None, "_tensors": None, "_pending": []}

    def forget_cores(self) -> None:
        self._cores = self._buckets = self._tensors = None

    def _core_list(self, param_groups) -> List[_Core]:
        if self._cores is None:
            self._cores = [_Core(p, group_of(p), names[i] if names else None)
                           for g in param_groups for names in [g.get("param_names")]
                           for i, p in enumerate(g["params"]) if group_of(p) is not None]
            tensors = [_local(c.tensor) for c in self._cores]
            if tensors and not one_bucket(tensors):
                self._buckets = Buckets(tensors)
            # plain tensors are the same objects every step: listed once (a DTensor's local shard is not)
            sharded = any(t is not c.tensor for t, c in zip(tensors, self._cores))
            self._tensors = None if sharded else tensors
            self._dtype = stat_dtype(tensors)
        return self._cores

    @torch.no_grad()
    def after_step(self, param_groups) -> None:
        self.steps += 1
        if self.warned:
            return  # once per optimizer: after a divergence every later step is non-finite too
        cores = self._core_list(param_groups)
        if not cores:
            return
        self._read_done()
        deferred = _local(cores[0].tensor).device.type == "cuda"
        tensors = self._tensors if self._tensors is not None else [_local(c.tensor) for c in cores]
        norms = _norms(tensors, math.inf if deferred else 2, self._buckets, self._dtype)
        if not deferred:
            self._report(cores, norms, self.steps, confirm=True)
            return
        host = torch.empty(norms.shape, dtype=norms.dtype, pin_memory=True)
        host.copy_(norms, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, host, self.steps, cores))

    def _read_done(self) -> None:
        """Report the earlier CUDA checks whose copies are done (waiting only for ones long overdue)."""
        while self._pending and not self.warned:
            event, host, step, cores = self._pending[0]
            if not event.query():
                if len(self._pending) < _MAX_PENDING:
                    return
                event.synchronize()
            self._pending.pop(0)
            self._report(cores, host, step, confirm=False)

    def _report(self, cores: List[_Core], norms: torch.Tensor, step: int, confirm: bool) -> None:
        """Warn if ``norms`` (of the cores after ``step``) flag a core; ``confirm``: 2-norms, which may have
        overflowed, of cores not changed since: look at the flagged cores' entries."""
        if math.isfinite(float(norms.sum())):  # norms are >= 0: their sum is finite iff each is (or overflowed)
            return
        finite = torch.isfinite(norms)
        bad = [cores[i] for i in (~finite).nonzero().flatten().tolist()]
        if confirm:
            bad = [c for c in bad if not bool(torch.isfinite(_local(c.tensor)).all())]
        if not bad:
            return  # the 2-norm of finite (huge) values overflowed
        self.warned = True
        self._pending.clear()
        warnings.warn(_message(cores, bad, step), DivergenceWarning, stacklevel=user_stacklevel())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a sharded core: this rank's shard


def _norms(tensors: List[torch.Tensor], order: float, buckets: Optional[Buckets], dtype: torch.dtype) -> torch.Tensor:
    """The ``order``-norm of every core (``tensors``: the cores, or their local shards), as one vector on the
    first core's device (NaN/inf where a core holds NaN/inf), in ``dtype``; ``buckets``: the cores' (device,
    dtype) plan when one launch does not cover them."""
    if order == math.inf and any(t.numel() == 0 for t in tensors):  # an empty shard: its max has no value
        tensors = [t if t.numel() else t.new_zeros(1) for t in tensors]
    if buckets is None:
        return torch.stack(torch._foreach_norm(tensors, order, dtype=dtype))
    return buckets.norms([tensors], order, dtype)  # a model over devices or dtypes: one launch per bucket


def _group_label(cores: List[_Core], token: Any, order: List[Any]) -> str:
    members = [c for c in cores if c.token == token]
    names = {re.sub(r"\.?cores\.\d+$", "", c.name) for c in members if c.name is not None}
    where = f"layer {names.pop() or '<model>'!r}, " if len(names) == 1 else ""
    shapes = [tuple(c.tensor.shape) for c in members]
    return f"{where}core group {order.index(token)} of {len(order)} (core shapes {shapes})"


def _message(cores: List[_Core], bad: List[_Core], step: int) -> str:
    order = list(dict.fromkeys(c.token for c in cores))
    tokens = list(dict.fromkeys(c.token for c in bad))
    listed = "; ".join(_group_label(cores, t, order) for t in tokens[:3])
    more = f"; and {len(tokens) - 3} more group(s)" if len(tokens) > 3 else ""
    hint = "" if any(c.name for c in cores) else (
        " (build the optimizer on model.named_parameters() to have the layers named)")
    return (f"training diverged: step {step} of this optimizer left NaN/inf in the cores of {len(tokens)} "
            f"layer(s): {listed}{more}{hint}. Every later step keeps them non-finite, and a checkpoint saved "
            f"from here is refused at load; lower the learning rate, or clip gradients. (Warned once per "
            f"optimizer.)")
