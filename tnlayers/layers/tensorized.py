"""The one generic tensorized layer; ``TensorizedLinear`` and the convs (``TensorizedConv1d/2d/3d``) only add
how the input is applied. Modes are ordered (input modes..., spatial modes..., output modes...).

What the layer holds itself: its cores and bias, the weight they make, decomposition into them, and its
forward. What it delegates: checking its arguments and laying out its network (``layout.py``), the
dense/factorized choice (``tnlayers/strategy.py``, shared with the adapters), and the guard of the no-grad
weight cache (``weight_cache.py``)."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.utils.checkpoint
from torch import nn

from ..contract import autocast_dtype
from ..decompose import decompose, relative_error
from ..formats.network import mode_label
from ..init import check_weight_std, init_cores_, resolve_weight_std
from ..strategy import STRATEGIES, ModuleChoices, check_strategy, chooser, timing_run
from .base import CoreModule, check_decomposition_options, check_tensor_values
from .layout import layer_layout
from .weight_cache import reuse_or_build

__all__ = ["TensorizedLayer", "STRATEGIES", "set_recompute"]


class TensorizedLayer(CoreModule):
    FORMAT = None  # set by the thin named classes (TTConv2d: "tt", ...)
    KIND = None  # "linear" | "conv"
    cache_weight = True  # reuse the dense weight while no core changes, when no graph needs it
    dense_params: int  # parameters of the nn.Linear / nn.ConvNd this layer stands for (weight and bias)
    _weight_cache = None
    _prebuilt = None  # a weight rebuilt together with other layers' for the next training call (set_batched_weights)
    last_strategy = None  # the strategy the last eager forward ran ("dense" or "factorized")
    # Training through the cores: keep only the chain's input and rerun the chain in backward (set_recompute)
    recompute = False

    def _setup(self, format, in_dim: int, out_dim: int, kernel: Tuple[int, ...], rank, in_shape, out_shape,
               bias: bool, strategy: str, device, dtype, weight_std, depthwise: bool = False) -> None:
        check_strategy(strategy)  # (in_dim/out_dim: plain positive ints, checked by the subclass)
        self.weight_std = check_weight_std(weight_std)
        layout = layer_layout(type(self).__name__, self.FORMAT, self.KIND, format, in_dim, out_dim, kernel, rank,
                              in_shape, out_shape, bias, depthwise=depthwise)
        self.in_shape, self.out_shape, self.roles = layout.in_shape, layout.out_shape, layout.roles
        self.fan_in, self.dense_params = layout.fan_in, layout.dense_params
        self._init_cores(layout.network, device, dtype)
        self.strategy = strategy
        # what a timed choice depends on besides the input: layers alike share decisions (tnlayers.strategy)
        self._choices = ModuleChoices((type(self).__name__, self.network.cores,
                                       tuple(sorted(self.network.sizes.items())), bias, self._apply_config()))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_dim, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # -- weight ---------------------------------------------------------------------------------------
    def _weight_shape(self) -> Tuple[int, ...]:
        raise NotImplementedError

    def _apply_config(self) -> tuple:  # how the input is applied besides the weight (conv: stride, ...)
        return ()

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed dense weight, shaped like the ``nn`` counterpart's."""
        self._check_materialized("weight")
        return self.plan.weight(self.core_parameters()).reshape(self._weight_shape())

    def _state_config(self) -> dict:
        """Saved with the cores (state_dict metadata): cores of the same shapes mean another weight under
        another format, kind, tensorization of the channels or kernel (see CoreModule._check_state_config)."""
        return {"kind": self.KIND, "format": self.format, "in_shape": self.in_shape, "out_shape": self.out_shape}

    def reset_parameters(self) -> None:
        """Random cores whose reconstructed weight has std ``weight_std`` (default ``"nn"``: the std of the
        ``nn`` layer's default init, 1/sqrt(3 fan_in); ``"kaiming_normal"``: sqrt(2/fan_in)); ``nn``'s bias
        init, uniform on ±1/sqrt(fan_in)."""
        init_cores_(self.cores, self.network, resolve_weight_std(self.weight_std, self.fan_in))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _weight_to_modes(self, weight: torch.Tensor) -> torch.Tensor:
        """A dense weight (out, in, *kernel) as the network's full tensor (modes in network order)."""
        order = self.plan.out_modes + self.plan.in_modes + self.plan.spatial_modes
        sizes = [self.network.sizes[m] for m in order]
        perm = [order.index(mode_label(i)) for i in range(len(order))]
        return weight.reshape(sizes).permute(perm)

    @torch.no_grad()
    def init_from_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None, **options) -> float:
        """Set the cores by decomposing a dense ``weight`` (TT-SVD, TR-SVD, CP-ALS, HOSVD + HOOI:
        ``tnlayers.decompositions``); returns and stores (``decomposition_error``) the relative Frobenius error
        of the fit."""
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) != self._weight_shape():
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit {type(self).__name__} with weight "
                             f"shape {self._weight_shape()}")
        check_tensor_values("weight", weight)
        check_decomposition_options(options)
        if bias is not None and self.bias is not None:
            check_tensor_values("bias", bias, self.bias.shape)
        self._check_materialized("init_from_weight")
        self._load_cores(decompose(self._weight_to_modes(weight), self.network, **options))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)
        rebuilt = self.weight
        error = relative_error(rebuilt, weight.to(rebuilt.device))
        self.decomposition_error = error
        return error

    # -- strategy -------------------------------------------------------------------------------------
    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor input, got {type(x).__name__}")
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got dtype {x.dtype}")
        core = self._first_core()
        if core.is_meta:
            self._check_materialized("forward")
        # nn.Conv2d refuses mixed dtypes too (outside autocast, which casts both): say which and what to do
        if x.dtype != core.dtype and autocast_dtype(x.device.type) is None:
            raise TypeError(f"{type(self).__name__} got an input of dtype {x.dtype}, but its cores are "
                            f"{core.dtype}: convert one to the other (layer.to({x.dtype}) or x.to({core.dtype})), "
                            f"or run under torch.autocast")

    def _dense(self, x, weight, bias):  # one F.linear / F.conv2d with the weight
        raise NotImplementedError

    def _factorized(self, x, cores, bias):  # the input through the cores
        raise NotImplementedError

    def _costs(self, x):  # (dense, factorized or None) FLOP estimates for this input
        raise NotImplementedError

    def _shape_key(self, x):  # what of the input's shape the choice depends on
        return tuple(x.shape)

    def _apply_cores(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on a prepared input, by the strategy in force for it."""
        strategy = self._strategy_for(x)
        if self.__dict__.get("last_strategy") != strategy and not torch.compiler.is_compiling():
            self.__dict__["last_strategy"] = strategy  # (a plain attribute: nn.Module.__setattr__ costs ~2 us)
        if strategy == "dense":
            return self._dense(x, self._dense_weight(), self.bias)
        return self._run_factorized(x, self.core_parameters(), self.bias)

    def _run_factorized(self, x, cores, bias):
        """The factorized chain; with ``recompute`` and a graph to record, as an activation checkpoint: backward
        reruns the chain from its input instead of keeping its intermediates (as dense keeps only x and W)."""
        if self.recompute and torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, *cores, bias)):
            # (the chain draws no random numbers: no RNG state to save and restore)
            return torch.utils.checkpoint.checkpoint(self._factorized, x, list(cores), bias, use_reentrant=False,
                                                     preserve_rng_state=False)
        return self._factorized(x, cores, bias)

    def _needs_grad(self, x) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _strategy_for(self, x) -> str:
        """``set_strategy``'s override or this layer's ``strategy``; "auto"/"flops" decided once per input
        shape, device, dtype, autocast dtype and grad mode (see :mod:`tnlayers.strategy`)."""
        grad = self._needs_grad(x)
        shape_key = self._shape_key(x)
        if self.recompute and grad:  # recomputing changes what auto times: a choice of its own
            shape_key = (shape_key, "recompute")
        return chooser.choose(self._choices, self.strategy, x, shape_key, grad, lambda: self._costs(x),
                              lambda: self._timing_run(x, grad), factorized=self._has_factorized())

    def _has_factorized(self) -> bool:
        return getattr(self.plan, "supported", True)

    def _timing_run(self, x: torch.Tensor, needs_grad: bool):
        """``run(strategy)``: one forward (+ backward when gradients are needed) on detached copies of this
        call's inputs, so timing leaves no trace in the caller's graph or in ``.grad``."""
        x = x.detach().requires_grad_(x.requires_grad and needs_grad)
        params = [p.detach().requires_grad_(p.requires_grad and needs_grad) for p in self.core_parameters()]
        bias = None if self.bias is None else self.bias.detach().requires_grad_(self.bias.requires_grad and needs_grad)
        weight = None if needs_grad else self._dense_weight()  # inference: dense is one conv with a cached weight

        def forward(strategy):
            if strategy == "dense":
                return self._dense(x, self.plan.weight(params).reshape(self._weight_shape()) if weight is None
                                   else weight, bias)
            return self._run_factorized(x, params, bias)
        return timing_run(forward, [t for t in (x, *params, bias) if t is not None and t.requires_grad], needs_grad)

    # -- weight cache ---------------------------------------------------------------------------------
    def _dense_weight(self) -> torch.Tensor:
        """The weight for the dense strategy. When it needs no autograd graph (``torch.no_grad()``,
        ``inference_mode``, frozen cores) it is built once and reused while the cores hold the values it was
        built from: each call compares the cores, exactly, with a copy kept at build time, so every way of
        writing them counts, including writes through ``.data`` that leave the version counter unchanged
        (EMA updates). The cores' version counters, storages, dtypes and devices, the autocast dtype
        and inference mode are also part of the key. Off the CPU the comparison synchronizes the host with
        the device once per call; ``with tnlayers.cached():`` skips it (see :mod:`.weight_cache`).
        ``cache_weight = False`` turns caching off for the layer (the weight is then rebuilt on every call)."""
        if torch.compiler.is_compiling():
            return self.weight
        cores = self.core_parameters()
        state = self.__dict__  # plain attributes, set without nn.Module.__setattr__ (~2 us each on the hot path)
        if (not self.cache_weight or (torch.is_grad_enabled() and any(c.requires_grad for c in cores))
                or any(c.is_inference() or hasattr(c, "to_local") for c in cores)):
            state["_weight_cache"] = None  # training: free the inference copy
            prebuilt = self._prebuilt
            if prebuilt is not None:  # built with others of its shape (batched_weights.py): taken once
                state["_prebuilt"] = None
                if prebuilt.valid(cores):
                    return prebuilt.weight
            return self.weight
        entry = self._weight_cache
        fresh = reuse_or_build(cores, entry, lambda: self.weight)
        if fresh is not entry:
            state["_weight_cache"] = fresh
        return fresh[1]

    def clear_weight_cache(self) -> None:
        """Free the cached inference weight (it is rebuilt on the next no-grad dense call)."""
        self._weight_cache = None

    def extra_repr(self) -> str:
        return (f"format={self.format!r}, ranks={self.ranks}, in_shape={self.in_shape}, out_shape={self.out_shape}, "
                f"strategy={self.strategy!r}")


def set_recompute(model: nn.Module, enabled: bool = True) -> int:
    """Turn recomputation on (or off) for every tensorized layer in ``model`` (the model itself included); returns
    how many layers were set. A layer that trains through its cores (the factorized strategy) then keeps only its
    input for backward and reruns the chain there, as ``torch.utils.checkpoint`` does for a block: its saved
    activations are the dense layer's (the input), for one more forward of the chain per step. ``auto`` times
    the choice again with the recomputation counted. Dense-strategy calls, inference and ``torch.no_grad`` are
    unchanged.

        >>> import torch, tnlayers
        >>> net = tnlayers.tensorize(torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3), torch.nn.ReLU()), rank=0.2)
        >>> tnlayers.set_recompute(net)
        1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_recompute expects an nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise TypeError(f"set_recompute: enabled must be a bool, got {type(enabled).__name__}")
    layers = [m for m in model.modules() if isinstance(m, TensorizedLayer)]
    for layer in layers:
        layer.recompute = enabled
    return len(layers)
