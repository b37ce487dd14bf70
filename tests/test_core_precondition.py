"""tnlayers.precondition_core_grads_ against explicit Jacobians: g̃_k = (1/K)(J_kᵀJ_k + δ)⁻¹ J_kᵀ G, and the
bound it exists for, ‖Σ_k J_k g̃_k‖ ≤ ‖G‖ (one step on the cores moves W no further than a dense step)."""
import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import tnlayers
from tnlayers.core_precondition import precondition_grads

FORMATS = ("tt", "tr", "cp", "tucker")


def _weight(net, cores):
    """W from the cores by one plain einsum of the format's network (the definition the layers are
    checked against tensorly with)."""
    return torch.einsum(net.equation(), *cores)


def _jacobians(layer):
    """J_k = ∂vec(W)/∂vec(G_k), explicit N x p_k matrices (float64)."""
    net = layer.network
    cores = [c.detach().double() for c in layer.core_parameters()]
    out = []
    for k in range(len(cores)):
        def w_of(core, k=k):
            return _weight(net, [core if j == k else c for j, c in enumerate(cores)]).reshape(-1)
        out.append(torch.autograd.functional.jacobian(w_of, cores[k]).reshape(-1, cores[k].numel()))
    return out


def _reference(layer, G, damping):
    """(1/K)(J_kᵀJ_k + δ·mean diag(J_kᵀJ_k)·I)⁻¹ J_kᵀ G per core, by dense linear algebra."""
    J = _jacobians(layer)
    out = []
    for Jk in J:
        A = Jk.T @ Jk
        A = A + damping * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype)
        out.append(torch.linalg.solve(A, Jk.T @ G.reshape(-1)) / len(J))
    return out


def _layer(fmt, kind, rank, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "conv":
            return tnlayers.TensorizedConv2d(6, 8, 3, rank=rank, format=fmt).double()
        return tnlayers.TensorizedLinear(12, 10, rank=rank, format=fmt).double()


def _grads_from(layer, G):
    """g_k = J_kᵀ G through the layer's own weight (autograd of the layer's reconstruction)."""
    cores = layer.core_parameters()
    weight = layer._weight_to_modes(layer.weight) if hasattr(layer, "_weight_to_modes") else layer.weight
    return list(torch.autograd.grad(weight, cores, G))


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_explicit_jacobians_undamped(fmt, kind):
    layer = _layer(fmt, kind, rank=2)  # ranks below every mode size: each J_kᵀJ_k is invertible
    G = torch.randn(layer.network.modes, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = precondition_grads(layer, _grads_from(layer, G), damping=0.0)
    for g, ref in zip(got, _reference(layer, G, 0.0)):
        torch.testing.assert_close(g.reshape(-1), ref, rtol=1e-7, atol=1e-9 * float(ref.abs().max()))


@pytest.mark.parametrize("fmt", ["tr", "cp"])
def test_matches_explicit_jacobians_damped(fmt):
    # every TR and CP core's environment is one connected piece, so the damped Gram is J_kᵀJ_k + δ·mean diag
    layer = _layer(fmt, "conv", rank=3, seed=2)
    G = torch.randn(layer.network.modes, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = precondition_grads(layer, _grads_from(layer, G), damping=0.05)
    for g, ref in zip(got, _reference(layer, G, 0.05)):
        torch.testing.assert_close(g.reshape(-1), ref, rtol=1e-7, atol=1e-9 * float(ref.abs().max()))


def _first_order_step(layer, pre):
    """Σ_k J_k g̃_k, by the explicit Jacobians."""
    return sum(Jk @ g.reshape(-1) for Jk, g in zip(_jacobians(layer), pre))


@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(FORMATS), kind=st.sampled_from(["conv", "linear"]), rank=st.integers(1, 5),
       damping=st.sampled_from([0.0, 1e-3, 1e-2, 0.3]), seed=st.integers(0, 1000),
       core_scale=st.floats(0.05, 20.0))
def test_step_on_W_never_exceeds_a_dense_step(fmt, kind, rank, damping, seed, core_scale):
    layer = _layer(fmt, kind, rank, seed)
    with torch.no_grad():
        layer.core_parameters()[0].mul_(core_scale)  # unbalanced and rescaled: the bound holds at any scale
    G = torch.randn(layer.network.modes, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    pre = precondition_grads(layer, _grads_from(layer, G), damping=damping)
    step = _first_order_step(layer, pre)
    assert float(step.norm()) <= float(G.norm()) * (1 + 1e-9)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradient_along_W_gives_exactly_the_dense_step(fmt):
    # every core can move W along W itself (J_k vec(G_k) = W), so each projection keeps G = W whole
    layer = _layer(fmt, "conv", rank=2, seed=4)
    W = _weight(layer.network, [c.detach() for c in layer.core_parameters()])
    pre = precondition_grads(layer, _grads_from(layer, W), damping=0.0)
    torch.testing.assert_close(_first_order_step(layer, pre), W.reshape(-1), rtol=1e-8, atol=1e-10)


def test_in_place_on_a_model_and_optimizer_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(tnlayers.TTConv2d(3, 8, 3, rank=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                tnlayers.TRLinear(8 * 4 * 4, 10, rank=3)).double()
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    layers = [model[0], model[3]]
    raw = [[c.grad.clone() for c in m.core_parameters()] for m in layers]
    expected = [precondition_grads(m, r) for m, r in zip(layers, raw)]
    dense_head_bias = model[3].bias.grad.clone()
    tnlayers.precondition_core_grads_(model)
    for m, exp in zip(layers, expected):
        for c, e in zip(m.core_parameters(), exp):
            torch.testing.assert_close(c.grad, e)
    torch.testing.assert_close(model[3].bias.grad, dense_head_bias)  # not a core: untouched
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_float32_and_missing_grads():
    torch.manual_seed(0)
    layer = tnlayers.TTLinear(12, 10, rank=2)
    layer(torch.randn(5, 12)).sum().backward()
    cores = layer.core_parameters()
    cores[1].grad = None  # a core without a gradient (frozen) stays without one; the others still change
    before = [None if c.grad is None else c.grad.clone() for c in cores]
    tnlayers.precondition_core_grads_(layer)
    assert cores[1].grad is None
    assert cores[0].grad.dtype == torch.float32 and not torch.equal(cores[0].grad, before[0])
    ref = precondition_grads(layer.double(), [b.double() if b is not None else None for b in before])
    torch.testing.assert_close(cores[0].grad.double(), ref[0], rtol=1e-4, atol=1e-6)


def test_degenerate_environment_keeps_the_gradient_finite():
    # a zero core makes the other cores' Gram matrices zero: no finite preconditioned gradient exists there
    layer = _layer("tt", "linear", 3)
    with torch.no_grad():
        layer.core_parameters()[0].zero_()
    G = torch.randn(layer.network.modes, dtype=torch.float64)
    grads = _grads_from(layer, G)
    for damping in (0.0, 1e-2):
        pre = precondition_grads(layer, grads, damping=damping)
        assert all(torch.isfinite(p).all() for p in pre)
        torch.testing.assert_close(pre[1], grads[1])  # zero, as it was: its environment holds the zero core


def test_adapters_are_left_alone():
    torch.manual_seed(0)
    model = tnlayers.adapt(torch.nn.Sequential(torch.nn.Linear(12, 10)), format="tt", rank=2, target_modules=["0"])
    model(torch.randn(3, 12)).pow(2).sum().backward()
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    tnlayers.precondition_core_grads_(model)
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_shared_layer_is_preconditioned_once():
    torch.manual_seed(0)
    shared = tnlayers.TTLinear(8, 8, rank=2)
    model = torch.nn.Sequential(shared, torch.nn.Tanh(), shared).double()
    model(torch.randn(3, 8, dtype=torch.float64)).sum().backward()
    expected = precondition_grads(shared, [c.grad.clone() for c in shared.core_parameters()])
    tnlayers.precondition_core_grads_(model)
    for c, e in zip(shared.core_parameters(), expected):
        torch.testing.assert_close(c.grad, e)


@pytest.mark.parametrize("bad, error", [(-0.1, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                                        ("0.1", TypeError), (True, TypeError)])
def test_bad_damping_is_refused(bad, error):
    with pytest.raises(error, match="damping"):
        tnlayers.precondition_core_grads_(tnlayers.TTLinear(8, 8, rank=2), damping=bad)


def test_not_a_module_is_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        tnlayers.precondition_core_grads_([torch.nn.Parameter(torch.ones(2))])


def test_copy_keeps_working():
    layer = _layer("tucker", "conv", 2)
    clone = copy.deepcopy(layer)
    G = torch.randn(layer.network.modes, dtype=torch.float64)
    a = precondition_grads(layer, _grads_from(layer, G))
    b = precondition_grads(clone, _grads_from(clone, G))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


# overlap="project": conjugate gradients on the K cores together, so that the first-order step on W tends to
# the orthogonal projection of G onto everything the cores can reach at once (the tangent space), instead of
# the mean of K separate projections. Reference: J J⁺ G with J = [J_1 … J_K] by dense linear algebra.


def _assert_close_in_norm(got, ref, rel):
    # the iteration stops once its residual is at rounding level (relative √(100 ε) ≈ 1.5e-7 in float64), so the
    # limit is reached to that accuracy in norm, not elementwise
    assert float((got - ref).norm()) <= rel * float(ref.norm()) + 1e-12, float((got - ref).norm() / ref.norm())


def _tangent_projection(layer, G, live=None):
    J = _jacobians(layer)
    J = torch.cat([Jk for k, Jk in enumerate(J) if live is None or k in live], dim=1)
    return J @ (torch.linalg.pinv(J) @ G.reshape(-1))


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_project_overlap_converges_to_the_tangent_projection(fmt, kind):
    layer = _layer(fmt, kind, rank=2, seed=5)
    G = torch.randn(layer.network.modes, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ref = _tangent_projection(layer, G)
    for damping in (0.0, 1e-2):  # the damping shapes the preconditioner only, not the limit
        pre = precondition_grads(layer, _grads_from(layer, G), damping=damping, overlap="project", iterations=100)
        _assert_close_in_norm(_first_order_step(layer, pre), ref, 1e-6)
    # and it reaches further than the mean of the K separate projections (the default) ever does
    mean = _first_order_step(layer, precondition_grads(layer, _grads_from(layer, G), damping=0.0, overlap="mean"))
    assert float(ref.norm()) > float(mean.norm())


@settings(max_examples=15, deadline=None)
@given(fmt=st.sampled_from(FORMATS), kind=st.sampled_from(["conv", "linear"]), rank=st.integers(1, 4),
       damping=st.sampled_from([0.0, 1e-3, 1e-2, 0.3]), iterations=st.integers(1, 8), seed=st.integers(0, 1000),
       scales=st.lists(st.floats(0.05, 20.0), min_size=8, max_size=8))
def test_project_overlap_is_bounded_at_every_iteration_and_scale_free_when_converged(fmt, kind, rank, damping,
                                                                                     iterations, seed, scales):
    # every iterate is G's projection onto a subspace of the tangent space: never longer than a dense step,
    # however the cores are scaled and balanced; converged (200 iterations: a TR at rank 4 has 225 tangent
    # directions), the step is the projection itself, which rescaling the cores does not change
    layer = _layer(fmt, kind, rank, seed)
    with torch.no_grad():
        for core, c in zip(layer.core_parameters(), scales):
            core.mul_(c)
    G = torch.randn(layer.network.modes, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    J = torch.cat(_jacobians(layer), dim=1)  # [J_1 … J_K], once per example

    def first_order(pre):
        return J @ torch.cat([g.reshape(-1) for g in pre])

    step = first_order(precondition_grads(layer, _grads_from(layer, G), damping, "project", iterations))
    assert float(step.norm()) <= float(G.norm()) * (1 + 1e-9)
    converged = first_order(precondition_grads(layer, _grads_from(layer, G), damping, "project", 200))
    _assert_close_in_norm(converged, J @ (torch.linalg.pinv(J) @ G.reshape(-1)), 1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_project_overlap_along_W_gives_exactly_the_dense_step(fmt):
    layer = _layer(fmt, "linear", rank=2, seed=7)
    W = _weight(layer.network, [c.detach() for c in layer.core_parameters()])
    pre = precondition_grads(layer, _grads_from(layer, W), damping=0.0, overlap="project", iterations=1)
    torch.testing.assert_close(_first_order_step(layer, pre), W.reshape(-1), rtol=1e-8, atol=1e-10)


def test_project_overlap_in_place_with_a_frozen_core():
    layer = _layer("tt", "linear", rank=2, seed=8)
    G = torch.randn(layer.network.modes, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    cores = layer.core_parameters()
    for core, grad in zip(cores, _grads_from(layer, G)):
        core.grad = grad
    cores[1].grad = None  # frozen: the others project onto what they alone can reach
    tnlayers.precondition_core_grads_(layer, damping=0.0, overlap="project", iterations=40)
    assert cores[1].grad is None
    J = _jacobians(layer)
    moved = sum(J[k] @ core.grad.reshape(-1) for k, core in enumerate(cores) if k != 1)
    live = [k for k in range(len(cores)) if k != 1]
    _assert_close_in_norm(moved, _tangent_projection(layer, G, live), 1e-6)


def test_project_overlap_degenerate_environment_stays_finite():
    layer = _layer("tt", "linear", 3)
    with torch.no_grad():
        layer.core_parameters()[0].zero_()  # W = 0: only core 0 moves W, along its own environment
    G = torch.randn(layer.network.modes, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    for damping in (0.0, 1e-2):
        pre = precondition_grads(layer, _grads_from(layer, G), damping=damping, overlap="project", iterations=20)
        assert all(torch.isfinite(p).all() for p in pre)
        step = _first_order_step(layer, pre)
        _assert_close_in_norm(step, _tangent_projection(layer, G), 1e-6)


@pytest.mark.parametrize("bad", ["sum", None, 1])
def test_bad_overlap_is_refused(bad):
    with pytest.raises(ValueError, match="overlap"):
        tnlayers.precondition_core_grads_(tnlayers.TTLinear(8, 8, rank=2), overlap=bad)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError),
                                        ("4", TypeError)])
def test_bad_iterations_is_refused(bad, error):
    with pytest.raises(error, match="iterations"):
        tnlayers.precondition_core_grads_(tnlayers.TTLinear(8, 8, rank=2), overlap="project", iterations=bad)


@pytest.mark.parametrize("options, error, name", [(dict(overlap="sum"), ValueError, "overlap"),
                                                  (dict(damping=-1.0), ValueError, "damping"),
                                                  (dict(overlap="project", iterations=0), ValueError, "iterations"),
                                                  (dict(iterations=2.0), TypeError, "iterations")])
def test_precondition_grads_refuses_what_the_in_place_form_refuses(options, error, name):
    # the functional form is public too: an unknown overlap must not fall through to an unscaled step
    layer = _layer("tt", "linear", rank=2)
    G = torch.randn(layer.network.modes, dtype=torch.float64)
    with pytest.raises(error, match=name):
        precondition_grads(layer, _grads_from(layer, G), **options)
