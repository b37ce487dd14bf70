"""strategy="auto" (FLOP estimate refined by one timing), set_strategy, and the no-grad weight cache.

References are independent of the code under test: dense weights rebuilt with torch.einsum over the cores
(tests/_references.py) and applied with F.conv2d / F.linear.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tnlayers
from tnlayers import strategy as strategy_module
from tnlayers import (CPConv2d, CPLinear, DAS, TRConv2d, TRLinear, TTConv2d, TTLinear, TuckerConv2d,
                      TuckerLinear)

from _references import conv_weight, linear_weight
from _strategy_helpers import fake_timings

pytestmark = pytest.mark.filterwarnings("ignore:.*of the dense nn.* it replaces")  # small shapes, high ranks


@pytest.fixture(autouse=True)
def fresh_decisions():
    strategy_module.clear_decisions()
    yield
    strategy_module.clear_decisions()


PER_DECISION = 2 * strategy_module.REPEATS  # timed calls per decision with a narrow gap


def reference_conv(layer, x, fmt):
    w = conv_weight(fmt, [c.detach() for c in layer.cores], layer.out_channels, layer.in_channels, *layer.kernel_size)
    return F.conv2d(x, w, layer.bias.detach(), padding=layer.padding)


# -- auto: the measurement decides ------------------------------------------------------------------
@pytest.mark.parametrize("faster", ["dense", "factorized"])
def test_auto_follows_the_timing_not_the_flops(monkeypatch, faster):
    layer = CPConv2d(64, 64, 3, padding=1, rank=138)  # FLOPs favour factorized about 2:1 (within TRUST_RATIO)
    x = torch.randn(4, 64, 16, 16)
    dense_flops, factorized_flops = layer._costs(x)
    assert factorized_flops < dense_flops < strategy_module.TRUST_RATIO * factorized_flops
    slower = {"dense": "factorized", "factorized": "dense"}[faster]
    calls = fake_timings(monkeypatch, {faster: 1.0, slower: 2.0})
    y = layer(x)
    assert layer.last_strategy == faster
    assert calls.count("dense") == calls.count("factorized") == strategy_module.REPEATS  # (warm-ups untimed)
    torch.testing.assert_close(y, reference_conv(layer, x, "cp"), rtol=1e-4, atol=1e-4)
    layer(x)  # decided once per input shape: no more timing
    assert len(calls) == PER_DECISION


def test_a_wide_gap_in_the_first_timed_round_decides_without_repeats(monkeypatch):
    layer = CPConv2d(64, 64, 3, padding=1, rank=138)
    calls = fake_timings(monkeypatch, {"dense": 1.0, "factorized": strategy_module.EARLY_RATIO + 0.5})
    layer(torch.randn(4, 64, 16, 16))
    assert calls == ["dense", "factorized"] and layer.last_strategy == "dense"


def test_a_close_call_is_timed_more(monkeypatch):
    layer = CPConv2d(64, 64, 3, padding=1, rank=138)
    calls = fake_timings(monkeypatch, {"dense": 1.0, "factorized": 0.9})  # within CLOSE
    layer(torch.randn(4, 64, 16, 16))
    rounds = strategy_module.REPEATS + strategy_module.EXTRA_REPEATS
    expected = [["dense", "factorized"], ["factorized", "dense"]] * rounds  # who goes first alternates
    assert calls == [s for pair in expected[:rounds] for s in pair] and layer.last_strategy == "factorized"


def test_each_strategy_is_timed_after_either(monkeypatch):
    """What ran just before shifts a call's time. Here factorized is 20% faster but 40% slower whenever it
    follows dense: with a fixed dense-then-factorized order it would lose every round."""
    layer = CPConv2d(64, 64, 3, padding=1, rank=138)
    previous = ["factorized"]  # the warm-up's last run

    def clock(run, strategy, device):
        run(strategy)
        slowed = strategy == "factorized" and previous[0] == "dense"
        previous[0] = strategy
        return {"dense": 1.0, "factorized": 0.8}[strategy] * (1.4 if slowed else 1.0)
    monkeypatch.setattr(strategy_module, "_time", clock)
    layer(torch.randn(4, 64, 16, 16))
    assert layer.last_strategy == "factorized"


def test_the_extra_rounds_catch_a_gap_that_noise_hid(monkeypatch):
    """Factorized is 15% faster, but its first REPEATS timings were slowed to look like a tie; the extra
    rounds of a close call see the gap. With REPEATS rounds only, the tie would have gone to dense."""
    layer = CPConv2d(64, 64, 3, padding=1, rank=138)
    seen = {"dense": [1.0] * 10, "factorized": [1.0] * strategy_module.REPEATS + [0.85] * 10}

    def clock(run, strategy, device):
        run(strategy)
        return seen[strategy].pop(0)
    monkeypatch.setattr(strategy_module, "_time", clock)
    layer(torch.randn(4, 64, 16, 16))
    assert layer.last_strategy == "factorized"
    assert len(seen["factorized"]) == 10 - strategy_module.EXTRA_REPEATS


@pytest.mark.parametrize("factorized_time", [1.0 - strategy_module.TIE / 2, 1.0 + strategy_module.TIE / 2])
def test_a_tie_goes_to_dense_although_factorized_has_fewer_flops(monkeypatch, factorized_time):
    layer = CPConv2d(64, 64, 3, padding=1, rank=138)
    fake_timings(monkeypatch, {"dense": 1.0, "factorized": factorized_time})
    layer(torch.randn(4, 64, 16, 16))
    assert layer.last_strategy == "dense"


def test_decisive_flops_or_tiny_layers_are_not_timed(monkeypatch):
    calls = fake_timings(monkeypatch, {"dense": 1.0, "factorized": 2.0})
    cheap = TuckerConv2d(64, 64, 3, padding=1, rank=4)  # factorized needs > TRUST_RATIO x fewer FLOPs
    cheap(torch.randn(8, 64, 32, 32))
    tiny = CPConv2d(8, 8, 3, padding=1, rank=20)  # below MIN_TIMED_FLOPS
    tiny(torch.randn(2, 8, 8, 8))
    assert calls == []
    assert cheap.last_strategy == "factorized"
    # a small layer whose FLOPs do not settle it runs dense: its time is fixed per-op costs, and the dense
    # path has the fewest ops (TR-ResNet-20 at 8x8: the chain took 1.5-2x dense's time on its 11 small layers)
    dense_flops, factorized_flops = tiny._costs(torch.randn(2, 8, 8, 8))
    assert max(dense_flops, factorized_flops) < strategy_module.MIN_TIMED_FLOPS
    assert factorized_flops < dense_flops < strategy_module.TRUST_RATIO * factorized_flops  # FLOPs: factorized
    assert tiny.last_strategy == "dense"


def test_layers_alike_share_one_decision_and_keys_separate_grad_mode(monkeypatch):
    calls = fake_timings(monkeypatch, {"dense": 1.0, "factorized": 2.0})
    first, second = (CPConv2d(64, 64, 3, padding=1, rank=138) for _ in range(2))
    x = torch.randn(4, 64, 16, 16)
    first(x)
    second(x)
    assert len(calls) == PER_DECISION and second.last_strategy == "dense"
    with torch.no_grad():
        second(x)  # inference is another question (dense is then one conv with the cached weight)
    assert len(calls) == 2 * PER_DECISION
    other_rank = CPConv2d(64, 64, 3, padding=1, rank=130)
    other_rank(x)
    assert len(calls) == 3 * PER_DECISION


def test_timing_leaves_no_gradient_and_no_graph(monkeypatch):
    fake_timings(monkeypatch, {"dense": 2.0, "factorized": 1.0})
    monkeypatch.setattr(strategy_module, "MIN_TIMED_FLOPS", 0)  # time this small layer too
    torch.manual_seed(0)
    layer = TRConv2d(64, 64, 3, padding=1, rank=10)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    y = layer(x)
    assert all(c.grad is None for c in layer.cores) and x.grad is None
    y.square().sum().backward()
    grads = [c.grad.clone() for c in layer.cores] + [x.grad.clone()]
    forced = TRConv2d(64, 64, 3, padding=1, rank=10, strategy="factorized")
    forced.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_()
    forced(x2).square().sum().backward()
    for got, want in zip(grads, [c.grad for c in forced.cores] + [x2.grad]):
        torch.testing.assert_close(got, want)


def test_auto_runs_untimed_on_meta_free_devices_only():
    assert strategy_module._timeable(torch.device("cpu"))
    assert not strategy_module._timeable(torch.device("meta"))


# -- set_strategy -----------------------------------------------------------------------------------
def test_set_strategy_as_call_and_as_context_manager():
    layer = TTConv2d(64, 64, 3, padding=1, rank=4)
    x = torch.randn(2, 64, 8, 8)
    assert tnlayers.get_strategy() is None
    with tnlayers.set_strategy("dense"):
        layer(x)
        assert layer.last_strategy == "dense"
        with tnlayers.set_strategy("factorized"):
            layer(x)
            assert layer.last_strategy == "factorized"
        assert tnlayers.get_strategy() == "dense"
    assert tnlayers.get_strategy() is None
    try:
        tnlayers.set_strategy("factorized")
        layer(x)
        assert layer.last_strategy == "factorized"
    finally:
        tnlayers.set_strategy(None)
    assert tnlayers.get_strategy() is None


@pytest.mark.parametrize("bad", ["fast", 1, ["dense"]])
def test_set_strategy_rejects_unknown(bad):
    with pytest.raises(ValueError, match="strategy must be one of"):
        tnlayers.set_strategy(bad)
    assert tnlayers.get_strategy() is None


CLASSES = [(TTConv2d, "conv"), (TRConv2d, "conv"), (CPConv2d, "conv"), (TuckerConv2d, "conv"),
           (TTLinear, "linear"), (TRLinear, "linear"), (CPLinear, "linear"), (TuckerLinear, "linear")]


@pytest.mark.filterwarnings("ignore:.*no expressiveness")  # small shapes: ranks above the modes
@settings(max_examples=25, deadline=None)
@given(case=st.sampled_from(CLASSES), channels=st.integers(2, 12), out=st.integers(2, 12), rank=st.integers(1, 5),
       batch=st.integers(1, 3), grad=st.booleans())
def test_auto_and_forced_strategies_agree(case, channels, out, rank, batch, grad):
    cls, kind = case
    torch.manual_seed(channels * 100 + out)
    if kind == "conv":
        layer, x = cls(channels, out, 3, padding=1, rank=rank), torch.randn(batch, channels, 5, 6)
    else:
        layer, x = cls(channels, out, rank=rank), torch.randn(batch, 3, channels)
    outputs = {}
    for s in ("auto", "flops", "dense", "factorized"):
        if s == "factorized" and not layer._has_factorized():
            continue
        with torch.set_grad_enabled(grad), tnlayers.set_strategy(s):
            outputs[s] = layer(x)
    for s, y in outputs.items():
        torch.testing.assert_close(y, outputs["dense"], rtol=1e-4, atol=1e-5, msg=s)


# -- weight cache -----------------------------------------------------------------------------------
def _conv(fmt="tucker"):
    torch.manual_seed(0)
    cls = {"tucker": TuckerConv2d, "cp": CPConv2d, "tt": TTConv2d}[fmt]
    return cls(6, 5, 3, padding=1, rank=3, strategy="dense")


def test_no_grad_reuses_one_weight_until_a_core_changes_in_place():
    layer, x = _conv(), torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        y1 = layer(x)
        cached = layer._weight_cache[1]
        layer(x)
        assert layer._weight_cache[1] is cached  # not rebuilt
        torch.testing.assert_close(y1, reference_conv(layer, x, "tucker"))
        layer.cores[1].mul_(1.5)  # in place: version counter moves
        y2 = layer(x)
    assert layer._weight_cache[1] is not cached
    torch.testing.assert_close(y2, reference_conv(layer, x, "tucker"))
    assert not torch.allclose(y1, y2)


def test_eval_inference_costs_one_conv(monkeypatch):
    layer, x = _conv("cp"), torch.randn(2, 6, 7, 7)
    layer.eval()
    builds = []
    original = type(layer.plan).weight
    monkeypatch.setattr(type(layer.plan), "weight", lambda plan, cores: builds.append(1) or original(plan, cores))
    with torch.inference_mode():
        for _ in range(3):
            y = layer(x)
    assert len(builds) == 1
    torch.testing.assert_close(y, reference_conv(layer, x, "cp"))


@pytest.mark.parametrize("optimizer", ["sgd", "das-torch", "das-triton"])
def test_optimizer_step_invalidates_the_cache(optimizer):
    if optimizer == "das-triton" and not tnlayers.kernels.triton_available():
        pytest.skip("triton not installed")
    layer, x = _conv("tt"), torch.randn(2, 6, 7, 7)
    if optimizer == "sgd":
        opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)
    else:
        opt = DAS(layer.parameters(), torch.optim.SGD, alpha=0.5, lr=0.01, momentum=0.9,
                  backend=optimizer.split("-")[1])
    for _ in range(2):  # the second step is the fused one for momentum SGD
        with torch.no_grad():
            layer(x)
        before = layer._weight_cache[1].clone()
        layer(x).sum().backward()
        assert layer._weight_cache is None  # training frees the inference copy
        with torch.no_grad():
            layer(x)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            y = layer(x)
        assert not torch.equal(layer._weight_cache[1], before)
        torch.testing.assert_close(y, reference_conv(layer, x, "tt"), rtol=1e-5, atol=1e-5)


def test_load_state_dict_and_dtype_change_invalidate_the_cache():
    layer, other, x = _conv(), _conv(), torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        other.cores[0].add_(1.0)
        layer(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), reference_conv(other, x, "tucker"))
        layer.double()
        y = layer(x.double())
    assert y.dtype == torch.float64 and layer._weight_cache[1].dtype == torch.float64


def test_frozen_cores_cache_with_grad_enabled_and_input_grads_flow():
    layer, x = _conv(), torch.randn(2, 6, 7, 7, requires_grad=True)
    layer.requires_grad_(False)
    layer(x).sum().backward()
    cached = layer._weight_cache[1]
    layer(x).sum().backward()
    assert layer._weight_cache[1] is cached
    x_ref = x.detach().clone().requires_grad_()
    reference_conv(layer, x_ref, "tucker").sum().backward()
    torch.testing.assert_close(x.grad, 2 * x_ref.grad)


def test_cache_off_per_layer_and_linear_layers_cache_too():
    layer, x = _conv(), torch.randn(2, 6, 7, 7)
    layer.cache_weight = False
    with torch.no_grad():
        layer(x)
    assert layer._weight_cache is None
    torch.manual_seed(1)
    lin = TTLinear(12, 10, rank=3, strategy="dense")
    xs = torch.randn(4, 12)
    with torch.no_grad():
        lin(xs)
        lin.cores[0].mul_(-1)
        y = lin(xs)
    torch.testing.assert_close(y, F.linear(xs, linear_weight("tt", [c.detach() for c in lin.cores], 10, 12), lin.bias))


def test_deepcopy_drops_the_cache():
    import copy
    layer, x = _conv(), torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        layer(x)
    clone = copy.deepcopy(layer)
    assert clone._weight_cache is None and layer._weight_cache is not None


# -- torch.compile ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kind", CLASSES, ids=[c.__name__ for c, _ in CLASSES])
def test_compile_fullgraph_matches_eager(cls, kind):
    torch._dynamo.reset()
    torch.manual_seed(0)
    if kind == "conv":
        layer, x = cls(6, 8, 3, padding=1, rank=3), torch.randn(2, 6, 7, 7)
    else:
        layer, x = cls(12, 10, rank=3), torch.randn(3, 5, 12)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    got = [c.grad.clone() for c in layer.cores]
    layer.zero_grad()
    want_y = layer(x)
    want_y.square().sum().backward()
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, [c.grad for c in layer.cores]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # inference traces too (the cache is bypassed while tracing)
        torch.testing.assert_close(compiled(x), want_y.detach(), rtol=1e-5, atol=1e-6)


def test_compile_with_inductor_generates_code_for_a_layer():
    torch._dynamo.reset()
    layer = TuckerConv2d(6, 8, 3, padding=1, rank=3, strategy="factorized")
    x = torch.randn(2, 6, 7, 7)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), reference_conv(layer, x, "tucker"), rtol=1e-4, atol=1e-5)
