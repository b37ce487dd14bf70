"""Adapters (tnlayers.adapters): ΔW against plain-torch references per format, equality with the base
model at init, merge/unmerge, parameter counts of the paper's adapters, target matching, optimizers and
bad input. References are written here from the formats' definitions, not from tnlayers' networks."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tnlayers
from _references import cp_full, tr_full, tt_full
from _strategy_helpers import fake_timings
from tnlayers import BAR, DAS, SAM
from tnlayers import strategy as strategy_module
from tnlayers.adapters import (Conv2dAdapter, LinearAdapter, adapt, merge, named_adapters, trainable_parameters,
                               unadapt, unmerge)

FORMATS = ["lora", "tucker", "tt", "cp", "tr"]
STRATEGIES = ["dense", "factorized", "auto"]
NAN = float("nan")
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}


def assert_within_merge_round_off(restored, original, merged):
    """unmerge's documented bound, per entry: |W'' - W| <= u (|W| + |W + sΔW|), written here with the merged
    weight W' for W + sΔW (it differs from it by at most u|W + sΔW|, hence the factor 1 + 2u)."""
    u = UNIT_ROUNDOFF[original.dtype]
    w, w0, wm = (t.detach().double() for t in (restored, original, merged))
    bound = u * (w0.abs() + wm.abs()) * (1 + 2 * u)
    assert ((w - w0).abs() <= bound).all(), ((w - w0).abs() / bound).max()


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ranks above a tiny layer's size warn (excess bonds); not what is tested
        yield


def reference_delta(fmt, cores, out_shape, in_shape, kernel=()):
    """ΔW / scale as (out, in, *kernel) from the cores, by each format's textbook definition. Mode order:
    out modes, then kernel (kh*kw as one mode for TT/TR, kh and kw for CP/Tucker), then in modes."""
    out_dim, in_dim = torch.Size(out_shape).numel(), torch.Size(in_shape).numel()
    k = torch.Size(kernel).numel()
    if fmt == "lora":  # B (out, r), A (r, [kh, kw,] in)
        a = cores[1].reshape(cores[1].shape[0], k, in_dim)
        return torch.einsum("or,rki->oik", cores[0], a).reshape(out_dim, in_dim, *kernel)
    if fmt == "tucker":  # Tucker-2: core (r_out, [kh, kw,] r_in), A (out, r_out), B (in, r_in): A G Bᵀ
        g = cores[0].reshape(cores[0].shape[0], k, cores[0].shape[-1])
        return torch.einsum("akb,oa,ib->oik", g, cores[1], cores[2]).reshape(out_dim, in_dim, *kernel)
    full = {"tt": tt_full, "tr": tr_full, "cp": cp_full}[fmt](list(cores))
    return full.reshape(out_dim, k, in_dim).permute(0, 2, 1).reshape(out_dim, in_dim, *kernel)


def dense_net(dtype=torch.float32):
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, dtype=dtype), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 5 * 5, 12, dtype=dtype), nn.Tanh(), nn.Linear(12, 4, dtype=dtype))


def train_a_little(model, x, steps=3, lr=0.05):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


# -- equality with the base model, merge, unmerge ---------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_adapted_equals_base_at_init_and_merge_unmerge_round_trip(fmt, strategy):
    torch.manual_seed(0)
    model, x = dense_net(), torch.randn(7, 3, 5, 5)
    before, y_base = copy.deepcopy(model.state_dict()), model(x)
    adapt(model, fmt, rank=2, target_modules=["0", "3", "5"], strategy=strategy)
    assert torch.equal(model(x), y_base)  # ΔW = 0 exactly, and the base op runs unchanged
    train_a_little(model, x)
    y_adapted = model(x)
    assert not torch.allclose(y_adapted, y_base)
    merge(model, keep_original=True)  # keeps a copy of each weight: unmerge restores it bit for bit
    assert all(a.merged for _, a in named_adapters(model))
    torch.testing.assert_close(model(x), y_adapted, atol=1e-5, rtol=0)
    unmerge(model)
    for name in ("0", "3", "5"):
        assert torch.equal(model.get_submodule(name).base.weight, before[f"{name}.weight"])
        assert torch.equal(model.get_submodule(name).base.bias, before[f"{name}.bias"])
    torch.testing.assert_close(model(x), y_adapted, atol=1e-5, rtol=0)
    merge(model)  # the default: ΔW added in place, subtracted again
    torch.testing.assert_close(model(x), y_adapted, atol=1e-5, rtol=0)
    merged = {name: model.get_submodule(name).base.weight.detach().clone() for name in ("0", "3", "5")}
    unmerge(model)
    for name in ("0", "3", "5"):
        assert_within_merge_round_off(model.get_submodule(name).base.weight, before[f"{name}.weight"], merged[name])
        assert torch.equal(model.get_submodule(name).base.bias, before[f"{name}.bias"])
    torch.testing.assert_close(model(x), y_adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_delta_and_output_match_plain_torch_reference(fmt):
    torch.manual_seed(1)
    linear, conv = nn.Linear(12, 8, dtype=torch.float64), nn.Conv2d(4, 6, (3, 2), stride=2, padding=1,
                                                                      dtype=torch.float64)
    x_lin, x_conv = torch.randn(5, 12, dtype=torch.float64), torch.randn(2, 4, 7, 6, dtype=torch.float64)
    for strategy in STRATEGIES:
        a = LinearAdapter(linear, fmt, rank=3, alpha=6, init="random", strategy=strategy)
        ref = reference_delta(fmt, a.cores, a.out_shape, a.in_shape)
        torch.testing.assert_close(a.delta_weight(), 2.0 * ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a(x_lin), F.linear(x_lin, linear.weight + 2.0 * ref, linear.bias))
        c = Conv2dAdapter(conv, fmt, rank=3, alpha=3, init="random", strategy=strategy)
        ref = reference_delta(fmt, c.cores, c.out_shape, c.in_shape, (3, 2))
        torch.testing.assert_close(c.delta_weight(), ref, rtol=1e-12, atol=1e-12)
        expected = F.conv2d(x_conv, conv.weight + ref, conv.bias, stride=2, padding=1)
        torch.testing.assert_close(c(x_conv), expected)


@pytest.mark.parametrize("fmt", ["tucker", "lora", "tt"])
def test_conv_padding_modes_and_groups(fmt):
    torch.manual_seed(2)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for conv in (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", dtype=torch.float64),
                 nn.Conv2d(4, 6, 3, groups=2, padding="same", dilation=2, dtype=torch.float64)):
        for strategy in STRATEGIES:
            a = Conv2dAdapter(conv, fmt, rank=2, init="random", strategy=strategy)
            assert a.delta_weight().shape == conv.weight.shape
            ref = reference_delta(fmt, a.cores, a.out_shape, a.in_shape, (3, 3)) * a.scale
            expected = conv._conv_forward(x, conv.weight + ref, conv.bias)
            torch.testing.assert_close(a(x), expected)
            torch.testing.assert_close(a(x[0]), expected[0])  # unbatched input


FUZZ = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(fmt=st.sampled_from(FORMATS), out_dim=st.integers(1, 12), in_dim=st.integers(1, 12),
       rank=st.integers(1, 4), batch=st.integers(1, 6), strategy=st.sampled_from(STRATEGIES))
def test_property_linear_delta_and_zero_init(fmt, out_dim, in_dim, rank, batch, strategy):
    torch.manual_seed(out_dim * 131 + in_dim * 7 + rank)
    linear = nn.Linear(in_dim, out_dim, dtype=torch.float64)
    x = torch.randn(batch, in_dim, dtype=torch.float64)
    zero = LinearAdapter(linear, fmt, rank=rank, strategy=strategy)
    assert torch.equal(zero(x), linear(x))
    assert int(sum(bool(c.abs().sum() == 0) for c in zero.cores)) == 1  # exactly one core starts at zero
    a = LinearAdapter(linear, fmt, rank=rank, alpha=2.0, init="random", strategy=strategy)
    ref = reference_delta(fmt, a.cores, a.out_shape, a.in_shape) * (2.0 / rank)
    torch.testing.assert_close(a.delta_weight(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a(x), F.linear(x, linear.weight + ref, linear.bias))


@FUZZ
@given(fmt=st.sampled_from(FORMATS), c_out=st.integers(1, 6), c_in=st.integers(1, 6), k=st.integers(1, 3),
       rank=st.integers(1, 3), strategy=st.sampled_from(STRATEGIES))
def test_property_conv_delta(fmt, c_out, c_in, k, rank, strategy):
    torch.manual_seed(c_out * 31 + c_in * 5 + k)
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, dtype=torch.float64)
    x = torch.randn(2, c_in, 4, 5, dtype=torch.float64)
    assert torch.equal(Conv2dAdapter(conv, fmt, rank=rank, strategy=strategy)(x), conv(x))
    a = Conv2dAdapter(conv, fmt, rank=rank, alpha=rank, init="random", strategy=strategy)
    ref = reference_delta(fmt, a.cores, a.out_shape, a.in_shape, (k, k))
    torch.testing.assert_close(a(x), F.conv2d(x, conv.weight + ref, conv.bias, padding=k // 2))


# -- parameter counts -------------------------------------------------------------------------------------
def test_paper_adapter_parameter_counts_in_closed_form():
    # LoRETTA (DAS paper, App. B): TT over the 4096 x 4096 update, modes [4,4,16,16,16,16,4,4], rank 16;
    # TT cores r_{k-1} n_k r_k with r_0 = r_8 = 1
    modes, r = [4, 4, 16, 16, 16, 16, 4, 4], 16
    bonds = [1] + [r] * 7 + [1]
    loretta = sum(bonds[k] * modes[k] * bonds[k + 1] for k in range(8))
    assert loretta == 1 * 4 * 16 + 16 * 4 * 16 + 4 * (16 * 16 * 16) + 16 * 4 * 16 + 16 * 4 * 1 == 18560
    model = nn.Sequential(nn.Linear(4096, 4096, device="meta"))
    adapt(model, **tnlayers.adapters.PAPER_PRESETS["loretta"]["adapter"] | {"target_modules": ["0"]})
    assert trainable_parameters(model).trainable == loretta
    assert trainable_parameters(model).total == 4096 * 4096 + 4096 + loretta
    assert [tuple(c.shape) for c in model[0].cores] == [(4, 16)] + [(16, n, 16) for n in modes[1:-1]] + [(16, 4)]
    # FLoRA (App. B): ΔW = A G Bᵀ with A (O, r), G (r, r), B (I, r): O·r + r² + I·r, r² more than LoRA's r(O + I)
    flora = nn.Sequential(nn.Linear(1024, 1024, device="meta"))
    adapt(flora, **tnlayers.adapters.PAPER_PRESETS["flora"]["adapter"] | {"target_modules": ["0"]})
    assert trainable_parameters(flora).trainable == 1024 * 8 + 8 * 8 + 1024 * 8 == 16448
    assert sorted(tuple(c.shape) for c in flora[0].cores) == [(8, 8), (1024, 8), (1024, 8)]
    lora = adapt(nn.Sequential(nn.Linear(1024, 768, device="meta")), "lora", rank=8, target_modules=["0"])
    assert trainable_parameters(lora).trainable == 8 * (1024 + 768)
    cp = adapt(nn.Sequential(nn.Conv2d(16, 32, 3, device="meta")), "cp", rank=5, target_modules=["0"],
               shapes={"0": {"out_shape": (4, 8), "in_shape": (4, 4)}})
    assert trainable_parameters(cp).trainable == 5 * (4 + 8 + 3 + 3 + 4 + 4)


# -- matching ---------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.value, self.my_query = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.proj = nn.Conv2d(4, 4, 1)


def blocks():
    return nn.ModuleDict({"enc": nn.ModuleList([Block(), Block()]), "head": nn.Linear(4, 2)})


MATCH_CASES = [  # (target_modules, the names adapt wraps)
    (["query"], ["enc.0.query", "enc.1.query"]),  # a dotted suffix: not "my_query"
    (["enc.1.query", "head"], ["enc.1.query", "head"]),  # full names
    (["0.value"], ["enc.0.value"]),  # a longer suffix
    (["enc.*.proj"], ["enc.0.proj", "enc.1.proj"]),  # glob, as tensorize
    (r".*\.(query|value)", ["enc.0.query", "enc.0.value", "enc.1.query", "enc.1.value"]),  # regex, full match
    (r"enc\.1\..*query", ["enc.1.query", "enc.1.my_query"]),
]


@pytest.mark.parametrize("targets,expected", MATCH_CASES)
def test_target_modules_rules(targets, expected):
    model = adapt(blocks(), "lora", rank=2, target_modules=targets)
    assert [name for name, _ in named_adapters(model)] == expected


def test_freezing_and_trainable_counts():
    model = adapt(blocks(), "tucker", rank=2, target_modules=["query"])
    cores = {id(p) for _, a in named_adapters(model) for p in a.cores}
    assert all(p.requires_grad == (id(p) in cores) for p in model.parameters())
    count = trainable_parameters(model)
    # Tucker-2 rank 2 on 4 x 4: A (4, 2), G (2, 2), B (4, 2); a Block holds 3 Linear(4, 4) and a 1x1 Conv(4, 4)
    assert count.trainable == 2 * (4 * 2 + 2 * 2 + 4 * 2) and count.total == 2 * 80 + 10 + count.trainable
    assert str(count) == "trainable params: 40 || all params: 210 || trainable%: 19.0476"
    model = adapt(blocks(), "tucker", rank=2, target_modules=["query"], freeze_model=False)
    assert model["head"].weight.requires_grad and not model["enc"][0].query.base.weight.requires_grad


# -- optimizers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["DAS", "SAM", "BAR"])
@pytest.mark.parametrize("fmt", ["tucker", "tt", "lora"])
def test_optimizers_move_only_adapter_cores_and_stay_finite_from_zero_init(fmt, method):
    torch.manual_seed(3)
    model, x = dense_net(), torch.randn(8, 3, 5, 5)
    adapt(model, fmt, rank=3, target_modules=["0", "3"])
    groups = tnlayers.core_groups(model)
    assert [name for name, _ in groups] == ["0", "3"]
    assert all(len(cores) == len(model.get_submodule(n).cores) for n, cores in groups)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cores_before = [p.detach().clone() for _, cores in groups for p in cores]
    make = dict(DAS=lambda p: DAS(p, torch.optim.Adam, alpha=2.0, lr=1e-2),
                SAM=lambda p: SAM(p, torch.optim.Adam, rho=0.1, lr=1e-2),
                BAR=lambda p: BAR(p, torch.optim.Adam, alpha=0.1, total_steps=5, lr=1e-2))[method]
    opt = make(model.parameters())  # all parameters: the frozen ones have no gradient and must not move
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        if method == "SAM":
            opt.first_step()
            model(x).square().mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    after = [p for _, cores in groups for p in cores]
    assert all(not torch.equal(a, b) for a, b in zip(after, cores_before))


def test_das_zero_core_is_not_rescaled_on_the_first_step():
    torch.manual_seed(4)
    model, x = dense_net(), torch.randn(8, 3, 5, 5)
    adapt(model, "tt", rank=3, target_modules=["3"])
    adapter = model[3]
    opt = DAS([p for p in model.parameters() if p.requires_grad], torch.optim.SGD, alpha=1.0, lr=0.1)
    model(x).square().mean().backward()
    opt.step()
    cores, lambdas = opt.last_lambdas
    zero_index = next(i for i, c in enumerate(cores) if c is adapter.cores[adapter.zero_core])
    assert lambdas[zero_index] == 0 and torch.isfinite(lambdas).all()
    assert (lambdas[torch.arange(len(cores)) != zero_index] < 0).all()  # the others have γ = 0 < mean: they shrink


# -- state, copies, unadapt -------------------------------------------------------------------------------
def test_state_dict_round_trip_and_merged_flag_is_checked():
    torch.manual_seed(5)
    model, x = dense_net(), torch.randn(4, 3, 5, 5)
    adapt(model, "tt", rank=2, target_modules=["3", "5"])
    train_a_little(model, x)
    state = model.state_dict()
    assert "3.cores.0" in state and "3.base.weight" in state
    fresh = adapt(dense_net(), "tt", rank=2, target_modules=["3", "5"])
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), model(x))
    merge(model)
    with pytest.raises(ValueError, match="saved merged but is not merged here"):
        fresh.load_state_dict(model.state_dict())
    copied = copy.deepcopy(model)
    assert len(tnlayers.core_groups(copied)) == 2
    unmerge(copied)
    torch.testing.assert_close(copied(x), model(x), atol=1e-5, rtol=0)


def test_unadapt_with_and_without_merge_and_inplace_false():
    torch.manual_seed(6)
    base, x = dense_net(), torch.randn(4, 3, 5, 5)
    original = copy.deepcopy(base.state_dict())
    model = adapt(base, "lora", rank=2, target_modules=["0", "3"], inplace=False)
    assert isinstance(base[0], nn.Conv2d) and isinstance(model[0], Conv2dAdapter)
    train_a_little(model, x)
    y = model(x)
    restored = unadapt(copy.deepcopy(model))
    assert type(restored[0]) is nn.Conv2d and type(restored[3]) is nn.Linear
    assert all(torch.equal(v, original[k]) for k, v in restored.state_dict().items())
    merged = unadapt(model, merge=True)
    assert type(merged[0]) is nn.Conv2d
    torch.testing.assert_close(merged(x), y, atol=1e-5, rtol=0)


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(7)
    linear = nn.Linear(6, 5)
    a = LinearAdapter(linear, "tucker", rank=2, dropout=0.5, init="random")
    x = torch.randn(3, 6)
    a.eval()
    torch.testing.assert_close(a(x), F.linear(x, linear.weight + a.delta_weight(), linear.bias))
    a.train()
    torch.manual_seed(8)
    y = a(x)
    torch.manual_seed(8)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, linear(x) + F.linear(dropped, a.delta_weight()))


def test_global_strategy_override_reaches_adapters(monkeypatch):
    a = LinearAdapter(nn.Linear(8, 8), "lora", rank=2, init="random", strategy="factorized")
    monkeypatch.setattr(a.plan, "factorized", lambda *args: pytest.fail("the factorized path ran"))
    with tnlayers.set_strategy("dense"):
        y = a(torch.randn(3, 8))
    assert y.shape == (3, 8)


def timed_decisions(monkeypatch, times):
    """Make every adapter's "auto" choice a timed one (no FLOP shortcut, no size floor) on a fake clock:
    each strategy still runs and takes ``times[strategy]`` seconds. Returns the list of timed strategies."""
    monkeypatch.setattr(strategy_module, "MIN_TIMED_FLOPS", 0)
    monkeypatch.setattr(strategy_module, "TRUST_RATIO", float("inf"))
    monkeypatch.setattr(strategy_module.chooser, "_decisions", {})  # none from earlier tests; restored afterwards
    return fake_timings(monkeypatch, times)


def record_ways(monkeypatch, adapter):
    """The strategy of each of the adapter's own forwards (timing runs included)."""
    ways, original = [], adapter._forward_by
    monkeypatch.setattr(adapter, "_forward_by", lambda x, strategy: ways.append(strategy) or original(x, strategy))
    return ways


@pytest.mark.parametrize("faster", ["dense", "factorized"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_adapter_auto_follows_the_timing_and_matches_the_reference(monkeypatch, kind, faster):
    calls = timed_decisions(monkeypatch, {faster: 1.0, {"dense": "factorized", "factorized": "dense"}[faster]: 2.0})
    torch.manual_seed(3)
    if kind == "linear":
        base, x = nn.Linear(12, 8, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
        a = LinearAdapter(base, "tucker", rank=3, alpha=6, init="random")
        expected = lambda: F.linear(x, base.weight + a.scale * reference_delta(  # noqa: E731
            "tucker", a.cores, a.out_shape, a.in_shape), base.bias)
    else:
        base, x = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64), torch.randn(2, 4, 7, 7, dtype=torch.float64)
        a = Conv2dAdapter(base, "cp", rank=3, alpha=3, init="random")
        expected = lambda: F.conv2d(x, base.weight + a.scale * reference_delta(  # noqa: E731
            "cp", a.cores, a.out_shape, a.in_shape, (3, 3)), base.bias, padding=1)
    forced = copy.deepcopy(a)  # before record_ways patches the instance
    forced.strategy = "dense" if faster == "factorized" else "factorized"
    ways = record_ways(monkeypatch, a)
    y = a(x)
    repeats = len(calls) // 2
    assert calls.count("dense") == calls.count("factorized") == repeats >= 1
    assert ways[-1] == faster  # the call's own output, after the timing runs
    torch.testing.assert_close(y, expected())
    assert all(c.grad is None for c in a.cores)  # timing used autograd.grad: nothing accumulated
    y.square().sum().backward()  # the caller's graph is intact
    grads = [c.grad.clone() for c in a.cores]
    forced(x).square().sum().backward()
    for got, want in zip(grads, [c.grad for c in forced.cores]):
        torch.testing.assert_close(got, want)
    a(x)
    assert len(calls) == 2 * repeats  # decided once per input shape and gradient mode


def test_adapters_alike_share_one_decision_and_flops_is_never_timed(monkeypatch):
    calls = timed_decisions(monkeypatch, {"dense": 1.0, "factorized": 2.0})
    x = torch.randn(4, 16)
    first, second = (LinearAdapter(nn.Linear(16, 16), "tt", rank=2, init="random") for _ in range(2))
    first(x)
    timed = len(calls)
    second(x)
    assert timed > 0 and len(calls) == timed
    with torch.no_grad():
        second(x)  # inference is another question
    assert len(calls) == 2 * timed
    LinearAdapter(nn.Linear(16, 16), "tt", rank=2, init="random", strategy="flops")(x)
    LinearAdapter(nn.Linear(16, 24), "tt", rank=2, init="random", strategy="auto")(x)  # another base shape
    assert len(calls) == 3 * timed


# -- bad input ----------------------------------------------------------------------------------------
def mha_model():
    return nn.Sequential(nn.MultiheadAttention(4, 2))


BAD = [  # (id, call, exception, message regex); each documented in docs/errors.md
    ("format-unknown", lambda: adapt(dense_net(), "ht", target_modules=["3"]), ValueError, "format must be one of"),
    ("format-not-str", lambda: adapt(dense_net(), 3, target_modules=["3"]), TypeError, "format must be a str"),
    ("rank-zero", lambda: adapt(dense_net(), rank=0, target_modules=["3"]), ValueError, "rank must be a positive"),
    ("rank-float", lambda: adapt(dense_net(), rank=0.5, target_modules=["3"]), TypeError, "rank must be a positive"),
    ("rank-unallocatable", lambda: adapt(dense_net(), "tt", rank=10**6, target_modules=["3"]), ValueError,
     r"15,000,008,000,000 parameters against 1,800 for the base weight; rank is out of range"),
    ("alpha-nan", lambda: adapt(dense_net(), alpha=NAN, target_modules=["3"]), ValueError, "alpha must be a finite"),
    ("alpha-zero", lambda: adapt(dense_net(), alpha=0, target_modules=["3"]), ValueError, "alpha must be a finite"),
    ("alpha-str", lambda: adapt(dense_net(), alpha="16", target_modules=["3"]), TypeError, "alpha must be a number"),
    ("dropout-one", lambda: adapt(dense_net(), dropout=1.0, target_modules=["3"]), ValueError, "dropout must be"),
    ("init-unknown", lambda: adapt(dense_net(), init="svd", target_modules=["3"]), ValueError, "init must be one of"),
    ("strategy-unknown", lambda: adapt(dense_net(), strategy="x", target_modules=["3"]), ValueError, "strategy"),
    ("targets-missing", lambda: adapt(dense_net()), TypeError, "needs target_modules"),
    ("targets-empty", lambda: adapt(dense_net(), target_modules=[]), ValueError, "target_modules is empty"),
    ("targets-type", lambda: adapt(dense_net(), target_modules=3), TypeError, "target_modules must be"),
    ("targets-no-match", lambda: adapt(blocks(), target_modules=["qeury"]), ValueError,
     r"target_modules: 'qeury' matches no module.*close matches: \['query'"),
    ("targets-regex-no-match", lambda: adapt(blocks(), target_modules=r"query"), ValueError,
     "target_modules: the regular expression 'query' matches no module"),
    ("targets-regex-invalid", lambda: adapt(blocks(), target_modules="(query"), ValueError,
     "target_modules: '\\(query' is not a valid regular expression"),
    ("targets-unsupported", lambda: adapt(blocks(), target_modules=["enc.0"]), TypeError,
     "target_modules matched 'enc.0', a Block"),
    ("targets-mha", lambda: adapt(mha_model(), target_modules=["out_proj"]), TypeError, "MultiheadAttention"),
    ("wrap-twice", lambda: adapt(adapt(blocks(), target_modules=["query"]), target_modules=["query"]), ValueError,
     "'enc.0.query' is already adapted"),
    ("shapes-keys", lambda: adapt(dense_net(), "tt", target_modules=["3"], shapes={"3": {"out": (3, 4)}}),
     ValueError, "shapes for '3' must be a dict"),
    ("shapes-product", lambda: adapt(dense_net(), "tt", target_modules=["3"], shapes={"*": {"out_shape": (3, 3)}}),
     ValueError, r"adapting '3' \(Linear\): out_shape=\(3, 3\) has product 9"),
    ("lora-split", lambda: adapt(dense_net(), "lora", target_modules=["3"], shapes={"*": {"out_shape": (3, 4)}}),
     ValueError, "format 'lora' is B·A over the whole"),
    ("adapter-alpha-inf", lambda: LinearAdapter(nn.Linear(2, 2), alpha=float("inf")), ValueError,
     "alpha must be a finite number"),
    ("model-not-module", lambda: adapt("model", target_modules=["3"]), TypeError, "adapt expects an nn.Module"),
    ("freeze-not-bool", lambda: adapt(dense_net(), target_modules=["3"], freeze_model=1), TypeError, "freeze_model"),
    ("merge-no-adapters", lambda: merge(dense_net()), ValueError, "merge: the model has no adapters"),
    ("unadapt-merge-not-bool", lambda: unadapt(dense_net(), merge="yes"), TypeError, "merge must be True or False"),
]


@pytest.mark.parametrize("make,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_failed_adapt_leaves_the_model_as_it_was():
    model = dense_net()
    with pytest.raises(ValueError, match="adapting '5'"):  # '3' builds (freezing its base), then '5' fails
        adapt(model, "tt", target_modules=["3", "5"], shapes={"5": {"in_shape": (5, 5)}, "3": {}})
    assert isinstance(model[3], nn.Linear) and all(p.requires_grad for p in model.parameters())


def test_merge_refuses_a_non_finite_update_and_changes_nothing():
    model = adapt(dense_net(), "tucker", rank=2, target_modules=["3", "5"], init="random")
    weights = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model[5].cores[0][0, 0] = NAN
    with pytest.raises(ValueError, match=r"merge: the update of 1 adapter\(s\) holds non-finite values \(NaN or inf\): "
                                         r"\['5'\]; nothing was merged"):
        merge(model)
    assert not any(a.merged for _, a in named_adapters(model))
    assert torch.equal(model[3].base.weight, weights[[n for n, _ in model.named_parameters()].index("3.base.weight")])


def test_tensorize_leaves_adapter_bases_alone_so_merge_still_works():
    torch.manual_seed(0)
    model = dense_net()
    adapt(model, "tucker", rank=2, target_modules=["3"], init="random")
    x = torch.randn(2, 3, 5, 5)
    with pytest.warns(UserWarning, match="frozen base of an adapter"):
        tnlayers.tensorize(model, format="tt", rank=2, filter=lambda name, module: True)
    assert type(model[3].base) is nn.Linear  # still the plain layer the adapter folds ΔW into
    assert isinstance(model[0], tnlayers.TTConv2d)
    adapted = model(x)
    merge(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
