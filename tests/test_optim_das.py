"""DAS (arXiv 2508.10435, Algorithm 2) against an independent per-layer reference, and its torch.optim
contract. The formulas: docs/design.md, 'DAS: deviation-aware scaling'."""
import copy
import math

import pytest
import torch
from torch import nn

from test_optim_helpers import TinyCNN, Tucker2, cnn_batch, cnn_loss, one_thread  # noqa: F401 (autouse fixture)
from tnlayers.groups import core_groups
from tnlayers.optim import DAS


def reference_das_scale(groups, lrs, alpha, normalization="global", denominator="squared"):
    """Algorithm 2 as a plain loop: ``groups`` lists of cores (with grads); ``lrs`` maps core -> η."""
    gammas = [[float(c.grad.double().pow(2).sum()) for c in cores] for cores in groups]
    total = sum(sum(g) for g in gammas)
    for cores, gamma in zip(groups, gammas):
        mean = sum(gamma) / len(gamma)
        u = (len(gamma) * mean) ** -0.5 if normalization == "layer" else total ** -0.5
        with torch.no_grad():
            for core, g in zip(cores, gamma):
                s = float(core.double().pow(2).sum())
                denom = s if denominator == "squared" else math.sqrt(s)
                core.mul_(1.0 + lrs[core] * alpha * u * (g - mean) / denom)


def two_tucker_model(dtype=torch.float64):
    model = nn.Module()
    model.first = Tucker2(6, 5, 3, scales=(2.0, 0.5, 1.0), dtype=dtype, seed=1)
    model.second = Tucker2(4, 4, 2, scales=(0.7, 1.5, 1.0), dtype=dtype, seed=2)
    return model


def regression_loss(model):
    gen = torch.Generator().manual_seed(7)
    loss = 0.0
    for layer in (model.first, model.second):
        target = torch.randn(layer().shape, generator=gen, dtype=layer.A.dtype)
        loss = loss + (layer() - target).pow(2).sum()
    return loss


def run(model, opt, steps, batches=None, scheduler=None):
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        cnn_loss(model, cnn_batch(t if batches is None else batches[t])).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("base, kwargs", [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.01)),
])
def test_alpha_zero_is_the_base_optimizer_bit_for_bit(base, kwargs):
    model_base, model_das = TinyCNN(), TinyCNN()
    run(model_base, base(model_base.parameters(), **kwargs), 6)
    run(model_das, DAS(model_das.parameters(), base, alpha=0.0, **kwargs), 6)
    for p, q in zip(model_base.parameters(), model_das.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("normalization", ["global", "layer"])
@pytest.mark.parametrize("denominator", ["squared", "norm"])
def test_one_step_matches_the_reference(normalization, denominator):
    model = two_tucker_model()
    expected = copy.deepcopy(model)
    lr, alpha = 0.01, 0.5
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=alpha, normalization=normalization,
              denominator=denominator, lr=lr)
    regression_loss(model).backward()
    regression_loss(expected).backward()
    opt.step()

    groups = [layer.core_parameters() for layer in (expected.first, expected.second)]
    reference_das_scale(groups, {c: lr for g in groups for c in g}, alpha, normalization, denominator)
    with torch.no_grad():
        for p in expected.parameters():
            p.sub_(lr * p.grad)
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert opt.last_lambdas[1].abs().max() > 1e-4  # the rescale did something measurable


def test_eta_is_the_current_lr_of_each_cores_param_group():
    model = two_tucker_model()
    expected = copy.deepcopy(model)
    groups = [{"params": model.first.parameters(), "lr": 0.02}, {"params": model.second.parameters(), "lr": 0.005}]
    opt = DAS(groups, torch.optim.SGD, alpha=0.3, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)
    opt.step()  # no gradients yet: nothing moves
    scheduler.step()  # lrs are now 0.01 and 0.0025
    regression_loss(model).backward()
    regression_loss(expected).backward()
    opt.step()
    layers = (expected.first, expected.second)
    lrs = {c: lr for layer, lr in zip(layers, (0.01, 0.0025)) for c in layer.core_parameters()}
    reference_das_scale([layer.core_parameters() for layer in layers], lrs, 0.3)
    with torch.no_grad():
        for p in expected.parameters():
            p.sub_(lrs[p] * p.grad)
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("schedule, factor", [
    ("linear", lambda t, total: max(0.0, 1 - t / total)),
    ("cosine", lambda t, total: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))),
])
def test_alpha_schedules_equal_the_same_callable_alpha(schedule, factor):
    model_a, model_b = TinyCNN(), TinyCNN()
    opt_a = DAS(model_a.parameters(), torch.optim.SGD, alpha=0.2, alpha_schedule=schedule, total_steps=4, lr=0.1)
    opt_b = DAS(model_b.parameters(), torch.optim.SGD, alpha=lambda t: 0.2 * factor(t, 4), lr=0.1)
    run(model_a, opt_a, 6)
    run(model_b, opt_b, 6)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    assert opt_a.steps_taken == 6


def test_guards_zero_core_zero_gradients_and_nonfinite_group():
    model = two_tucker_model()
    with torch.no_grad():
        model.first.G.zero_()  # LoRA-style zero core: s = 0
    regression_loss(model).backward()
    with torch.no_grad():
        model.second.A.grad[0, 0] = float("inf")
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.5, lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    opt._rescale_cores()
    cores, lambdas = opt.last_lambdas
    assert torch.isfinite(lambdas).all()
    by_core = dict(zip(map(id, cores), lambdas.tolist()))
    assert by_core[id(model.first.G)] == 0.0
    assert all(by_core[id(c)] == 0.0 for c in model.second.core_parameters())  # non-finite group untouched
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.first.G, before[1])

    # All-zero gradients: nothing to compare, so no rescale.
    model.zero_grad(set_to_none=False)
    opt._rescale_cores()
    assert not opt.last_lambdas[1].any()


def test_core_without_grad_is_left_out_of_its_group():
    model = two_tucker_model()
    expected = copy.deepcopy(model)
    regression_loss(model).backward()
    regression_loss(expected).backward()
    model.first.B.grad = None
    expected.first.B.grad = None
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.5, lr=0.01)
    opt.step()
    groups = [[expected.first.A, expected.first.G], expected.second.core_parameters()]
    reference_das_scale(groups, {c: 0.01 for g in groups for c in g}, 0.5)
    with torch.no_grad():
        for p in expected.parameters():
            if p.grad is not None:
                p.sub_(0.01 * p.grad)
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_param_groups_with_and_without_cores_and_no_cores_at_all():
    model = TinyCNN()
    cores = [c for _, cs in core_groups(model) for c in cs]
    core_ids = {id(c) for c in cores}
    rest = [p for p in model.parameters() if id(p) not in core_ids]
    opt = DAS([{"params": rest, "lr": 0.1}, {"params": cores, "alpha": 0.05}], torch.optim.SGD, lr=0.05)
    run(model, opt, 2)
    assert len(opt.last_lambdas[0]) == len(cores)

    plain = nn.Linear(4, 2)
    twin = copy.deepcopy(plain)
    with pytest.warns(UserWarning, match="no core groups"):
        opt_das = DAS(plain.parameters(), torch.optim.SGD, alpha=1.0, lr=0.1)
    opt_sgd = torch.optim.SGD(twin.parameters(), lr=0.1)
    for m, o in ((plain, opt_das), (twin, opt_sgd)):
        m(torch.ones(3, 4)).sum().backward()
        o.step()
    assert torch.equal(plain.weight, twin.weight)


def test_state_dict_round_trip_resumes_identically():
    batches = list(range(8))
    model = TinyCNN()
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.1, alpha_schedule="linear", total_steps=8,
              lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    run(model, opt, 3, batches, sched)
    saved_model, saved_opt, saved_sched = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), \
        copy.deepcopy(sched.state_dict())
    assert saved_opt["tnlayers"] == {"steps_taken": 3}
    assert not any("perturb" in k for k in saved_opt)
    run(model, opt, 5, batches[3:], sched)

    resumed = TinyCNN(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = DAS(resumed.parameters(), torch.optim.SGD, alpha=0.1, alpha_schedule="linear", total_steps=8,
               lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert opt2.steps_taken == 3 and opt2.param_groups is opt2.base_optimizer.param_groups
    run(resumed, opt2, 5, batches[3:], sched2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_gradscaler_skips_a_step_with_an_injected_inf():
    model = TinyCNN()
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.5, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(cnn_loss(model, cnn_batch())).backward()
    model.conv1.core.grad[0, 0, 0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.steps_taken == 0 and scaler.get_scale() < 2.0 ** 10

    opt.zero_grad(set_to_none=True)
    scaler.scale(cnn_loss(model, cnn_batch())).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.steps_taken == 1 and not torch.equal(model.conv1.core, before[1])


def test_rescale_reads_nothing_back_to_the_host(monkeypatch):
    model = TinyCNN()
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.1, lr=0.1)
    cnn_loss(model, cnn_batch()).backward()

    def host_sync(*args, **kwargs):
        raise AssertionError("host sync inside the DAS rescale")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    opt._rescale_cores()
    monkeypatch.undo()
    assert opt.last_lambdas[1].abs().sum() > 0


def test_closure_set_to_none_and_accumulation():
    model, twin = TinyCNN(), TinyCNN()
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.1, lr=0.1)
    opt_twin = DAS(twin.parameters(), torch.optim.SGD, alpha=0.1, lr=0.1)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = cnn_loss(model, cnn_batch())
        loss.backward()
        return loss

    loss = opt.step(closure)
    opt_twin.zero_grad()
    expected = cnn_loss(twin, cnn_batch())
    expected.backward()
    opt_twin.step()
    assert torch.equal(loss, expected)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))

    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no gradients at all: nothing moves
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

    # Two accumulated half-batches rescale once, like one batch with the summed loss.
    x, y = cnn_batch(n=8)
    for part in (slice(0, 4), slice(4, 8)):
        cnn_loss(model, (x[part], y[part])).backward()
    opt.step()
    opt_twin.zero_grad()
    (cnn_loss(twin, (x[:4], y[:4])) + cnn_loss(twin, (x[4:], y[4:]))).backward()
    opt_twin.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_base_optimizer_instance_is_adopted():
    model = TinyCNN()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = DAS(None, base, alpha=0.1)
    assert opt.param_groups is base.param_groups and opt.param_groups[0]["alpha"] == 0.1
    run(model, opt, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="params"):
        DAS([nn.Parameter(torch.ones(2))], base)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(alpha=-0.1), ValueError, "alpha"),
    (dict(alpha="big"), TypeError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(normalization="per-core"), ValueError, "normalization"),
    (dict(denominator="cubed"), ValueError, "denominator"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(alpha_schedule="linear"), ValueError, "total_steps"),
    (dict(alpha_schedule="step", total_steps=3), ValueError, "alpha_schedule"),
    (dict(alpha=lambda t: 0.1, alpha_schedule="cosine", total_steps=3), ValueError, "alpha_schedule"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    with pytest.raises(error, match=match):
        DAS(TinyCNN().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize("base", [nn.Linear, "SGD", torch.optim.SGD.step, None])
def test_base_optimizer_must_be_an_optimizer(base):
    with pytest.raises(TypeError, match="base_optimizer"):
        DAS(TinyCNN().parameters(), base, lr=0.1)


def test_base_kwargs_with_an_instance_and_bad_callable_alpha_are_errors():
    model = TinyCNN()
    with pytest.raises(TypeError, match="lr"):
        DAS(None, torch.optim.SGD(model.parameters(), lr=0.1), lr=0.2)
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=lambda t: -1.0, lr=0.1)
    cnn_loss(model, cnn_batch()).backward()
    with pytest.raises(ValueError, match="alpha"):
        opt.step()


def test_add_param_group_deepcopy_and_partial_group_warning():
    model = two_tucker_model()
    opt = DAS(model.first.parameters(), torch.optim.SGD, alpha=0.2, lr=0.01, momentum=0.9)
    opt.add_param_group({"params": model.second.parameters(), "lr": 0.02})
    added = opt.param_groups[1]
    assert added["alpha"] == 0.2 and added["momentum"] == 0.9 and opt.base_optimizer.param_groups[1] is added
    regression_loss(model).backward()
    opt.step()
    assert len(opt.last_lambdas[0]) == 6

    twin = copy.deepcopy(opt)
    assert twin.base_optimizer is not opt.base_optimizer and twin.steps_taken == 1
    assert twin.param_groups is twin.base_optimizer.param_groups

    # A missing core in the middle of a group leaves a gap in the indices.
    partial = DAS([model.first.A, model.first.B], torch.optim.SGD, alpha=0.2, lr=0.01)
    with pytest.warns(UserWarning, match="partly"):
        partial.step()


def test_warns_when_the_last_core_of_a_group_is_missing():
    import tnlayers
    layer = tnlayers.TTConv2d(4, 4, 3, rank=2)
    opt = DAS(list(layer.cores)[:-1], torch.optim.SGD, alpha=0.1, lr=0.1)
    layer(torch.randn(2, 4, 5, 5)).pow(2).sum().backward()
    with pytest.warns(UserWarning, match="partly"):
        opt.step()
