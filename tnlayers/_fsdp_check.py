"""A torch bug that tnlayers refuses to train through: FSDP2 gradients summed, not averaged, over gloo.

Before torch 2.9, the gloo backend's reduce-scatter took ``ReduceOp.AVG`` for a sum, without an error
(pytorch/pytorch#162338). FSDP2 (``fully_shard``) reduce-scatters float32/bfloat16 gradients with AVG, so on a
gloo mesh (CPU) every sharded gradient came out ``world_size`` times the average over the ranks: training ran
and silently differed from one process on the global batch (with SGD, a ``world_size``-fold learning rate).
float16 reductions (pre/post-divided sums) and ``set_force_sum_reduction_for_comms(True)`` (torch 2.8) were
right. :func:`tnlayers.core_groups`, which must be called after ``fully_shard``, runs the check.
"""
from __future__ import annotations

import re
import sys
from typing import Optional, Tuple

import torch
from torch import nn

FIRST_FIXED = (2, 9)  # the first torch release whose gloo reduce-scatter averages
TORCH_VERSION = str(torch.__version__)  # the check's input (tests set an older one)


def _release(version: str) -> Tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else FIRST_FIXED


def check_fsdp2_gradient_averaging(model: nn.Module) -> None:
    """Raise RuntimeError when ``model`` has a ``fully_shard`` module whose gradients this torch would sum
    instead of average (see the module docstring); nothing on torch >= 2.9 or without FSDP2."""
    if _release(TORCH_VERSION) >= FIRST_FIXED:
        return
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kind = getattr(fsdp, "FSDPModule", None)
    if kind is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, kind):
            ranks = _summing_ranks(module)
            if ranks:
                where = f"module {name!r}" if name else "the model"
                workaround = (" (torch 2.8: or call .set_force_sum_reduction_for_comms(True) on every fully_shard "
                              "module before core_groups)"
                              if hasattr(module, "set_force_sum_reduction_for_comms") else "")
                raise RuntimeError(
                    f"FSDP2 on the gloo backend sums gradients instead of averaging them on torch {TORCH_VERSION}: "
                    f"fully_shard on {where} would train with gradients {ranks}x the average over its {ranks} "
                    f"ranks (gloo's reduce-scatter takes ReduceOp.AVG for a sum, pytorch/pytorch#162338), a "
                    f"result silently different from one process on the global batch; upgrade to torch >= "
                    f"{FIRST_FIXED[0]}.{FIRST_FIXED[1]}{workaround}")


def _summing_ranks(module: nn.Module) -> Optional[int]:
    """How many ranks the gradients of this ``fully_shard`` module would be summed over (None: averaged)."""
    import torch.distributed as dist

    group = module._get_fsdp_state()._fsdp_param_group
    if group is None or getattr(group, "force_sum_reduction_for_comms", False):
        return None
    policy = group.mp_policy
    dtypes = {policy.reduce_dtype or policy.param_dtype or p.sharded_param.dtype for p in group.fsdp_params}
    if not dtypes & {torch.float32, torch.bfloat16}:
        return None  # float16 (or float64) reductions are pre/post-divided sums: right
    process_group = group.mesh_info.shard_process_group
    if process_group.size() < 2:
        return None
    config = str(dist.get_backend_config(process_group))
    backends = dict(entry.split(":", 1) if ":" in entry else (group.device.type, entry)
                    for entry in config.split(","))
    return process_group.size() if backends.get(group.device.type) == "gloo" else None
