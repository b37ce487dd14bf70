"""The norm-dynamics theory (docs/design.md, 'Norm deviation: s_k, γ_k, Q and Cov') checked numerically on
the DAS paper's (arXiv 2508.10435) Fig. 1 model (Tucker-2 A·G·Bᵀ fit to T + noise·N), in float64."""
import pytest
import torch

from test_optim_helpers import Tucker2, one_thread  # noqa: F401 (autouse fixture)
from tnlayers.optim import DAS, SAM

DTYPE = torch.float64
_gen = torch.Generator().manual_seed(1)
TARGET = torch.randn(8, 3, generator=_gen, dtype=DTYPE) @ torch.randn(3, 7, generator=_gen, dtype=DTYPE) / 3


def unbalanced_model():
    return Tucker2(8, 7, 3, scales=(2.0, 0.6, 1.2), dtype=DTYPE, seed=3)


def loss(model, target=TARGET):
    return 0.5 * (model() - target).pow(2).sum()


def squared_norms(model):
    return torch.stack([c.detach().pow(2).sum() for c in model.core_parameters()])


def norm_deviation(model):
    # float64 throughout (tnlayers.metrics reports in float32, too coarse for O(η²) differences)
    s = squared_norms(model)
    return float((s - s.mean()).pow(2).sum())


def sgd_step(model, lr):
    model.zero_grad()
    loss(model).backward()
    torch.optim.SGD(model.parameters(), lr=lr).step()


def predicted_change(model, lr, strength):
    """4 η ρ u K Cov(s, γ) at the model's current point (Theorem 3), ρ (or α) = ``strength``."""
    model.zero_grad()
    loss(model).backward()
    s = squared_norms(model)
    gamma = torch.stack([c.grad.pow(2).sum() for c in model.core_parameters()])
    cov = ((s - s.mean()) * (gamma - gamma.mean())).mean()
    return float(4 * lr * strength * gamma.sum().rsqrt() * len(s) * cov)


def test_sgd_conserves_pairwise_gaps_and_q_to_second_order():
    changes = []
    for lr in (1e-3, 5e-4):
        model = unbalanced_model()
        s0, q0 = squared_norms(model), norm_deviation(model)
        sgd_step(model, lr)
        s1 = squared_norms(model)
        changes.append((norm_deviation(model) - q0, (s1[0] - s1[1]) - (s0[0] - s0[1]), s1 - s0))
    (dq_big, gap_big, ds_big), (dq_small, gap_small, _) = changes
    # Halving η quarters the change in Q and in the gaps: they are O(η²), while each s_k moves at O(η).
    assert dq_big / dq_small == pytest.approx(4.0, rel=0.01)
    assert float(gap_big / gap_small) == pytest.approx(4.0, rel=0.01)
    assert float(gap_big.abs()) < 0.1 * float(ds_big.abs().max())


@pytest.mark.parametrize("method", ["sam", "das"])
def test_one_step_changes_q_by_four_eta_rho_u_k_cov(method):
    lr, strength = 1e-4, 1e-3
    predicted = predicted_change(unbalanced_model(), lr, strength)
    reference = unbalanced_model()
    sgd_step(reference, lr)

    model = unbalanced_model()
    loss(model).backward()
    if method == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=strength, lr=lr)
        opt.first_step()
        loss(model).backward()
        opt.second_step()
    else:
        DAS(model.parameters(), torch.optim.SGD, alpha=strength, lr=lr).step()
    relative_change = norm_deviation(model) - norm_deviation(reference)
    assert predicted < 0  # a small core with a large gradient: the balancing direction
    assert relative_change == pytest.approx(predicted, rel=0.10)


def train_on_noisy_target(method, noise, steps=300, lr=1e-3, strength=0.3):
    model = unbalanced_model()
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    elif method == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=strength, lr=lr)
    else:
        opt = DAS(model.parameters(), torch.optim.SGD, alpha=strength, lr=lr)
    gen = torch.Generator().manual_seed(5)
    q0 = norm_deviation(model)
    for _ in range(steps):
        target = TARGET + noise * torch.randn(TARGET.shape, generator=gen, dtype=DTYPE)

        def closure():
            opt.zero_grad()
            value = loss(model, target)
            value.backward()
            return value
        opt.step(closure)
    return norm_deviation(model) / q0


def test_q_decreases_under_sam_and_das_but_not_sgd_on_a_noisy_target():
    assert train_on_noisy_target("sgd", noise=1.0) == pytest.approx(1.0, abs=0.03)
    sam_low, sam_high = train_on_noisy_target("sam", noise=0.3), train_on_noisy_target("sam", noise=1.0)
    das_low, das_high = train_on_noisy_target("das", noise=0.3), train_on_noisy_target("das", noise=1.0)
    assert sam_high < 0.8 and das_high < 0.9
    # More noise, larger Cov, faster balancing (the paper's Fig. 1).
    assert sam_high < sam_low < 0.95 and das_high < das_low < 1.0
