"""End to end: the optimizers on a small CNN made of tnlayers' own tensorized layers."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tnlayers
from test_optim_helpers import one_thread  # noqa: F401 (autouse fixture)
from tnlayers.groups import core_groups
from tnlayers.optim import BAR, DAS, SAM, NormDynamics, disable_running_stats

if not all(hasattr(tnlayers, name) for name in ("TuckerConv2d", "TTConv2d", "CPLinear")):
    pytest.skip("tnlayers layers not available", allow_module_level=True)


def tensorized_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        tnlayers.TuckerConv2d(3, 8, 3, padding=1, rank=3), nn.BatchNorm2d(8), nn.ReLU(),
        tnlayers.TTConv2d(8, 8, 3, padding=1, rank=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), tnlayers.CPLinear(8, 4, rank=3))


BATCH = (torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
         torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(2)))


def train(model, opt, steps=15):
    x, y = BATCH
    losses = []
    calls = []
    for _ in range(steps):
        def closure():
            # SAM calls the closure twice a step; its second (perturbed) pass leaves BN statistics alone.
            second_pass = isinstance(opt, SAM) and len(calls) % 2 == 1
            calls.append(1)
            opt.zero_grad(set_to_none=True)
            with disable_running_stats(model) if second_pass else contextlib.nullcontext():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    return losses


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: SAM(p, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9),
    lambda p: DAS(p, torch.optim.SGD, alpha=0.1, lr=0.05, momentum=0.9),
    lambda p: BAR(p, torch.optim.SGD, alpha=0.1, total_steps=15, lr=0.05, momentum=0.9),
], ids=["sgd", "sam", "das", "bar"])
def test_tensorized_cnn_trains(make_opt):
    model = tensorized_cnn()
    losses = train(model, make_opt(model.parameters()))
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_das_finds_the_layers_groups_and_alpha_zero_is_sgd():
    model, twin = tensorized_cnn(), tensorized_cnn()
    das = DAS(model.parameters(), torch.optim.SGD, alpha=0.0, lr=0.05, momentum=0.9)
    train(model, das, steps=5)
    train(twin, torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9), steps=5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))

    das = DAS(model.parameters(), torch.optim.SGD, alpha=0.1, lr=0.05)
    train(model, das, steps=1)
    n_cores = sum(len(cores) for _, cores in core_groups(model))
    assert len(das.last_lambdas[0]) == n_cores and das.last_lambdas[1].abs().sum() > 0
    report = NormDynamics(model, das).record()
    assert {f"{name}/Q" for name, _ in core_groups(model)} <= set(report)
