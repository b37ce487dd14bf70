"""Ranks chosen from the weights: error-versus-rank curves per layer and format (``curves``), a budgeted
allocation across layers (``allocation``), EVBMF for Tucker-2 (``vbmf``), and what ``tensorize`` calls
(``choose``). Design notes: docs/design.md, 'Choosing ranks'.

    >>> import torch
    >>> from tnlayers.formats import get_format
    >>> from tnlayers.rank_selection import allocate, error_curve
    >>> W = torch.randn(16, 9, 16, dtype=torch.float64)
    >>> curve = error_curve(W, "tucker", lambda r: get_format("tucker").network((16, 9, 16), [r, None, r]), W.numel())
    >>> pick = allocate([curve], budget=int(curve.params[3]))[0]
    >>> curve.ranks[pick]
    4
"""
from __future__ import annotations

from .allocation import allocate, minimum_params
from .choose import BUDGETS_OF, METHODS, Candidate, RankChoice, check_budget, choose_ranks, parse_method
from .curves import LayerCurve, error_curve
from .vbmf import evbmf_rank

__all__ = ["BUDGETS_OF", "allocate", "minimum_params", "METHODS", "Candidate", "RankChoice", "check_budget", "choose_ranks",
           "parse_method", "LayerCurve", "error_curve", "evbmf_rank"]
