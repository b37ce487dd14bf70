"""FactorizedTensor: a tensor of a given shape held in factorized form."""
from __future__ import annotations

import math
from math import prod
from numbers import Real
from typing import Any

import torch

from ..contract import expression
from ..decompose import decompose
from ..formats import check_modes, get_format
from ..init import init_cores_
from ..shapes import resolve_rank
from ..types import Device, DType, Shape, TensorRank
from .base import CoreModule, build_network, check_decomposition_options, check_tensor_values

__all__ = ["FactorizedTensor"]


class FactorizedTensor(CoreModule):
    """A ``shape`` tensor in ``format`` ("cp", "tucker", "tt", "tr") of rank ``rank``; ``forward()``
    returns the full tensor, ``.cores`` the factors (one scale-invariant group).

    ``rank``: int (uniform), a sequence (per bond; TT may be written ``[1, r1, ..., 1]``; Tucker per mode,
    ``None`` = mode left unfactored), a float in (0, 1]: the fraction of ``prod(shape)`` parameters, or
    ``"same"`` (the default, as tltorch's ``FactorizedTensor.new``): the same as ``1.0``, the largest
    uniform rank whose parameter count does not exceed the full tensor's.
    Cores start random with the full tensor's entries of std ``std``.

    Example::

        >>> import torch, tnlayers
        >>> T = tnlayers.FactorizedTensor((8, 6, 4), format="tucker", rank=(4, 3, 2))
        >>> T().shape, [tuple(c.shape) for c in T.cores]
        (torch.Size([8, 6, 4]), [(4, 3, 2), (8, 4), (6, 3), (4, 2)])
        >>> full = torch.randn(8, 6, 4, dtype=torch.float64)
        >>> tnlayers.FactorizedTensor.from_tensor(full, "tt", rank=[1, 8, 4, 1])().allclose(full)  # full TT rank
        True
    """

    def __init__(self, shape: Shape, format: str = "tucker", rank: TensorRank = "same", *, std: float = 1.0,
                 device: Device = None, dtype: DType = None):
        super().__init__()
        if isinstance(std, (bool, str, bytes)) or not isinstance(std, (Real, torch.Tensor)):
            raise TypeError(f"std must be a number, got {type(std).__name__}")
        if not math.isfinite(float(std)) or float(std) < 0:
            raise ValueError(f"std must be a finite number >= 0, got {std!r}")
        fmt = get_format(format)
        modes = check_modes(shape)
        roles = ("mode",) * len(modes)
        if isinstance(rank, str) and rank == "same":
            rank = 1.0
        rank = resolve_rank(rank, lambda r: fmt.network(modes, fmt.layer_rank(r, roles)).num_params, prod(modes))
        self._init_cores(build_network(fmt, modes, rank, roles, prod(modes), "full tensor"), device, dtype)
        self._expr, _ = expression(self.network.equation(), tuple(self.network.shapes))
        self.std = float(std)
        self.reset_parameters()

    def _state_config(self) -> dict:
        return {"kind": "tensor", "format": self.format, "shape": tuple(self.network.modes)}

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.network.modes)

    def reset_parameters(self) -> None:
        init_cores_(self.cores, self.network, self.std)

    def forward(self) -> torch.Tensor:
        return self._expr(*self.cores)

    to_tensor = forward

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, format: str = "tucker", rank: TensorRank = "same", **options: Any
                    ) -> "FactorizedTensor":
        """Decompose ``tensor`` (TT-SVD, TR-SVD, CP-ALS or HOSVD + HOOI: ``tnlayers.decompositions``) into a
        FactorizedTensor.

            >>> import torch, tnlayers
            >>> T = tnlayers.FactorizedTensor.from_tensor(torch.randn(8, 6, 4), "cp", rank=5)
            >>> T.shape, T().shape
            (torch.Size([8, 6, 4]), torch.Size([8, 6, 4]))
        """
        check_tensor_values("tensor", tensor)
        check_decomposition_options(options)
        out = cls(tuple(tensor.shape), format, rank, std=float(tensor.float().std()) if tensor.numel() > 1 else 1.0,
                  device=tensor.device, dtype=tensor.dtype if tensor.is_floating_point() else None)
        out._load_cores(decompose(tensor, out.network, **options))
        return out

    def extra_repr(self) -> str:
        return f"shape={tuple(self.network.modes)}, format={self.format!r}, ranks={self.ranks}"
