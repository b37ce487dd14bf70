"""SAM against a hand-written two-pass reference, both driving styles, AMP, checkpoints and BatchNorm."""
import copy

import pytest
import torch
from torch import nn

from test_optim_helpers import (TinyCNN, amp_sam_step, cnn_batch, cnn_loss, one_thread,  # noqa: F401 (autouse fixture)
                                sam_closure, sam_step_explicit, unscaled_sam_step)
from tnlayers.optim import SAM


def reference_sam_step(model, base, batch, rho, adaptive=False, eps=1e-12):
    """Algorithm 1 written out: gradient, perturb by ρ·T²g/||Tg|| (T = |w| if adaptive else 1), gradient
    there, restore, base step."""
    base.zero_grad(set_to_none=True)
    cnn_loss(model, batch).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    weight = [p.abs() if adaptive else torch.ones_like(p) for p in params]
    norm = sum(((t * p.grad) ** 2).sum() for t, p in zip(weight, params)).sqrt()
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for t, p in zip(weight, params):
            p.add_(rho / (norm + eps) * t * t * p.grad)
    base.zero_grad(set_to_none=True)
    cnn_loss(model, batch).backward()
    with torch.no_grad():
        for p, old in zip(params, saved):
            p.copy_(old)
    base.step()


def sam_step_closure(model, opt, batch):
    return opt.step(sam_closure(model, opt, batch))


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("style", [sam_step_explicit, sam_step_closure])
def test_first_five_steps_equal_the_two_pass_reference(adaptive, style):
    model = TinyCNN().double()
    reference = copy.deepcopy(model)
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, **kwargs)
    base = torch.optim.SGD(reference.parameters(), **kwargs)
    for t in range(5):
        style(model, opt, cnn_batch(t))
        reference_sam_step(reference, base, cnn_batch(t), rho=0.1, adaptive=adaptive)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_closure_and_explicit_styles_agree_bit_for_bit():
    model_a, model_b = TinyCNN(), TinyCNN()
    opt_a = SAM(model_a.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)
    opt_b = SAM(model_b.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)
    for t in range(3):
        loss = sam_step_closure(model_a, opt_a, cnn_batch(t))
        sam_step_explicit(model_b, opt_b, cnn_batch(t))
        assert loss.shape == ()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_rho_zero_is_the_base_optimizer_and_rho_is_per_group():
    model, twin = TinyCNN(), TinyCNN()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    base = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for t in range(3):
        sam_step_explicit(model, opt, cnn_batch(t))
        base.zero_grad()
        cnn_loss(twin, cnn_batch(t)).backward()
        base.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))

    head = list(model.head.parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("head")]
    opt = SAM([{"params": body}, {"params": head, "rho": 0.0}], torch.optim.SGD, rho=0.2, lr=0.1)
    opt.zero_grad()
    cnn_loss(model, cnn_batch()).backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    before = {p: p.detach().clone() for p in model.parameters()}
    norm = torch.stack([g.norm() for g in grads.values()]).norm()
    opt.first_step()
    assert all(torch.equal(p, before[p]) for p in head)
    for p in body:
        torch.testing.assert_close(p - before[p], 0.2 * grads[p] / norm)
    grads_now = [p.grad for p in model.parameters()]  # first_step zeroed them for the second pass
    assert not grads_now[0].any() and all(g is None for g in grads_now[1:])
    cnn_loss(model, cnn_batch()).backward()
    opt.second_step()


def test_base_instance_and_scheduler_share_the_groups():
    model = TinyCNN()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = SAM(model.parameters(), base, rho=0.05)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    sam_step_closure(model, opt, cnn_batch())
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.01)
    assert "momentum_buffer" in opt.state[model.conv1.core]


def test_state_dict_carries_no_perturbation_and_resumes_identically():
    model = TinyCNN()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for t in range(2):
        sam_step_closure(model, opt, cnn_batch(t))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    opt.zero_grad()
    cnn_loss(model, cnn_batch(9)).backward()
    opt.first_step()  # mid-step: w̃ is in the model, but not in the optimizer state
    keys = {k for s in opt.state_dict()["state"].values() for k in s}
    assert keys == {"momentum_buffer"}
    cnn_loss(model, cnn_batch(9)).backward()
    opt.second_step()
    for t in range(2, 5):
        sam_step_closure(model, opt, cnn_batch(t))

    resumed = TinyCNN(seed=3)
    resumed.load_state_dict(saved_model)
    opt2 = SAM(resumed.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    opt2.zero_grad()
    cnn_loss(resumed, cnn_batch(9)).backward()
    opt2.first_step()
    cnn_loss(resumed, cnn_batch(9)).backward()
    opt2.second_step()
    for t in range(2, 5):
        sam_step_closure(resumed, opt2, cnn_batch(t))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


@pytest.mark.parametrize("clip", [None, 0.1])
def test_gradscaler_steps_match_unscaled_sam(clip):
    model, twin = TinyCNN(), TinyCNN()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_twin = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for t in range(3):
        amp_sam_step(model, opt, scaler, cnn_batch(t), clip=clip)
        unscaled_sam_step(twin, opt_twin, cnn_batch(t), clip=clip)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inject", ["first", "second"])
def test_gradscaler_skips_the_whole_step_on_inf_in_either_pass(inject):
    model = TinyCNN()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    amp_sam_step(model, opt, scaler, cnn_batch(0))
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    amp_sam_step(model, opt, scaler, cnn_batch(1), inject=inject)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum))
    assert scaler.get_scale() == 2.0 ** 11
    amp_sam_step(model, opt, scaler, cnn_batch(2))  # and training goes on
    assert not torch.equal(model.conv1.core, before[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_first_gradient_never_reaches_the_weights():
    model = TinyCNN()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    cnn_loss(model, cnn_batch()).backward()
    model.head.weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    cnn_loss(model, cnn_batch()).backward()
    assert torch.isnan(next(model.parameters()).grad).all()  # the step is marked non-finite as a whole
    assert all(torch.isfinite(p.grad).all() for p in list(model.parameters())[1:])


def test_parameters_without_grads_are_left_alone():
    model = TinyCNN()
    unused = nn.Parameter(torch.ones(3))
    opt = SAM(list(model.parameters()) + [unused], torch.optim.SGD, rho=0.05, lr=0.1)
    sam_step_closure(model, opt, cnn_batch())
    assert torch.equal(unused, torch.ones(3)) and unused.grad is None


def test_disable_running_stats_keeps_one_update_per_step():
    model = TinyCNN()
    model.bn1.momentum = None  # cumulative average: the case that momentum=0 tricks break
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    reference = copy.deepcopy(model)
    reference(cnn_batch()[0])
    sam_step_explicit(model, opt, cnn_batch())
    assert int(model.bn1.num_batches_tracked) == 1 and model.bn1.track_running_stats
    torch.testing.assert_close(model.bn1.running_mean, reference.bn1.running_mean)
    torch.testing.assert_close(model.bn1.running_var, reference.bn1.running_var)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rho=-0.01), ValueError, "rho"),
    (dict(rho="0.05"), TypeError, "rho"),
    (dict(base_optimizer=nn.Module), TypeError, "base_optimizer"),
    (dict(base_optimizer=lambda params: None), TypeError, "base_optimizer"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    kwargs = {"base_optimizer": torch.optim.SGD, "lr": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        SAM(TinyCNN().parameters(), **kwargs)


def test_steps_out_of_order_are_errors():
    model = TinyCNN()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.step()
    with pytest.raises(RuntimeError, match="gradient"):
        opt.first_step()
    cnn_loss(model, cnn_batch()).backward()
    opt.first_step(zero_grad=False)
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()


def test_eps_goes_to_the_base_optimizer_and_perturb_eps_to_sam():
    """``SAM(params, AdamW, eps=...)`` sets AdamW's eps (as davda54/sam, whose SAM takes no eps, passes it on);
    SAM's guard of the division by ||g|| is ``perturb_eps``: one step equals the formula with it."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = SAM([w], torch.optim.AdamW, rho=0.5, perturb_eps=1.0, eps=1e-3, lr=0.1)
    assert opt.param_groups[0]["eps"] == 1e-3 and opt.base_optimizer.defaults["eps"] == 1e-3
    w.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)  # ||g|| = 5
    opt.first_step()
    expected = torch.tensor([3.0, 4.0], dtype=torch.float64) * (1 + 0.5 / (5 + 1.0))  # w + rho g/(||g|| + eps)
    assert torch.allclose(w.detach(), expected, rtol=0, atol=1e-15)
