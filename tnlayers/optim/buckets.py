"""Tensors spread over devices and dtypes, reduced the way ``torch.optim``'s foreach path groups them: one
multi-tensor launch per (device, dtype) bucket, the partial results moved to one *home* device (the first
tensor's, as ``torch.nn.utils.clip_grad_norm_`` does) and combined there; what is computed at home (a scale,
one factor per tensor) goes back to each bucket's device once.

Callers keep their single launch when every tensor is on one device with one real dtype (the common case and
the hot path, :func:`one_bucket`); these helpers run when that does not hold: a model placed with
``device_map`` over a GPU and the CPU, cores of mixed dtypes (float32 + bfloat16 + float64), complex cores
(their norms are real, ‖z‖² = Σ|z_i|², reduced in the complex counterpart of the statistics dtype, which is
what ``torch._foreach_norm`` asks for complex inputs).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .norms import foreach_squared_norms, stat_dtype

__all__ = ["Buckets", "one_bucket", "norm_dtype", "to_device", "rescale_", "squared_norms", "global_norm",
           "foreach_mul", "foreach_mul_", "dot"]


def norm_dtype(dtype: torch.dtype, stat: torch.dtype) -> torch.dtype:
    """The ``dtype=`` of ``torch._foreach_norm`` over tensors of ``dtype`` for norms in ``stat``: ``stat``, or its
    complex counterpart for complex tensors (whose norms still come out real, in ``stat``).

        >>> norm_dtype(torch.bfloat16, torch.float32), norm_dtype(torch.complex64, torch.float64)
        (torch.float32, torch.complex128)
    """
    if dtype.is_complex:
        return torch.complex128 if stat == torch.float64 else torch.complex64
    return stat


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` (itself when it is there); asynchronous towards an accelerator, synchronous
    towards the CPU (the host may read it next, and an asynchronous device-to-host copy is not yet there).

        >>> t = torch.ones(2)
        >>> to_device(t, torch.device("cpu")) is t
        True
    """
    return tensor.to(device, non_blocking=device.type != "cpu")


def one_bucket(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether one multi-tensor launch covers ``tensors`` (non-empty): one device, one real dtype.

        >>> one_bucket([torch.ones(2), torch.ones(3)]), one_bucket([torch.ones(2), torch.ones(3).double()])
        (True, False)
    """
    device, dtype = tensors[0].device, tensors[0].dtype
    return not dtype.is_complex and all(t.device == device and t.dtype == dtype for t in tensors)


class Buckets:
    """A fixed list of tensors split by (device, dtype), with the index tensors that take per-tensor values
    to the home device (the first tensor's) and back. Build it once per list (they are small host-to-device
    copies) and reuse it each step.

        >>> tensors = [torch.ones(2), torch.ones(3, dtype=torch.float64), torch.ones(4, dtype=torch.bfloat16)]
        >>> plan = Buckets(tensors)
        >>> plan.norms([tensors], 2, torch.float64).square().round(decimals=6)  # ||t||², in the order given
        tensor([2., 3., 4.], dtype=torch.float64)
        >>> plan.rescale_(tensors, torch.tensor([1.0, 2.0, -0.5]))  # t *= 1 + λ, per bucket
        >>> [float(t[0]) for t in tensors]
        [2.0, 3.0, 0.5]
    """

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.home = tensors[0].device
        self.n = len(tensors)
        keys: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
        for i, t in enumerate(tensors):
            keys.setdefault((t.device, t.dtype), []).append(i)
        self.parts = [(device, dtype, index) for (device, dtype), index in keys.items()]
        self._back: Dict[int, torch.Tensor] = {}
        self._home_index: Optional[List[torch.Tensor]] = None

    def _inverse(self, lists: int) -> torch.Tensor:
        """The permutation from the concatenated bucket results (bucket 1: list 0's tensors, list 1's, ...;
        then bucket 2: ...) to [list 0 in order; list 1 in order; ...]."""
        if lists not in self._back:
            positions = [0] * (lists * self.n)
            at = 0
            for _, _, index in self.parts:
                for j in range(lists):
                    for i in index:
                        positions[j * self.n + i] = at
                        at += 1
            self._back[lists] = torch.tensor(positions, device=self.home)
        return self._back[lists]

    def norms(self, lists: Sequence[Sequence[torch.Tensor]], order: float, dtype: torch.dtype) -> torch.Tensor:
        """The ``order``-norms of the tensors of ``lists`` (lists shaped like the one this plan was built on, e.g.
        the cores and their gradients), as one vector [list 0; list 1; ...] in ``dtype`` on the home device:
        one ``torch._foreach_norm`` launch per bucket."""
        parts = []
        for device, kind, index in self.parts:
            members = [tensors[i] for tensors in lists for i in index]
            local = torch.stack(torch._foreach_norm(members, order, dtype=norm_dtype(kind, dtype)))
            parts.append(to_device(local, self.home))
        return torch.cat(parts)[self._inverse(len(lists))]

    def rescale_(self, tensors: Sequence[torch.Tensor], lambdas: torch.Tensor) -> None:
        """``tensors[i] *= 1 + lambdas[i]`` in place, ``lambdas`` a vector on the home device: one launch per
        bucket (three for half/bfloat16, see :func:`rescale_`)."""
        if self._home_index is None:
            self._home_index = [torch.tensor(index, device=self.home) for _, _, index in self.parts]
        for (device, _, index), at_home in zip(self.parts, self._home_index):
            rescale_([tensors[i] for i in index], to_device(lambdas[at_home], device))


_NARROW = (torch.bfloat16, torch.float16)


def rescale_(tensors: Sequence[torch.Tensor], lambdas: torch.Tensor) -> None:
    """``tensors[i] *= 1 + lambdas[i]`` in place, for tensors of one dtype on ``lambdas``' device.

    Half and bfloat16 tensors are multiplied in float32 and rounded once (three launches): a CUDA multiply by a
    0-d tensor of another dtype would first round the factor to the tensor's dtype, and 1 + λ in bfloat16 moves
    in steps of 2^-7 (every |λ| < 2^-8 would vanish). One rounding of the product is what ``torch.optim`` does
    to a bfloat16 parameter at each update.

        >>> t = [torch.tensor([3.0], dtype=torch.bfloat16)]
        >>> rescale_(t, torch.tensor([0.005])); t  # 3 x 1.005 = 3.015, the nearest bfloat16 value
        [tensor([3.0156], dtype=torch.bfloat16)]
    """
    tensors = list(tensors)
    factors = list((1.0 + lambdas).unbind(0))
    if tensors[0].dtype in _NARROW:
        wide = [t.float() for t in tensors]
        torch._foreach_mul_(wide, factors)
        torch._foreach_copy_(tensors, wide)
    else:
        torch._foreach_mul_(tensors, factors)


def squared_norms(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """||t||² of each tensor, one vector in ``dtype`` on the first tensor's device, wherever the tensors are.

        >>> squared_norms([torch.ones(2), torch.ones(3, dtype=torch.complex64)], torch.float32).round(decimals=5)
        tensor([2., 3.])
    """
    tensors = list(tensors)
    if one_bucket(tensors):
        return foreach_squared_norms(tensors, dtype)
    return Buckets(tensors).norms([tensors], 2, dtype).square()


def global_norm(tensors: Sequence[torch.Tensor], one: Optional[bool] = None) -> torch.Tensor:
    """||(t_1, ..., t_n)||_2 over all entries of all tensors, a 0-d tensor on the first tensor's device, in
    float32 (float64 if any tensor is float64 or complex128). ``one``: :func:`one_bucket` of ``tensors``, when
    the caller knows it.

        >>> global_norm([torch.full((4,), 1.5), torch.ones(3, dtype=torch.bfloat16)])
        tensor(3.4641)
    """
    tensors = list(tensors)
    if one_bucket(tensors) if one is None else one:
        dtype = stat_dtype(tensors[:1])
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)))
    dtype = stat_dtype(tensors)
    home = tensors[0].device
    parts = [to_device(torch.stack(torch._foreach_norm([tensors[i] for i in index], 2, dtype=norm_dtype(kind, dtype))),
                       home) for _, kind, index in Buckets(tensors).parts]
    return torch.linalg.vector_norm(torch.cat(parts))


def _by_device(tensors: Sequence[torch.Tensor]) -> Dict[torch.device, List[int]]:
    devices: Dict[torch.device, List[int]] = {}
    for i, t in enumerate(tensors):
        devices.setdefault(t.device, []).append(i)
    return devices


def foreach_mul(tensors: Sequence[torch.Tensor], scalar: torch.Tensor) -> List[torch.Tensor]:
    """``[t * scalar for t in tensors]`` for a 0-d tensor ``scalar``, one launch per device, ``scalar`` copied
    once to each device.

        >>> foreach_mul([torch.ones(2), torch.ones(1, dtype=torch.float64)], torch.tensor(3.0))
        [tensor([3., 3.]), tensor([3.], dtype=torch.float64)]
    """
    tensors = list(tensors)
    devices = _by_device(tensors)
    if len(devices) == 1:
        return list(torch._foreach_mul(tensors, to_device(scalar, tensors[0].device)))
    out: List[torch.Tensor] = [scalar] * len(tensors)
    for device, index in devices.items():
        for i, product in zip(index, torch._foreach_mul([tensors[i] for i in index], to_device(scalar, device))):
            out[i] = product
    return out


def foreach_mul_(tensors: Sequence[torch.Tensor], scalar: torch.Tensor) -> None:
    """``t *= scalar`` for every tensor, in place, as :func:`foreach_mul`.

        >>> t = [torch.ones(2)]
        >>> foreach_mul_(t, torch.tensor(2.0)); t
        [tensor([2., 2.])]
    """
    tensors = list(tensors)
    for device, index in _by_device(tensors).items():
        torch._foreach_mul_([tensors[i] for i in index], to_device(scalar, device))


def dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i <x_i, y_i> over a list of tensor pairs (each pair on one device), the real inner product (complex
    tensors are pairs of reals: Re Σ conj(x) y), accumulated in float32 (float64 if any input is float64 or
    complex128) on the first tensor's device.

        >>> dot([torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 4.0])])
        tensor(11.)
        >>> dot([torch.tensor([1j])], [torch.tensor([2 + 1j])])  # Re(conj(i)(2 + i)) = Re(1 - 2i)
        tensor(1.)
    """
    xs, ys = list(xs), list(ys)
    dtype = stat_dtype(xs + ys)
    if not xs:
        return torch.zeros((), dtype=dtype)
    home = xs[0].device
    terms = []
    for x, y in zip(xs, ys):
        kind = norm_dtype(torch.promote_types(x.dtype, y.dtype), dtype)
        term = torch.vdot(x.reshape(-1).to(kind), y.reshape(-1).to(kind))
        terms.append(to_device(term.real if kind.is_complex else term, home))
    return torch.stack(terms).sum()
