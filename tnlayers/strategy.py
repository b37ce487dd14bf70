"""How a tensorized layer or an adapter applies its cores: the global override, and what ``strategy="auto"``
decides.

* ``"dense"``: contract the cores into the weight, then one ``F.conv2d``/``F.linear``;
* ``"factorized"``: contract the input through the cores (1x1 map -> small k x k conv -> 1x1 map);
* ``"flops"``: the cheaper by opt_einsum's FLOP estimate (no timing: the same choice on every run and every
  rank, the deterministic mode that bitwise-reproducible runs need);
* ``"auto"``: the FLOP estimate, refined by timing both once where it is not decisive.

The factorized chain's thin intermediate convolutions are memory-bound, so FLOPs alone can pick it wrongly
at high rank (a CP conv of rank 137 on 64 channels: half dense's FLOPs, 1.76x its training-step time on one
CPU core where fresh activations page-fault, 0.8x with memory reused). ``"auto"`` therefore times one forward
(+ backward when gradients are needed) of each strategy on the first call for a given layer configuration,
input shape, device, dtype and grad mode, and keeps the faster (factorized only when at least ``TIE``
faster; a close call, within ``CLOSE``, is timed ``EXTRA_REPEATS`` more times); layers of the same
configuration share the decision. Not timed: where the FLOP estimate settles it (``TRUST_RATIO``), where the
layer is small (``MIN_TIMED_FLOPS``: dense, whose few ops cost less than the chain's many), on devices other
than CPU and CUDA, and inside ``torch.compile`` (a decision already made, else the untimed rule: FLOPs, small
layers dense). Timings vary from run to run, so two runs may choose differently in close cases (same result up
to rounding); ``"flops"`` or a forced strategy never varies.

One front end serves layers and adapters alike: :class:`StrategyChooser` (the process-wide ``chooser``)
builds the decision key, holds the shared decisions under a lock and times each key once (a second thread
asking for a key being timed waits for that timing). Each module keeps its own recent choices in a
:class:`ModuleChoices`. Under ``torch.distributed`` (initialized, world size > 1) ``"auto"`` decides without timing
(the FLOP estimate, small layers dense): the same choice on every rank by construction, with no timing and
no communication. (Sharing rank 0's timed choice would need a collective inside a forward call, which hangs
or mismatches collectives as soon as only some ranks run a layer, e.g. evaluation on rank 0 alone.)
Design notes: docs/design.md, 'Strategy cost model'.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Dict, Hashable, Iterator, Optional, Sequence, Tuple

import torch

from .contract import autocast_dtype

__all__ = ["STRATEGIES", "set_strategy", "get_strategy", "check_strategy", "decide", "clear_decisions",
           "StrategyChooser", "ModuleChoices", "chooser", "timing_run", "by_flops"]

STRATEGIES = ("auto", "flops", "dense", "factorized")
TRUST_RATIO = 8.0  # a FLOP ratio beyond this decides without timing
MIN_TIMED_FLOPS = 5e7  # below this (about a millisecond on one CPU core) fixed costs rule: dense, not timed
TIE = 0.05  # timings closer than this fraction are a tie, which goes to dense (see decide)
REPEATS = 3  # timed runs per strategy after one warm-up each, interleaved; the minimum counts
CLOSE = 1.25  # minimums closer than this ratio after REPEATS rounds: a close call, timed EXTRA_REPEATS more
EXTRA_REPEATS = 2
EARLY_RATIO = 3.0  # first timed runs this far apart decide at once (no repeats of a slow strategy)
_MAX_DECISIONS = 4096
_MAX_CHOICES_PER_MODULE = 64  # input shapes a module remembers its choice for

_override: Optional[str] = None


def check_strategy(strategy, allow_none: bool = False, name: str = "strategy") -> None:
    if strategy is None and allow_none:
        return
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        allowed = STRATEGIES + ((None,) if allow_none else ())
        raise ValueError(f"{name} must be one of {allowed}, got {strategy!r}")


def get_strategy() -> Optional[str]:
    """The strategy forced on every tensorized layer by :class:`set_strategy`, or None (each its own).

        >>> import tnlayers
        >>> tnlayers.get_strategy() is None
        True
        >>> with tnlayers.set_strategy("flops"):
        ...     tnlayers.get_strategy()
        'flops'
    """
    return _override


class set_strategy:
    """Force one strategy on every tensorized layer (``None``: each layer's own ``strategy``).

    Like ``torch.set_grad_enabled``: as a call it stays in force; as a context manager the previous
    setting comes back on exit::

        tnlayers.set_strategy("dense")           # from now on
        with tnlayers.set_strategy("factorized"):
            y = model(x)                          # only here

    ``"flops"`` decides by the FLOP estimate alone, never timing: the same choice in every run (bitwise-
    reproducible runs).

        >>> import torch, tnlayers
        >>> layer = tnlayers.TTLinear(16, 16, rank=2)
        >>> with tnlayers.set_strategy("dense"):
        ...     _ = layer(torch.randn(4, 16))
        >>> layer.last_strategy, tnlayers.get_strategy()
        ('dense', None)
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


def by_flops(dense: int, factorized: Optional[int]) -> str:
    return "factorized" if factorized is not None and factorized < dense else "dense"


def _untimed(strategy: str, dense: int, factorized: Optional[int]) -> Optional[str]:
    """The choice that needs no timing, or None where ``"auto"`` times: ``"flops"`` by the FLOPs; ``"auto"`` by
    the FLOPs where they settle it (``TRUST_RATIO``), dense for a small layer (``MIN_TIMED_FLOPS``: its time is
    the ops' fixed costs, and the dense path runs the fewest ops: one conv or linear after a short rebuild, at
    inference the cached weight alone)."""
    if strategy != "auto" or factorized is None:
        return by_flops(dense, factorized)
    low, high = sorted((dense, factorized))
    if high > TRUST_RATIO * max(low, 1):
        return by_flops(dense, factorized)
    return "dense" if high < MIN_TIMED_FLOPS else None


def _untimed_or_flops(strategy: str, dense: int, factorized: Optional[int]) -> str:
    """Where no timing may run (a traced forward, a layer asked from inside its own timing run)."""
    return _untimed(strategy, dense, factorized) or by_flops(dense, factorized)


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


def _timed_choice(run: Callable[[str], None], device: torch.device) -> str:
    """Time both strategies (see the module docstring) and pick by the rule: factorized only if ``TIE`` faster."""
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
    return "factorized" if t_factorized < (1 - TIE) * t_dense else "dense"


class ModuleChoices:
    """One module's side of the strategy front end: ``config``, what its timed decisions are shared by
    (modules of equal config share them), and the choices it made, by input key (the last
    ``_MAX_CHOICES_PER_MODULE``). Plain data, so the module deep-copies and pickles; the lock that guards
    it belongs to the :class:`StrategyChooser`."""

    def __init__(self, config: tuple):
        if not isinstance(config, tuple):
            raise TypeError(f"config must be a tuple, got {type(config).__name__}")
        self.config = config
        self.made: Dict[tuple, str] = {}
        self.generation = 0  # the chooser's clear() count when ``made`` was last valid

    def __iter__(self) -> Iterator[tuple]:  # the keys: (strategy, shape key, device, dtype, autocast, grad)
        return iter(list(self.made))

    def __len__(self) -> int:
        return len(self.made)


class StrategyChooser:
    """Which strategy a module runs for an input: the forced one, or for "flops"/"auto" a decision taken
    once per key and shared. Thread-safe: one lock guards the shared decisions and every module's
    :class:`ModuleChoices`, and a key is timed once (a thread asking for a key another thread is timing
    waits for that result). Under torch.distributed, timed decisions come from rank 0 (module docstring)."""

    def __init__(self, max_decisions: int = _MAX_DECISIONS):
        if isinstance(max_decisions, bool) or not isinstance(max_decisions, int) or max_decisions < 1:
            raise ValueError(f"max_decisions must be a positive int, got {max_decisions!r}")
        self.max_decisions = max_decisions
        self._lock = threading.Lock()
        self._decisions: Dict[Hashable, str] = {}
        self._timing: Dict[Hashable, Tuple[int, threading.Event]] = {}  # key -> (thread timing it, its done)
        self._generation = 0  # clear() count: modules' own choices from before a clear() are dropped

    def __len__(self) -> int:
        return len(self._decisions)

    def clear(self) -> None:
        """Forget every decision, the shared ones and each module's own: they are retaken on the next call."""
        with self._lock:
            self._decisions.clear()
            self._generation += 1

    @staticmethod
    def key(strategy: str, shape_key: Hashable, x: torch.Tensor, grad: bool) -> tuple:
        """What a decision depends on besides the module's config: the strategy asked ("auto" and "flops"
        may differ), the input's shape as the module reduces it, device, dtype, autocast dtype, grad mode."""
        return (strategy, shape_key, x.device, x.dtype, autocast_dtype(x.device.type), bool(grad))

    def choose(self, module: ModuleChoices, strategy: str, x: torch.Tensor, shape_key: Hashable, grad: bool,
               costs: Callable[[], tuple], make_run: Callable[[], Callable[[str], None]],
               factorized: bool = True) -> str:
        """``"dense"`` or ``"factorized"`` for this call. ``strategy``: the module's own (``set_strategy``'s
        override wins); ``grad``: whether this call needs gradients; ``costs()``: the (dense, factorized or
        None) FLOP estimates; ``make_run()``: the timing function, built only when a timing runs;
        ``factorized``: False when the module has no factorized chain (a forced "factorized" then runs dense).
        Inside ``torch.compile`` nothing is timed or remembered: a choice already made, else the FLOPs."""
        strategy = _override or strategy
        if strategy == "factorized" and not factorized:
            return "dense"  # a global override on a layout without a factorized chain
        if strategy in ("dense", "factorized"):
            return strategy
        key = self.key(strategy, shape_key, x, grad)
        current = module.generation == self._generation  # else a clear() came since: its choices are stale
        choice = module.made.get(key) if current else None  # (one dict read: atomic, no lock needed)
        if choice is not None:
            return choice
        if torch.compiler.is_compiling():  # (no lock, no timing in a traced forward)
            return _untimed_or_flops(strategy, *costs())
        if not current:
            with self._lock:
                module.made.clear()
                module.generation = self._generation
        choice = self.decide(module.config + key, strategy, costs, make_run, x.device)
        with self._lock:
            if len(module.made) >= _MAX_CHOICES_PER_MODULE:
                module.made.clear()
            module.made[key] = choice
        return choice

    def decide(self, key: Hashable, strategy: str, costs: Callable[[], tuple],
               make_run: Callable[[], Callable[[str], None]], device: torch.device) -> str:
        """The shared choice of ``strategy`` ("auto" or "flops") for ``key``, taken once: cached, else
        waited for (another thread is timing it), else taken here."""
        me = threading.get_ident()
        while True:
            with self._lock:
                choice = self._decisions.get(key)
                if choice is not None:
                    return choice
                timing = self._timing.get(key)
                if timing is None:
                    done = threading.Event()
                    self._timing[key] = (me, done)
                    break
            if timing[0] == me:  # asked again from inside its own timing run: never wait on oneself
                return _untimed_or_flops(strategy, *costs())
            timing[1].wait()  # then look again: a timing that raised left no decision, and is retried
        try:
            choice = self._take(strategy, costs, make_run, device)
            with self._lock:
                if len(self._decisions) >= self.max_decisions:
                    self._decisions.clear()
                self._decisions[key] = choice
        finally:
            with self._lock:
                del self._timing[key]
            done.set()
        return choice

    @staticmethod
    def _take(strategy: str, costs: Callable[[], tuple], make_run: Callable[[], Callable[[str], None]],
              device: torch.device) -> str:
        dense, factorized = costs()
        choice = _untimed(strategy, dense, factorized)  # the same on every rank: no need to share
        if choice is not None:
            return choice
        if not _timeable(device) or _distributed():
            return by_flops(dense, factorized)  # every rank computes the same FLOPs; timings would differ
        return _timed_choice(make_run(), device)


def _distributed() -> bool:
    """Whether this process is one rank of several in an initialized torch.distributed job (looked at when a
    decision would be timed, never at import)."""
    import torch.distributed as dist  # loaded by `import torch` already: no import cost

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


chooser = StrategyChooser()  # the one process-wide front end (layers and adapters)


def clear_decisions() -> None:
    """Forget every decision of ``"auto"``/``"flops"`` (they are retaken on the next call)."""
    chooser.clear()


def decide(key: Hashable, strategy: str, costs: Callable[[], tuple], run: Callable[[str], None],
           device: torch.device) -> str:
    """The shared choice of ``strategy`` ("auto" or "flops") for ``key``, made once and cached
    (:meth:`StrategyChooser.decide` of the process-wide ``chooser``).

    ``costs()`` gives the (dense, factorized) FLOP estimates (factorized None: no such chain);
    ``run(s)`` runs strategy ``s`` once on a detached copy of the call's inputs, outside any graph.
    """
    return chooser.decide(key, strategy, costs, lambda: run, device)


def timing_run(forward: Callable[[str], torch.Tensor], leaves: Sequence[torch.Tensor],
               grad: bool) -> Callable[[str], None]:
    """``run(strategy)`` for the chooser: ``forward(strategy)`` (on inputs the caller detached), and with
    ``grad`` the backward into ``leaves`` through ``torch.autograd.grad``, so ``.grad`` and the caller's
    graph stay untouched."""

    def run(strategy: str) -> None:
        with torch.set_grad_enabled(grad):
            y = forward(strategy)
            if grad and leaves:
                torch.autograd.grad(y, list(leaves), torch.ones_like(y))
    return run
