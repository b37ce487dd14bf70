"""Fused DAS step in two Triton launches, whatever the number of cores.

Design: a *pointer table*. The cores stay where they are (no flat buffer to copy into and out of); a small
device table holds, per core, the addresses of the core, its gradient and its optimizer state, and per
chunk of ``BLOCK`` elements, which core and where in it. One program handles one chunk:

1. ``_reduce_kernel``: s_k = ||G_k||², γ_k = ||g_k||² and each group's Σγ, accumulated in fp32 by atomic
   adds of per-chunk partial sums (the order of those adds is not fixed: last-bit differences between runs).
2. ``_update_kernel``: λ_k from the reduced sums (ḡ, u and the guards of the torch path), then
   G ← (1+λ)G fused with the base optimizer's update (SGD with momentum/dampening/nesterov/weight decay,
   or AdamW), reading and writing each core, gradient and state element once; or the rescale alone.

Nothing is read back to the host, so a step never waits on the device. The tables are rebuilt only when
an address changes (e.g. gradients set to None and reallocated), through a pinned, non-blocking copy.
Requires cores of one floating dtype (fp32/bf16/fp16) on one device; callers fall back to the torch path
otherwise. On CPU tensors the kernels run under ``TRITON_INTERPRET=1`` (how CI tests them).
Design notes: docs/design.md, 'Triton kernels for DAS'.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import triton
import triton.language as tl

# 1024 elements per program: large enough to amortize the per-program table reads and the λ computation,
# small enough that a ResNet's small cores (a few hundred elements) do not leave most lanes idle.
BLOCK = 1024
UPDATE_NONE, UPDATE_SGD, UPDATE_ADAMW = 0, 1, 2
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _is_finite(x):
    return (x - x) == 0.0  # inf - inf and NaN - NaN are NaN; no inf literal needed in the kernel


@triton.jit
def _reduce_kernel(p_ptrs, g_ptrs, chunk_core, chunk_start, numels, segment, s_out, gamma_out, group_out,
                   DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    k = tl.load(chunk_core + c)
    offs = tl.load(chunk_start + c) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + k)
    p = tl.load(tl.load(p_ptrs + k).to(tl.pointer_type(DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(tl.load(g_ptrs + k).to(tl.pointer_type(DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
    sg = tl.sum(g * g, axis=0)
    tl.atomic_add(s_out + k, tl.sum(p * p, axis=0))
    tl.atomic_add(gamma_out + k, sg)
    tl.atomic_add(group_out + tl.load(segment + k), sg)


@triton.jit
def _update_kernel(p_ptrs, g_ptrs, a_ptrs, b_ptrs, chunk_core, chunk_start, numels, segment, counts,
                   s_in, gamma_in, group_in, lambda_out, n_groups,
                   step_size, lr, momentum, dampening, weight_decay, beta1, beta2, eps, bias1, bias2_sqrt,
                   lam_lo, lam_hi,
                   DTYPE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, GLOBAL_U: tl.constexpr,
                   SQUARED: tl.constexpr, UPDATE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                   BOUNDED: tl.constexpr):
    c = tl.program_id(0)
    k = tl.load(chunk_core + c)
    start = tl.load(chunk_start + c)
    group = tl.load(segment + k)
    s = tl.load(s_in + k)
    group_sum = tl.load(group_in + group)
    if GLOBAL_U:  # u over every group with a usable gradient: one bad layer must not zero all λ
        offs_g = tl.arange(0, BLOCK_G)
        sums = tl.load(group_in + offs_g, mask=offs_g < n_groups, other=0.0)
        total = tl.sum(tl.where(_is_finite(sums) & (sums > 0), sums, 0.0), axis=0)
    else:
        total = group_sum
    denominator = s if SQUARED else tl.sqrt(s)
    lam = step_size * (tl.load(gamma_in + k) - group_sum / tl.load(counts + group)) / (tl.sqrt(total) * denominator)
    keep = _is_finite(group_sum) & (group_sum > 0) & (s > 0) & _is_finite(lam)
    lam = tl.where(keep, lam, 0.0)
    if BOUNDED:  # DAS's max_scale: 1 + λ within [1/max_scale, max_scale]
        lam = tl.minimum(tl.maximum(lam, lam_lo), lam_hi)
    tl.store(lambda_out + k, lam, mask=start == 0)

    offs = start + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + k)
    p_ptr = tl.load(p_ptrs + k).to(tl.pointer_type(DTYPE)) + offs
    p = tl.load(p_ptr, mask=mask).to(tl.float32) * (1.0 + lam)
    if UPDATE == 1:  # torch.optim.SGD (momentum buffers already exist when MOMENTUM)
        d = tl.load(tl.load(g_ptrs + k).to(tl.pointer_type(DTYPE)) + offs, mask=mask).to(tl.float32)
        d = d + weight_decay * p
        if MOMENTUM:
            a_ptr = tl.load(a_ptrs + k).to(tl.pointer_type(DTYPE)) + offs
            buf = momentum * tl.load(a_ptr, mask=mask).to(tl.float32) + (1.0 - dampening) * d
            tl.store(a_ptr, buf.to(DTYPE), mask=mask)
            if NESTEROV:
                d = d + momentum * buf
            else:
                d = buf
        p = p - lr * d
    if UPDATE == 2:  # torch.optim.AdamW: decoupled weight decay, bias-corrected moments
        g = tl.load(tl.load(g_ptrs + k).to(tl.pointer_type(DTYPE)) + offs, mask=mask).to(tl.float32)
        p = p * (1.0 - lr * weight_decay)
        a_ptr = tl.load(a_ptrs + k).to(tl.pointer_type(DTYPE)) + offs
        b_ptr = tl.load(b_ptrs + k).to(tl.pointer_type(DTYPE)) + offs
        m = beta1 * tl.load(a_ptr, mask=mask).to(tl.float32) + (1.0 - beta1) * g
        v = beta2 * tl.load(b_ptr, mask=mask).to(tl.float32) + (1.0 - beta2) * g * g
        tl.store(a_ptr, m.to(DTYPE), mask=mask)
        tl.store(b_ptr, v.to(DTYPE), mask=mask)
        p = p - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
    tl.store(p_ptr, p.to(DTYPE), mask=mask)


def _pointer_table(tensors: Sequence[Optional[torch.Tensor]], device) -> torch.Tensor:
    ptrs = [0 if t is None else t.data_ptr() for t in tensors]
    host = torch.tensor(ptrs, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


class FusedDASPlan:
    """Chunk tables for one set of cores (one dtype, one device, contiguous tensors), built once."""

    def __init__(self, cores: List[torch.Tensor], segment: torch.Tensor, counts: torch.Tensor):
        if not cores:
            raise ValueError("cores must not be empty")
        dtypes = {c.dtype for c in cores}
        if len(dtypes) != 1 or next(iter(dtypes)) not in _TL_DTYPES:
            raise TypeError(f"fused DAS needs cores of one dtype among {sorted(map(str, _TL_DTYPES))}, got {dtypes}")
        if not all(c.is_contiguous() for c in cores):
            raise ValueError("fused DAS needs contiguous cores")
        self.device = cores[0].device
        self.dtype = cores[0].dtype
        self.n_cores, self.n_groups = len(cores), int(counts.numel())
        numels = [c.numel() for c in cores]
        chunk_core, chunk_start = [], []
        for k, n in enumerate(numels):
            for start in range(0, n, BLOCK):
                chunk_core.append(k)
                chunk_start.append(start)
        self.n_chunks = len(chunk_core)
        as_device = lambda values, dtype: torch.tensor(values, dtype=dtype).to(self.device)  # noqa: E731
        self.chunk_core = as_device(chunk_core, torch.int32)
        self.chunk_start = as_device(chunk_start, torch.int64)
        self.numels = as_device(numels, torch.int64)
        self.segment = segment.to(self.device, torch.int32)
        self.counts = counts.to(self.device, torch.float32)
        self.block_g = triton.next_power_of_2(max(self.n_groups, 1))
        self._tables: Dict[str, tuple] = {}

    def table(self, name: str, tensors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """Pointer table ``name`` for ``tensors``, rebuilt only when an address changed."""
        key = tuple(0 if t is None else t.data_ptr() for t in tensors)
        cached = self._tables.get(name)
        if cached is None or cached[0] != key:
            for t in tensors:
                if t is not None and (t.dtype != self.dtype or not t.is_contiguous() or t.device != self.device):
                    raise ValueError(f"{name}: every tensor must be contiguous {self.dtype} on {self.device}")
            cached = (key, _pointer_table(tensors, self.device))
            self._tables[name] = cached
        return cached[1]

    def reduce(self, cores, grads):
        """(s, γ, per-group Σγ) in fp32, one launch (plus the zeroing of the accumulators)."""
        out = torch.zeros(2 * self.n_cores + self.n_groups, dtype=torch.float32, device=self.device)
        s, gamma, group = out[:self.n_cores], out[self.n_cores:2 * self.n_cores], out[2 * self.n_cores:]
        _reduce_kernel[(self.n_chunks,)](self.table("p", cores), self.table("g", grads), self.chunk_core,
                                         self.chunk_start, self.numels, self.segment, s, gamma, group,
                                         DTYPE=_TL_DTYPES[self.dtype], BLOCK=BLOCK)
        return s, gamma, group

    def update(self, cores, grads, stats, step_size: float, normalization: str = "global",
               denominator: str = "squared", update: int = UPDATE_NONE, state_a=None, state_b=None,
               lr: float = 0.0, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
               weight_decay: float = 0.0, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
               step: int = 1, max_scale: float = math.inf) -> torch.Tensor:
        """Rescale every core by (1+λ_k), fused with an SGD or AdamW update; returns λ (fp32, per core).
        A finite ``max_scale`` bounds 1 + λ_k to [1/max_scale, max_scale] (DAS's option of that name)."""
        s, gamma, group = stats
        lambdas = torch.empty(self.n_cores, dtype=torch.float32, device=self.device)
        has_a = update == UPDATE_ADAMW or (update == UPDATE_SGD and momentum != 0)
        a = self.table("a", state_a) if has_a else self.numels  # any int64 tensor: never read
        b = self.table("b", state_b) if update == UPDATE_ADAMW else self.numels
        _update_kernel[(self.n_chunks,)](
            self.table("p", cores), self.table("g", grads), a, b, self.chunk_core, self.chunk_start, self.numels,
            self.segment, self.counts, s, gamma, group, lambdas, self.n_groups,
            float(step_size), float(lr), float(momentum), float(dampening), float(weight_decay), float(beta1),
            float(beta2), float(eps), 1.0 - beta1 ** step, (1.0 - beta2 ** step) ** 0.5,
            1.0 / max_scale - 1.0, max_scale - 1.0 if math.isfinite(max_scale) else 0.0,
            DTYPE=_TL_DTYPES[self.dtype], BLOCK=BLOCK, BLOCK_G=self.block_g,
            GLOBAL_U=normalization == "global", SQUARED=denominator == "squared", UPDATE=update,
            MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), BOUNDED=math.isfinite(max_scale))
        return lambdas
