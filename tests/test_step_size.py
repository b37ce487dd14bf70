"""The step size on W (docs/design.md, "The step size on W"): tnlayers.lr.step_ratio against an independent
computation, the per-core multipliers of tnlayers.lr.param_groups, and the benchmark's --quick mode."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import tnlayers
from _benchmarks import load_benchmark
from tnlayers.lr import core_lr_multipliers, param_groups, step_ratio

FORMATS = ["tt", "tr", "cp", "tucker"]


def hand_weight(layer, cores):
    """The layer's full tensor (modes in network order) from a hand-written einsum of ``cores``: the network
    as data (labels per core) turned into single letters here, not through tnlayers' equation builder."""
    letters = {}
    net = layer.network
    modes = [f"m{i}" for i in range(len(net.modes))]
    for label in modes + [lab for core in net.cores for lab in core]:
        letters.setdefault(label, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[len(letters)])
    eq = ",".join("".join(letters[lab] for lab in core) for core in net.cores) + "->" + "".join(letters[m] for m in modes)
    return torch.einsum(eq, *cores)


def manual_sgd_ratio(layer, grad_modes, eta, multipliers):
    """||W(G_k - eta m_k g_k) - W(G_k)|| / ||eta G||, gradients and reconstruction by hand (float64)."""
    cores = [c.detach().double().requires_grad_() for c in layer.core_parameters()]
    weight = hand_weight(layer, cores)
    grads = torch.autograd.grad((weight * grad_modes).sum(), cores)  # = J_k^T G
    stepped = [c.detach() - eta * m * g for c, g, m in zip(cores, grads, multipliers)]
    return float((hand_weight(layer, stepped) - weight.detach()).norm() / (eta * grad_modes.norm()))


def make(kind, fmt, rank, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "conv":
            return tnlayers.TensorizedConv2d(16, 16, 3, rank=rank, format=fmt)
        return tnlayers.TensorizedLinear(64, 32, rank=rank, format=fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_step_ratio_matches_manual_sgd_step(kind, fmt):
    """First order (step_ratio) = the exact ratio of a hand-made SGD step in the limit of a small lr."""
    layer = make(kind, fmt, 0.3)
    grad = torch.randn(layer.network.modes, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first = step_ratio(layer, grad)
    m = [1.0] * len(layer.core_parameters())
    assert manual_sgd_ratio(layer, grad, 1e-6, m) == pytest.approx(first, rel=1e-4)
    # the exact ratio is a polynomial in eta: its departure from first order shrinks linearly with eta
    gap = [abs(manual_sgd_ratio(layer, grad, eta, m) - first) for eta in (1e-2, 1e-3)]
    assert gap[1] < gap[0] / 5 + 1e-12


def test_step_ratio_uses_the_layers_weight_layout():
    """A weight-shaped G, mapped by the layer to mode order, gives the ratio of the layer's own weight step."""
    layer = make("conv", "tt", 0.3)
    G = torch.randn(layer._weight_shape(), dtype=torch.float64)
    first = step_ratio(layer, layer._weight_to_modes(G))
    eta = 1e-6
    grads = torch.autograd.grad(layer.weight, layer.core_parameters(), G.float())
    before = layer.weight.detach().double()
    with torch.no_grad():
        for c, g in zip(layer.core_parameters(), grads):
            c.sub_(eta * g)
    assert float((layer.weight.detach().double() - before).norm() / (eta * G.norm())) == pytest.approx(first, rel=2e-2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ratio_scales_with_the_init_scale_as_the_formula_says(fmt):
    """Scaling every core by c scales W by c^K and each J_k J_k^T by c^(2(K-1)): ratio x c^(2(K-1))."""
    layer = make("linear", fmt, 0.3)
    K = len(layer.core_parameters())
    grad = torch.randn(layer.network.modes, dtype=torch.float64)
    base = step_ratio(layer, grad)
    with torch.no_grad():
        for c in layer.core_parameters():
            c.mul_(1.5)
    assert step_ratio(layer, grad) == pytest.approx(base * 1.5 ** (2 * (K - 1)), rel=1e-5)  # float32 cores


def test_rebalancing_changes_the_ratio_but_not_the_remedy():
    """W is unchanged by G_1 -> cG_1, G_2 -> G_2/c, the plain step is not; the multipliers follow the balance."""
    layer = make("conv", "tucker", 0.3)
    grad = torch.randn(layer.network.modes, dtype=torch.float64)
    plain, m = step_ratio(layer, grad), core_lr_multipliers(layer)
    matched = step_ratio(layer, grad, m)
    with torch.no_grad():
        cores = layer.core_parameters()
        cores[0].mul_(4.0)
        cores[1].div_(4.0)
    assert step_ratio(layer, grad) > 2 * plain
    assert step_ratio(layer, grad, core_lr_multipliers(layer)) == pytest.approx(matched, rel=1e-6)


@pytest.mark.slow  # 15 random layers, ~20 s on 2 cores
@settings(max_examples=15, deadline=None)
@given(fmt=st.sampled_from(FORMATS), kind=st.sampled_from(["conv", "linear"]),
       rank=st.sampled_from([0.05, 0.1, 0.3, 0.6]), seed=st.integers(0, 1000),
       target=st.sampled_from([0.5, 1.0, 2.0]))
def test_param_groups_match_a_dense_step_at_init(fmt, kind, rank, seed, target):
    """With the multipliers, a hand-made SGD step on the cores moves W by target x a dense step (root mean
    square over 128 fresh Gaussian gradients, within 15%), for every format, shape, rank. One gradient's ratio
    spreads up to ~30%, on small and large layers alike: 128 samples here and up to 128 probes in
    param_groups keep the two estimates' combined error near 4%, so 15% is about 4 standard errors."""
    layer = make(kind, fmt, rank, seed)
    groups = param_groups(layer, lr=0.1, target=target, seed=seed)
    m = [g["lr_multiplier"] for g in groups if "lr_multiplier" in g]
    assert len(m) == len(layer.core_parameters())
    assert all(g["lr"] == pytest.approx(0.1 * g.get("lr_multiplier", 1.0)) for g in groups)
    gen = torch.Generator().manual_seed(seed + 1)
    ratios = [manual_sgd_ratio(layer, torch.randn(layer.network.modes, generator=gen, dtype=torch.float64), 1e-5, m)
              for _ in range(128)]
    assert math.sqrt(sum(r * r for r in ratios) / 128) == pytest.approx(target, rel=0.15)


def test_param_groups_cover_every_parameter_once_and_pass_options():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 16, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = tnlayers.tensorize(net, format="tt", rank=4)
    groups = param_groups(net, lr=0.05, weight_decay=5e-4)
    params = [p for g in groups for p in g["params"]]
    assert sorted(map(id, params)) == sorted(map(id, net.parameters()))
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    assert {g.get("layer") for g in groups[1:]} == {"0", "2"}
    assert groups[0]["lr"] == 0.05 and "lr_multiplier" not in groups[0]


@pytest.mark.parametrize("wrapper", ["SGD", "DAS", "SAM", "BAR"])
def test_param_groups_work_with_every_optimizer(wrapper):
    """Per-core groups: the wrappers find the core groups across param groups; DAS uses each core's lr."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = tnlayers.tensorize(net, format="tucker", rank=4)
    groups = param_groups(net, lr=0.01)
    kw = dict(momentum=0.9)
    opt = {"SGD": lambda: torch.optim.SGD(groups, lr=0.01, **kw),
           "DAS": lambda: tnlayers.DAS(groups, torch.optim.SGD, alpha=0.1, **kw),
           "SAM": lambda: tnlayers.SAM(groups, torch.optim.SGD, rho=0.05, **kw),
           "BAR": lambda: tnlayers.BAR(groups, torch.optim.SGD, alpha=0.1, **kw)}[wrapper]()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(10, (8,))
    before = [p.detach().clone() for p in net.parameters()]
    for _ in range(3):
        tnlayers.optim.training_step(net, opt, lambda: nn.functional.cross_entropy(net(x), y))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    if wrapper == "DAS":
        cores, lambdas = opt.last_lambdas
        assert len(cores) == 3 and torch.isfinite(lambdas).all()


def test_zero_weight_keeps_lr_with_a_warning():
    layer = make("linear", "tt", 0.3)
    with torch.no_grad():
        layer.core_parameters()[0].zero_()
    with pytest.warns(UserWarning, match="no lr matching"):
        groups = param_groups(layer, lr=0.1)
    assert all(g["lr"] == 0.1 for g in groups)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=0.0), ValueError, "lr must be a finite number > 0"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number > 0"),
    (dict(lr="0.1"), TypeError, "lr must be a positive number"),
    (dict(lr=0.1, target=-1.0), ValueError, "target must be a finite number > 0"),
    (dict(lr=0.1, seed=1.5), TypeError, "seed must be an int"),
    (dict(lr=0.1, params=[]), ValueError, "param_groups sets"),
], ids=["lr-zero", "lr-nan", "lr-str", "target-negative", "seed-float", "reserved-key"])
def test_param_groups_refuses_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        param_groups(make("linear", "tt", 0.3), **kwargs)


def test_param_groups_refuses_a_non_module():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        param_groups([torch.zeros(2)], lr=0.1)


def test_step_ratio_refuses_a_wrong_gradient_shape():
    layer = make("linear", "tt", 0.3)
    with pytest.raises(ValueError, match="mode shape"):
        step_ratio(layer, torch.zeros(3, 3))


def _bench():
    return load_benchmark("lr_transfer")


def test_benchmark_quick_grid(tmp_path):
    out = tmp_path / "lr.md"
    rows = _bench().main(["--quick", "--quiet", "--archs", "cnn", "--remedy", "--out", str(out)])
    text = out.read_text()
    assert "| cnn | yes | tt | 0.05 |" in text and "tt + precondition" in text and "Command:" in text
    judged = [r for r in rows if r["format"] != "dense"]
    assert len(judged) == 8 and all(r["verdict"] in ("met", "MISSED") for r in judged)
    assert all((r["verdict"] == "met") == (r["divergence_ok"] and r["accuracy_ok"]) for r in judged)
    assert all(0 <= r["diverged"] <= r["seeds"] == 2 for r in rows)
    assert text.count("MISSED:") == sum(r["verdict"] == "MISSED" for r in judged)


def test_benchmark_quick_grid_param_groups_remedy(tmp_path):
    out = tmp_path / "lr.md"
    _bench().main(["--quick", "--quiet", "--archs", "cnn", "--remedy", "--remedy-kind", "param_groups",
                   "--out", str(out)])
    assert "tt + param_groups" in out.read_text()


def test_benchmark_quick_ratios(tmp_path):
    out = tmp_path / "ratios.md"
    rows = _bench().main(["--ratios", "--quick", "--quiet", "--formats", "tucker", "--out", str(out)])
    assert "## Init: nn 1/sqrt(3 fan_in) (after)" in out.read_text()
    for r in rows:
        assert r["exact"][0] == pytest.approx(r["first_order"][0], rel=0.05)
        assert r["remedy"][0] == pytest.approx(1.0, rel=0.2)
        assert r["precondition"][0] <= 1.0  # the bound of tnlayers.precondition_core_grads_, exact step
    he, nn_ = [r["exact"][0] for r in rows if r["layer"].startswith("conv")]
    pre = [r["precondition"][0] for r in rows if r["layer"].startswith("conv")]
    assert pre[0] == pytest.approx(pre[1], rel=1e-3)  # scale-free to first order: the same under either init
    K = rows[0]["cores"]
    assert he / nn_ == pytest.approx(math.sqrt(6) ** (2 * (K - 1) / K), rel=0.2)  # (std ratio)^(2(K-1)/K)
