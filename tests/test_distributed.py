"""SAM and DAS across 2 processes (gloo, CPU): DistributedDataParallel and FSDP2 (``fully_shard``, cores
sharded as DTensors) train like one process on the same global batch; ``strategy="auto"`` picks the same
strategy on every rank. Workers: tests/_dist_workers.py."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from test_optim_helpers import one_thread  # noqa: F401 (autouse fixture)

import _dist_workers as workers
from tnlayers._fsdp_check import FIRST_FIXED, _release

HERE = os.path.dirname(os.path.abspath(__file__))

WORLD = 2
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def launch(scenario, tmp_path):
    """Run ``scenario`` on WORLD ranks (one subprocess each); returns every rank's results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")])}
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_dist_workers.py"), scenario, str(rank),
                               str(WORLD), str(store), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(WORLD)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"{scenario} workers did not finish within {TIMEOUT_S} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} of {scenario} failed:\n{out[-4000:]}"
    return [torch.load(tmp_path / f"{scenario}-{rank}.pt", weights_only=True) for rank in range(WORLD)]


def assert_matches(result, reference, tol=1e-5):
    losses, state = result
    ref_losses, ref_state = reference
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=tol, atol=tol)
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=tol, atol=tol, msg=key)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch("all", tmp_path_factory.mktemp("dist"))


@pytest.mark.parametrize("kind", ["das", "sam", "sam-local"])
def test_ddp_matches_one_process_on_the_global_batch(results, kind):
    reference = workers.reference_run(kind, WORLD)
    for rank_results in results:
        assert_matches(rank_results[f"ddp.{kind}"], reference)
    # the per-rank perturbation is a different algorithm: it must not coincide with synchronized SAM
    if kind == "sam-local":
        synced = results[0]["ddp.sam"][0]
        assert max(abs(a - b) for a, b in zip(synced, results[0]["ddp.sam-local"][0])) > 1e-6


# before torch 2.9 gloo's reduce-scatter took ReduceOp.AVG for a sum: FSDP2 gradients came out world-size times
# the average, and core_groups refuses (test_fsdp2_over_gloo_is_refused_before_torch_2_9)
GLOO_SUMS_FSDP2_GRADIENTS = _release(torch.__version__) < FIRST_FIXED


@pytest.mark.skipif(GLOO_SUMS_FSDP2_GRADIENTS, reason="torch < 2.9 sums FSDP2 gradients over gloo")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fsdp2_das_matches_one_process_on_the_global_batch(results, backend):
    if f"fsdp.das-{backend}" not in results[0]:
        pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1 with triton installed")
    reference = workers.reference_run("das", WORLD)
    for rank_results in results:
        assert rank_results[f"fsdp.lambdas_nonzero-{backend}"]
        assert_matches(rank_results[f"fsdp.das-{backend}"], reference)


def test_fsdp2_over_gloo_is_refused_before_torch_2_9(results):
    """core_groups raises on FSDP2 over gloo when torch is older than 2.9 (the check's version input set to
    2.8.0 on any torch) and names the version to upgrade to; it accepts what old gloo got right (a float16
    reduction, force-sum reductions); on the running torch it raises exactly when torch < 2.9."""
    for rank_results in results:
        refusal = rank_results["fsdp.refusal"]
        message = refusal["old.float32"]
        assert message is not None and "torch >= 2.9" in message and "2.8.0" in message
        assert "2x the average" in message and "gloo" in message
        assert refusal["old.float16"] is None
        assert refusal.get("old.force_sum") is None
        assert (refusal["real"] is not None) == GLOO_SUMS_FSDP2_GRADIENTS


@pytest.mark.parametrize("version, release", [("2.8.0+cu128", (2, 8)), ("2.7.1", (2, 7)), ("2.9.0", (2, 9)),
                                              ("2.10.0a0+git1234", (2, 10)), ("2.13.0+cpu", (2, 13))])
def test_fsdp_check_reads_the_torch_release(version, release):
    assert _release(version) == release
    assert (release < FIRST_FIXED) == (version.startswith(("2.7", "2.8")))


def test_sharded_core_stats_take_one_all_reduce(results):
    for rank_results in results:
        stats = rank_results["fsdp.stats"]
        assert stats["calls"] == 1
        for name in ("s", "gamma"):
            got, expected = stats[name]
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", sorted(workers.CLOCK_FAVOURS))
def test_auto_decisions_are_the_same_on_every_rank(results, case):
    """The ranks' clocks disagree (each alone picks another strategy), yet layers and adapters run the same
    strategy on both ranks: the FLOP rule's, with no timing; a layer run on rank 0 alone issues no
    collective (both ranks got past the barrier after it)."""
    alone = [r[f"strategy.alone.{case}"] for r in results]
    assert alone == list(workers.CLOCK_FAVOURS[case])  # the premise: each rank's own clock disagrees
    for rank_results in results:
        assert rank_results[f"strategy.layer.{case}"] == results[0][f"strategy.layer_flops.{case}"]
        assert rank_results[f"strategy.adapter.{case}"] == results[0][f"strategy.adapter_flops.{case}"]
        assert rank_results[f"strategy.timed.{case}"] == 0
        assert rank_results["strategy.uneven_done"]


def test_sam_sync_first_pass_arguments():
    from tnlayers.optim import SAM

    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(TypeError, match="sync_first_pass"):
        SAM(params, torch.optim.SGD, lr=0.1, sync_first_pass="no")
    with pytest.raises(ValueError, match="model="):
        SAM(params, torch.optim.SGD, lr=0.1, sync_first_pass=False)
    with pytest.raises(ValueError, match="model="):
        SAM(params, torch.optim.SGD, lr=0.1, sync_first_pass=False, model=torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match="only used with sync_first_pass=False"):
        SAM(params, torch.optim.SGD, lr=0.1, model=torch.nn.Linear(3, 1))
