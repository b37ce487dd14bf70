"""Rank selection (tnlayers/rank_selection): the allocation against brute force, the error curves against
decompositions written here with torch.linalg.svd, EVBMF against planted ranks, and tensorize(rank="auto" |
"vbmf" | "energy:...") end to end: budget met, errors lower than uniform rank at equal parameters."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import tnlayers
from tnlayers.formats import get_format
from tnlayers.rank_selection import LayerCurve, allocate, error_curve, evbmf_rank
from tnlayers.rank_selection.allocation import loss

pytestmark = pytest.mark.filterwarnings("ignore:.*Kept as given.*", "ignore:.*more than the dense.*")


# -- allocation -----------------------------------------------------------------------------------------------
@st.composite
def _curves(draw):
    curves = []
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.integers(1, 5))
        steps = draw(st.lists(st.integers(1, 9), min_size=k, max_size=k))
        drops = draw(st.lists(st.floats(0.0, 0.3), min_size=k, max_size=k))
        params = np.cumsum(steps)
        error = np.clip(1.0 - np.cumsum(drops), 0.0, 1.0)
        curves.append(LayerCurve(list(range(1, k + 1)), params, error, draw(st.integers(10, 90))))
    return curves


@settings(max_examples=150, deadline=None)
@given(_curves(), st.integers(0, 60))
def test_allocation_is_the_brute_force_optimum(curves, extra):
    budget = sum(int(c.params[0]) for c in curves) + extra
    picks = allocate(curves, budget)
    assert sum(int(c.params[i]) for c, i in zip(curves, picks)) <= budget
    losses = [-c.dense_params * np.log1p(-np.minimum(c.error, 1 - 1e-12)) for c in curves]  # written out here
    best = min(sum(lo[i] for lo, i in zip(losses, combo))
               for combo in itertools.product(*[range(len(c.ranks)) for c in curves])
               if sum(int(c.params[i]) for c, i in zip(curves, combo)) <= budget)
    assert sum(lo[i] for lo, i in zip(losses, picks)) == pytest.approx(best, abs=1e-9)


def test_allocation_is_uniform_on_flat_spectra_and_refuses_a_budget_below_rank_one():
    # e = 1 - p / n: the loss -n log(p / n) is smallest at p proportional to n, the uniform fraction
    small, big = [LayerCurve(list(range(1, n + 1)), np.arange(1, n + 1), 1 - np.arange(1, n + 1) / n, n)
                  for n in (40, 160)]
    picks = allocate([small, big], budget=50)
    assert (small.params[picks[0]], big.params[picks[1]]) == (10, 40)
    assert loss(small)[-1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="below rank 1 in every layer"):
        allocate([small, big], budget=1)


# -- curves ---------------------------------------------------------------------------------------------------
def _decaying(shape, seed, decay):
    """A tensor whose unfoldings have geometrically decaying spectra (like a trained weight's)."""
    gen = torch.Generator().manual_seed(seed)
    core = torch.randn(shape, generator=gen, dtype=torch.float64)
    for mode, n in enumerate(shape):
        scale = decay ** torch.arange(n, dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        core = torch.movedim(torch.tensordot(q * scale, core, dims=([1], [mode])), 0, mode)
    return core


def _hosvd_error(W, r_in, r_out):
    """Rank-(r_in, r_out) HOSVD of modes 0 and 3 with torch.linalg.svd: relative squared error."""
    u_in = torch.linalg.svd(W.reshape(W.shape[0], -1), full_matrices=False)[0][:, :r_in]
    u_out = torch.linalg.svd(W.movedim(3, 0).reshape(W.shape[3], -1), full_matrices=False)[0][:, :r_out]
    core = torch.einsum("ijkl,ia,lb->ajkb", W, u_in, u_out)
    approx = torch.einsum("ajkb,ia,lb->ijkl", core, u_in, u_out)
    return float(((approx - W) ** 2).sum() / (W ** 2).sum())


@settings(max_examples=12, deadline=None)
@given(st.integers(2, 9), st.integers(2, 9), st.integers(1, 3), st.integers(0, 10 ** 6))
def test_tucker_curve_is_the_hosvd_error_at_every_rank(c_in, c_out, k, seed):
    W = _decaying((c_in, k, k, c_out), seed, 0.7)
    fmt = get_format("tucker")
    curve = error_curve(W, "tucker", lambda r: fmt.network(W.shape, [r, None, None, r]), W.numel())
    for r, e in zip(curve.ranks, curve.error):
        assert e == pytest.approx(_hosvd_error(W, min(r, c_in), min(r, c_out)), abs=1e-10)


def _tt_svd_error(W, r):
    """Sequential truncated SVDs (torch.linalg.svd) of a 3-mode tensor at bonds (r, r): relative sq. error."""
    n1, n2, n3 = W.shape
    u, s, vh = torch.linalg.svd(W.reshape(n1, -1), full_matrices=False)
    r1 = min(r, s.numel())
    rest = (s[:r1, None] * vh[:r1]).reshape(r1 * n2, n3)
    u2, s2, vh2 = torch.linalg.svd(rest, full_matrices=False)
    r2 = min(r, s2.numel())
    approx = (u[:, :r1] @ ((u2[:, :r2] * s2[:r2]) @ vh2[:r2]).reshape(r1, n2 * n3)).reshape(W.shape)
    return float(((approx - W) ** 2).sum() / (W ** 2).sum())


@settings(max_examples=12, deadline=None)
@given(st.integers(2, 8), st.integers(1, 9), st.integers(2, 8), st.integers(0, 10 ** 6))
def test_tt_curve_lies_between_the_bounds_of_the_tt_svd_error(n1, n2, n3, seed):
    W = _decaying((n1, n2, n3), seed, 0.75)
    fmt = get_format("tt")
    curve = error_curve(W, "tt", lambda r: fmt.network(W.shape, r), W.numel())
    s1 = torch.linalg.svdvals(W.reshape(n1, -1)) ** 2
    s2 = torch.linalg.svdvals(W.reshape(-1, n3)) ** 2
    total = float(s1.sum())
    for r, e in zip(curve.ranks, curve.error):
        t1, t2 = float(s1[r:].sum()) / total, float(s2[r:].sum()) / total
        exact = _tt_svd_error(W, r)
        assert max(t1, t2) - 1e-10 <= exact <= t1 + t2 + 1e-10  # the theory the estimate rests on
        assert max(t1, t2) - 1e-10 <= e <= min(t1 + t2, 1.0) + 1e-10


def test_cp_curve_goes_through_its_measured_ranks():
    W = _decaying((6, 3, 3, 6), 0, 0.6)
    fmt = get_format("cp")
    curve = error_curve(W, "cp", lambda r: fmt.network(W.shape, r), 60 * fmt.network(W.shape, 1).num_params)
    assert list(np.diff(curve.error) <= 0) == [True] * (len(curve.ranks) - 1)
    cores = tnlayers.decompose.decompose(W, fmt.network(W.shape, curve.ranks[-1]), n_iter_max=25, tol=1e-4)
    approx = torch.einsum("ia,ja,ka,la->ijkl", *cores)
    assert curve.error[-1] == pytest.approx(float(((approx - W) ** 2).sum() / (W ** 2).sum()), rel=1e-6, abs=1e-9)


# -- EVBMF ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank,rows,cols", [(0, 30, 90), (1, 40, 60), (4, 64, 576), (12, 128, 128)])
def test_evbmf_finds_the_planted_rank(rank, rows, cols):
    gen = np.random.default_rng(rank)
    signal = gen.standard_normal((rows, rank)) @ gen.standard_normal((rank, cols)) * 2.0
    noisy = signal + gen.standard_normal((rows, cols)) * 0.5
    assert evbmf_rank(np.linalg.svd(noisy, compute_uv=False), rows, cols) == rank


# -- tensorize ------------------------------------------------------------------------------------------------
def _cnn(seed=0):
    """Convs whose weights have different spectra: what a per-layer allocation can exploit."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.Flatten(),
                        nn.Linear(32 * 4 * 4, 10))
    with torch.no_grad():
        for i, decay in [(2, 0.55), (4, 0.9), (6, 0.7)]:
            w = net[i].weight
            net[i].weight.copy_(_decaying(w.shape, i, decay).float() * 0.05)
    return net


def _chosen(model):
    return [m for m in model.modules() if isinstance(m, tnlayers.layers.tensorized.TensorizedLayer)]


@pytest.mark.parametrize("fmt", ["tt", "tr", "tucker", "cp"])
def test_auto_meets_the_budget_and_beats_uniform_rank_at_equal_parameters(fmt):
    dense = _cnn()
    uniform = _chosen(tnlayers.tensorize(_cnn(), format=fmt, rank=0.3, init="decompose"))
    params = sum(m.network.num_params + m.bias.numel() for m in uniform)
    auto = _chosen(tnlayers.tensorize(_cnn(), format=fmt, rank="auto", budget=params, init="decompose"))
    got = sum(m.network.num_params + m.bias.numel() for m in auto)
    assert 0.99 * params <= got <= params
    sizes = [m.weight.numel() for m in dense if isinstance(m, nn.Conv2d)]

    def total(layers):  # the loss the allocation minimizes, from the errors the decompositions reached
        return sum(-n * math.log1p(-m.decomposition_error ** 2) for n, m in zip(sizes, layers))
    assert total(auto) < total(uniform)
    fraction = _chosen(tnlayers.tensorize(_cnn(), format=fmt, rank="auto", budget=0.25, init="decompose"))
    dense_params = sum(m.dense_params for m in fraction)
    assert 0.99 * 0.25 <= sum(m.network.num_params + m.bias.numel() for m in fraction) / dense_params <= 0.25


def test_energy_and_vbmf_per_layer_and_the_summary_columns(capsys):
    model = tnlayers.tensorize(_cnn(), format="tucker", rank={"0": 2, "2": "vbmf", "*": "energy:0.9"},
                               init="decompose")
    layers = dict((n, m) for n, m in model.named_modules() if isinstance(m, tnlayers.layers.tensorized.TensorizedLayer))
    assert not hasattr(layers["0"], "rank_choice") and layers["2"].rank_choice.method == "vbmf"
    for name in ("4", "6"):  # the first candidate whose HOSVD keeps 90% of the energy (HOOI only does better)
        r = layers[name].rank_choice.rank  # candidates: 1, [2, 1], 2, [3, 2], 3, ...
        (a, b), (a0, b0) = ((r, r), (r, r - 1)) if isinstance(r, int) else (r, (r[1], r[1]))
        assert layers[name].decomposition_error <= math.sqrt(0.1) + 1e-9
        w = dict(_cnn().named_modules())[name].weight.detach().double().permute(1, 2, 3, 0)
        assert _hosvd_error(w, a, b) <= 0.1 < _hosvd_error(w, a0, b0)
    tnlayers.summary(model)
    table = capsys.readouterr().out
    assert "rank by" in table and "vbmf" in table and "energy:0.9" in table and "given" in table


def test_auto_summary_reports_the_budget(capsys):
    model = tnlayers.tensorize(_cnn(), format="tt", rank="auto", budget=0.2, init="decompose")
    report = tnlayers.summary(model, print_table=False)
    (line,) = report.budget_lines
    assert "budget 0.2 of their dense parameters" in line and "rank='auto': 4 layer(s)" in line


@pytest.mark.parametrize("kwargs,error,match", [
    pytest.param(dict(rank="auto", budget=0.0), ValueError, "budget as a fraction", id="budget-zero"),
    pytest.param(dict(rank="auto", budget=1.5), ValueError, "budget as a fraction", id="budget-above-one"),
    pytest.param(dict(rank="auto", budget=0), ValueError, "budget as a parameter count", id="budget-count-zero"),
    pytest.param(dict(rank="auto", budget=True), TypeError, "budget must be", id="budget-bool"),
    pytest.param(dict(rank="auto", budget="0.2"), TypeError, "budget must be", id="budget-str"),
    pytest.param(dict(rank="auto", budget=50), ValueError, "rank 1 in every one of them already needs", id="budget-below-rank-one"),
    pytest.param(dict(rank="auto"), TypeError, "rank='auto' needs budget=", id="auto-without-budget"),
    pytest.param(dict(rank=0.2, budget=0.2), ValueError, "budget= is only used by rank='auto'", id="budget-without-auto"),
    pytest.param(dict(rank="auto", budget=0.2, init="random"), ValueError, "needs init='decompose'", id="auto-random-init"),
    pytest.param(dict(rank="energy:1.5"), ValueError, "energy to keep must be a number in", id="energy-out-of-range"),
    pytest.param(dict(rank="smallest"), ValueError, "is not a rank", id="unknown-rank-string"),
    pytest.param(dict(rank="vbmf", format="tt"), ValueError, "VBMF picks Tucker-2 ranks", id="vbmf-not-tucker"),
])
def test_rank_selection_refusals(kwargs, error, match):
    args = dict(format="tucker", init="decompose") | kwargs
    model = _cnn()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        tnlayers.tensorize(model, **args)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # left as it was


def test_auto_refuses_non_finite_weights():
    model = _cnn()
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight of '2'"):
        tnlayers.tensorize(model, format="tt", rank="auto", budget=0.3, init="decompose")


def test_a_layer_given_a_rank_method_says_where_it_works():
    with pytest.raises(TypeError, match=r"chosen from a model's weights by tnlayers.tensorize"):
        tnlayers.TTConv2d(4, 4, 3, rank="auto")


def test_a_flops_budget_counts_each_layer_at_its_input():
    x = torch.randn(2, 3, 4, 4)
    model = tnlayers.tensorize(_cnn(), format="tucker", rank="auto", budget=0.4, budget_of="flops", init="decompose",
                               example_inputs=x)
    dense_flops = used = 0
    for layer in _chosen(model):  # every conv keeps the 4x4 size here (padding 1 or a 1x1 kernel)
        c_out, c_in, kh, kw = layer.weight.shape
        dense_flops += 2 * 2 * c_in * c_out * kh * kw * 4 * 4  # nn.Conv2d's multiply-adds, twice, written out
        dense, factorized = layer._costs(torch.empty(2, c_in, 4, 4))
        used += min(dense, factorized)
    assert 0.99 * 0.4 <= used / dense_flops <= 0.4
    (line,) = tnlayers.summary(model, print_table=False).budget_lines
    assert "budget 0.4 of their dense FLOPs at example_inputs" in line


@pytest.mark.parametrize("kwargs,error,match", [
    pytest.param(dict(budget_of="flops"), ValueError, "needs example_inputs=", id="flops-without-inputs"),
    pytest.param(dict(budget_of="bytes"), ValueError, "budget_of must be one of", id="budget-of-unknown"),
])
def test_flops_budget_refusals(kwargs, error, match):
    with pytest.raises(error, match=match):
        tnlayers.tensorize(_cnn(), format="tt", rank="auto", budget=0.3, init="decompose", **kwargs)


def test_auto_on_an_embedding_tt_works_and_tucker_says_what_to_do():
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 64), nn.Linear(64, 10))
    tt = tnlayers.tensorize(model, format="tt", rank="auto", budget=0.2, init="decompose", inplace=False)
    report = tnlayers.summary(tt, print_table=False)
    assert [r["rank_by"] for r in report.rows] == ["auto", "auto"]
    used = sum(r["params"] for r in report.rows) / sum(r["dense_params"] for r in report.rows)
    assert 0.99 * 0.2 <= used <= 0.2
    with pytest.raises(ValueError, match="Tucker curves are for two factored modes"):
        tnlayers.tensorize(model, format="tucker", rank="auto", budget=0.2, init="decompose", inplace=False)
