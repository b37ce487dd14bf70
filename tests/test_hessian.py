"""Hessian-vector products and power iteration against closed forms (quadratics with a known spectrum) and
against the full Hessian from torch.func.hessian + eigvalsh."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from test_optim_helpers import one_thread  # noqa: F401 (autouse fixture)
from tnlayers.optim.hessian import HessianOperator, max_hessian_eigenvalue, top_eigenvector


def known_quadratic(n, eigenvalues, seed):
    """f(w) = ½ wᵀAw + bᵀw with A = Q diag(eigenvalues) Qᵀ, Q a random orthogonal basis (float64)."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    matrix = basis @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ basis.T
    return basis, matrix, torch.randn(n, generator=gen, dtype=torch.float64)


def split_params(flat, sizes):
    """The vector w as several parameters of various shapes (the eigenvector spans all of them)."""
    pieces = torch.split(flat.detach().clone(), sizes)
    shapes = [(s,) if s % 2 else (2, s // 2) for s in sizes]
    return [nn.Parameter(p.reshape(shape)) for p, shape in zip(pieces, shapes)]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 12), seed=st.integers(0, 10_000), pieces=st.integers(1, 3), data=st.data())
def test_power_iteration_finds_the_known_top_eigenpair(n, seed, pieces, data):
    pieces = min(pieces, n)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), min_size=pieces - 1, max_size=pieces - 1)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
    top = data.draw(st.sampled_from([6.0, -6.0]))  # the largest |λ| may be negative: power iteration finds it
    rest = data.draw(st.lists(st.floats(-3.0, 3.0), min_size=n - 1, max_size=n - 1))
    basis, matrix, offset = known_quadratic(n, [top, *rest], seed)
    params = split_params(torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64),
                          sizes)

    def loss():
        w = flat(params)
        return 0.5 * w @ matrix @ w + offset @ w

    pair = top_eigenvector(loss, params, iters=80)  # |λ2/λ1| ≤ 1/2: 2^-80 of the start's other components
    v = flat(pair.vector)
    assert v.norm().item() == pytest.approx(1.0, abs=1e-12)
    assert abs(float(v @ basis[:, 0])) > 0.99
    assert pair.value == pytest.approx(top, rel=1e-9)
    assert all(p.grad is None for p in params)


def test_hessian_vector_product_is_a_times_v_with_unused_and_frozen_params():
    basis, matrix, offset = known_quadratic(5, [4.0, 3.0, 2.0, 1.0, 0.5], seed=3)
    w = nn.Parameter(torch.randn(5, dtype=torch.float64))
    unused = nn.Parameter(torch.ones(2, dtype=torch.float64))       # not in the loss: grad None
    frozen = torch.ones(3, dtype=torch.float64)                     # requires_grad False: a constant
    linear = nn.Parameter(torch.ones(3, dtype=torch.float64))       # the loss is linear in it: zero curvature
    hvp = HessianOperator(lambda: 0.5 * w @ matrix @ w + offset @ w + (linear * frozen).sum(),
                          [w, unused, frozen, linear])
    vector = [torch.randn(5, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
              torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    product = hvp(vector)
    torch.testing.assert_close(product[0], matrix @ vector[0], rtol=1e-12, atol=1e-12)
    assert all(torch.equal(p, torch.zeros_like(p)) for p in product[1:])
    torch.testing.assert_close(hvp.gradient[0], matrix @ w.detach() + offset, rtol=1e-12, atol=1e-12)
    assert w.grad is None and linear.grad is None


def test_warm_start_from_the_eigenvector_stays_there():
    basis, matrix, _ = known_quadratic(6, [5.0, 4.9, 1.0, 0.5, 0.2, 0.1], seed=1)  # tiny gap: cold start is slow
    w = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    pair = top_eigenvector(lambda: 0.5 * w @ matrix @ w, [w], iters=1, init=[basis[:, 0].clone()])
    assert abs(float(pair.vector[0] @ basis[:, 0])) == pytest.approx(1.0, abs=1e-12)
    assert pair.value == pytest.approx(5.0, rel=1e-12)
    early = top_eigenvector(lambda: 0.5 * w @ matrix @ w, [w], iters=500, tol=1e-9)
    assert early.iterations < 500 and early.value == pytest.approx(5.0, rel=1e-6)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc1 = nn.Linear(4, 5).double()
        self.bn = nn.BatchNorm1d(5).double()
        self.fc2 = nn.Linear(5, 3).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def test_sharpness_of_a_small_net_matches_the_full_hessian_and_leaves_state_alone():
    model = SmallNet()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
    loss_fn = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    loss_fn().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    value = max_hessian_eigenvalue(model, loss_fn, iters=2000, tol=1e-12)

    # Reference: the dense Hessian of the same batch loss written out in plain torch (BatchNorm on the batch's
    # biased statistics), by torch.autograd.functional.hessian, and its eigenvalue of largest magnitude.
    sizes = [p.numel() for p in model.parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss_of(theta):
        w1, b1, gamma, beta, w2, b2 = [t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes)]
        h = x @ w1.T + b1
        h = (h - h.mean(0)) / (h.var(0, unbiased=False) + model.bn.eps).sqrt() * gamma + beta
        return nn.functional.cross_entropy(torch.tanh(h) @ w2.T + b2, y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, theta))
    expected = eigenvalues[eigenvalues.abs().argmax()].item()
    assert value == pytest.approx(expected, rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


@pytest.mark.parametrize("call, error, match", [
    (lambda w: top_eigenvector(lambda: (w ** 4).sum(), [w], iters=0), ValueError, "iters"),
    (lambda w: top_eigenvector(lambda: (w ** 4).sum(), [w], iters=2.5), TypeError, "iters"),
    (lambda w: top_eigenvector("loss", [w]), TypeError, "loss_fn"),
    (lambda w: top_eigenvector(lambda: (w ** 4).sum().backward(), [w]), TypeError, "loss_fn must return"),
    (lambda w: top_eigenvector(lambda: (w ** 4).sum(), [w], init=[torch.ones(2)]), ValueError, "init"),
    (lambda w: top_eigenvector(lambda: (w ** 4).sum(), [w], init=[torch.zeros(3)]), ValueError, "init"),
    (lambda w: top_eigenvector(lambda: (w ** 4).sum(), [w], tol=-1.0), ValueError, "tol"),
    (lambda w: top_eigenvector(lambda: (w ** 4).sum(), [w], tol=math.nan), ValueError, "tol"),
    (lambda w: top_eigenvector(lambda: (w ** 4).sum(), []), TypeError, "params"),
    (lambda w: max_hessian_eigenvalue("model", lambda: (w ** 4).sum()), TypeError, "model"),
])
def test_bad_arguments_name_themselves(call, error, match):
    with pytest.raises(error, match=match):
        call(nn.Parameter(torch.ones(3)))
