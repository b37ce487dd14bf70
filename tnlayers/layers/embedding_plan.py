"""The contractions of a tensorized embedding's cores, planned once with opt_einsum: the table, the rows of
given indices (gathered from the cores: the table is never built), and ``x @ table^T`` (a tied output head).

Mode k of the network is the merged mode n_k = i_k * j_k, split row-major into (i_k, j_k): i_k a digit of
the row index (mixed radix, i_1 the most significant), j_k a digit of the embedding dimension (CP's network
is over the separate modes (i_1, ..., i_d, j_1, ..., j_d) instead: embedding_layout.py). A lookup
takes the digits of each index, gathers the slice ``core[..., digit, :, ...]`` of every core holding a mode
(a TT core (r, i_k j_k, r') gives an (r, j_k, r') matrix per row), and contracts those slices per row, with
the cores holding no mode (a Tucker core) shared by all rows: for TT, U rows cost
2 U sum_k (j_1 ... j_{k-1}) r_{k-1} j_k r_k multiply-adds and U sum_k r_{k-1} j_k r_k gathered entries, nothing
of order num_embeddings x embedding_dim. The same code serves every format: only the labels differ.
"""
from __future__ import annotations

from math import prod
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..contract import _under_autocast, expression
from ..formats.network import Network, einsum_equation, mode_label

__all__ = ["EmbeddingPlan", "bucket"]

_BATCH = "_batch"  # the rows' axis (never clashes with the network's m*/r* labels)


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two: one planned path (and one strategy decision) per bucket."""
    return 1 << max(n - 1, 0).bit_length()


def _i(k: int) -> str:
    return f"_i{k}"


def _j(k: int) -> str:
    return f"_j{k}"


class EmbeddingPlan:
    """Contractions of ``net`` (over merged modes ``in_shape[k] * out_shape[k]``) for a table of
    ``num_embeddings`` rows (``prod(in_shape)`` >= it: the rows past it are never returned)."""

    def __init__(self, net: Network, in_shape: Sequence[int], out_shape: Sequence[int], num_embeddings: int):
        self.net, self.in_shape, self.out_shape = net, tuple(in_shape), tuple(out_shape)
        self.num_embeddings, self.rows, self.dim = num_embeddings, prod(in_shape), prod(out_shape)
        d = len(self.in_shape)
        sizes = dict(net.sizes)
        sizes.update({_i(k): n for k, n in enumerate(self.in_shape)})
        sizes.update({_j(k): n for k, n in enumerate(self.out_shape)})
        self.sizes = sizes
        self.i_labels, self.j_labels = [_i(k) for k in range(d)], [_j(k) for k in range(d)]
        self.separate = len(net.modes) == 2 * d  # modes (i..., j...), not (i_k j_k, ...)
        self.split, self.held, self.split_shapes = self._split(net.cores)
        self._table, self.table_cost = expression(einsum_equation(self.split, self.i_labels + self.j_labels),
                                                  tuple(self.split_shapes))
        # Tucker: the core is absorbed into its last factor (core x F: (R..., n_last), once per call) before the
        # gather, so a row contracts slices of that product with the other factors' slices; with the core
        # contracted per row instead, each row cost R_1...R_d j_last multiply-adds (19x more at rank 80)
        lookup_cores, self._absorb = list(net.cores), None
        if net.format == "tucker" and len(net.cores) > 1:
            (mode, bond), last = net.cores[-1], len(net.cores) - 1
            absorbed = tuple(mode if label == bond else label for label in net.cores[0])
            self._absorb = expression(einsum_equation([net.cores[0], net.cores[-1]], absorbed),
                                      (net.shapes[0], net.shapes[-1]))
            lookup_cores = [absorbed, *net.cores[1:last]]
        self._lsplit, self._lheld, self._lshapes = self._split(lookup_cores)
        # a gathered core: the rows first, then its labels without the index digits
        self.gathered = [((_BATCH,) if held else ()) + tuple(x for x in labels if x not in self.i_labels)
                         for labels, held in zip(self._lsplit, self._lheld)]
        self._lookup_eq = einsum_equation(self.gathered, [_BATCH] + self.j_labels)
        self._logits_eq = einsum_equation([[_BATCH] + self.j_labels] + self.split, [_BATCH] + self.i_labels)
        strides = [prod(self.in_shape[k + 1:]) for k in range(d)]
        self._strides, self._radix = strides, list(self.in_shape)
        # TT and TR: every core holds one mode between its two bonds (TT's ends lack one): contracted left to
        # right as (U, a, j, b) slices by batched matmuls, which need no transposed copies (opt_einsum's order
        # for the equal-cost paths of a chain left 30% of the lookup's time to permuting copies)
        self.chain = net.format in ("tt", "tr")
        if self.chain:
            bond = lambda label: not label.startswith("m")  # noqa: E731 (network.py: modes are m0, m1, ...)
            self._sides = [(sizes[labels[0]] if bond(labels[0]) else 1, sizes[labels[-1]] if bond(labels[-1]) else 1)
                           for labels in net.cores]
            j, (first, last) = self.out_shape, (self._sides[0][0], self._sides[-1][1])
            left = sum(first * prod(j[:k]) * a * j[k] * b for k, (a, b) in enumerate(self._sides) if k > 0)
            right = sum(a * j[k] * b * prod(j[k + 1:]) * last for k, (a, b) in enumerate(self._sides) if k < d - 1)
            self._left_first = left <= right

    def _split(self, cores):
        """Per core: its labels with each mode m_k split into (i_k, j_k), the modes it holds, its split shape."""
        d = len(self.in_shape)
        if self.separate:
            parts = {mode_label(k): (_i(k),) for k in range(d)}
            parts.update({mode_label(d + k): (_j(k),) for k in range(d)})
        else:
            parts = {mode_label(k): (_i(k), _j(k)) for k in range(d)}
        split = [tuple(x for label in labels for x in parts.get(label, (label,))) for labels in cores]
        held = [[int(x[2:]) for x in labels if x.startswith("_i")] for labels in split]
        return split, held, [tuple(self.sizes[x] for x in labels) for labels in split]

    # -- shapes and costs -------------------------------------------------------------------------------
    def _gathered_shapes(self, rows: int) -> Tuple[Tuple[int, ...], ...]:
        return tuple(tuple(rows if x == _BATCH else self.sizes[x] for x in labels) for labels in self.gathered)

    def _lookup(self, rows: int):
        return expression(self._lookup_eq, self._gathered_shapes(bucket(rows)))

    def _logits(self, rows: int):
        x_shape = (bucket(rows), *self.out_shape)
        return expression(self._logits_eq, (x_shape, *self.split_shapes))

    def lookup_costs(self, rows: int) -> Tuple[int, int]:
        """(rebuild the table then gather, gather from the cores) FLOP estimates for ``rows`` distinct rows."""
        planned = bucket(rows)
        absorb = 0 if self._absorb is None else self._absorb[1]
        return self.table_cost + rows * self.dim, absorb + self._lookup(rows)[1] * rows // planned

    def logits_costs(self, rows: int) -> Tuple[int, int]:
        """(rebuild the table then ``F.linear``, contract ``x`` through the cores) FLOP estimates."""
        planned = bucket(rows)
        return (self.table_cost + 2 * rows * self.num_embeddings * self.dim,
                self._logits(rows)[1] * rows // planned)

    # -- contractions -----------------------------------------------------------------------------------
    def _split_cores(self, cores: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [c.reshape(shape) for c, shape in zip(cores, self.split_shapes)]

    def table(self, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        """The table, (num_embeddings, embedding_dim): rows past num_embeddings are not returned."""
        full = self._table(*self._split_cores(_under_autocast(cores))).reshape(self.rows, self.dim)
        return full[:self.num_embeddings]

    def digits(self, indices: torch.Tensor) -> torch.Tensor:
        """(U, d) mixed-radix digits of 1-D ``indices`` (i_1 the most significant)."""
        strides = torch.tensor(self._strides, device=indices.device, dtype=torch.int64)
        radix = torch.tensor(self._radix, device=indices.device, dtype=torch.int64)
        return indices.to(torch.int64).unsqueeze(1).div(strides, rounding_mode="floor").remainder(radix)

    def _gather(self, core: torch.Tensor, k: int, digits: torch.Tensor) -> torch.Tensor:
        """Core ``k``'s slices at the rows' digits: (U, its other axes), the index digits moved out."""
        labels, held = self._lsplit[k], self._lheld[k]
        axes = [labels.index(_i(m)) for m in held]
        moved = core.reshape(self._lshapes[k]).movedim(axes, list(range(len(axes))))
        rest = moved.shape[len(axes):]
        flat_index = digits[:, held[0]]
        for m in held[1:]:  # several modes on one core (a Tucker core with unfactored modes): one flat index
            flat_index = flat_index * self.in_shape[m] + digits[:, m]
        # F.embedding, not index_select: its CPU backward sums repeated rows 3-4x faster than index_add_
        picked = F.embedding(flat_index, moved.reshape(prod(self.in_shape[m] for m in held), -1))
        return picked.reshape(len(flat_index), *rest)

    def lookup(self, cores: Sequence[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (1-D, in range) of the table, (U, embedding_dim), without building the table."""
        cores = _under_autocast(cores)
        if self._absorb is not None:
            cores = [self._absorb[0](cores[0], cores[-1]), *cores[1:-1]]
        digits = self.digits(indices)
        operands = [self._gather(c, k, digits) if self._lheld[k] else c for k, c in enumerate(cores)]
        if self.chain:
            return self._chain(operands)
        if self.separate and self.net.format == "cp":
            return self._cp(operands)
        if self._absorb is not None and len(self.net.cores) == len(self.in_shape) + 1:
            return self._tucker(operands)
        return self._lookup(len(indices))[0](*operands).reshape(len(indices), self.dim)

    def _tucker(self, slices: List[torch.Tensor]) -> torch.Tensor:
        """Tucker with every mode factored: the absorbed core's slices (U, R_0, ..., R_{d-2}, j_last) and the
        other factors' (U, j_k, R_k), contracted by batched matmuls over the leading bond each time, so the
        large (U, R_0 R_1 ..., j_last) slices are never transposed (opt_einsum's order copied them: half the
        lookup's time at rank 45); only the shrinking remainder moves its new dim mode to the back."""
        out, factors = slices[0], slices[1:]
        rows, j = out.shape[0], self.out_shape
        for k, factor in enumerate(factors):  # out: (U, R_k, ..., R_{d-2}, j_last, j_0, ..., j_{k-1})
            rest = prod(out.shape[1:]) // factor.shape[-1]  # (explicit sizes: U may be 0)
            out = torch.bmm(factor, out.reshape(rows, factor.shape[-1], rest))  # (U, j_k, the rest)
            if k < len(factors) - 1:
                out = out.transpose(1, 2).contiguous()
        d = len(j)  # out: (U, j_{d-2}, j_last, j_0, ..., j_{d-3})
        order = [d - 2, d - 1, *range(d - 2)]
        out = out.reshape(rows, *(j[m] for m in order))
        return out.permute(0, *(1 + order.index(m) for m in range(d))).reshape(rows, self.dim)

    def _cp(self, operands: List[torch.Tensor]) -> torch.Tensor:
        """CP over separate modes: the gathered rows of the index factors, (U, R) each, multiplied together,
        then one matrix product with the Khatri-Rao product of the dim factors, (embedding_dim, R)."""
        d = len(self.in_shape)
        rows = operands[0]
        for factor in operands[1:d]:
            rows = rows * factor
        dims = operands[d]
        for factor in operands[d + 1:]:  # (j_a, R), (j_b, R) -> (j_a j_b, R), row-major
            dims = (dims.unsqueeze(1) * factor.unsqueeze(0)).reshape(dims.shape[0] * factor.shape[0], -1)
        return rows @ dims.T

    def _chain(self, slices: List[torch.Tensor]) -> torch.Tensor:
        """A train's or ring's gathered slices, (U, a_k, j_k, b_k) each, contracted by batched matmuls from the
        cheaper end. A ring is closed by its last step, a matmul over both end bonds at once (a trace after it
        would first build (U, r, embedding_dim, r)). Sizes are explicit: U may be 0."""
        rows, sides, j = slices[0].shape[0], self._sides, self.out_shape
        ring, d = sides[0][0] > 1 or sides[-1][1] > 1, len(slices)
        if self._left_first:
            width = sides[0][0] * j[0]  # out: (U, a_0 j_0 ... j_k, b_k)
            out = slices[0].reshape(rows, width, sides[0][1])
            for k in range(1, d - 1 if ring else d):
                a, b = sides[k]
                out = torch.bmm(out, slices[k].reshape(rows, a, j[k] * b)).reshape(rows, width * j[k], b)
                width *= j[k]
            if not ring:
                return out.reshape(rows, self.dim)
            (a, b), first = sides[-1], sides[0][0]  # close: sum over (a_0, b_{d-2}) of out x the last slice
            out = out.reshape(rows, first, width // first, a).transpose(1, 2).reshape(rows, width // first, first * a)
            last = slices[-1].permute(0, 3, 1, 2).reshape(rows, b * a, j[-1])
            return torch.bmm(out, last).reshape(rows, self.dim)
        width = j[-1] * sides[-1][1]  # out: (U, a_k, j_k ... j_last b_last)
        out = slices[-1].reshape(rows, sides[-1][0], width)
        for k in range(d - 2, 0 if ring else -1, -1):
            a, b = sides[k]
            out = torch.bmm(slices[k].reshape(rows, a * j[k], b), out).reshape(rows, a, j[k] * width)
            width *= j[k]
        if not ring:
            return out.reshape(rows, self.dim)
        (a, b), last = sides[0], sides[-1][1]  # close: sum over (b_last, a_1) of the first slice x out
        out = out.reshape(rows, b, width // last, last).permute(0, 3, 1, 2).reshape(rows, last * b, width // last)
        first = slices[0].transpose(1, 2).reshape(rows, j[0], a * b)
        return torch.bmm(first, out).reshape(rows, self.dim)

    def logits(self, x2d: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        """``x2d @ table^T``, (B, num_embeddings), contracting ``x2d`` (B, embedding_dim) through the cores."""
        rows = x2d.shape[0]
        x, *cores = _under_autocast([x2d, *cores])
        out = self._logits(rows)[0](x.reshape(rows, *self.out_shape), *self._split_cores(cores))
        return out.reshape(rows, self.rows)[:, :self.num_embeddings]

    def to_modes(self, weight: torch.Tensor) -> torch.Tensor:
        """A dense table (num_embeddings, embedding_dim) as the network's full tensor: rows padded with zeros
        to ``prod(in_shape)``, each merged mode k holding (i_k, j_k) row-major (or the modes (i..., j...))."""
        d = len(self.in_shape)
        if self.rows > weight.shape[0]:
            weight = torch.cat([weight, weight.new_zeros(self.rows - weight.shape[0], weight.shape[1])])
        split = weight.reshape(*self.in_shape, *self.out_shape)
        if self.separate:
            return split
        order = [a for k in range(d) for a in (k, d + k)]
        return split.permute(order).reshape(self.net.modes)
