"""X-SAM against its closed form on quadratics with a known Hessian, against SAM/ASAM at xi=0, training on
the Fig. 1 Tucker-2 problem and a TuckerConv2d CNN, checkpoints, GradScaler and bad input."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import tnlayers
from test_optim_helpers import (TinyCNN, amp_sam_step, cnn_batch, cnn_loss, one_thread,  # noqa: F401 (autouse fixture)
                                sam_closure, sam_step_explicit, unscaled_sam_step)
from tnlayers.optim import SAM, XSAM, disable_running_stats, training_step


def known_quadratic(n, eigenvalues, seed):
    """A = Q diag(eigenvalues) Qᵀ with a random orthogonal Q, and an offset b (float64)."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    matrix = basis @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ basis.T
    return basis, matrix, torch.randn(n, generator=gen, dtype=torch.float64)


def hand_xsam_direction(w, matrix, offset, top_vector, rho, xi, eps=1e-12):
    """The documented X-SAM direction for f(w) = ½ wᵀAw + bᵀw, written out: g, SAM's g̃, the correction
    along the exact top eigenvector when (g·v)(g̃·v) ≥ 0. Returns (direction, whether it was corrected)."""
    g = matrix @ w + offset
    g_sam = matrix @ (w + rho * g / (g.norm() + eps)) + offset
    along = g_sam @ top_vector
    corrected = bool((g @ top_vector) * along >= 0)
    return (g_sam + xi * along * top_vector if corrected else g_sam), corrected


def pieces_of(w, sizes):
    return [nn.Parameter(p.clone()) for p in torch.split(w, sizes)]


def run_xsam_on_quadratic(w0, sizes, matrix, offset, steps, **kwargs):
    params = pieces_of(w0, sizes)

    def loss_fn():
        w = torch.cat(params)
        return 0.5 * w @ matrix @ w + offset @ w

    opt = XSAM(params, torch.optim.SGD, eig_iters=80, **kwargs)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure, loss_fn=loss_fn)
    return torch.cat([p.detach() for p in params]), opt


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 10), seed=st.integers(0, 10_000), top=st.sampled_from([8.0, -8.0]),
       rho=st.floats(0.01, 2.0), xi=st.floats(0.0, 3.0), data=st.data())
def test_two_steps_follow_the_closed_form(n, seed, top, rho, xi, data):
    rest = data.draw(st.lists(st.floats(-4.0, 4.0), min_size=n - 1, max_size=n - 1))
    basis, matrix, offset = known_quadratic(n, [top, *rest], seed)
    w0 = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    cut = data.draw(st.integers(1, n))
    sizes = [cut, n - cut] if cut < n else [n]
    lr = 0.02
    w = w0
    for _ in range(2):  # step 0 estimates v; step 1 reuses the stored v (eig_every=10)
        direction, _ = hand_xsam_direction(w, matrix, offset, basis[:, 0], rho, xi)
        w = w - lr * direction
    got, opt = run_xsam_on_quadratic(w0, sizes, matrix, offset, 2, rho=rho, xi=xi, lr=lr)
    torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)
    assert opt.eigenvalue == pytest.approx(top, rel=1e-9)


@pytest.mark.parametrize("top", [8.0, -8.0])
def test_both_sides_of_the_angle_test(top):
    # rho = ||g||/4: along v, g̃ = (g·v)(1 + ρλ/||g||) is 3 (g·v) for λ = 8 (corrected) and −(g·v) for
    # λ = −8, where SAM's perturbation crossed the valley (left as SAM).
    basis, matrix, offset = known_quadratic(4, [top, 1.0, 0.5, -0.5], seed=2)
    w0 = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64)
    rho = float((matrix @ w0 + offset).norm()) / 4
    direction, corrected = hand_xsam_direction(w0, matrix, offset, basis[:, 0], rho, xi=1.5)
    sam_direction, _ = hand_xsam_direction(w0, matrix, offset, basis[:, 0], rho, xi=0.0)
    assert corrected == (top > 0)
    got, _ = run_xsam_on_quadratic(w0, [2, 2], matrix, offset, 1, rho=rho, xi=1.5, lr=0.1)
    torch.testing.assert_close(got, w0 - 0.1 * direction, rtol=1e-10, atol=1e-12)
    if top < 0:
        torch.testing.assert_close(direction, sam_direction, rtol=0, atol=0)


def frozen_loss(model, batch):
    def loss_fn():
        with disable_running_stats(model):
            return cnn_loss(model, batch)
    return loss_fn


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("style", ["closure", "by-hand"])
def test_xi_zero_is_sam_bit_for_bit(adaptive, style):
    model, twin = TinyCNN(), TinyCNN()
    kwargs = dict(rho=0.1, adaptive=adaptive, lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = XSAM(model.parameters(), torch.optim.SGD, xi=0.0, eig_every=2, eig_iters=2, **kwargs)
    sam = SAM(twin.parameters(), torch.optim.SGD, **kwargs)
    def step(net, optimizer, batch):
        if style == "closure":
            extra = {"loss_fn": frozen_loss(net, batch)} if isinstance(optimizer, XSAM) else {}
            optimizer.step(sam_closure(net, optimizer, batch), **extra)
            return
        if isinstance(optimizer, XSAM) and optimizer.eigen_update_due:
            optimizer.update_eigenvector(frozen_loss(net, batch))
        sam_step_explicit(net, optimizer, batch)

    for t in range(4):
        step(model, opt, cnn_batch(t))
        step(twin, sam, cnn_batch(t))
    assert opt.eigenvalue is not None
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), twin.buffers()))


def test_eigenvector_is_updated_every_eig_every_steps_without_touching_grads():
    model = TinyCNN()
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.05, xi=1.0, eig_every=3, eig_iters=2, lr=0.05)
    calls = []

    def counting_loss(batch):
        def loss_fn():
            calls.append(opt._steps)
            return frozen_loss(model, batch)()
        return loss_fn

    for t in range(7):
        opt.step(sam_closure(model, opt, cnn_batch(t)), loss_fn=counting_loss(cnn_batch(t)))
    assert calls == [0, 3, 6]
    cnn_loss(model, cnn_batch(0)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    opt.update_eigenvector(frozen_loss(model, cnn_batch(0)))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    vector = opt.eigenvector
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in vector))
    assert norm.item() == pytest.approx(1.0, abs=1e-6) and len(vector) == len(list(model.parameters()))


def test_trains_the_fig1_tucker2_problem():
    """A·G·Bᵀ fitted to T + N (fresh unit noise each step): the fit to the clean T improves."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(40, 4, generator=gen, dtype=torch.float64) @ torch.randn(4, 20, generator=gen,
                                                                                    dtype=torch.float64) / 2
    torch.manual_seed(0)
    model = tnlayers.FactorizedTensor((40, 20), "tucker", rank=(4, 4), std=1.0, dtype=torch.float64)
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.2, xi=1.0, eig_every=5, eig_iters=3, lr=0.05)
    with torch.no_grad():
        start = (model() - target).square().mean()
    for _ in range(150):
        noisy = target + torch.randn(target.shape, generator=gen, dtype=torch.float64)
        training_step(model, opt, lambda: (model() - noisy).square().mean())
    with torch.no_grad():
        end = (model() - target).square().mean()
    assert end < 0.6 * start, (start, end)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.eigenvalue > 0


def test_trains_a_tucker_conv_cnn_with_one_batchnorm_update_per_step():
    torch.manual_seed(0)
    model = nn.Sequential(tnlayers.TuckerConv2d(3, 8, 3, padding=1, rank=3), nn.BatchNorm2d(8), nn.ReLU(),
                          tnlayers.TuckerConv2d(8, 8, 3, padding=1, rank=3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.05, xi=1.0, eig_every=4, eig_iters=3, lr=0.3,
               momentum=0.9)
    losses = [float(training_step(model, opt, lambda: F.cross_entropy(model(x), y))) for _ in range(30)]
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(int(bn.num_batches_tracked) == 30 for bn in (model[1], model[4]))
    assert opt.eigenvalue > 0


def xsam_cnn_step(model, opt, t):
    return opt.step(sam_closure(model, opt, cnn_batch(t)), loss_fn=frozen_loss(model, cnn_batch(t)))


def test_state_dict_round_trip_resumes_the_same_trajectory():
    def build(model):
        return XSAM(model.parameters(), torch.optim.SGD, rho=0.05, xi=1.0, eig_every=2, eig_iters=3,
                    lr=0.05, momentum=0.9)

    model = TinyCNN()
    opt = build(model)
    for t in range(3):
        xsam_cnn_step(model, opt, t)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for t in range(3, 8):  # crosses eigen-updates at steps 4 and 6, warm-started from the saved v
        xsam_cnn_step(model, opt, t)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = TinyCNN(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = build(resumed)
    opt2.load_state_dict(saved["opt"])
    assert not opt2.eigen_update_due and opt2.eigenvalue == pytest.approx(float(saved["opt"]["tnlayers"]["eigenvalue"]))
    for t in range(3, 8):
        xsam_cnn_step(resumed, opt2, t)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    assert opt2.state_dict()["tnlayers"]["xsam_steps"] == 8

    bad = copy.deepcopy(saved["opt"])
    bad["tnlayers"]["eigenvector"] = bad["tnlayers"]["eigenvector"][:-1]
    with pytest.raises(ValueError, match="eigenvector does not match"):
        build(TinyCNN()).load_state_dict(bad)
    bad = copy.deepcopy(saved["opt"])
    first = bad["tnlayers"]["eigenvector"][0]
    first[(0,) * first.dim()] = float("nan")
    with pytest.raises(ValueError, match="eigenvector holds non-finite"):
        build(TinyCNN()).load_state_dict(bad)


def amp_xsam_step(model, opt, scaler, batch, clip=None, inject=None):
    if opt.eigen_update_due:
        opt.update_eigenvector(frozen_loss(model, batch))
    amp_sam_step(model, opt, scaler, batch, inject=None if inject is None else "second", clip=clip, bad=inject)


@pytest.mark.parametrize("clip", [None, 0.1])
def test_gradscaler_steps_match_unscaled_xsam(clip):
    model, twin = TinyCNN(), TinyCNN()
    kwargs = dict(rho=0.05, xi=2.0, eig_every=2, eig_iters=3, lr=0.1, momentum=0.9)
    opt = XSAM(model.parameters(), torch.optim.SGD, **kwargs)
    opt_twin = XSAM(twin.parameters(), torch.optim.SGD, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for t in range(3):
        amp_xsam_step(model, opt, scaler, cnn_batch(t), clip=clip)
        if opt_twin.eigen_update_due:
            opt_twin.update_eigenvector(frozen_loss(twin, cnn_batch(t)))
        unscaled_sam_step(twin, opt_twin, cnn_batch(t), clip=clip)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    before = [p.detach().clone() for p in model.parameters()]
    amp_xsam_step(model, opt, scaler, cnn_batch(3), inject=float("inf"))  # skipped whole, scale backs off
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0 ** 11


BAD_ARGUMENTS = [
    ("rho-negative", dict(rho=-1), ValueError, "rho must be a finite number >= 0"),
    ("xi-nan", dict(xi=float("nan")), ValueError, "xi must be a finite number >= 0"),
    ("xi-inf", dict(xi=float("inf")), ValueError, "xi must be a finite number >= 0"),
    ("xi-negative", dict(xi=-0.5), ValueError, "xi must be a finite number >= 0"),
    ("xi-str", dict(xi="1"), TypeError, "xi must be a number"),
    ("eig-every-zero", dict(eig_every=0), ValueError, r"eig_every must be a positive int \(>= 1\)"),
    ("eig-every-float", dict(eig_every=2.5), TypeError, "eig_every must be a positive int"),
    ("eig-iters-zero", dict(eig_iters=0), ValueError, r"eig_iters must be a positive int \(>= 1\)"),
    ("eig-iters-bool", dict(eig_iters=True), TypeError, "eig_iters must be a positive int"),
]


@pytest.mark.parametrize("kwargs, error, match", [row[1:] for row in BAD_ARGUMENTS],
                         ids=[row[0] for row in BAD_ARGUMENTS])
def test_bad_arguments_name_themselves(kwargs, error, match):
    with pytest.raises(error, match=match):
        XSAM(TinyCNN().parameters(), torch.optim.SGD, **{"lr": 0.1, **kwargs})


def test_missing_loss_fn_and_out_of_order_calls_are_errors():
    model = TinyCNN()
    opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="needs loss_fn="):
        opt.step(sam_closure(model, opt, cnn_batch()))
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        opt.step(sam_closure(model, opt, cnn_batch()), loss_fn=3)
    cnn_loss(model, cnn_batch()).backward()
    with pytest.raises(RuntimeError, match="update_eigenvector"):
        opt.first_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # nothing moved
    opt.update_eigenvector(frozen_loss(model, cnn_batch()))
    opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step"):
        opt.update_eigenvector(frozen_loss(model, cnn_batch()))
    cnn_loss(model, cnn_batch()).backward()
    opt.second_step()
    assert not opt.eigen_update_due and all(torch.isfinite(p).all() for p in model.parameters())


DDP_WORKER = r'''
import sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
import tnlayers
from tnlayers.optim import XSAM, training_step

rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(tnlayers.TuckerConv2d(3, 6, 3, padding=1, rank=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 3)).double()


def batch(step, part=None):
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 3, 5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
    return (x, y) if part is None else (x[4 * part:4 * part + 4], y[4 * part:4 * part + 4])


def run(model, sync_first_pass, part):
    kwargs = {} if sync_first_pass else dict(sync_first_pass=False, model=model)
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.1, xi=2.0, eig_every=2, eig_iters=4, lr=0.1, **kwargs)
    for step in range(3):
        x, y = batch(step, part)
        training_step(model, opt, lambda: F.cross_entropy(model(x), y))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


if rank < 0:  # the single-process reference on the whole batch
    torch.save(run(make_model(), True, None), out + "/reference.pt")
    sys.exit(0)
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
results = {sync: run(DistributedDataParallel(make_model()), sync, rank) for sync in (True, False)}
torch.save(results, out + f"/rank{rank}.pt")
dist.destroy_process_group()
'''


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_ddp_ranks_share_the_eigenvector_and_match_one_process(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), "2", str(tmp_path / "store"), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (-1, 0, 1)]
    for proc in procs:
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, out[-3000:]
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    # Averaged H v (and g̃): both ranks take the same steps, those of one process on the whole batch.
    torch.testing.assert_close(ranks[0][True], reference, rtol=1e-9, atol=1e-11)
    assert torch.equal(ranks[0][True], ranks[1][True])
    # Local first passes (m-sharpness): different perturbations, still the same step on every rank.
    assert torch.equal(ranks[0][False], ranks[1][False])
    assert not torch.equal(ranks[0][False], ranks[0][True])
