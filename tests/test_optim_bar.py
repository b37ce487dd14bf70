"""BAR (nBAR/oBAR, two cores as in the paper and the K-core generalization) and NormDynamics."""
import math

import pytest
import torch
from torch import nn

from test_optim_helpers import TinyCNN, Tucker2, cnn_batch, cnn_loss, one_thread  # noqa: F401 (autouse fixture)
from tnlayers.groups import mark_core_group
from tnlayers.optim import BAR, DAS, NormDynamics


class LowRank(nn.Module):
    """LoRA's X·Yᵀ: the paper's two-core group."""

    def __init__(self, x_scale, y_scale):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.X = nn.Parameter(x_scale * torch.randn(6, 2, generator=gen, dtype=torch.float64))
        self.Y = nn.Parameter(y_scale * torch.randn(5, 2, generator=gen, dtype=torch.float64))
        mark_core_group([self.X, self.Y])

    def core_parameters(self):
        return [self.X, self.Y]

    def forward(self):
        return self.X @ self.Y.T


def one_bar_step(model, variant, lr=0.1, alpha=0.5):
    target = torch.ones(6, 5, dtype=torch.float64)
    (model() - target).pow(2).sum().backward()
    grads = [c.grad.clone() for c in model.core_parameters()]
    before = [c.detach().clone() for c in model.core_parameters()]
    BAR(model.parameters(), torch.optim.SGD, alpha=alpha, variant=variant, alpha_schedule="constant", lr=lr).step()
    return before, grads


@pytest.mark.parametrize("x_scale, y_scale", [(3.0, 0.3), (0.3, 3.0)])
@pytest.mark.parametrize("variant", ["nbar", "obar"])
def test_two_cores_follow_the_papers_rule(variant, x_scale, y_scale):
    model = LowRank(x_scale, y_scale)
    (x0, y0), (gx, gy) = one_bar_step(model, variant)
    step = 0.5 * 0.1
    if variant == "nbar":
        x_grows = gx.norm() >= gy.norm()
    else:
        x_grows = not bool(x0.norm() >= y0.norm())
    fx, fy = (1 + step, 1 - step) if x_grows else (1 - step, 1 + step)
    torch.testing.assert_close(model.X, fx * x0 - 0.1 * gx, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.Y, fy * y0 - 0.1 * gy, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant", ["nbar", "obar"])
def test_k_cores_move_by_the_sign_against_the_group_mean(variant):
    model = Tucker2(6, 5, 3, scales=(2.0, 0.5, 1.0), dtype=torch.float64, seed=1)
    (model() - 1.0).pow(2).sum().backward()
    cores = model.core_parameters()
    before = [c.detach().clone() for c in cores]
    grads = [c.grad.clone() for c in cores]
    measured = [g.pow(2).sum() for g in grads] if variant == "nbar" else [c.pow(2).sum() for c in before]
    mean = sum(measured) / 3
    signs = [math.copysign(1.0, float(m - mean)) * (1 if variant == "nbar" else -1) for m in measured]
    opt = BAR(model.parameters(), torch.optim.SGD, alpha=0.2, variant=variant, alpha_schedule="constant", lr=0.05)
    opt.step()
    for core, old, grad, sign in zip(cores, before, grads, signs):
        torch.testing.assert_close(core, (1 + 0.2 * 0.05 * sign) * old - 0.05 * grad, rtol=1e-12, atol=1e-14)


def test_cosine_alpha_is_the_default_and_counts_steps():
    model = TinyCNN()
    opt = BAR(model.parameters(), torch.optim.SGD, alpha=0.1, total_steps=4, lr=0.1)
    factors = []
    for t in range(5):
        opt.zero_grad()
        cnn_loss(model, cnn_batch(t)).backward()
        opt.step()
        factors.append(float(opt.last_lambdas[1].abs().max()) if opt.last_lambdas else 0.0)
    expected = [0.1 * 0.1 * 0.5 * (1 + math.cos(math.pi * min(t, 4) / 4)) for t in range(5)]
    assert factors == pytest.approx(expected, abs=1e-8)
    assert opt.state_dict()["tnlayers"] == {"steps_taken": 5}


def test_nonfinite_group_is_left_alone():
    model = LowRank(1.0, 1.0)
    (model() - 1.0).pow(2).sum().backward()
    model.X.grad[0, 0] = float("nan")
    opt = BAR(model.parameters(), torch.optim.SGD, alpha=0.5, alpha_schedule="constant", lr=0.1)
    opt._rescale_cores()
    assert not opt.last_lambdas[1].any()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(variant="xbar", total_steps=3), ValueError, "variant"),
    (dict(alpha=-1.0, total_steps=3), ValueError, "alpha"),
    (dict(alpha_schedule="cosine"), ValueError, "total_steps"),  # only when asked for: the default works
    (dict(base_optimizer=object, total_steps=3), TypeError, "base_optimizer"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    kwargs = {"base_optimizer": torch.optim.SGD, "lr": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        BAR(TinyCNN().parameters(), **kwargs)


def test_norm_dynamics_reports_each_group():
    model = TinyCNN().double()
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.5, lr=0.1)
    dynamics = NormDynamics(model, opt)
    first = dynamics.record()
    assert first["conv1/grad0"] != first["conv1/grad0"]  # no gradient yet: NaN
    assert first["conv1/lambda0"] == 0.0

    cnn_loss(model, cnn_batch()).backward()
    report = dynamics.record(keep=True)
    cores = model.conv2.core_parameters()
    s = torch.stack([c.detach().pow(2).sum() for c in cores])
    gamma = torch.stack([c.grad.pow(2).sum() for c in cores])
    assert report["conv2/Q"] == pytest.approx(float((s - s.mean()).pow(2).sum()), rel=1e-12)
    assert report["conv2/cov"] == pytest.approx(float(((s - s.mean()) * (gamma - gamma.mean())).mean()), rel=1e-12)
    assert report["conv2/s1"] == pytest.approx(float(s[1]), rel=1e-12)
    assert report["conv2/grad2"] == pytest.approx(float(gamma[2]), rel=1e-12)
    assert all(isinstance(v, float) for v in report.values()) and dynamics.history == [report]

    opt.step()
    applied = dict(zip(map(id, opt.last_lambdas[0]), opt.last_lambdas[1].tolist()))
    after = dynamics()
    for k, core in enumerate(model.conv1.core_parameters()):
        assert after[f"conv1/lambda{k}"] == applied[id(core)] != 0.0
