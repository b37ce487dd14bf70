"""1x1 maps of a factorized conv chain as batched GEMMs over the pixels, in either memory layout.

An activation (B, C, *spatial) (1, 2 or 3 spatial dims: (B, C, H, W) for a Conv2d) is held here as its pixels
(B, C, P), P = the product of the spatial sizes, stored either channels-first contiguous or channels-last (then
``x.mT`` of a contiguous (B, P, C)). A map ``y = matrix @ x`` can write ``y`` in either layout, so the chain's
middle k x k conv gets channels-last input, which oneDNN runs 2-8x faster than NCHW at the odd channel counts
ranks give (depthwise too), without a copy to convert it.

Why a custom autograd function: autograd of the plain ``bmm`` hands back ``x``'s gradient in ``y``'s layout,
so a chain turning NCHW input into channels-last would give the layer below a transposed gradient (a copy
the size of the input, on every step). Here each gradient comes back in its own tensor's layout. Its
backward is made of differentiable ops, so second-order gradients work.
"""
from __future__ import annotations

import torch

from ._autograd import signature_stored

__all__ = ["to_pixels", "from_pixels", "pixel_map", "is_channels_last"]


def to_pixels(x: torch.Tensor):
    """(B, C, *spatial) -> (stored pixels, channels_last): stored (B, C, P) for channels-first contiguous, (B, P, C)
    for channels-last. Other strides are made channels-last contiguous (one copy)."""
    batch, channels = x.shape[:2]
    if x.is_contiguous():
        return x.reshape(batch, channels, -1), False
    return x.movedim(1, -1).contiguous().reshape(batch, -1, channels), True  # a view when x is channels-last


def from_pixels(y: torch.Tensor, channels_last: bool, *spatial: int) -> torch.Tensor:
    """Inverse of :func:`to_pixels`: a (B, C, *spatial) view of stored pixels."""
    if channels_last:
        return y.reshape(y.shape[0], *spatial, y.shape[2]).movedim(-1, 1)
    return y.reshape(y.shape[0], y.shape[1], *spatial)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` (B, C, *spatial) is stored channels-last and not also channels-first contiguous; for one spatial
    dim (no torch memory format), whether it is the transpose of a contiguous (B, L, C)."""
    if x.is_contiguous():
        return False
    if x.dim() == 3:
        return x.mT.is_contiguous()
    return x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _gemm(x: torch.Tensor, matrix: torch.Tensor, x_last: bool, y_last: bool) -> torch.Tensor:
    """Stored pixels of ``matrix @ x`` for stored pixels ``x``; the stride-0 batch of the expanded matrix is no copy.
    A product whose stored last dim would be a few channels is computed the other way round and transposed:
    MKL's batched GEMM is slow writing a narrow last dim (16 -> 3 channels over 1024 pixels, batch 128, one
    thread: 8.3 ms written (B, P, O), 0.5 ms written (B, O, P) plus 0.2 ms for the transposing copy)."""
    batch, out, channels = x.shape[0], matrix.shape[0], matrix.shape[1]
    xs = x.mT if x_last else x  # (B, C, P), a strided view either way: bmm reads both orders in place
    if y_last and out >= channels:  # y^T = x^T @ matrix^T, written (B, P, O)
        return torch.bmm(xs.mT, matrix.mT.expand(batch, channels, out))
    y = torch.bmm(matrix.expand(batch, out, channels), xs)  # written (B, O, P)
    return y.mT.contiguous() if y_last else y


def _map(x, matrix, bias, x_last: bool, y_last: bool) -> torch.Tensor:
    y = _gemm(x, matrix, x_last, y_last)
    if bias is not None:  # in place: one pass fewer than baddbmm, which copies the broadcast bias first
        y.add_(bias.reshape((1, 1, -1) if y_last else (1, -1, 1)))
    return y


def _matrix_grad(grad: torch.Tensor, x: torch.Tensor, x_last: bool, y_last: bool) -> torch.Tensor:
    """(O, C): the stored pixels' product grad @ x^T, summed over the batch."""
    g = grad.mT if y_last else grad  # (B, O, P)
    xs = x.mT if x_last else x  # (B, C, P)
    if xs.shape[1] < g.shape[1]:  # written with the wider last dim
        return torch.bmm(xs, g.mT).sum(0).mT
    return torch.bmm(g, xs.mT).sum(0)


@signature_stored  # (apply: ~30 us less per call)
class _PixelMap(torch.autograd.Function):
    generate_vmap_rule = True  # with setup_context: torch.func's grad, vmap, jacrev work as for nn.Conv2d

    @staticmethod
    def forward(x, matrix, bias, x_last: bool, y_last: bool):
        return _map(x, matrix, bias, x_last, y_last)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, matrix, _, x_last, y_last = inputs
        ctx.save_for_backward(x, matrix)
        ctx.layouts = (x_last, y_last)

    @staticmethod
    def backward(ctx, grad):
        x, matrix = ctx.saved_tensors
        x_last, y_last = ctx.layouts
        grad_x = grad_matrix = grad_bias = None
        if ctx.needs_input_grad[0]:  # matrix^T @ grad, written in x's layout
            grad_x = _gemm(grad, matrix.mT, y_last, x_last)
        g = grad.mT if y_last else grad  # (B, O, P)
        if ctx.needs_input_grad[1]:
            grad_matrix = _matrix_grad(grad, x, x_last, y_last)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum((0, 2))
        return grad_x, grad_matrix, grad_bias, None, None


def pixel_map(x: torch.Tensor, matrix: torch.Tensor, bias, x_last: bool, y_last: bool) -> torch.Tensor:
    """Stored pixels (B, O, P) or (B, P, O) of ``matrix @ x + bias`` for stored pixels ``x`` (see module doc);
    ``matrix`` (O, C), ``bias`` (O,) or None."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, matrix, bias)):
        return _PixelMap.apply(x, matrix, bias, x_last, y_last)
    return _map(x, matrix, bias, x_last, y_last)  # no graph to record: skip the Function's per-call overhead
