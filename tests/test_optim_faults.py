"""Faults a user can cause with the optimizers (issue 17): each is handled correctly or refused loudly.

Every expected value is computed here, by hand, in plain torch (no tnlayers optimizer code)."""
import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_optim_helpers import TinyCNN, Tucker2, cnn_batch, cnn_loss, one_thread  # noqa: F401 (autouse fixture)
import tnlayers
from tnlayers.optim import BAR, DAS, GSAM, SAM, XSAM


def tucker_target_loss(model):
    target = torch.linspace(-1, 1, 30, dtype=model.A.dtype).view(6, 5)
    return (model() - target).pow(2).sum()


def reference_das_lambdas(cores, lr, alpha):
    """Algorithm 2 (one group, global u = its own Σγ^(-1/2)), plain float64 arithmetic."""
    gamma = [float(c.grad.double().pow(2).sum()) for c in cores]
    s = [float(c.detach().double().pow(2).sum()) for c in cores]
    mean, u = sum(gamma) / len(gamma), sum(gamma) ** -0.5
    return [lr * alpha * u * (g - mean) / sk for g, sk in zip(gamma, s)]


def tiny_core_model():
    """A Tucker-2 group whose core G has norm ~1e-6 next to an O(1) gradient: λ_G ≈ 1e10 unbounded."""
    model = Tucker2(6, 5, 3, dtype=torch.float64, seed=3)
    with torch.no_grad():
        model.G.mul_(1e-6)
    return model


# ---- item 2 of the issue: DAS's rescale is bounded ----

@pytest.mark.parametrize("max_scale", [2.0, 10.0])
def test_das_factor_is_clamped_to_max_scale(max_scale):
    model = tiny_core_model()
    expected = copy.deepcopy(model)
    lr, alpha = 0.1, 0.5
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=alpha, lr=lr, max_scale=max_scale, backend="torch")
    tucker_target_loss(model).backward()
    tucker_target_loss(expected).backward()
    opt.step()

    cores = expected.core_parameters()
    raw = reference_das_lambdas(cores, lr, alpha)
    assert max(raw) > 1e6  # unbounded, G would grow a million-fold in one step
    with torch.no_grad():
        for core, lam in zip(cores, raw):
            core.mul_(min(max(1.0 + lam, 1.0 / max_scale), max_scale))
            core.sub_(lr * core.grad)
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    factors = 1.0 + opt.last_lambdas[1]
    assert float(factors.max()) == pytest.approx(max_scale) and float(factors.min()) >= 1.0 / max_scale


def test_das_default_keeps_a_tiny_core_from_exploding():
    model = tiny_core_model()
    before = float(model.G.detach().norm())
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.5, lr=0.1)
    tucker_target_loss(model).backward()
    opt.step()
    growth = float(model.G.detach().norm()) / before
    assert 1e3 < growth <= 1e4 * (1 + 1e-9) + 0.1 * float(model.G.grad.norm()) / before  # max_scale + SGD step
    assert tucker_target_loss(model) < 2 * tucker_target_loss(tiny_core_model())


@pytest.mark.parametrize("alpha", [1e30, 1e300])
def test_das_absurd_alpha_takes_a_bounded_step_not_a_nan(alpha):
    """One step: every factor within the default [1e-4, 1e4] (or 1 where λ is not finite), so no core is
    non-finite or zero and the loss stays finite. (Over many steps a huge α diverges as a huge lr does.)"""
    model = Tucker2(6, 5, 3, dtype=torch.float32, seed=4)
    before = [c.detach().clone() for c in model.core_parameters()]
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=alpha, lr=0.05)
    tucker_target_loss(model).backward()
    grads = [c.grad.clone() for c in model.core_parameters()]
    opt.step()
    for core, old, grad, lam in zip(model.core_parameters(), before, grads, opt.last_lambdas[1].tolist()):
        assert 1e-4 * (1 - 1e-6) <= 1 + lam <= 1e4 * (1 + 1e-6)
        torch.testing.assert_close(core, (1 + lam) * old - 0.05 * grad)
        assert torch.isfinite(core).all() and core.detach().norm() > 0
    assert torch.isfinite(tucker_target_loss(model))


def paper_cnn():
    """Two tnlayers TR convs with BatchNorm and a dense head, the shape of the paper's TR-ResNets."""
    torch.manual_seed(0)
    return nn.Sequential(tnlayers.TRConv2d(3, 8, 3, rank=3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         tnlayers.TRConv2d(8, 8, 3, rank=3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_das_default_bound_is_inactive_for_adapters_at_the_papers_alpha():
    """Adapters growing their zero-initialized core (paper's adapter α up to 2, Adam): factors well above 1,
    still bit for bit the unbounded run with the default bound."""
    from tnlayers.adapters import adapt

    results, largest = [], 0.0
    for max_scale in (None, math.inf):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TT bonds larger than the modes allow: a one-time note
            model = adapt(net, format="tt", rank=4, alpha=16, target_modules=["0", "2"])
        kwargs = {} if max_scale is None else {"max_scale": max_scale}
        opt = DAS([p for p in model.parameters() if p.requires_grad], torch.optim.Adam, alpha=2.0, lr=3e-3,
                  **kwargs)
        gen = torch.Generator().manual_seed(1)
        for _ in range(40):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(16, 16, generator=gen)), torch.randint(0, 4, (16,), generator=gen)).backward()
            opt.step()
            largest = max(largest, 1.0 + float(opt.last_lambdas[1].max()))
        results.append([p.detach().clone() for p in model.parameters()])
    assert 5.0 < largest < 1e3  # a bound of, say, 2 would have changed this run
    assert all(torch.equal(p, q) for p, q in zip(*results))


def test_das_default_bound_is_inactive_at_the_papers_settings():
    """Paper's CIFAR settings (α 0.1, lr 0.1 cosine, momentum 0.9, wd 5e-4): the default bound never binds,
    so the run is bit for bit the unbounded one (measured on TR/CP/TT/Tucker ResNet-20s: |λ| < 1e-2)."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen))
               for _ in range(40)]
    results, largest = [], 0.0
    for max_scale in (None, math.inf):
        model = paper_cnn()
        kwargs = {} if max_scale is None else {"max_scale": max_scale}
        opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.1, lr=0.1, momentum=0.9, weight_decay=5e-4,
                  **kwargs)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, len(batches))
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            largest = max(largest, float(opt.last_lambdas[1].abs().max()))
        results.append([p.detach().clone() for p in model.parameters()])
    assert 1e-6 < largest < 0.1  # DAS acted, far inside the default bound
    assert all(torch.equal(p, q) for p, q in zip(*results))


@pytest.mark.parametrize("max_scale, error", [(1.0, ValueError), (0.5, ValueError), (float("nan"), ValueError),
                                              ("2", TypeError), (True, TypeError)])
def test_das_bad_max_scale_names_itself(max_scale, error):
    with pytest.raises(error, match="max_scale"):
        DAS(Tucker2().parameters(), torch.optim.SGD, lr=0.1, max_scale=max_scale)


# ---- item 3: BAR with alpha * lr >= 1 ----

def test_bar_refuses_alpha_times_lr_of_one_or_more_at_construction():
    with pytest.raises(ValueError, match=r"alpha \* lr < 1.*alpha=10.0.*lr=0.1"):
        BAR(Tucker2().parameters(), torch.optim.SGD, alpha=10.0, lr=0.1)


def test_bar_refuses_a_scheduled_lr_at_step_time_and_changes_nothing():
    model = Tucker2(dtype=torch.float64)
    opt = BAR(model.parameters(), torch.optim.SGD, alpha=0.5, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 40.0)  # lr 0.1 -> 4
    tucker_target_loss(model).backward()
    opt.step()
    sched.step()
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    tucker_target_loss(model).backward()
    with pytest.raises(ValueError, match=r"alpha=0.5 \(at step 1\) and lr=4.0, alpha \* lr = 2.0"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.steps_taken == 1
    torch.testing.assert_close(opt.state_dict()["state"], state["state"], rtol=0, atol=0)


def test_bar_defaults_work_without_total_steps():
    model = Tucker2(dtype=torch.float64)
    opt = BAR(model.parameters(), torch.optim.SGD, lr=0.1)  # alpha 0.1, no total_steps: constant alpha
    for _ in range(3):
        opt.zero_grad()
        tucker_target_loss(model).backward()
        opt.step()
        assert opt.last_lambdas[1].abs().max() == pytest.approx(0.1 * 0.1, rel=1e-12)


# ---- item 4: wrappers that would do nothing warn ----

def test_das_and_bar_warn_once_when_given_no_cores():
    for cls in (DAS, BAR):
        with pytest.warns(UserWarning, match=f"{cls.__name__} found no core groups among the 2 parameters") as got:
            opt = cls(nn.Linear(4, 2).parameters(), torch.optim.SGD, lr=0.1)
        assert len(got) == 1 and got[0].filename == __file__  # points at this line, not into tnlayers
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.add_param_group({"params": Tucker2().parameters()})  # cores added later: no second warning
            nn.Linear(2, 2)(torch.ones(1, 2)).sum().backward()
            opt.step()


def test_no_warning_with_cores_or_for_sam():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DAS(TinyCNN().parameters(), torch.optim.SGD, lr=0.1)
        BAR(nn.Sequential(tnlayers.TTLinear(8, 8, rank=2), nn.Linear(8, 2)).parameters(), torch.optim.SGD, lr=0.1)
        SAM(nn.Linear(4, 2).parameters(), torch.optim.SGD, lr=0.1)


# ---- item 10: SAM's GradScaler flag must not move a parameter without a second-pass gradient ----

class TwoParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([0.3, 0.7, -1.1], dtype=torch.float64))

    def loss(self, use_a=True):
        b_part = (self.b - 0.2).pow(2).sum() + self.b.prod()
        return b_part + ((self.a * self.b).sum() ** 2 if use_a else 0.0)


def reference_sam_momentum(model, rho, lr, momentum, steps):
    """davda54/sam with SGD momentum, by hand: step t's second pass uses ``a`` only where steps[t] is True."""
    a, b = model.a.detach().clone(), model.b.detach().clone()
    buf = {}
    for second_uses_a in steps:
        pa, pb = a.clone().requires_grad_(), b.clone().requires_grad_()
        ga, gb = torch.autograd.grad(TwoParams.loss(_view(pa, pb)), (pa, pb))
        norm = torch.sqrt(ga.pow(2).sum() + gb.pow(2).sum())
        qa = (a + rho * ga / (norm + 1e-12)).requires_grad_()
        qb = (b + rho * gb / (norm + 1e-12)).requires_grad_()
        loss = TwoParams.loss(_view(qa, qb), use_a=second_uses_a)
        grads = torch.autograd.grad(loss, (qa, qb), allow_unused=True)
        new = {}
        for name, value, grad in (("a", a, grads[0]), ("b", b, grads[1])):
            if grad is None:  # no gradient: torch.optim.SGD skips the parameter, momentum included
                new[name] = value
                continue
            buf[name] = grad.clone() if name not in buf else momentum * buf[name] + grad
            new[name] = value - lr * buf[name]
        a, b = new["a"], new["b"]
    return a, b


def _view(a, b):
    holder = nn.Module()
    holder.a, holder.b = a, b
    return holder


def run_wrapper(opt, model, steps):
    for second_uses_a in steps:
        opt.zero_grad(set_to_none=True)
        model.loss().backward()
        opt.first_step()
        model.loss(use_a=second_uses_a).backward()
        opt.second_step()


def test_sam_leaves_a_parameter_without_second_pass_gradient_alone():
    model = TwoParams()
    steps = [True, False, False]
    expected_a, expected_b = reference_sam_momentum(model, 0.05, 0.1, 0.9, steps)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    run_wrapper(opt, model, steps[:1])
    a_after_first = model.a.detach().clone()
    run_wrapper(opt, model, steps[1:])
    assert torch.equal(model.a, a_after_first)  # momentum did not carry it on a zero gradient
    torch.testing.assert_close(model.a, expected_a, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.b, expected_b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [
    lambda ps: GSAM(ps, torch.optim.SGD, rho=0.05, alpha=0.3, lr=0.1, momentum=0.9),
    lambda ps: XSAM(ps, torch.optim.SGD, rho=0.05, xi=0.5, eig_every=100, lr=0.1, momentum=0.9),
], ids=["gsam", "xsam"])
def test_sam_variants_leave_it_alone_too(make):
    model = TwoParams()
    opt = make(model.parameters())
    if isinstance(opt, XSAM):
        opt.update_eigenvector(model.loss)
    run_wrapper(opt, model, [True])
    a_after_first = model.a.detach().clone()
    run_wrapper(opt, model, [False, False])
    assert torch.equal(model.a, a_after_first)
    assert model.a.grad is None and model.b.grad is not None


def test_gradscaler_still_skips_on_a_nonfinite_first_pass_when_the_flag_param_gets_no_gradient():
    model = TwoParams().float()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model.loss()).backward()
    model.a.grad[0] = float("inf")
    opt.first_step()
    scaler.scale(model.loss(use_a=False)).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert scaler.get_scale() < 2.0 ** 8


# ---- loading one optimizer's state into another kind: refused before anything changes ----

def das_sgd(ps):
    return DAS(ps, torch.optim.SGD, alpha=0.1, lr=0.1, momentum=0.9)


SAVERS = {
    "SAM(SGD)": lambda ps: SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9),
    "GSAM(SGD)": lambda ps: GSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9),
    "BAR(SGD)": lambda ps: BAR(ps, torch.optim.SGD, lr=0.1, momentum=0.9),
    "DAS(Adam)": lambda ps: DAS(ps, torch.optim.Adam, lr=0.01),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
}


def trained_state(make, steps=2):
    model = TinyCNN()
    opt = make(model.parameters())
    for t in range(steps):
        closure = _closure(model, opt, t)
        opt.step(closure) if isinstance(opt, SAM) else (closure(), opt.step())
    return opt.state_dict()


def _closure(model, opt, t):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = cnn_loss(model, cnn_batch(t))
        loss.backward()
        return loss
    return closure


def das_run(model, opt, batches):
    for t in batches:
        _closure(model, opt, t)()
        opt.step()


@pytest.mark.parametrize("saver", sorted(SAVERS))
def test_loading_another_kinds_state_is_refused_and_changes_nothing(saver):
    foreign = trained_state(SAVERS[saver])
    model, twin = TinyCNN(), TinyCNN()
    opt, twin_opt = das_sgd(model.parameters()), das_sgd(twin.parameters())
    das_run(model, opt, [0])
    das_run(twin, twin_opt, [0])
    before = copy.deepcopy(opt.state_dict())
    plain = saver in ("Adam", "SGD")
    pattern = "plain torch.optim optimizer's" if plain else rf"saved by {re.escape(saver)} but this optimizer is DAS\(SGD\)"
    for check in (opt.check_state_dict, opt.load_state_dict):
        with pytest.raises(ValueError, match=pattern):
            check(foreign)
    assert opt.state_dict()["tnlayers"] == before["tnlayers"] and opt.param_groups[0]["alpha"] == 0.1
    torch.testing.assert_close(opt.state_dict()["state"], before["state"], rtol=0, atol=0)
    das_run(model, opt, [1, 2])  # still usable: the same steps as an optimizer that never saw the bad load
    das_run(twin, twin_opt, [1, 2])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_sam_refuses_das_state_naming_both():
    opt = SAM(TinyCNN().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"saved by DAS\(SGD\) but this optimizer is SAM\(SGD\)"):
        opt.load_state_dict(trained_state(das_sgd))


def test_state_dicts_of_earlier_versions_load_into_the_same_kind_only():
    saved = trained_state(das_sgd)
    # as saved before the kind was stored (a copy: loading shares the state tensors with the dict)
    legacy = copy.deepcopy({k: v for k, v in saved.items() if k != "tnlayers_kind"})
    model, resumed = TinyCNN(), TinyCNN()
    opt = das_sgd(model.parameters())
    opt.load_state_dict(saved)
    opt2 = das_sgd(resumed.parameters())
    opt2.load_state_dict(legacy)
    assert opt2.steps_taken == 2
    das_run(model, opt, [3, 4])
    das_run(resumed, opt2, [3, 4])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    with pytest.raises(ValueError, match=r"saved by DAS or BAR \(its param groups have no 'rho'\) but this "
                                         r"optimizer is SAM\(SGD\)"):
        SAM(TinyCNN().parameters(), torch.optim.SGD, lr=0.1).load_state_dict(legacy)
    adam = {k: v for k, v in trained_state(SAVERS["DAS(Adam)"]).items() if k != "tnlayers_kind"}
    with pytest.raises(ValueError, match=r"no \['momentum', 'dampening'\].*around another base optimizer"):
        das_sgd(TinyCNN().parameters()).load_state_dict(adam)


def test_state_dict_with_other_param_groups_is_refused_before_any_change():
    saved = trained_state(das_sgd)
    model = TinyCNN()
    opt = DAS([{"params": list(model.parameters())[:3]}, {"params": list(model.parameters())[3:]}],
              torch.optim.SGD, alpha=0.1, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"param groups hold \[12\] parameters, this optimizer.s hold \[3, 9\]"):
        opt.load_state_dict(saved)
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["alpha"] = -1.0
    fresh = das_sgd(TinyCNN().parameters())
    with pytest.raises(ValueError, match="state_dict param group 0: alpha must be a finite number >= 0"):
        fresh.load_state_dict(bad)
    assert fresh.param_groups[0]["alpha"] == 0.1 and fresh.steps_taken == 0


# ---- errors that must say what happened ----

@pytest.mark.parametrize("make", [
    lambda ps: DAS(ps, torch.optim.LBFGS, lr=0.1),
    lambda ps: BAR(ps, torch.optim.LBFGS, lr=0.1),
    lambda ps: SAM(ps, torch.optim.LBFGS, lr=0.1),
    lambda ps: DAS(None, torch.optim.LBFGS(ps, lr=0.1)),
], ids=["das", "bar", "sam", "das-instance"])
def test_a_base_optimizer_that_needs_a_closure_is_refused(make):
    with pytest.raises(TypeError, match=r"LBFGS needs a closure in step\(\).*first-order optimizer"):
        make(Tucker2().parameters())


@pytest.mark.parametrize("make, option, base", [
    (lambda ps: DAS(ps, torch.optim.RMSprop, lr=0.01), "alpha", "RMSprop"),
    (lambda ps: BAR(ps, torch.optim.ASGD, lr=0.01), "alpha", "ASGD"),
    (lambda ps: SAM(ps, torch.optim.Adadelta), "rho", "Adadelta"),
], ids=["das-rmsprop", "bar-asgd", "sam-adadelta"])
def test_a_base_optimizer_with_an_option_of_the_same_name_is_refused(make, option, base):
    with pytest.raises(ValueError, match=rf"option '{option}' has the same name as a hyper-parameter of {base}"):
        make(Tucker2().parameters())


@pytest.mark.parametrize("cls", [DAS, BAR, SAM])
def test_parameters_on_the_meta_device_are_refused(cls):
    layer = tnlayers.TTLinear(8, 8, rank=2, device="meta")
    with pytest.raises(ValueError, match=r"on the meta device; materialize the model first \(model.to_empty"):
        cls(layer.parameters(), torch.optim.SGD, lr=0.1)

