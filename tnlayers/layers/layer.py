"""The one generic tensorized layer; ``TensorizedLinear`` and ``TensorizedConv2d`` only add how the
input is applied. Modes are ordered (input modes..., spatial modes..., output modes...)."""
from __future__ import annotations

import math
from math import prod
from typing import Tuple

import torch
from torch import nn

from ..decompose import decompose
from ..formats import get_format
from ..formats.network import mode_label
from ..init import init_cores_, kaiming_std
from ..shapes import optional_shape, resolve_rank
from .base import CoreModule, build_network, check_decomposition_options, check_tensor_values

__all__ = ["TensorizedLayer", "STRATEGIES"]

STRATEGIES = ("auto", "dense", "factorized")
_MAX_CACHED_SHAPES = 64


class TensorizedLayer(CoreModule):
    FORMAT = None  # set by the thin named classes (TTConv2d: "tt", ...)
    KIND = None  # "linear" | "conv"

    def _setup(self, format, in_dim, out_dim, kernel: Tuple[int, ...], rank, in_shape, out_shape, bias,
               strategy, device, dtype):
        if format is None:
            if self.FORMAT is None:
                raise TypeError(f"{type(self).__name__} needs format=, one of 'cp', 'tucker', 'tt', 'tr'")
            format = self.FORMAT
        elif self.FORMAT is not None and format != self.FORMAT:
            raise ValueError(f"{type(self).__name__} is format {self.FORMAT!r}; got format={format!r}")
        fmt = get_format(format)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        for name, value in (("in_features" if self.KIND == "linear" else "in_channels", in_dim),
                            ("out_features" if self.KIND == "linear" else "out_channels", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False, got {bias!r}")
        split = fmt.SPLIT_CHANNELS[self.KIND]
        self.in_shape = optional_shape(in_shape, in_dim, "in_shape", split)
        self.out_shape = optional_shape(out_shape, out_dim, "out_shape", split)
        spatial = ((prod(kernel),) if fmt.MERGE_SPATIAL else tuple(kernel)) if kernel else ()
        modes = self.in_shape + spatial + self.out_shape
        roles = ("in",) * len(self.in_shape) + ("spatial",) * len(spatial) + ("out",) * len(self.out_shape)
        self.fan_in = in_dim * prod(kernel)
        dense_params = in_dim * out_dim * prod(kernel)
        rank = resolve_rank(rank, lambda r: fmt.network(modes, fmt.layer_rank(r, roles)).num_params,
                            dense_params, where=f" for {type(self).__name__}")
        self._init_cores(build_network(fmt, modes, rank, roles), device, dtype)
        self.roles = roles
        self.strategy = strategy
        self._choices = {}
        if bias:
            self.bias = nn.Parameter(torch.empty(out_dim, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # -- weight ---------------------------------------------------------------------------------------
    def _weight_shape(self) -> Tuple[int, ...]:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed dense weight, shaped like the ``nn`` counterpart's."""
        self._check_materialized("weight")
        return self.plan.weight(list(self.cores)).reshape(self._weight_shape())

    def reset_parameters(self) -> None:
        """Variance-preserving cores (the weight's std matches Kaiming-normal's); ``nn``'s bias init."""
        init_cores_(self.cores, self.network, kaiming_std(self.fan_in))
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
        """Set the cores by decomposing a dense ``weight`` (TT-SVD, TR-SVD, CP-ALS, HOOI via tensorly);
        returns and stores (``decomposition_error``) the relative Frobenius error of the fit."""
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
        error = float(torch.linalg.vector_norm((self.weight - weight.to(self.weight)).double())
                      / torch.linalg.vector_norm(weight.double()).clamp_min(1e-300))
        self.decomposition_error = error
        return error

    # -- strategy -------------------------------------------------------------------------------------
    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor input, got {type(x).__name__}")
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got dtype {x.dtype}")
        self._check_materialized("forward")

    def _strategy_for(self, key, costs) -> str:
        """The forced strategy, or for "auto" the cheaper one by opt_einsum's FLOP estimate (ties: dense),
        decided once per input shape."""
        if self.strategy != "auto":
            return self.strategy
        choice = self._choices.get(key)
        if choice is None:
            dense, factorized = costs()
            choice = "factorized" if factorized is not None and factorized < dense else "dense"
            if len(self._choices) >= _MAX_CACHED_SHAPES:
                self._choices.clear()
            self._choices[key] = choice
        return choice

    def extra_repr(self) -> str:
        return (f"format={self.format!r}, ranks={self.ranks}, in_shape={self.in_shape}, out_shape={self.out_shape}, "
                f"strategy={self.strategy!r}")
