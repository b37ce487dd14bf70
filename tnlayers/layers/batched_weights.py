"""Rebuilding the weights of many layers in one contraction per layer shape (``set_batched_weights``).

Why: in training, every step rebuilds each layer's weight from its cores through a handful of small pairwise
products, and for a small network on CPU their fixed per-op cost, not their arithmetic, is what the step pays
over the dense network (a TR-ResNet-20 at rank 8 on 8x8 inputs: ~75 % of its excess time). Layers of the
same shape (a ResNet stage's convs) can be rebuilt together: their cores stacked along a batch axis, one
contraction whose steps are ``bmm``, the result split per layer; one set of ops instead of one per layer.

How: a forward pre-hook on the model builds, when a graph is being recorded, the weights of the tensorized
layers that ran dense on their last call, grouped by plan, dtype and device (two layers or more per group).
Each such layer takes its weight on its next dense call in this forward when its cores are the ones the
weight was built from (same tensors, version counters and values: the stacked copies are the snapshot, and a
write through ``.data`` moves no version counter), grad mode and autocast dtype unchanged; any
other call builds its own, as without batching. A forward hook (always called, also when the forward
raises) drops what was not taken. The gradient goes through two ``autograd.Function`` (stack, split) that give
gradients only to the cores of layers whose weight was used: a layer skipped by this forward keeps a
``None`` gradient (optimizers skip it), as without batching.

Not inside ``torch.compile`` (the hook does nothing there; inductor traces each layer's rebuild). Both
Functions' backwards are plain torch ops (indexing, ``stack``), so a double backward (``create_graph=True``)
differentiates through them.
Design notes: docs/design.md, 'Batched weight rebuilds'.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from ..contract import autocast_dtype
from .tensorized import TensorizedLayer
from .weight_cache import unchanged

__all__ = ["set_batched_weights"]


class _Used:
    """Which layers of one batched rebuild had their weight used: written by :class:`_Split`'s backward,
    read by :class:`_Stack`'s, which autograd runs after it (the contraction lies between them)."""

    __slots__ = ("layers",)

    def __init__(self):
        self.layers = ()


class _Stack(torch.autograd.Function):
    """``(used, K, *cores of layer 0, *cores of layer 1, ...)`` -> K tensors, core j of every layer stacked.
    Backward: each layer's slices of the gradients, ``None`` for a layer whose weight was not used."""

    @staticmethod
    def forward(ctx, used: _Used, k: int, *cores: torch.Tensor):
        ctx.used, ctx.k, ctx.n = used, k, len(cores) // k
        ctx.set_materialize_grads(False)
        return tuple(torch.stack(cores[j::k]) for j in range(k))

    @staticmethod
    def backward(ctx, *grads):
        result: List[torch.Tensor | None] = [None] * (ctx.n * ctx.k)
        for j, g in enumerate(grads):
            if g is not None:
                parts = g.unbind(0)  # (one op for all layers' views; indexing g[i] costs one per layer)
                for i in ctx.used.layers:
                    result[i * ctx.k + j] = parts[i]
        return (None, None, *result)


class _Split(torch.autograd.Function):
    """``(used, weights)`` -> one weight per layer (views of ``weights``); backward notes which received a
    gradient and hands the contraction a full one (zeros for the others, as ``unbind``'s backward)."""

    @staticmethod
    def forward(ctx, used: _Used, weights: torch.Tensor):
        ctx.used = used
        ctx.set_materialize_grads(False)
        return tuple(weights.detach().unbind(0))

    @staticmethod
    def backward(ctx, *grads):
        ctx.used.layers = tuple(i for i, g in enumerate(grads) if g is not None)
        if not ctx.used.layers:
            return None, None
        zero = None
        upstream = []
        for g in grads:
            if g is None:
                zero = torch.zeros_like(grads[ctx.used.layers[0]]) if zero is None else zero
                g = zero
            upstream.append(g)
        return None, torch.stack(upstream)


def _batched_weights(layers: Sequence[TensorizedLayer], cores: Sequence[Sequence[torch.Tensor]]):
    """(the weights of ``layers`` (one plan), one contraction for all, gradients as :class:`_Stack` says;
    per layer, views of the stacked copies of its cores: the values each weight was built from)."""
    used = _Used()
    stacked = _Stack.apply(used, len(cores[0]), *[c for own in cores for c in own])
    copies = list(zip(*[s.detach().unbind(0) for s in stacked]))
    return _Split.apply(used, layers[0].plan.weights(stacked)), copies


# The innermost active saved-tensor hooks (torch >= 2.8; a private binding, hence looked up, not assumed)
_TOP_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are on: inside a non-reentrant activation checkpoint (its forward and its
    recompute) or ``save_on_cpu``. A checkpoint's recompute, in backward, has no prebuilt weight to take,
    so its forward must not take one either: both then save the same tensors, as checkpoint requires."""
    if _TOP_HOOKS is None:
        return False  # (older torch: undetectable; checkpoint then refuses the mismatch with CheckpointError)
    try:
        return _TOP_HOOKS(False) is not None
    except TypeError:  # a binding without the ignore_is_tracing argument
        return _TOP_HOOKS() is not None


class _Prebuilt:
    """A weight built for one layer by the batcher, and what it was built from."""

    __slots__ = ("batcher", "generation", "cores", "versions", "autocast", "weight", "values")

    def __init__(self, batcher, cores: Sequence[torch.Tensor], weight: torch.Tensor, values: Sequence[torch.Tensor]):
        self.batcher, self.generation = batcher, batcher.generation
        self.cores = tuple(cores)
        self.versions = tuple(c._version for c in cores)
        self.autocast = autocast_dtype(cores[0].device.type)
        self.weight, self.values = weight, list(values)

    def valid(self, cores: Sequence[torch.Tensor]) -> bool:
        """Whether the layer, about to use ``cores``, may take this weight instead of building its own."""
        return (self.generation == self.batcher.generation and torch.is_grad_enabled()
                and len(cores) == len(self.cores) and all(a is b for a, b in zip(cores, self.cores))
                and tuple(c._version for c in cores) == self.versions
                and autocast_dtype(cores[0].device.type) == self.autocast and not _saved_tensor_hooks_active()
                and unchanged(cores, self.values))  # values too: a write through .data keeps the version


def _batchable(layer: nn.Module) -> bool:
    if not isinstance(layer, TensorizedLayer) or layer.last_strategy != "dense" or not layer.plan.batchable:
        return False
    cores = layer.core_parameters()
    first = cores[0]  # (a layer's cores share dtype, device and kind: its own contraction needs them to)
    return (any(c.requires_grad for c in cores) and not first.is_meta and not first.is_inference()
            and not hasattr(first, "to_local"))


def _group_key(layer: TensorizedLayer) -> tuple:
    plan, core = layer.plan, layer.core_parameters()[0]
    return (type(layer).__name__, tuple(plan.net.cores), plan.shapes, tuple(plan.out_modes), tuple(plan.in_modes),
            tuple(plan.spatial_modes), layer._weight_shape(), core.dtype, core.device)


class _Batcher:
    """The model's hooks: build before its forward, drop what was not taken after it (also when it raised)."""

    def __init__(self):
        self.generation = 0
        self.given: List[TensorizedLayer] = []

    def build(self, model: nn.Module, args) -> None:
        if torch.compiler.is_compiling():
            return  # (before touching any state: a traced hook would guard on it and recompile every step)
        self.drop()
        if not torch.is_grad_enabled():
            return
        groups = {}
        for layer in model.modules():
            if _batchable(layer):
                groups.setdefault(_group_key(layer), []).append(layer)
        for layers in groups.values():
            if len(layers) < 2:
                continue  # nothing to share: the layer's own rebuild is as fast
            cores = [layer.core_parameters() for layer in layers]
            weights, values = _batched_weights(layers, cores)
            for layer, own, weight, built_from in zip(layers, cores, weights, values):
                layer._prebuilt = _Prebuilt(self, own, weight.reshape(layer._weight_shape()), built_from)
                self.given.append(layer)

    def drop(self, *unused) -> None:
        if not self.given:
            return  # nothing handed out (also: nothing to trace inside torch.compile)
        self.generation += 1
        for layer in self.given:
            layer._prebuilt = None
        self.given = []


def _remove_hooks(model: nn.Module) -> None:
    """Remove the batcher's hooks (found by owner, so also on a deep copy or an unpickled model)."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, hook in list(hooks.items()):
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, _Batcher):
                owner.drop()
                del hooks[key]
                getattr(model, "_forward_hooks_always_called", {}).pop(key, None)


def set_batched_weights(model: nn.Module, enabled: bool = True) -> int:
    """Rebuild the weights of ``model``'s tensorized layers together, one contraction per group of layers of
    the same shape, on every training forward of ``model`` (see this module's docstring); returns how many
    tensorized layers ``model`` holds. Speeds up training steps of networks with many small layers of few
    distinct shapes (a ResNet stage's convs share one), where each layer's rebuild is dominated by fixed
    per-op costs; gradients are those of the per-layer rebuilds (up to float rounding). Inference
    (``torch.no_grad``, the weight cache) and ``torch.compile`` are unchanged. ``enabled=False`` removes it;
    enabling twice leaves one set of hooks.

        >>> import torch, tnlayers
        >>> net = tnlayers.tensorize(tnlayers.models.cifar_resnet(8, widths=(4, 8, 16)), format="tr", rank=4)
        >>> tnlayers.set_batched_weights(net)
        7
        >>> net(torch.randn(2, 3, 8, 8)).sum().backward()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_batched_weights expects an nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise TypeError(f"set_batched_weights: enabled must be a bool, got {type(enabled).__name__}")
    _remove_hooks(model)
    if enabled:
        batcher = _Batcher()
        model.register_forward_pre_hook(batcher.build)
        model.register_forward_hook(batcher.drop, always_call=True)
    return sum(isinstance(m, TensorizedLayer) for m in model.modules())
