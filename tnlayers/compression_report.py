"""``summary``: what ``tensorize`` did to a model — each tensorized layer against its dense counterpart,
the Conv/Linear layers left dense, and the totals. A layer (or model) that got larger says "larger"."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .layers.tensorized import TensorizedLayer
from .metrics import norm_deviation

__all__ = ["summary", "Summary", "size_change"]


def size_change(params: int, dense: int) -> str:
    """``"2.29x smaller"`` / ``"10.42x larger"`` / ``"same size"``: params against dense, the direction in words
    (a bare ratio such as "0.1x" does not say which way it goes)."""
    if params == dense:
        return "same size"
    if params < dense:
        return f"{dense / max(params, 1):.2f}x smaller"
    return f"{params / max(dense, 1):.2f}x larger"


@dataclass(repr=False)
class Summary:
    """Returned by :func:`summary`: one row (a dict) per tensorized layer, and the model's totals. ``table`` is
    the text table that :func:`summary` prints; ``str``/``repr`` are one line (so ``print(summary(model))``
    shows the table once, then that line, and a REPL or notebook echoes the line, not the rows)."""

    rows: List[dict]
    params: int  # the model's parameter count as it is
    dense_params: int  # the count if every tensorized layer were its dense counterpart
    dense_layers: List[str] = field(default_factory=list)  # Conv/Linear modules left dense (the classifier, ...)

    @property
    def compression(self) -> float:
        """dense / tensorized parameters: > 1 smaller, < 1 larger than the dense model."""
        return self.dense_params / max(self.params, 1)

    @property
    def larger(self) -> List[str]:
        """The tensorized layers with more parameters than their dense counterpart."""
        return [r["name"] for r in self.rows if r["params"] > r["dense_params"]]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        larger = f" ({len(self.larger)} larger than dense)" if self.larger else ""
        return (f"<tnlayers Summary: {len(self.rows)} tensorized layer(s){larger}, {len(self.dense_layers)} "
                f"Conv/Linear left dense; {self.params:,} parameters (dense: {self.dense_params:,}, "
                f"{size_change(self.params, self.dense_params)}); .table has the table>")

    @property
    def budget_lines(self) -> List[str]:
        """One line per ``rank="auto"`` budget: what was asked, what the layers sharing it use."""
        groups: dict = {}
        for r in self.rows:
            if r["rank_by"] == "auto":
                groups.setdefault((r["budget"], r["budget_of"]), []).append(r)
        lines = []
        for (budget, of), rows in groups.items():
            params, dense = sum(r["params"] for r in rows), sum(r["dense_params"] for r in rows)
            unit = "parameters" if of == "params" else "FLOPs at example_inputs"
            asked = f"{budget:.4g} of their dense {unit}" if isinstance(budget, float) else f"{budget:,} {unit}"
            used = (f"{params:,} of {dense:,} parameters ({params / dense:.4g} of dense)" if of == "params" else
                    f"{rows[0]['budget_used']:.4g} of the dense FLOPs; {params:,} of {dense:,} parameters")
            lines.append(f"rank='auto': {len(rows)} layer(s), budget {asked}: {used}")
        return lines

    @property
    def table(self) -> str:
        """The table :func:`summary` prints: a row per tensorized layer, the layers left dense, the totals."""
        chosen = any(r["rank_by"] for r in self.rows)  # the column only when some rank was chosen
        header = ("layer", "format", "shape", "ranks", *(("rank by",) if chosen else ()), "params", "dense",
                  "vs dense", "error", "Q")
        lines = [header]
        for r in self.rows:
            ranks = list(r["ranks"].values())
            ranks = str(ranks[0]) if len(set(ranks)) == 1 else str(ranks)
            error = "-" if r["error"] is None else f"{r['error']:.3g}"
            lines.append((r["name"], r["format"], "x".join(map(str, r["shape"])), ranks,
                          *((r["rank_by"] or "given",) if chosen else ()), f"{r['params']:,}",
                          f"{r['dense_params']:,}", size_change(r["params"], r["dense_params"]), error,
                          f"{r['Q']:.3g}"))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
        if self.larger:
            text.append(f"{len(self.larger)} of {len(self.rows)} tensorized layers are larger than dense: "
                        f"lower their rank, or leave them dense")
        text.extend(self.budget_lines)
        if self.dense_layers:
            shown = ", ".join(self.dense_layers[:8]) + (", ..." if len(self.dense_layers) > 8 else "")
            text.append(f"left dense: {len(self.dense_layers)} Conv/Linear layer(s): {shown}")
        text.append(f"total: {self.params:,} parameters (dense: {self.dense_params:,}, "
                    f"{size_change(self.params, self.dense_params)})")
        return "\n".join(text)


def _row(name: str, layer: TensorizedLayer) -> dict:
    bias = 0 if layer.bias is None else layer.bias.numel()
    params = layer.network.num_params + bias
    dense = layer.dense_params  # what nn.Conv2d/nn.Linear would hold, bias included
    choice = getattr(layer, "rank_choice", None)  # set by tensorize(rank="auto" | "vbmf" | "energy:...")
    return dict(name=name or "<model>", format=layer.format, shape=tuple(layer.network.modes), ranks=layer.ranks,
                params=params, dense_params=dense, compression=dense / params,
                error=getattr(layer, "decomposition_error", None),
                rank_by=None if choice is None else choice.method,
                estimated_error=None if choice is None else choice.estimated_error,
                budget=None if choice is None else choice.budget,
                budget_of=None if choice is None else choice.budget_of,
                budget_used=None if choice is None else choice.used,
                Q=float("nan") if layer.cores[0].is_meta else float(norm_deviation(layer.cores)))


@torch.no_grad()
def summary(model: nn.Module, print_table: bool = True) -> Summary:
    """Every tensorized layer (name, format, tensorized shape, ranks, how they were chosen when
    ``tensorize`` chose them — "auto", "vbmf", "energy:0.9" —, parameters against dense — "smaller" or
    "larger" —, decomposition error if decomposed, norm deviation Q), the Conv/Linear layers left dense,
    each ``rank="auto"`` budget against what its layers use, and the totals, dense vs tensorized. Prints the table unless ``print_table=False``, and returns a
    :class:`Summary` (``rows``, ``params``, ``dense_params``, ``dense_layers``, ``larger``, and ``table``, the
    printed text). Call it as a statement: the returned object prints as one line, not as the table again
    (``print(summary(model))`` shows the table once, then that line).

        >>> import tnlayers
        >>> model = tnlayers.models.tr_resnet20(rank=4)
        >>> report = tnlayers.summary(model, print_table=False)  # print_table=True (default) prints report.table
        >>> len(report), report.params < report.dense_params, report.dense_layers
        (19, True, ['fc'])
        >>> print(report.table.splitlines()[0])
        layer  format  shape  ranks  params  dense  vs dense  error  Q
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"summary expects an nn.Module, got {type(model).__name__}")
    if not isinstance(print_table, bool):
        raise TypeError(f"print_table must be True or False, got {print_table!r}")
    rows, dense_layers = [], []
    for name, module in model.named_modules():
        if isinstance(module, TensorizedLayer):
            rows.append(_row(name, module))
        elif isinstance(module, (_ConvNd, nn.Linear)):
            dense_layers.append(name or "<model>")
    total = sum(p.numel() for p in model.parameters())
    dense_total = total + sum(r["dense_params"] - r["params"] for r in rows)
    result = Summary(rows, total, dense_total, dense_layers)
    if print_table:
        print(result.table)
    return result
