"""``tensorize(..., rank="auto" | "vbmf" | "energy:0.9")``: ranks chosen per layer from the weights being
decomposed. The string may stand for the whole model or for some layers of a rank mapping
(``{"layer4.*": "vbmf", "*": 0.1}``).

- ``"auto"`` with ``budget=``: every "auto" layer's error curve (``curves.py``), then one allocation over all of
  them (``allocation.py``) whose parameters — cores and biases of those layers — fit the budget: a float in
  (0, 1], the fraction of those layers' dense parameters (weights and biases), or an int, a parameter count.
- ``"energy:<e>"``, e in (0, 1): per layer, the smallest rank whose estimated error keeps at least the fraction
  e of the weight's squared norm (relative error at most sqrt(1 - e)).
- ``"vbmf"`` (Tucker only): per channel mode, the rank EVBMF finds in that mode's unfolding (``vbmf.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from .._caller import warn_user
from ..decompositions.subspace import mode_gram
from ..decompositions.threads import mostly_one_thread
from ..decompose import decompose_network, relative_error
from .allocation import allocate, loss, minimum_params
from .curves import LayerCurve, error_curve
from .vbmf import evbmf_rank

__all__ = ["RankChoice", "parse_method", "check_budget", "choose_ranks", "METHODS", "BUDGETS_OF"]

METHODS = ("auto", "vbmf", "energy:<fraction>")
CP_SPAN = 4.0  # CP curves (measured) reach at most this multiple of a layer's share of the budget
PROBES = 8  # "auto": TT/TR decompositions per layer at geometrically spaced ranks, correcting the estimate
FLOPS_CANDIDATES = 96  # budget_of="flops": candidates per layer whose FLOPs are planned
REFINE_ROUNDS = 4  # then at most this many rounds of decomposing TT/TR layers at the picked ranks


@dataclass
class RankChoice:
    """How a layer's rank was chosen: kept on the layer as ``rank_choice`` and shown by ``tnlayers.summary``."""
    method: str  # "auto", "vbmf", "energy:0.9"
    rank: object  # the rank given to the layer
    estimated_error: Optional[float] = None  # relative error the curve predicted (None for vbmf)
    budget: object = None  # "auto": the budget as given
    budget_of: str = "params"  # "auto": what the budget counts
    used: Optional[float] = None  # "auto": the fraction of the dense count the "auto" layers use together


def parse_method(rank) -> Optional[Tuple[str, float]]:
    """``(method, energy)`` for a rank string, None for any other rank; unknown strings are refused."""
    if not isinstance(rank, str):
        return None
    if rank in ("auto", "vbmf"):
        return rank, 0.0
    head, sep, value = rank.partition(":")
    if head == "energy" and sep:
        try:
            energy = float(value)
        except ValueError:
            energy = math.nan
        if 0.0 < energy < 1.0:
            return "energy", energy
        raise ValueError(f"rank={rank!r}: the energy to keep must be a number in (0, 1), e.g. 'energy:0.9'")
    raise ValueError(f"rank={rank!r} is not a rank: use an int, a per-bond sequence, a float in (0, 1], or one of "
                     f"'auto' (with budget=), 'vbmf' (Tucker), 'energy:<fraction>' (e.g. 'energy:0.9')")


BUDGETS_OF = ("params", "flops")


def check_budget(budget, budget_of: str = "params") -> object:
    """A float in (0, 1] (fraction of the dense parameters or FLOPs) or a positive int (a parameter or FLOP
    count); ``budget_of`` one of BUDGETS_OF."""
    if budget_of not in BUDGETS_OF:
        raise ValueError(f"budget_of must be one of {BUDGETS_OF}, got {budget_of!r}")
    if isinstance(budget, bool) or not isinstance(budget, Real):
        raise TypeError(f"budget must be a float in (0, 1] (a fraction of the selected layers' dense parameters) or "
                        f"a positive int (a parameter count), got {budget!r}")
    if isinstance(budget, Integral):
        if budget < 1:
            raise ValueError(f"budget as a parameter count must be a positive int, got {budget!r}")
        return int(budget)
    budget = float(budget)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget as a fraction of the selected layers' dense parameters must be in (0, 1], got "
                         f"{budget!r} (for a parameter count give an int)")
    return budget


@dataclass
class Candidate:
    """What the chooser needs of one layer: its format, modes and roles, its weight in mode order, sizes."""
    name: str
    fmt: object  # the format module (tnlayers.formats.<name>)
    modes: Tuple[int, ...]
    roles: Tuple[str, ...]
    weight: torch.Tensor  # the dense weight, permuted to the network's mode order
    bias: int  # bias entries (kept dense)
    dense_params: int  # weight and bias
    flops_of: Optional[Callable[[object], int]] = None  # budget_of="flops": a rank value's FLOPs at the input
    dense_flops: int = 0  # budget_of="flops": the dense layer's FLOPs at that input

    def network_of(self, rank):
        return self.fmt.network(self.modes, self.fmt.layer_rank(rank, self.roles))

    def bonds(self) -> int:
        """How many entries a per-bond rank list has for this layer (1: the format takes one int only)."""
        name = self.fmt.NAME
        if name == "tt":
            return len(self.modes) - 1
        if name == "tr":
            return len(self.modes)
        if name == "tucker":
            return sum(role != "spatial" for role in self.roles)
        return 1

    def value_of(self, step: int):
        """The ``step``-th candidate rank: uniform rank r = 1 + step // bonds with the first step % bonds bonds
        at r + 1 (steps finer than a whole rank: a budget is met more closely), each bond cut to the most it
        can use (more adds parameters, never accuracy); an int where that is uniform."""
        count = self.bonds()
        r, ahead = 1 + step // count, step % count
        if self.fmt.NAME == "cp":
            return min(r, math.prod(self.modes) // max(self.modes))
        values = [r + 1] * ahead + [r] * (count - ahead)
        if self.fmt.NAME == "tt":
            caps = [min(math.prod(self.modes[:k]), math.prod(self.modes[k:])) for k in range(1, len(self.modes))]
        elif self.fmt.NAME == "tucker":
            caps = [n for n, role in zip(self.modes, self.roles) if role != "spatial"]
        else:  # tr: a bond's use depends on its neighbours (excess() warns); no cut
            caps = values
        values = [min(v, cap) for v, cap in zip(values, caps)]
        return values[0] if len(set(values)) == 1 else values


def _curve(c: Candidate, limit: int, options: dict) -> LayerCurve:
    if c.fmt.NAME == "tucker" and c.bonds() != 2:
        raise ValueError(f"rank selection for {c.name!r}: Tucker curves are for two factored modes (Tucker-2 of a conv "
                         f"or linear layer), and this layer has {c.bonds()} (e.g. a Tucker embedding); give it an int "
                         f"or float rank in a rank mapping, or use format='tt' for it")
    return error_curve(c.weight, c.fmt.NAME, c.network_of, limit, options, c.value_of, c.bonds())


@mostly_one_thread
def _vbmf(c: Candidate) -> list:
    if c.fmt.NAME != "tucker":
        raise ValueError(f"rank='vbmf' for {c.name!r}: VBMF picks Tucker-2 ranks (one per channel mode), and this "
                         f"layer is format {c.fmt.NAME!r}; use format='tucker', or rank='energy:<fraction>' or "
                         f"rank='auto' with budget=, which work for every format")
    weight = c.weight.detach().to("cpu", torch.float64, memory_format=torch.contiguous_format)
    ranks = []
    for mode, role in enumerate(c.roles):
        if role == "spatial":
            continue
        values = torch.linalg.eigvalsh(mode_gram(weight, mode)).clamp_min(0).sqrt().numpy()
        ranks.append(max(1, evbmf_rank(values, weight.shape[mode], weight.numel() // weight.shape[mode])))
    return ranks


def choose_ranks(candidates: Dict[object, Tuple[Candidate, str, float]], budget, options: dict,
                 progress: Callable[[str], None] = lambda name: None, budget_of: str = "params"
                 ) -> Dict[object, RankChoice]:
    """``{key: RankChoice}`` for ``{key: (candidate, method, energy)}``; ``budget`` for the "auto" ones;
    ``progress(name)`` after each layer's curve."""
    chosen: Dict[object, RankChoice] = {}
    auto = {key: c for key, (c, method, _) in candidates.items() if method == "auto"}
    for key, (c, method, energy) in candidates.items():
        if method == "vbmf":
            chosen[key] = RankChoice("vbmf", _vbmf(c))
            progress(c.name)
        elif method == "energy":
            curve = _curve(c, c.dense_params - c.bias, options)
            fits = [i for i, e in enumerate(curve.error) if e <= 1.0 - energy]
            i = fits[0] if fits else len(curve.ranks) - 1
            if not fits:
                warn_user(f"rank='energy:{energy:g}' for {c.name!r}: no rank below the dense layer's size keeps that "
                          f"much energy (estimated {1 - curve.error[i]:.3g} at rank {curve.ranks[i]}); using that rank")
            chosen[key] = RankChoice(f"energy:{energy:g}", curve.ranks[i], math.sqrt(curve.error[i]))
            progress(c.name)
    if auto:
        chosen.update(_allocate(auto, budget, options, progress, budget_of))
    return chosen


def _on_flops(auto: Dict[object, Candidate], curves: Dict[object, LayerCurve]) -> Dict[object, LayerCurve]:
    """The curves with each candidate's FLOPs at the recorded input in place of its parameters (at most
    FLOPS_CANDIDATES per layer, evenly spread: each costs a contraction plan)."""
    out = {}
    for key, curve in curves.items():
        count = len(curve.ranks)
        keep = sorted({int(round(x)) for x in np.linspace(0, count - 1, min(count, FLOPS_CANDIDATES))})
        flops = np.array([auto[key].flops_of(curve.ranks[i]) for i in keep], dtype=np.int64)
        error = np.minimum.accumulate(curve.error[keep])
        order = np.maximum.accumulate(flops)  # a cost that does not grow with the rank: count the larger one
        out[key] = LayerCurve([curve.ranks[i] for i in keep], order, error, curve.dense_params)
    return out


def _auto_curves(auto: Dict[object, Candidate], fraction: float, cap: Optional[int], options: dict, progress
                 ) -> Dict[object, LayerCurve]:
    """Each "auto" layer's curve up to its dense size (and ``cap`` core parameters); CP's measured curves stop at
    CP_SPAN times the layer's ``fraction`` share (their cost grows with the rank)."""
    curves = {}
    for key, c in auto.items():
        limit = c.dense_params - c.bias
        if c.fmt.NAME == "cp":
            limit = min(limit, max(int(CP_SPAN * fraction * limit), c.network_of(1).num_params))
        curves[key] = _curve(c, max(limit if cap is None else min(limit, cap), 1), options)
        progress(c.name)
    return curves


def _check_fits(budget, allowed: int, need: int, dense: int, count: int, unit: str) -> None:
    if allowed < need:
        raise ValueError(f"budget={budget!r} allows {allowed:,} {unit} for the {count} layer(s) with rank='auto' "
                         f"(dense: {dense:,}); rank 1 in every one of them already needs {need:,} ({need / dense:.3g} "
                         f"of dense): raise the budget, or leave some layers dense (filter=)")


def _allocate(auto: Dict[object, Candidate], budget, options: dict, progress, budget_of: str = "params"
              ) -> Dict[object, RankChoice]:
    if budget_of == "flops":
        return _allocate_flops(auto, budget, options, progress)
    dense = sum(c.dense_params for c in auto.values())
    bias = sum(c.bias for c in auto.values())
    total = budget if isinstance(budget, int) else budget * dense
    cores_budget = int(math.floor(total)) - bias
    curves = _auto_curves(auto, min(1.0, total / dense), cores_budget, options, progress)
    _check_fits(budget, int(total), minimum_params(curves.values()) + bias, dense, len(auto), "parameters")
    measured = _Measurements(auto, curves, options)
    picks = _refined(auto, curves, cores_budget, measured)
    uniform = _uniform_picks(auto, curves, cores_budget)
    if uniform is not None:  # never worse than a uniform fraction that fits: compare by measured errors
        for key, i, j in zip(curves, uniform, picks):  # Tucker's curve is HOSVD's: HOOI does better, unevenly
            if auto[key].fmt.NAME in ("tt", "tr", "tucker"):
                for k in {i, j}:
                    curves[key].error[k] = measured.error(key, k)
        chosen_loss = sum(loss(c)[i] for c, i in zip(curves.values(), picks))
        if sum(loss(c)[i] for c, i in zip(curves.values(), uniform)) < chosen_loss:
            picks = uniform
    picks = _filled(list(curves.values()), picks, cores_budget)
    used = (sum(int(c.params[i]) for c, i in zip(curves.values(), picks)) + bias) / dense
    return {key: RankChoice("auto", curve.ranks[i], math.sqrt(curve.error[i]), budget, "params", used)
            for (key, curve), i in zip(curves.items(), picks)}


def _allocate_flops(auto: Dict[object, Candidate], budget, options: dict, progress) -> Dict[object, RankChoice]:
    dense = sum(c.dense_flops for c in auto.values())
    total = int(budget if isinstance(budget, int) else math.floor(budget * dense))
    curves = _on_flops(auto, _auto_curves(auto, min(1.0, total / dense), None, options, progress))
    _check_fits(budget, total, minimum_params(curves.values()), dense, len(auto), "FLOPs at example_inputs")
    picks = _filled(list(curves.values()), _refined(auto, curves, total, _Measurements(auto, curves, options)), total)
    used = sum(int(c.params[i]) for c, i in zip(curves.values(), picks)) / dense
    return {key: RankChoice("auto", curve.ranks[i], math.sqrt(curve.error[i]), budget, "flops", used)
            for (key, curve), i in zip(curves.items(), picks)}


def _filled(curves: list, picks: list, budget: int) -> list:
    """Spend what the budget has left on the next candidates that fit, the best loss decrease per parameter
    first (an estimate can be flat where a decomposition still gains; a budget is met to within a step)."""
    picks = list(picks)
    left = budget - sum(int(c.params[i]) for c, i in zip(curves, picks))
    losses = [loss(c) for c in curves]
    while True:
        steps = [((losses[n][i] - losses[n][i + 1]) / (c.params[i + 1] - c.params[i]), n)
                 for n, (c, i) in enumerate(zip(curves, picks))
                 if i + 1 < len(c.ranks) and c.params[i + 1] - c.params[i] <= left]
        if not steps:
            return picks
        _, n = max(steps)
        left -= int(curves[n].params[picks[n] + 1] - curves[n].params[picks[n]])
        picks[n] += 1


def _uniform_picks(auto: Dict[object, Candidate], curves: Dict[object, LayerCurve], budget: int) -> Optional[list]:
    """What ``rank=<fraction>`` gives (per layer the largest uniform int rank keeping at most that fraction of the
    weight) for the largest fraction whose picks fit ``budget`` together; None when even the smallest does not."""
    def picks_at(fraction: float) -> list:
        out = []
        for key, curve in curves.items():
            limit = fraction * (auto[key].dense_params - auto[key].bias)
            fits = [i for i, (r, p) in enumerate(zip(curve.ranks, curve.params)) if isinstance(r, int) and p <= limit]
            out.append(fits[-1] if fits else 0)
        return out

    def used(picks: list) -> int:
        return sum(int(c.params[i]) for c, i in zip(curves.values(), picks))

    low, high = 0.0, 1.0
    if used(picks_at(low)) > budget:
        return None
    for _ in range(40):  # bisection on the fraction: the picks only change at finitely many fractions
        mid = (low + high) / 2
        low, high = (mid, high) if used(picks_at(mid)) <= budget else (low, mid)
    return picks_at(low)


class _Measurements:
    """Relative squared errors of the format's decompositions at candidate ranks, each computed once (the
    refinement and the comparison with uniform rank ask for the same ones)."""

    def __init__(self, auto: Dict[object, Candidate], curves: Dict[object, LayerCurve], options: dict):
        self.auto, self.curves, self.options, self.done = auto, curves, options, {}

    @torch.no_grad()
    def error(self, key, index: int) -> float:
        if (key, index) not in self.done:
            c = self.auto[key]
            net = c.network_of(self.curves[key].ranks[index])
            weight = c.weight.detach().to("cpu", torch.float64, memory_format=torch.contiguous_format)
            approx = torch.einsum(net.equation(), *decompose_network(weight, net, **self.options).cores)
            self.done[key, index] = min(relative_error(approx, weight) ** 2, 1.0 - 1e-12)
        return self.done[key, index]


def _refined(auto: Dict[object, Candidate], curves: Dict[object, LayerCurve], budget: int,
             measurements: _Measurements) -> list:
    """Allocate on TT/TR curves corrected by decompositions: first at PROBES geometrically spaced candidates per
    layer, then at the ranks each allocation picks, until the picks stand (at most REFINE_ROUNDS). The TT/TR
    curves are estimates, most optimistic where many cuts each lose much (a ring cut to rank 1 loses nearly
    everything), and an allocation goes exactly where an estimate is most optimistic. Between measured
    candidates the estimate's loss is scaled by the measured/estimated ratio of its neighbours; measured ones
    take the measured loss."""
    keys = [key for key, c in auto.items() if c.fmt.NAME in ("tt", "tr")]
    estimated = {key: loss(curves[key]) for key in keys}
    measured: Dict[object, Dict[int, float]] = {key: {} for key in keys}

    def measure(key, indices) -> None:
        curve = curves[key]
        for i in indices:
            measured[key][i] = -curve.dense_params * math.log1p(-measurements.error(key, i))
        points = sorted(measured[key])
        ratios = [measured[key][j] / max(estimated[key][j], 1e-300) for j in points]
        corrected = estimated[key] * np.interp(np.arange(len(curve.ranks)), points, ratios)
        corrected[points] = [measured[key][j] for j in points]
        curve.error = np.minimum.accumulate(-np.expm1(-corrected / curve.dense_params))

    for key in keys:
        count = len(curves[key].ranks)
        measure(key, sorted({int(round(x)) - 1 for x in np.geomspace(1, count, min(PROBES, count))}))
    picks = allocate(list(curves.values()), budget)
    for _ in range(REFINE_ROUNDS):
        at = dict(zip(curves, picks))
        fresh = [key for key in keys if at[key] not in measured[key]]
        if not fresh:
            break
        for key in fresh:
            measure(key, [at[key]])
        picks = allocate(list(curves.values()), budget)
    return picks
