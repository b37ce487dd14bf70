"""Vectorized per-core statistics and core rescaling, shared by DAS, BAR and the diagnostics.

All cores of all groups are handled at once: two ``torch._foreach_norm`` calls give s_k = ||G_k||² and
γ_k = ||g_k||², per-group means are segment sums (``index_add_``) over a precomputed group id per core, and
the rescale is one ``torch._foreach_mul_``. Nothing reads a value back to the host, so a step never waits
for the device. (A per-layer Python loop with ``.item()`` costs several times an SGD step on a ResNet's
~200 small cores; see docs/design.md, 'Triton kernels for DAS'.)

Sharded cores (DTensor, e.g. after FSDP2's ``fully_shard``): the norms are taken of each rank's local shard
and the packed vector [s; γ] of partial sums is all-reduced once over the mesh (once per sharded mesh
dimension: one collective for plain FSDP2) before λ is computed; the rescale multiplies the local shards.
A core replicated on a mesh dimension the others are sharded on counts 1/size of its local sums there, so
the sum stays exact. After ``fully_shard`` the parameters are new objects: call
``tnlayers.core_groups(model)`` (which re-marks the groups) before building the optimizer.

Cores on several devices (a model placed with ``device_map``) or of several dtypes (float32 + bfloat16 +
float64; complex): one norm launch per (device, dtype) bucket, as ``torch.optim``'s foreach path groups
tensors; s and γ are gathered on the first core's device in float32 (float64 if any core is float64 or
complex128), where the group means, the global normalization and λ are computed; each bucket gets its λ back
for its own multiply (``buckets.Buckets``). A group may span devices. One device with one real dtype keeps
the single launch above.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..groups import INDEX_ATTR, SIZE_ATTR, group_of
from .._caller import user_stacklevel
from ..types import Alpha, BaseOptimizer, Params
from .alpha_schedule import alpha_at, check_schedule, split_alpha
from .buckets import Buckets, one_bucket, rescale_
from .norms import foreach_squared_norms, stat_dtype
from .validation import check_non_negative
from .wrapper import WrappedOptimizer


def _dtensor_type(cores: Sequence[torch.Tensor]) -> Optional[type]:
    """The DTensor class when any core is one, else None (plain tensors never import torch.distributed)."""
    if all(type(c) in (torch.Tensor, torch.nn.Parameter) for c in cores):
        return None
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor if any(isinstance(c, DTensor) for c in cores) else None


class CoreLayout:
    """The cores with a gradient this step, in one flat order, with the tensors that index them.

    ``segment[k]`` is core k's group number (0..n_groups-1), ``counts[g]`` the group's core count and
    ``param_group[k]`` the index of the param group holding core k (for its learning rate and alpha).
    """

    def __init__(self, cores: List[torch.Tensor], tokens: List[Any], param_group: List[int]):
        self.cores = cores
        numbers: Dict[Any, int] = {}
        segment = [numbers.setdefault(token, len(numbers)) for token in tokens]
        self.n_groups = len(numbers)
        self.param_group_list = param_group
        self.dtype = stat_dtype(cores)
        device = cores[0].device  # the home device: statistics and λ live here
        # None: one device and one real dtype, the one-launch hot path; else one launch per (device, dtype)
        self.buckets: Optional[Buckets] = None if one_bucket(cores) else Buckets(cores)
        self._plain_rescale = self.buckets is None and cores[0].dtype in (torch.float32, torch.float64)
        self.segment = torch.tensor(segment, dtype=torch.long, device=device)
        self.counts = torch.bincount(self.segment, minlength=self.n_groups).to(self.dtype)
        self.param_group = torch.tensor(param_group, dtype=torch.long, device=device)
        self.sharded = False
        self._reduce_groups: List[Any] = []
        self._weights: Optional[torch.Tensor] = None
        dtensor = _dtensor_type(cores)
        if dtensor is not None:
            self._plan_sharded(dtensor)

    def _plan_sharded(self, dtensor: type) -> None:
        """Which mesh dimensions the partial sums are added over, and how much each core's sums count."""
        if not all(isinstance(c, dtensor) for c in self.cores):
            raise ValueError("the cores of one optimizer must be all DTensors (sharded) or all plain tensors")
        mesh = self.cores[0].device_mesh
        if any(c.device_mesh != mesh for c in self.cores):
            raise ValueError("all sharded cores of one optimizer must live on one device mesh")
        for c in self.cores:
            if any(not (p.is_shard() or p.is_replicate()) for p in c.placements):
                raise ValueError(f"sharded cores must be Shard or Replicate on each mesh dimension, got {c.placements}")
        dims = sorted({d for c in self.cores for d, p in enumerate(c.placements) if p.is_shard()})
        weights = [1.0 / math.prod(mesh.size(d) for d in dims if c.placements[d].is_replicate()) for c in self.cores]
        if any(w != 1.0 for w in weights):
            self._weights = torch.tensor(weights * 2, dtype=self.dtype, device=self.segment.device)
        self._reduce_groups = [mesh.get_group(d) for d in dims]
        self._placements = [c.placements for c in self.cores]
        self.sharded = True

    def check_sharded_grads(self) -> None:
        for placements, core in zip(self._placements, self.cores):
            if getattr(core.grad, "placements", None) != placements:
                raise ValueError(f"the gradient of a sharded core must be a DTensor placed as the core "
                                 f"({placements}), got {getattr(core.grad, 'placements', type(core.grad).__name__)}")

    def local_cores(self) -> List[torch.Tensor]:
        """The tensors to rescale in place: the cores, or each rank's shards of them."""
        if not self.sharded:
            return self.cores
        return [c.to_local() for c in self.cores]

    def rescale_(self, lambdas: torch.Tensor) -> None:
        """G_k ← (1 + λ_k)·G_k in place (on each rank's shards when sharded); ``lambdas`` on the home device."""
        if self._plain_rescale:
            torch._foreach_mul_(self.local_cores(), list((1.0 + lambdas).unbind(0)))
        elif self.buckets is None:
            rescale_(self.local_cores(), lambdas)  # half/bfloat16 cores: multiplied in float32, rounded once
        else:
            self.buckets.rescale_(self.local_cores(), lambdas)

    def _squared_norms(self, cores: List[torch.Tensor], grads: List[torch.Tensor]) -> torch.Tensor:
        """The packed [s; γ] on the home device, in the statistics dtype."""
        if self.buckets is None:
            return foreach_squared_norms(cores + grads, self.dtype)
        return self.buckets.norms([cores, grads], 2, self.dtype).square()

    def segment_sum(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.n_groups, dtype=values.dtype, device=values.device).index_add_(
            0, self.segment, values)

    def segment_mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.segment_sum(values) / self.counts

    def stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(s, γ): squared norms of the cores and of their gradients (one multi-tensor reduction)."""
        if not self.sharded:
            both = self._squared_norms(self.cores, [c.grad for c in self.cores])
            return both[:len(self.cores)], both[len(self.cores):]
        return self._sharded_stats()

    def _sharded_stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        self.check_sharded_grads()
        grads = [c.grad for c in self.cores]
        with torch.no_grad():
            both = self._squared_norms([t.to_local() for t in self.cores], [g.to_local() for g in grads])
        return self.all_reduce_stats(both)

    def all_reduce_stats(self, both: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(s, γ) of the whole cores from the packed local partial sums [s; γ] (sharded layouts only)."""
        import torch.distributed as dist

        if self._weights is not None:
            both = both * self._weights.to(both.dtype)
        for group in self._reduce_groups:  # one packed all-reduce per sharded mesh dimension
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        return both[:len(self.cores)], both[len(self.cores):]


class CoreIndex:
    """Which parameters of an optimizer are cores, and of which group; layouts cached per grad pattern.

    Cores are found by the group markers the layers set (``tnlayers.groups``), so plain
    ``model.parameters()`` works. Only the cores that have a gradient at a step take part in it (a core
    without one is neither rescaled nor counted in its group's means); the layout for each such pattern is
    built once.
    """

    def __init__(self, param_groups: Sequence[Dict[str, Any]]):
        self.cores: List[torch.Tensor] = []
        self.tokens: List[Any] = []
        self.param_group: List[int] = []
        for index, group in enumerate(param_groups):
            for p in group["params"]:
                token = group_of(p)
                if token is not None:
                    self.cores.append(p)
                    self.tokens.append(token)
                    self.param_group.append(index)
        self._layouts: Dict[Tuple[bool, ...], Optional[CoreLayout]] = {}
        self._warn_about_partial_groups()

    def _warn_about_partial_groups(self) -> None:
        """A group is scale-invariant only as a whole: rescaling some of its cores changes the layer."""
        positions: Dict[Any, List[int]] = {}
        sizes: Dict[Any, int] = {}
        for core, token in zip(self.cores, self.tokens):
            positions.setdefault(token, []).append(getattr(core, INDEX_ATTR, -1))
            sizes[token] = getattr(core, SIZE_ATTR, None)
        partial = [sorted(p) for t, p in positions.items()
                   if sorted(p) != list(range(sizes[t] if sizes[t] is not None else len(p)))]
        if partial:
            warnings.warn(f"{len(partial)} core group(s) are only partly in this optimizer (core indices "
                          f"{partial[0]}, ...); their cores are balanced among the ones present",
                          stacklevel=user_stacklevel())

    def layout(self) -> Optional[CoreLayout]:
        """The layout of the cores that have a gradient now, or None when none has."""
        has_grad = tuple(c.grad is not None for c in self.cores)
        if has_grad not in self._layouts:
            chosen = [i for i, flag in enumerate(has_grad) if flag]
            self._layouts[has_grad] = CoreLayout(
                [self.cores[i] for i in chosen], [self.tokens[i] for i in chosen],
                [self.param_group[i] for i in chosen]) if chosen else None
        return self._layouts[has_grad]


class CoreScalingOptimizer(WrappedOptimizer):
    """Base of DAS and BAR: per step, G_k ← (1+λ_k)·G_k for every core, then the base optimizer's step.

    λ_k = η·α·(subclass-specific factor), with η the core's param-group learning rate *now* (so LR
    schedulers apply) and α the group's alpha at the current step. Subclasses implement :meth:`_lambdas`.
    A step counter (used by alpha schedules) is saved in ``state_dict``. Cores whose λ would be
    non-finite are left alone.
    """

    def __init__(self, params: Optional[Params], base_optimizer: BaseOptimizer, alpha: Alpha, alpha_schedule: str,
                 total_steps: Optional[int], defaults: Dict[str, Any], base_kwargs: Dict[str, Any]):
        check_schedule(alpha_schedule, total_steps)
        group_alpha, self._alpha_fn = split_alpha(alpha, alpha_schedule)
        self.alpha_schedule = alpha_schedule
        self.total_steps = total_steps
        self.steps_taken = 0
        self._core_index: Optional[CoreIndex] = None
        self.last_lambdas: Optional[Tuple[List[torch.Tensor], torch.Tensor]] = None
        super().__init__(params, base_optimizer, {"alpha": group_alpha, **defaults}, base_kwargs)
        self._warn_if_no_cores()

    def _warn_if_no_cores(self) -> None:
        """Over parameters without core groups this optimizer is exactly its base optimizer: say so once."""
        params = [p for g in self.param_groups for p in g["params"]]
        if any(group_of(p) is not None for p in params):
            return
        name = type(self).__name__
        warnings.warn(
            f"{name} found no core groups among the {len(params)} parameters given: it will take exactly the base "
            f"optimizer's step. {name} rescales the cores of tnlayers layers and adapters and the factors of PEFT "
            "LoRA/LoHa/LoKr adapters (import peft before building the optimizer): the parameters "
            "tnlayers.core_groups(model) lists", UserWarning, stacklevel=user_stacklevel())

    def _check_group(self, group: Dict[str, Any]) -> Dict[str, Any]:
        if "lr" not in group:
            raise ValueError(f"{type(self).__name__} needs a base optimizer whose param groups have an 'lr'")
        if group.get("alpha") is not None:
            return {"alpha": check_non_negative("alpha", group["alpha"])}
        if self._alpha_fn is None:
            raise ValueError("a param group has alpha=None (saved with a callable alpha?) but this optimizer has "
                             "no callable alpha; give it the same callable alpha=")
        return {}

    def _param_groups_changed(self) -> None:
        super()._param_groups_changed()  # also marks PEFT groups (wrapper.py)
        self._core_index = None

    def _extra_state(self) -> Dict[str, Any]:
        return {"steps_taken": self.steps_taken}

    def _check_extra_state(self, extra: Dict[str, Any]) -> None:
        steps = extra.get("steps_taken", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state_dict: steps_taken must be an int >= 0, got {steps!r}")

    def _load_extra_state(self, extra: Dict[str, Any]) -> None:
        self.steps_taken = int(extra.get("steps_taken", 0))

    def _step_sizes(self, layout: CoreLayout):
        """η·α per core: a Python float when all param groups agree (no tensor built), else a vector."""
        per_group = [float(g["lr"]) * alpha_at(g.get("alpha"), self._alpha_fn, self.alpha_schedule,
                                              self.steps_taken, self.total_steps)
                     for g in self.param_groups]
        self._check_step_sizes(per_group, sorted(set(layout.param_group_list)))
        used = {per_group[i] for i in set(layout.param_group_list)}
        if len(used) == 1:
            return used.pop()
        table = torch.tensor(per_group, dtype=layout.dtype, device=layout.segment.device)
        return table[layout.param_group]

    def _check_step_sizes(self, per_group: List[float], used: List[int]) -> None:
        """Hook: raise, before any change, when η·α of a param group holding cores is unusable."""

    def _lambdas(self, layout: CoreLayout, s: torch.Tensor, gamma: torch.Tensor, step_size) -> torch.Tensor:
        raise NotImplementedError

    def _layout(self) -> Optional[CoreLayout]:
        """The layout of the cores with a gradient now (None: none has one)."""
        if self._core_index is None:
            self._core_index = CoreIndex(self.param_groups)
        return self._core_index.layout()

    @torch.no_grad()
    def _rescale_cores(self, layout: Optional[CoreLayout] = None) -> None:
        self.last_lambdas = None
        layout = self._layout() if layout is None else layout
        if layout is None:
            return
        step_size = self._step_sizes(layout)
        if isinstance(step_size, float) and step_size == 0.0:
            return  # alpha or lr is 0: leave the cores bit-for-bit untouched, at no cost
        s, gamma = layout.stats()
        lambdas = self._lambdas(layout, s, gamma, step_size)
        # one op instead of isfinite + where: the same values (finite λ kept bit for bit, the others zeroed)
        lambdas = torch.nan_to_num(lambdas, nan=0.0, posinf=0.0, neginf=0.0)
        layout.rescale_(lambdas)
        self.last_lambdas = (layout.cores, lambdas)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Rescale the cores, then take the base optimizer's step with the unchanged gradients.

        With a closure, it is called first (with grad enabled) to compute the loss and gradients.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layout = self._layout()  # looked up once a step: both paths use it
        if not self._fused_step(layout):
            self._rescale_cores(layout)
            self.base_optimizer.step()
        self.steps_taken += 1
        self._after_update()
        return loss

    def _fused_step(self, layout: Optional[CoreLayout]) -> bool:
        """Rescale and step in fused kernels where a subclass can; False: take the torch path."""
        return False
