"""GSAM's surrogate-gap correction against its closed form on quadratics, against SAM at alpha=0, GradScaler
and bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from test_optim_helpers import TinyCNN, cnn_batch, cnn_loss, one_thread  # noqa: F401 (autouse fixture)
from tnlayers.optim import SAM, disable_running_stats
from tnlayers.optim.gsam import GSAM


def hand_gsam_direction(w, matrix, offset, rho, alpha, eps=1e-12):
    """g̃ − α g_⊥ for f(w) = ½ wᵀAw + bᵀw, with g_⊥ the part of g orthogonal to g̃, written out."""
    g = matrix @ w + offset
    g_sam = matrix @ (w + rho * g / (g.norm() + eps)) + offset
    g_orth = g - (g @ g_sam) / (g_sam @ g_sam) * g_sam
    return g_sam - alpha * g_orth


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 10), seed=st.integers(0, 10_000), rho=st.floats(0.01, 1.0), alpha=st.floats(0.0, 2.0),
       data=st.data())
def test_two_steps_follow_the_closed_form(n, seed, rho, alpha, data):
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.randn(n, n, generator=gen, dtype=torch.float64)
    matrix = matrix @ matrix.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    offset = torch.randn(n, generator=gen, dtype=torch.float64)
    w0 = torch.randn(n, generator=gen, dtype=torch.float64)
    cut = data.draw(st.integers(1, n))
    params = [nn.Parameter(p.clone()) for p in torch.split(w0, [cut, n - cut] if cut < n else [n])]
    opt = GSAM(params, torch.optim.SGD, rho=rho, alpha=alpha, lr=0.05)
    w = w0
    for _ in range(2):
        def closure():
            opt.zero_grad(set_to_none=True)
            v = torch.cat(params)
            loss = 0.5 * v @ matrix @ v + offset @ v
            loss.backward()
            return loss
        opt.step(closure)
        w = w - 0.05 * hand_gsam_direction(w, matrix, offset, rho, alpha)
    torch.testing.assert_close(torch.cat([p.detach() for p in params]), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
def test_alpha_zero_is_sam_bit_for_bit(adaptive):
    model, twin = TinyCNN(), TinyCNN()
    kwargs = dict(rho=0.1, adaptive=adaptive, lr=0.05, momentum=0.9)
    opt = GSAM(model.parameters(), torch.optim.SGD, alpha=0.0, **kwargs)
    sam = SAM(twin.parameters(), torch.optim.SGD, **kwargs)
    for t in range(3):
        for m, o in ((model, opt), (twin, sam)):
            o.zero_grad(set_to_none=True)
            cnn_loss(m, cnn_batch(t)).backward()
            o.first_step()
            with disable_running_stats(m):
                cnn_loss(m, cnn_batch(t)).backward()
            o.second_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_gradscaler_matches_unscaled_gsam_and_refuses_an_early_unscale():
    model, twin = TinyCNN(), TinyCNN()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.5, lr=0.1, momentum=0.9)
    opt_twin = GSAM(twin.parameters(), torch.optim.SGD, rho=0.05, alpha=0.5, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for t in range(3):
        opt.zero_grad(set_to_none=True)
        scaler.scale(cnn_loss(model, cnn_batch(t))).backward()
        opt.first_step()
        scaler.scale(cnn_loss(model, cnn_batch(t))).backward()
        scaler.step(opt)
        scaler.update()
        opt_twin.zero_grad(set_to_none=True)
        cnn_loss(twin, cnn_batch(t)).backward()
        opt_twin.first_step()
        cnn_loss(twin, cnn_batch(t)).backward()
        opt_twin.second_step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    scaler.scale(cnn_loss(model, cnn_batch(5))).backward()
    opt.first_step()
    scaler.scale(cnn_loss(model, cnn_batch(5))).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # w restored, no step


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(alpha=-0.1), ValueError, "alpha must be a finite number >= 0"),
    (dict(alpha=float("nan")), ValueError, "alpha must be a finite number >= 0"),
    (dict(alpha="0.1"), TypeError, "alpha must be a number"),
    (dict(rho=-1), ValueError, "rho must be a finite number >= 0"),
    (dict(sync_first_pass=False, model=nn.Module()), ValueError, "sync_first_pass=False"),
], ids=["alpha-negative", "alpha-nan", "alpha-str", "rho-negative", "local-first-pass"])
def test_bad_arguments_name_themselves(kwargs, error, match):
    with pytest.raises(error, match=match):
        GSAM(TinyCNN().parameters(), torch.optim.SGD, **{"lr": 0.1, **kwargs})
