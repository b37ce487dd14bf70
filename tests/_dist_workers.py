"""Worker processes for tests/test_distributed.py, and the single-process references they are compared to.

Run as ``python tests/_dist_workers.py SCENARIO RANK WORLD_SIZE STORE_FILE OUT_DIR``; each rank writes its
results to ``OUT_DIR/SCENARIO-RANK.pt`` (keys ``ddp.*``, ``fsdp.*``). The process group is gloo on CPU, set
up through a file store (no port to pick). Scenarios (``all`` runs both):

* ``ddp``: DAS, SAM and SAM with ``sync_first_pass=False`` under DistributedDataParallel, 20 steps each, every
  rank on its half of the same global batch;
* ``fsdp``: DAS on an FSDP2 (``fully_shard``) model whose cores are DTensors sharded on dim 0 (torch backend,
  and the Triton kernels on the local shards when ``TRITON_INTERPRET=1``; torch >= 2.9 only: older gloo sums
  FSDP2 gradients), plus a check that ``CoreLayout.stats()`` on sharded cores issues exactly one all-reduce and
  matches the full tensors, and ``core_groups``' refusal of FSDP2 over gloo on torch < 2.9;
* ``strategy``: ``strategy="auto"`` on a fake clock that disagrees between the ranks (each rank's clock
  favours another strategy): every rank must still run the same strategy, the FLOP rule's, without timing;
  and a layer run on rank 0 alone must not issue a collective.
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 20
GLOBAL_BATCH = 16
LR, MOMENTUM, ALPHA, RHO = 0.05, 0.9, 5.0, 0.05


def make_model():
    import tnlayers

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3))
    return tnlayers.tensorize(dense, format="tr", rank=3, progress=False)


def global_batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=gen), torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)


def local_batch(step, rank, world):
    x, y = global_batch(step)
    n = GLOBAL_BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def das(params, backend="torch"):
    from tnlayers.optim import DAS
    return DAS(params, torch.optim.SGD, alpha=ALPHA, backend=backend, lr=LR, momentum=MOMENTUM)


def sam(params, **kwargs):
    from tnlayers.optim import SAM
    return SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, **kwargs)


# ---- single-process references, on the whole global batch ------------------------------------------------

def reference_run(kind, world=2):
    """Losses and final state of one process on the global batch (``kind``: das, sam, sam-local)."""
    model = make_model()
    if kind == "sam-local":
        return _reference_sam_local(model, world)
    opt = das(model.parameters()) if kind == "das" else sam(model.parameters())
    losses = []
    for step in range(STEPS):
        x, y = global_batch(step)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reference_sam_local(model, world):
    """SAM with a per-rank perturbation, written out: each rank's half perturbs along its own gradient,
    the gradients at the perturbed points are averaged, the base optimizer steps with the average."""
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    losses = []
    for step in range(STEPS):
        averaged = [torch.zeros_like(p) for p in params]
        loss_sum = 0.0
        for rank in range(world):
            x, y = local_batch(step, rank, world)
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            loss_sum += float(F.cross_entropy(model(x), y).detach())
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(g, alpha=RHO / (float(norm) + 1e-12))
            tilde = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
            for a, g in zip(averaged, tilde):
                a.add_(g / world)
        for p, g in zip(params, averaged):
            p.grad = g
        base.step()
        losses.append(loss_sum / world)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- distributed scenarios ---------------------------------------------------------------------------------

def _global_loss(loss):
    import torch.distributed as dist
    value = loss.detach().clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def run_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for kind in ("das", "sam", "sam-local"):
        ddp = DDP(make_model())
        if kind == "das":
            opt = das(ddp.parameters())
        elif kind == "sam":
            opt = sam(ddp.parameters())
        else:
            opt = sam(ddp.parameters(), sync_first_pass=False, model=ddp)
        losses = []
        for step in range(STEPS):
            x, y = local_batch(step, rank, world)

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()
                return loss
            losses.append(_global_loss(opt.step(closure)))
        results[kind] = (losses, {k: v.detach().clone() for k, v in ddp.module.state_dict().items()})
    return results


def _check_sharded_stats(rank, world):
    """CoreLayout.stats() on DTensor-sharded cores: one all-reduce, equal to the full tensors' norms."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from tnlayers.groups import mark_core_group
    from tnlayers.optim.core_scaling import CoreIndex

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(3)
    full = [torch.randn(5, 4, generator=gen), torch.randn(1, 3, 2, generator=gen), torch.randn(6, generator=gen)]
    grads = [torch.randn(t.shape, generator=gen) for t in full]
    placements = [[Shard(0)], [Shard(0)], [Replicate()]]  # uneven, empty-on-one-rank and replicated
    cores = []
    for t, g, pl in zip(full, grads, placements):
        core = nn.Parameter(distribute_tensor(t, mesh, pl))
        core.grad = distribute_tensor(g, mesh, pl)
        cores.append(core)
    mark_core_group(cores)
    layout = CoreIndex([{"params": cores}]).layout()
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        s, gamma = layout.stats()
    finally:
        dist.all_reduce = real
    expected_s = torch.stack([t.pow(2).sum() for t in full])
    expected_g = torch.stack([g.pow(2).sum() for g in grads])
    return {"calls": len(calls), "s": (s, expected_s), "gamma": (gamma, expected_g)}


def triton_interpreted():
    from tnlayers.kernels import triton_available
    return triton_available() and os.environ.get("TRITON_INTERPRET") == "1"


def run_fsdp(rank, world):
    from tnlayers._fsdp_check import FIRST_FIXED, _release

    results = {"stats": _check_sharded_stats(rank, world), "refusal": _fsdp_refusal(world)}
    if _release(torch.__version__) < FIRST_FIXED:
        return results  # core_groups refuses FSDP2 over gloo there (gloo sums the gradients)
    for backend in ("torch", "triton") if triton_interpreted() else ("torch",):
        results[f"das-{backend}"], results[f"lambdas_nonzero-{backend}"] = _fsdp_das(rank, world, backend)
    return results


def _fsdp_refusal(world):
    """core_groups on FSDP2 models over gloo, with the check's torch version set to 2.8.0 (``old.*``) and left
    as it is (``real``): the RuntimeError's message, or None. ``old.float32``: float32 gradients (averaged
    with ReduceOp.AVG, which gloo summed); ``old.float16``: a float16 reduction (a pre/post-divided sum);
    ``old.force_sum``: set_force_sum_reduction_for_comms(True) (torch >= 2.8 only)."""
    import tnlayers
    from tnlayers import _fsdp_check
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    def sharded(reduce_dtype=None):
        model = make_model()
        mesh = init_device_mesh("cpu", (world,))
        policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
        for module in model.modules():
            if hasattr(module, "core_parameters"):
                fully_shard(module, mesh=mesh, mp_policy=policy)
        return fully_shard(model, mesh=mesh, mp_policy=policy)

    def refusal(model, version):
        real, _fsdp_check.TORCH_VERSION = _fsdp_check.TORCH_VERSION, version
        try:
            tnlayers.core_groups(model)
        except RuntimeError as error:
            return str(error)
        finally:
            _fsdp_check.TORCH_VERSION = real
        return None

    out = {"old.float32": refusal(sharded(), "2.8.0+cu128"), "real": refusal(sharded(), torch.__version__),
           "old.float16": refusal(sharded(torch.float16), "2.8.0+cu128")}
    model = sharded()
    if hasattr(model, "set_force_sum_reduction_for_comms"):
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
        out["old.force_sum"] = refusal(model, "2.8.0+cu128")
    return out


def _fsdp_das(rank, world, backend):
    import tnlayers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for module in model.modules():
        if hasattr(module, "core_parameters") or isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    groups = tnlayers.core_groups(model)  # fully_shard made new parameter objects: re-mark the groups
    assert groups and all(isinstance(c, DTensor) for _, cores in groups for c in cores)
    opt = das(model.parameters(), backend)
    losses = []
    for step in range(STEPS):
        x, y = local_batch(step, rank, world)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(_global_loss(loss))
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
             for k, v in model.state_dict().items()}
    # FSDP re-gathers cores without bumping version counters: a no-grad forward after a step must not reuse
    # a weight cached before it (compared with a grad-enabled forward, which never caches)
    with tnlayers.set_strategy("dense"):
        with torch.no_grad():
            model(x)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            after_step = model(x)
        fresh = model(x).detach()
    assert torch.allclose(after_step, fresh, rtol=1e-5, atol=1e-6), "stale weight under FSDP"
    return (losses, state), bool(opt.last_lambdas[1].abs().max() > 0)


# the strategy each rank's fake clock makes faster, per case: the ranks disagree in both cases, and rank 0
# favours dense in one case and factorized in the other
CLOCK_FAVOURS = {"a": ("dense", "factorized"), "b": ("factorized", "dense")}


def run_strategy(rank, world):
    """For each case, a tensorized layer and an adapter decide "auto" under the process group with this
    rank's clock (which would pick differently on each rank). Returns {what: value}: the clock's own pick
    (the rule applied to this rank's times alone), the strategy each module ran, the FLOP rule's pick
    (``strategy="flops"``), and how many timed calls this rank made. Then rank 0 alone runs a layer on a new
    shape (an evaluation on rank 0 only) and both ranks meet at a barrier: a collective inside that call
    would hang or pair with the barrier."""
    import torch.distributed as dist

    import tnlayers
    from tnlayers import strategy
    from tnlayers.adapters import LinearAdapter

    strategy.MIN_TIMED_FLOPS, strategy.TRUST_RATIO = 0, float("inf")  # time every decision, however small
    case = {"now": None}
    timed = []

    def clock(run, s, device):  # this rank's clock: the favoured strategy takes 1 s, the other 3 s
        run(s)
        timed.append(s)
        return 1.0 if s == CLOCK_FAVOURS[case["now"]][rank] else 3.0

    strategy._time = clock
    out = {}
    torch.manual_seed(0)
    for name, batch in (("a", 2), ("b", 4)):  # another batch: another key, another decision
        case["now"] = name
        out[f"alone.{name}"] = strategy._timed_choice(lambda s: None, torch.device("cpu"))
        del timed[:]
        layer = tnlayers.CPConv2d(8, 8, 3, padding=1, rank=4)
        layer(torch.randn(batch, 8, 6, 6))
        flops = tnlayers.CPConv2d(8, 8, 3, padding=1, rank=4, strategy="flops")
        flops(torch.randn(batch, 8, 6, 6))
        adapter = LinearAdapter(nn.Linear(16, 16), "tt", 2, 1.0, init="random")
        adapter(torch.randn(batch, 16))
        flops_adapter = LinearAdapter(nn.Linear(16, 16), "tt", 2, 1.0, init="random", strategy="flops")
        flops_adapter(torch.randn(batch, 16))
        out[f"layer.{name}"] = layer.last_strategy
        out[f"layer_flops.{name}"] = flops.last_strategy
        out[f"adapter.{name}"] = next(iter(adapter._choices.made.values()))
        out[f"adapter_flops.{name}"] = next(iter(flops_adapter._choices.made.values()))
        out[f"timed.{name}"] = len(timed)
    if rank == 0:
        with torch.no_grad():
            tnlayers.TTConv2d(8, 8, 3, padding=1, rank=3)(torch.randn(5, 8, 7, 7))
    dist.barrier()
    out["uneven_done"] = True
    return out


def main(scenario, rank, world, store_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        runs = {"ddp": [run_ddp], "fsdp": [run_fsdp], "strategy": [run_strategy],
                "all": [run_ddp, run_fsdp, run_strategy]}[scenario]
        results = {}
        for run in runs:  # one launch for all: starting the processes costs more than the runs
            results.update({f"{run.__name__[4:]}.{k}": v for k, v in run(rank, world).items()})
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"{scenario}-{rank}.pt"))


if __name__ == "__main__":
    scenario_arg, rank_arg, world_arg, store_arg, out_arg = sys.argv[1:6]
    main(scenario_arg, int(rank_arg), int(world_arg), store_arg, out_arg)
