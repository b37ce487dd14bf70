"""How a tensorized layer applies its cores: the global override, and what ``strategy="auto"`` decides.

* ``"dense"``: contract the cores into the weight, then one ``F.conv2d``/``F.linear``;
* ``"factorized"``: contract the input through the cores (1x1 map -> small k x k conv -> 1x1 map);
* ``"flops"``: the cheaper by opt_einsum's FLOP estimate (no timing: the same choice on every run);
* ``"auto"``: the FLOP estimate, refined by timing both once where it is not decisive.

The factorized chain wins only when it needs several times fewer multiply-adds than dense: its thin
intermediate convolutions are memory-bound, so FLOPs alone can pick it wrongly at high rank (a CP conv of
rank 137 on 64 channels has half the FLOPs of dense; on one CPU core its training step took 1.76x dense's
time where fresh activations page-fault, 0.8x with memory reused: the winner depends on the machine and
even on the process's allocator). ``"auto"`` therefore
times one forward (+ backward when gradients are needed) of each strategy on the first call for a given
layer configuration, input shape, device, dtype and grad mode, and caches the faster (factorized only when
it is at least ``TIE`` faster: ties go to dense; a close call, within ``CLOSE``, is timed ``EXTRA_REPEATS``
more times); layers of the same configuration share the decision.
Timing is skipped where the FLOP estimate settles it (one strategy needs ``TRUST_RATIO`` times fewer
FLOPs) or where the layer is too small for the choice to matter (``MIN_TIMED_FLOPS``), on devices other
than CPU and CUDA, and inside ``torch.compile`` (traced forwards use a decision an eager call already
made, else the FLOP estimate). Timings vary from run to run, so two runs may choose differently in close
cases (both ways give the same result up to rounding); ``"flops"`` or a forced strategy never varies.
Design notes: docs/design.md, 'Strategy cost model'.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Hashable, Optional

import torch

__all__ = ["STRATEGIES", "set_strategy", "get_strategy", "check_strategy", "decide", "choose", "clear_decisions"]

STRATEGIES = ("auto", "flops", "dense", "factorized")
TRUST_RATIO = 8.0  # a FLOP ratio beyond this decides without timing
MIN_TIMED_FLOPS = 5e7  # below this (about a millisecond on one CPU core) either choice is fine: not timed
TIE = 0.05  # timings closer than this fraction are a tie, which goes to dense (see decide)
REPEATS = 3  # timed runs per strategy after one warm-up each, interleaved; the minimum counts
CLOSE = 1.25  # minimums closer than this ratio after REPEATS rounds: a close call, timed EXTRA_REPEATS more
EXTRA_REPEATS = 2
EARLY_RATIO = 3.0  # first timed runs this far apart decide at once (no repeats of a slow strategy)
_MAX_DECISIONS = 4096
_MAX_CHOICES_PER_MODULE = 64  # input shapes a module remembers its choice for

_override: Optional[str] = None
_decisions: Dict[Hashable, str] = {}


def check_strategy(strategy, allow_none: bool = False, name: str = "strategy") -> None:
    if strategy is None and allow_none:
        return
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        allowed = STRATEGIES + ((None,) if allow_none else ())
        raise ValueError(f"{name} must be one of {allowed}, got {strategy!r}")


def get_strategy() -> Optional[str]:
    """The strategy forced on every tensorized layer by :class:`set_strategy`, or None (each its own)."""
    return _override


class set_strategy:
    """Force one strategy on every tensorized layer (``None``: each layer's own ``strategy``).

    Like ``torch.set_grad_enabled``: as a call it stays in force; as a context manager the previous
    setting comes back on exit::

        tnlayers.set_strategy("dense")           # from now on
        with tnlayers.set_strategy("factorized"):
            y = model(x)                          # only here
    """

    def __init__(self, strategy: Optional[str]):
        global _override
        check_strategy(strategy, allow_none=True)
        self.previous, _override = _override, strategy

    def __enter__(self) -> "set_strategy":
        return self

    def __exit__(self, *exc) -> None:
        global _override
        _override = self.previous


def clear_decisions() -> None:
    """Forget every timed decision of ``"auto"`` (they are retaken on the next call)."""
    _decisions.clear()


def by_flops(dense: int, factorized: Optional[int]) -> str:
    return "factorized" if factorized is not None and factorized < dense else "dense"


def _timeable(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())


def _time(run: Callable[[str], None], strategy: str, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run(strategy)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _close(times: Dict[str, list]) -> bool:
    """A close call: on a shared machine one slow run in three can still flip a 20% gap, so time more."""
    low, high = sorted(min(t) for t in times.values())
    return high < CLOSE * low


def decide(key: Hashable, strategy: str, costs: Callable[[], tuple], run: Callable[[str], None],
           device: torch.device) -> str:
    """The choice of ``strategy`` ("auto" or "flops") for ``key``, made once and cached.

    ``costs()`` gives the (dense, factorized) FLOP estimates (factorized None: no such chain);
    ``run(s)`` runs strategy ``s`` once on a detached copy of the call's inputs, outside any graph.
    """
    cached = _decisions.get(key)
    if cached is not None:
        return cached
    dense, factorized = costs()
    choice = by_flops(dense, factorized)
    if strategy == "auto" and factorized is not None and _timeable(device):
        low, high = sorted((dense, factorized))
        if high >= MIN_TIMED_FLOPS and high <= TRUST_RATIO * max(low, 1):
            for s in ("dense", "factorized"):
                run(s)  # warm-up, untimed: it pays one-time costs (oneDNN/cuDNN primitives for new shapes)
            times = {"dense": [], "factorized": []}
            for repeat in range(REPEATS + EXTRA_REPEATS):
                if repeat >= REPEATS and not _close(times):
                    break  # the extra rounds are for close calls only
                # alternate who goes first: what ran just before shifts a call's time (here a chain ran 29%
                # slower right after a dense conv), and a fixed order would always charge it to one side
                for s in (("dense", "factorized") if repeat % 2 == 0 else ("factorized", "dense")):
                    times[s].append(_time(run, s, device))
                first = sorted(t[0] for t in times.values())
                if repeat == 0 and first[1] >= EARLY_RATIO * first[0]:
                    break  # a gap this wide decides: no repeats of a slow strategy
            # a tie goes to dense: one compute-bound op, steadier under load than a chain of memory-bound
            # ones, and with the inference cache exactly the dense layer's cost
            t_dense, t_factorized = min(times["dense"]), min(times["factorized"])
            choice = "factorized" if t_factorized < (1 - TIE) * t_dense else "dense"
    if len(_decisions) >= _MAX_DECISIONS:
        _decisions.clear()
    _decisions[key] = choice
    return choice


def choose(choices: Dict[Hashable, str], key: Hashable, config: tuple, strategy: str, costs: Callable[[], tuple],
           make_run: Callable[[], Callable[[str], None]], device: torch.device) -> str:
    """A module's choice for ``key`` (its input shape, device, dtype, grad mode...): remembered in the module's
    own ``choices``, else taken by :func:`decide` (shared by modules of the same ``config``) with the timing
    function ``make_run()`` builds, only then. Inside ``torch.compile`` nothing is timed or cached: a choice
    already made, else the FLOP estimate."""
    choice = choices.get(key)
    if choice is not None:
        return choice
    if torch.compiler.is_compiling():
        return by_flops(*costs())
    choice = decide(config + key, strategy, costs, make_run(), device)
    if len(choices) >= _MAX_CHOICES_PER_MODULE:
        choices.clear()
    choices[key] = choice
    return choice
