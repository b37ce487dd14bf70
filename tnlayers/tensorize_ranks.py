"""What ``tensorize`` does for ranks given as "auto", "vbmf" or "energy:<e>": which layers ask for them, what the
chooser (``tnlayers/rank_selection``) needs of each layer — its weight in the network's mode order, and for a
FLOPs budget the FLOPs each candidate rank costs at the layer's input in one dry forward of ``example_inputs``."""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

from .classifier import dry_forward
from .conversion_plan import LayerPlan
from .formats import get_format
from .rank_selection import BUDGETS_OF, Candidate, choose_ranks, parse_method

__all__ = ["rank_methods", "choose_from_weights"]

PROGRESS_BAR = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"  # tqdm, as tensorize's


def rank_methods(unique: dict, init: str, budget, budget_of: str) -> dict:
    """{plan key: (method, energy)} for the layers whose rank is a string ("auto", "vbmf", "energy:0.9")."""
    methods = {}
    for key, (name, plan) in unique.items():
        try:
            methods[key] = parse_method(plan.rank)
        except ValueError as err:  # name the layer: a rank mapping may give each layer its own string
            raise ValueError(f"tensorizing {name or '<model>'!r}: {err}") from None
    methods = {key: m for key, m in methods.items() if m is not None}
    if methods and init != "decompose":
        asked = sorted({plan.rank for key, (_, plan) in unique.items() if key in methods})
        raise ValueError(f"rank={asked[0]!r} chooses ranks from the weights being decomposed, so it needs "
                         f"init='decompose' (with init='random' there is nothing to measure); or give an int or "
                         f"float rank")
    auto = any(m[0] == "auto" for m in methods.values())
    if auto and budget is None:
        raise TypeError("rank='auto' needs budget=: a float in (0, 1] (the fraction of the selected layers' dense "
                        "parameters to keep) or an int (a parameter count)")
    if budget is not None and not auto:
        raise ValueError("budget= is only used by rank='auto' (no selected layer has it); drop budget=, or give "
                         "rank='auto'")
    if budget_of != "params" and budget is None:
        raise ValueError(f"budget_of={budget_of!r} is only used with rank='auto' and budget=")
    return methods


def _input_shapes(model: nn.Module, modules: Dict[object, nn.Module], example_inputs) -> Dict[object, tuple]:
    """{key: the input shape of that module} in one dry forward (eval mode, no grad) of ``example_inputs``."""
    shapes: Dict[object, tuple] = {}

    def record(key):
        def hook(module, inputs, output) -> None:  # returns None: the output is left as it is
            shapes.setdefault(key, tuple(inputs[0].shape))
        return hook
    dry_forward(model, [(m, record(key)) for key, m in modules.items()], example_inputs)
    return shapes


def _flops(probe: nn.Module, shape: tuple):
    """(rank value -> FLOPs at an input of ``shape``, the dense layer's FLOPs there): the probe's own cost model
    with the candidate's contraction plan in place of its rank-1 plan."""
    plan_class, x = type(probe.plan), torch.empty(shape, device="meta")
    extra = (probe.kernel_size, probe.groups) if hasattr(probe, "kernel_size") else ()
    dense, _ = probe._costs(x)
    dense_flops = dense - probe.plan.weight_cost  # nn's layer: no weight to build

    def flops_of(network) -> int:
        saved, probe.plan = probe.plan, plan_class(network, probe.roles, *extra)
        try:
            dense, factorized = probe._costs(x)
        finally:
            probe.plan = saved
        return int(dense if factorized is None else min(dense, factorized))
    return flops_of, int(dense_flops)


def choose_from_weights(model: nn.Module, unique: dict, methods: dict, budget, budget_of: str,
                        build: Callable[[str, LayerPlan], nn.Module], options: dict, show: bool,
                        example_inputs) -> dict:
    """Sets ``plan.rank`` of every layer in ``methods`` from its weight; returns {plan key: RankChoice}.
    ``build(name, plan)`` makes a layer (here a rank-1 probe: its network's modes and roles, its cost model)."""
    from tqdm.auto import tqdm  # only when choosing: keeps `import tnlayers` light

    if budget_of not in BUDGETS_OF:
        raise ValueError(f"budget_of must be one of {BUDGETS_OF}, got {budget_of!r}")
    shapes = {}
    if budget_of == "flops":
        if example_inputs is None:
            raise ValueError("budget_of='flops' needs example_inputs=: a layer's FLOPs depend on its input's size")
        auto = {key: unique[key][1].module for key, m in methods.items() if m[0] == "auto"}
        shapes = _input_shapes(model, auto, example_inputs)
        missing = [unique[key][0] or "<model>" for key in auto if key not in shapes]
        if missing:
            raise ValueError(f"budget_of='flops': {missing[:5]} did not run in the forward of example_inputs, so their "
                             f"FLOPs are unknown; leave them out of rank='auto' (a rank mapping) or pass inputs "
                             f"that reach them")
    candidates = {}
    for key, (method, energy) in methods.items():
        name, plan = unique[key]
        probe = build(name, LayerPlan(plan.module, plan.format, 1, plan.shape))  # rank 1: tiny
        if key in shapes and not hasattr(probe, "_costs"):
            raise ValueError(f"budget_of='flops': {type(probe).__name__} {name!r} has no FLOP model")
        bias = 0 if getattr(plan.module, "bias", None) is None else plan.module.bias.numel()
        fmt = get_format(plan.format)
        candidate = Candidate(name or "<model>", fmt, probe.network.modes, probe.roles,
                              probe._weight_to_modes(plan.module.weight), bias, probe.dense_params)
        if key in shapes:
            flops_of, candidate.dense_flops = _flops(probe, shapes[key])
            candidate.flops_of = lambda value, c=candidate, f=flops_of: f(c.network_of(value))
        candidates[key] = (candidate, method, energy)
    sizes = {c.name: c.weight.numel() for c, _, _ in candidates.values()}  # a curve's cost ~ the weight's size
    with tqdm(total=sum(sizes.values()), desc="choosing ranks", disable=not show, bar_format=PROGRESS_BAR) as bar:
        chosen = choose_ranks(candidates, budget, options, lambda name: bar.update(sizes[name]), budget_of)
    for key, choice in chosen.items():
        unique[key][1].rank = choice.rank
    return chosen
