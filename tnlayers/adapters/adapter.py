"""What every adapter shares: a frozen base layer, the cores of ΔW (one scale-invariant group), the
scale α/r, merging into the base weight, and the choice between two ways of computing the output.

Two ways, same result (up to rounding):
- "dense": the base layer's own op with the weight W + scale·ΔW (ΔW rebuilt from the cores each call);
- "factorized": base(x) + scale·ΔW·dropout(x), with x contracted through the cores when the layout allows.
"flops" picks the cheaper by a FLOP estimate per input shape; "auto" starts from it and, where it is not
decisive, times both ways once, as tensorized layers do (:mod:`tnlayers.strategy`: same thresholds, and
adapters alike share decisions); ``tnlayers.set_strategy`` overrides both. With gradients, the dense way also
pays the gradient of the full weight (one more product of the layer's size) and the factorized way pays its
contraction about three times (forward and two backward products); without gradients, each pays once.
Dropout on the adapter's input (as LoRA's) needs the factorized way while training.
"""
from __future__ import annotations

import contextlib
import math
from math import prod
from numbers import Real
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

from ..contract import expression
from ..formats._rank import check_int_rank
from ..init import init_cores_, kaiming_std
from ..layers.base import CoreModule
from ..strategy import STRATEGIES, ModuleChoices, check_strategy, chooser, timing_run
from .delta import delta_layout, get_adapter_format

__all__ = ["Adapter", "INITS", "STRATEGIES", "check_number", "check_adapter_options"]

INITS = ("zero", "random")
MERGE_BLOCKS = 8  # merge builds ΔW in up to this many blocks of output rows: at most ~1/8 of a layer at a time
# _merge_stamp after load_state_dict replaced a merged adapter's base weight without the cores and merged flag
# saved with it: which ΔW that weight holds is unknown
_UNKNOWN_DELTA = "base weight loaded without its cores"


def check_number(name: str, value, low: float, high: float, low_open: bool, high_open: bool) -> float:
    """A finite real number in the interval; the error names the argument and the interval."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return value


def check_adapter_options(format, rank, alpha, dropout, init, strategy):
    """(format module, rank, alpha, dropout) after checking every option an adapter takes."""
    fmt = get_adapter_format(format)
    rank = check_int_rank(rank, "rank")
    alpha = check_number("alpha", alpha, 0.0, math.inf, low_open=True, high_open=True)
    dropout = check_number("dropout", dropout, 0.0, 1.0, low_open=False, high_open=True)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    check_strategy(strategy)
    return fmt, rank, alpha, dropout


class Adapter(CoreModule):
    """Base class of :class:`LinearAdapter` and :class:`Conv2dAdapter`: ``base(x) + scale·ΔW x``.

    Attributes: ``base`` (the wrapped layer, frozen), ``cores`` (ΔW's cores, one scale-invariant group
    for DAS/SAM/BAR), ``scale`` (= alpha / rank), ``merged`` (ΔW folded into ``base.weight``).
    ``alpha`` is the adapter's output scale (scale = alpha / rank, LoRA's ``lora_alpha``), unrelated to the
    ``alpha`` of DAS, BAR or GSAM.

        >>> import torch, tnlayers
        >>> from tnlayers.adapters import Adapter
        >>> adapter = tnlayers.adapters.LinearAdapter(torch.nn.Linear(16, 16), "lora", rank=2, alpha=4)
        >>> isinstance(adapter, Adapter), adapter.scale, adapter.delta_weight().abs().max().item()
        (True, 2.0, 0.0)
    """

    def _setup(self, base: nn.Module, format, rank: int, alpha: float, dropout: float, init: str,
               strategy: str, dims: Tuple[int, int, Tuple[int, ...]], out_shape=None, in_shape=None) -> None:
        fmt, rank, alpha, dropout = check_adapter_options(format, rank, alpha, dropout, init, strategy)
        out_dim, in_dim, kernel = dims
        layout = delta_layout(fmt, out_dim, in_dim, kernel, rank, out_shape, in_shape)
        self.base = base.requires_grad_(False)  # frozen: only the cores train
        weight = base.weight
        self._init_cores(layout.network, weight.device, weight.dtype)
        self.roles, self.zero_core = layout.roles, layout.zero_core
        self.out_shape, self.in_shape = layout.out_shape, layout.in_shape
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.init, self.strategy = init, strategy
        self.fan_in = in_dim * prod(kernel)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # merge(keep_original=True) keeps the base weight it overwrote, so unmerge() restores it bit for bit
        self.register_buffer("weight_before_merge", None, persistent=False)
        # (id, version counter) of each core at merge: unmerge() subtracts ΔW again, which must be the one added
        self._merge_stamp = None
        # what a timed choice depends on besides the input (the base's repr holds its shape, stride, padding,
        # groups): adapters alike share decisions (tnlayers.strategy)
        self._choices = ModuleChoices((type(self).__name__, self.network.cores,
                                       tuple(sorted(self.network.sizes.items())), repr(base)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The cores as a tnlayers layer's (variance-preserving at Kaiming's std), then, for init="zero",
        the first core holding an output mode set to zero, so that ΔW = 0."""
        init_cores_(self.cores, self.network, kaiming_std(self.fan_in))
        if self.init == "zero":
            self.cores[self.zero_core].zero_()

    # -- ΔW ---------------------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (as the base layer stores it); ``delta_weight()`` is the update."""
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def _delta_shape(self) -> Tuple[int, ...]:
        raise NotImplementedError

    def _to_base_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW in the base weight's layout (the same, except for a transposed GPT-2 Conv1D)."""
        return delta

    def delta_weight(self) -> torch.Tensor:
        """scale·ΔW, shaped (out, in[, kh, kw]) like an ``nn.Linear``/``nn.Conv2d`` weight."""
        self._check_materialized("delta_weight")
        # contiguous: a contraction's output may come transposed, and W + ΔW would inherit that layout (for a
        # 1x1 conv it reads as channels-last), sending the base op to another kernel than base(x) runs
        return (self.scale * self.plan.weight(self.core_parameters()).reshape(self._delta_shape())).contiguous()

    def _each_block(self, visit: Callable[[torch.Tensor, torch.Tensor], Any]) -> List[Any]:
        """``visit(ΔW / scale for a block of output rows, the base weight's block viewed with the same axes)`` for
        each block, the cores' contraction with the first output mode sliced into up to ``MERGE_BLOCKS`` parts;
        the results, in order. Merge and unmerge add each block in place, so beyond the model they hold one
        block and the contraction's small intermediates, never a whole layer's ΔW or a copy of the weight. No
        autocast: unmerge must subtract exactly what merge added."""
        device = self.base.weight.device.type
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext():
            return self._blocks(visit)

    def _blocks(self, visit) -> List[Any]:
        self._check_materialized("merge")
        plan, net = self.plan, self.network
        modes = [*plan.out_modes, *plan.in_modes, *plan.spatial_modes]
        equation, first = net.equation(modes), modes[0]
        holder, axis = next((k, labels.index(first)) for k, labels in enumerate(net.cores) if first in labels)
        cores = list(self.core_parameters())
        size = net.sizes[first]
        rows = prod(net.sizes[m] for m in plan.out_modes[1:])  # output rows per index of the first output mode
        weight = self._to_base_layout(self.base.weight)  # (out, in[, kh, kw]): a transpose is its own inverse
        step = -(-size // min(size, MERGE_BLOCKS))
        results = []
        for start in range(0, size, step):
            part = list(cores)
            part[holder] = cores[holder].narrow(axis, start, min(step, size - start))
            delta = expression(equation, tuple(tuple(c.shape) for c in part))[0](*part)  # plans cached per shape
            block = weight.narrow(0, start * rows, delta.shape[0] * rows)
            try:
                block = block.view(delta.shape)  # splits the channel axes (merges kh, kw for TT/TR)
            except RuntimeError:  # a weight stored so that no such view exists: reshape ΔW's block instead
                delta = delta.reshape(block.shape)
            results.append(visit(delta, block))
            del delta, block  # before the next block is built: one block alive at a time
        return results

    def _apply_delta(self, sign: int) -> None:
        self._each_block(lambda delta, block: block.add_(delta, alpha=sign * self.scale))

    @staticmethod
    def _finite(delta: torch.Tensor) -> bool:
        # aminmax: NaN propagates, and no mask of the block's size as isfinite(delta) makes; over the axes in
        # memory order, since it copies a permuted block (as a contraction's output may come) first
        low, high = torch.aminmax(delta.permute(sorted(range(delta.dim()), key=lambda i: -delta.stride(i))))
        return bool(torch.isfinite(low) & torch.isfinite(high))

    @torch.no_grad()
    def _mergeable(self) -> bool:
        """Whether :meth:`merge` would accept this adapter (its ΔW is finite); changes nothing."""
        return self.merged or all(self._each_block(lambda delta, block: self._finite(delta)))

    @torch.no_grad()
    def merge(self, keep_original: bool = False) -> None:
        """Add scale·ΔW into ``base.weight`` in place (a no-op when merged); forward is then ``base(x)`` alone.
        ``keep_original=True`` also keeps a copy of the weight, for a bitwise :meth:`unmerge`; without it
        unmerge subtracts ΔW again (round-off: :func:`tnlayers.adapters.merge`)."""
        if not isinstance(keep_original, bool):
            raise TypeError(f"keep_original must be True or False, got {keep_original!r}")
        if self.merged:
            return
        if not self._mergeable():  # checked whole before the first block is added
            raise ValueError(f"merge: the update of this {type(self).__name__} holds non-finite values (NaN or inf); "
                             f"the base weight was left as it is")
        self._merge_checked(keep_original)

    def _merge_checked(self, keep_original: bool) -> None:
        """merge, once ``_mergeable()`` said yes (``tnlayers.adapters.merge`` checks every adapter first)."""
        if keep_original:
            self.weight_before_merge = self.base.weight.detach().clone()
        self._apply_delta(+1)
        self._merge_stamp = self._core_stamp()
        self.merged = True

    def _core_stamp(self) -> Tuple[Tuple[int, int], ...]:
        return tuple((id(c), c._version) for c in self.cores)

    def _check_cores_unchanged(self, name: Optional[str] = None) -> None:
        """Refuse to subtract a ΔW other than the one merge added: the cores changed in place since (an
        optimizer step, ``load_state_dict``, an edit under ``no_grad``; ``.data`` writes are not seen). A copy of
        the model (``deepcopy``, pickling) holds other core objects, whose counters started afresh: not checked."""
        stamp = self._merge_stamp
        what = f"this {type(self).__name__}" if name is None else f"{type(self).__name__} {name!r}"
        fix = ("keep the merged weight (unadapt(model, merge=True)); merge(model, keep_original=True) keeps a copy of "
               "each weight that unmerge restores whatever the cores")
        if stamp == _UNKNOWN_DELTA:
            raise ValueError(f"unmerge: load_state_dict replaced the base weight of {what} while merged, without "
                             f"the cores and merged flag saved with it, so which ΔW that weight holds is unknown; load "
                             f"the whole state saved with it, or {fix}")
        if stamp is None:
            return
        changed = [k for k, (core, (ident, version)) in enumerate(zip(self.cores, stamp))
                   if id(core) == ident and core._version != version]
        if changed:
            raise ValueError(f"unmerge: cores {changed} of {what} changed since merge (an optimizer step, "
                             f"load_state_dict or an in-place edit while merged); the base weight holds the ΔW of the "
                             f"cores at merge time, and subtracting today's ΔW would not restore "
                             f"it. Load the state saved while merged (base weight and cores together), or {fix}")

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW out of ``base.weight`` again (a no-op when not merged): bit for bit from the kept copy after
        ``merge(keep_original=True)``, else by subtracting the ΔW of the same cores (within the round-off
        :func:`tnlayers.adapters.merge` states); refused if the cores changed since merge."""
        if not self.merged:
            return
        if self.weight_before_merge is not None:
            self.base.weight.copy_(self.weight_before_merge)
        else:
            self._check_cores_unchanged()
            self._apply_delta(-1)
        self.weight_before_merge = None
        self._merge_stamp = None
        self.merged = False

    # -- state --------------------------------------------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.merged)  # a tensor, so safetensors-based checkpoints can hold it too

    def set_extra_state(self, state: Any) -> None:
        pass  # checked in _load_from_state_dict, before anything is copied

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        flag = state_dict.get(prefix + "_extra_state")
        if flag is not None and bool(flag) != self.merged:
            saved, here = ("merged", "not merged") if bool(flag) else ("not merged", "merged")
            raise ValueError(f"load_state_dict: {prefix or '<model>'!r} was saved {saved} but is {here} here: its base "
                             f"weight would count ΔW {'twice' if bool(flag) else 'not at all'}; call "
                             f"{'merge' if bool(flag) else 'unmerge'} on the model before loading")
        if self.merged and prefix + "base.weight" in state_dict:
            # the loaded base weight replaces the one merge kept a copy of; saved merged (checked above), it holds
            # the ΔW of the cores saved with it, which unmerge can subtract once they are loaded too
            self.weight_before_merge = None
            whole = flag is not None and all(f"{prefix}cores.{k}" in state_dict for k in range(len(self.cores)))
            self._merge_stamp = None if whole else _UNKNOWN_DELTA
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- forward ------------------------------------------------------------------------------------------
    def _needs_factorized(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def _strategy_for(self, x: torch.Tensor, key, flops) -> str:
        """The forced strategy, or for "flops"/"auto" a choice made once per input shape (``key``), gradient
        mode, device, dtype and autocast dtype; ``flops()`` gives (base op, building ΔW, factorized ΔW x).
        ``tnlayers.set_strategy`` reaches adapters too (:mod:`tnlayers.strategy`)."""
        if self._needs_factorized():
            return "factorized"
        grad = torch.is_grad_enabled() and self.cores[0].requires_grad
        return chooser.choose(self._choices, self.strategy, x, key, grad, lambda: self._costs(*flops(), grad),
                              lambda: self._timing_run(x, grad))

    def _costs(self, base: int, build: int, factorized: int, grad: bool) -> Tuple[int, int]:
        """(dense, factorized) FLOP estimates of what differs between the two ways."""
        passes = 3 if grad else 1
        return (base if grad else 0) + passes * build + prod(self._delta_shape()), passes * factorized

    def _forward_by(self, x: torch.Tensor, strategy: str) -> torch.Tensor:  # the output, computed one way
        raise NotImplementedError

    def _timing_run(self, x: torch.Tensor, grad: bool):
        """``run(strategy)``: the output one way (+ the cores' gradient) from a detached copy of ``x``."""
        x = x.detach()
        return timing_run(lambda strategy: self._forward_by(x, strategy), [c for c in self.cores if c.requires_grad],
                          grad)

    def extra_repr(self) -> str:
        return (f"format={self.format!r}, rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, "
                f"out_shape={self.out_shape}, in_shape={self.in_shape}, strategy={self.strategy!r}, merged={self.merged}")
