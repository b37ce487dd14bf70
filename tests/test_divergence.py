"""Divergence is told at the step it happens (issue 18): a step of SAM, GSAM, XSAM, DAS or BAR that leaves
cores NaN/inf warns once (DivergenceWarning), naming the layer; a normal run and a step GradScaler skips
do not warn."""
import functools
import os
import warnings

import pytest
import torch
from torch import nn

import tnlayers
from tnlayers.optim import BAR, DAS, GSAM, SAM, XSAM, DivergenceWarning, training_step

OPTIMIZERS = {
    "DAS": functools.partial(DAS, alpha=0.01),
    "DAS-triton": functools.partial(DAS, alpha=0.01, backend="triton"),  # the fused kernels' step
    "BAR": functools.partial(BAR, alpha=0.0),  # alpha * lr < 1 is required; the rescale is not the point
    "SAM": functools.partial(SAM, rho=0.05),
    "GSAM": functools.partial(GSAM, rho=0.05),
    "XSAM": functools.partial(XSAM, rho=0.05, eig_every=3, eig_iters=2),
}


def model():
    torch.manual_seed(0)
    return nn.Sequential(tnlayers.TTConv2d(3, 8, 3, rank=2), nn.ReLU(), tnlayers.TuckerConv2d(8, 8, 3, rank=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator)


def build(name, net, lr, named=True):
    if name == "DAS-triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":  # a GPU machine: test_cuda_* covers the kernels there
            pytest.skip("this net is on the CPU, where the fused kernels run only under TRITON_INTERPRET=1")
    params = net.named_parameters() if named else net.parameters()
    return OPTIMIZERS[name](params, torch.optim.SGD, lr=lr, momentum=0.9)


def cores_finite(net) -> bool:
    return all(bool(torch.isfinite(c).all()) for _, cores in tnlayers.core_groups(net) for c in cores)


def run(net, opt, steps):
    """[(warnings of the step, cores finite after it)] for each step."""
    x, y = batch()
    out = []
    for _ in range(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            training_step(net, opt, lambda: nn.functional.cross_entropy(net(x), y))
        out.append(([w for w in caught if issubclass(w.category, DivergenceWarning)], cores_finite(net)))
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_divergence_warns_once_at_the_step_naming_the_layer(name):
    net = model()
    steps = run(net, build(name, net, lr=1e25), 8)
    first_bad = next(i for i, (_, finite) in enumerate(steps) if not finite)
    warned = [i for i, (caught, _) in enumerate(steps) if caught]
    assert warned == [first_bad]  # at that step, and only once
    caught = steps[first_bad][0]
    assert len(caught) == 1 and issubclass(DivergenceWarning, RuntimeWarning)
    message = str(caught[0].message)
    assert f"step {first_bad + 1} of this optimizer" in message
    bad_layers = [n for n, m in net.named_modules() if isinstance(m, tnlayers.TensorizedConv2d)
                  and not all(bool(torch.isfinite(c).all()) for c in m.core_parameters())]
    assert all(f"layer {n!r}" in message for n in bad_layers[:3]), (bad_layers, message)
    assert "(3, 2), (2, 9, 2), (2, 8)" in message or "(8, 2)" in message  # the cores' shapes
    assert caught[0].filename == __file__  # points at the user's code, not inside tnlayers or torch


def test_without_names_the_group_index_and_shapes_are_given():
    net = model()
    steps = run(net, build("DAS", net, lr=1e25, named=False), 6)
    message = str(next(c for c, _ in steps if c)[0].message)
    assert "core group 0 of 2 (core shapes [(3, 2), (2, 9, 2), (2, 8)])" in message
    assert "model.named_parameters()" in message


@pytest.mark.parametrize("name", ["DAS", "BAR", "SAM", "GSAM", "XSAM"])
def test_a_normal_run_does_not_warn(name):
    net = model()
    steps = run(net, build(name, net, lr=0.01), 12)
    assert not any(caught for caught, _ in steps) and cores_finite(net)


def test_a_loaded_state_warns_again():
    """The warning is once per run: a run resumed from a checkpoint (load_state_dict) is told of its own."""
    net = model()
    opt = build("DAS", net, lr=1e25)
    good = (opt.state_dict(), {k: v.clone() for k, v in net.state_dict().items()})
    assert sum(len(c) for c, _ in run(net, opt, 6)) == 1
    opt.load_state_dict(good[0])
    net.load_state_dict(good[1])
    assert sum(len(c) for c, _ in run(net, opt, 6)) == 1


@pytest.mark.parametrize("name", ["DAS", "BAR", "SAM"])
def test_grad_scaler_skipped_steps_do_not_warn(name):
    """A step with an inf gradient is skipped by GradScaler: the cores stay finite, nothing is told."""
    net = model()
    opt = build(name, net, lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = batch()

    def backward(poison):
        loss = nn.functional.cross_entropy(net(x), y)
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()

    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        for step in range(4):
            opt.zero_grad()
            backward(poison=step % 2 == 1)
            if isinstance(opt, SAM):
                opt.first_step()
                backward(poison=False)
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            assert (scaler.get_scale() < scale) == (step % 2 == 1)  # the poisoned steps were skipped
    assert cores_finite(net)


def test_dense_parameters_alone_are_not_watched():
    """Only cores are checked (the wrappers rescale cores); a model without any has nothing to tell."""
    net = nn.Linear(4, 2)
    with pytest.warns(UserWarning, match="found no core groups"):
        opt = DAS(net.parameters(), torch.optim.SGD, lr=1e30)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        for _ in range(4):
            opt.zero_grad()
            (net(torch.randn(3, 4)).pow(2).sum() * 1e30).backward()
            opt.step()


def test_huge_finite_cores_are_not_a_divergence():
    """A float32 2-norm overflows from entries of ~1e19 on: such cores are confirmed entry by entry, not told."""
    from tnlayers.optim._divergence import DivergenceWatch

    layer = tnlayers.TTLinear(16, 16, rank=2)
    groups = [{"params": list(layer.parameters())}]
    watch = DivergenceWatch()
    with torch.no_grad():
        layer.cores[1].fill_(1e30)
    assert not bool(torch.isfinite(torch.linalg.vector_norm(layer.cores[1])))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        watch.after_step(groups)
    with torch.no_grad():
        layer.cores[1][0, 0] = float("-inf")
    with pytest.warns(DivergenceWarning, match=r"step 2 .*core group 0 of 1"):
        watch.after_step(groups)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_warns_one_step_later_naming_the_step(backend):
    """On CUDA the check is read a step late (no host sync per step): the warning comes at the next step and
    names the step that diverged."""
    if backend == "triton":
        pytest.importorskip("triton")
    net = model().cuda()
    opt = DAS(net.named_parameters(), torch.optim.SGD, alpha=0.01, backend=backend, lr=1e25, momentum=0.9)
    x, y = (t.cuda() for t in batch())
    steps = []
    for _ in range(8):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            training_step(net, opt, lambda: nn.functional.cross_entropy(net(x), y))
        steps.append(([w for w in caught if issubclass(w.category, DivergenceWarning)], cores_finite(net)))
    first_bad = next(i for i, (_, finite) in enumerate(steps) if not finite)
    warned = [i for i, (caught, _) in enumerate(steps) if caught]
    assert warned == [first_bad + 1]
    assert f"step {first_bad + 1} of this optimizer" in str(steps[first_bad + 1][0][0].message)
