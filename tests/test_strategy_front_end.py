"""The one strategy front end (tnlayers.strategy.StrategyChooser): one key for layers and adapters, one
decision per key even when threads ask at once, and "flops" free of any timing or collective.

References: the FLOP rule (factorized iff its estimate is lower) applied to the estimates directly, and
a fake clock whose answers are fixed by the test (tests/_strategy_helpers.py). The 2-process test (rank 0
decides) is in tests/test_distributed.py."""
import copy
import pickle
import threading
import time

import pytest
import torch
from torch import nn

import tnlayers
from tnlayers import strategy as strategy_module
from tnlayers.adapters import LinearAdapter
from tnlayers.strategy import ModuleChoices, StrategyChooser

from _strategy_helpers import fake_timings

pytestmark = pytest.mark.filterwarnings("ignore:.*of the dense nn.* it replaces")


@pytest.fixture(autouse=True)
def fresh_decisions():
    strategy_module.clear_decisions()
    yield
    strategy_module.clear_decisions()


@pytest.fixture
def time_everything(monkeypatch):
    """Every "auto" decision is timed, however small or lopsided the FLOP estimates."""
    monkeypatch.setattr(strategy_module, "MIN_TIMED_FLOPS", 0)
    monkeypatch.setattr(strategy_module, "TRUST_RATIO", float("inf"))


def test_layers_and_adapters_key_their_choices_alike(time_everything, monkeypatch):
    fake_timings(monkeypatch, {"dense": 1.0, "factorized": 2.0})
    layer = tnlayers.TTLinear(16, 16, rank=2)
    adapter = LinearAdapter(nn.Linear(16, 16), "tt", rank=2, init="random")
    x = torch.randn(3, 16)
    layer(x), adapter(x)
    (layer_key,), (adapter_key,) = list(layer._choices), list(adapter._choices)
    # (strategy, shape key, device, dtype, autocast dtype, grad): the same fields in the same order
    assert layer_key == ("auto", 4, x.device, x.dtype, None, True)  # 3 rows round up to 4
    assert adapter_key == ("auto", 3, x.device, x.dtype, None, True)


def test_threads_asking_for_one_key_share_one_timing(time_everything, monkeypatch):
    """Four threads run four identical layers on the same input at once: one timing, one answer."""
    started, calls = threading.Event(), []

    def slow_clock(run, strategy, device):
        started.set()
        time.sleep(0.05)  # keep the timing open while the other threads arrive
        run(strategy)
        calls.append(strategy)
        return {"dense": 2.0, "factorized": 1.0}[strategy]
    monkeypatch.setattr(strategy_module, "_time", slow_clock)
    torch.manual_seed(0)
    layers = [tnlayers.CPConv2d(8, 8, 3, padding=1, rank=4) for _ in range(4)]
    x = torch.randn(2, 8, 6, 6)
    errors = []

    def call(layer):
        try:
            with torch.no_grad():
                layer(x)
        except BaseException as err:  # reported below: an exception in a thread would pass silently
            errors.append(err)
    threads = [threading.Thread(target=call, args=(layer,)) for layer in layers]
    threads[0].start()
    assert started.wait(10)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(calls) == 2 * strategy_module.REPEATS  # one decision's rounds, not one per thread
    assert [layer.last_strategy for layer in layers] == ["factorized"] * 4


def test_a_failed_timing_is_retaken_not_cached():
    chooser = StrategyChooser()
    costs = lambda: (10 ** 8, 6 * 10 ** 7)  # noqa: E731 (within TRUST_RATIO, above MIN_TIMED_FLOPS)

    def broken():
        def run(strategy):
            raise RuntimeError("out of memory")
        return run
    with pytest.raises(RuntimeError, match="out of memory"):
        chooser.decide("k", "auto", costs, broken, torch.device("cpu"))
    assert len(chooser) == 0
    # the key is free again (not left "being timed"): "flops" decides it by the rule alone
    assert chooser.decide("k", "flops", costs, broken, torch.device("cpu")) == "factorized"


def test_a_key_asked_again_from_inside_its_own_timing_does_not_wait_on_itself():
    chooser = StrategyChooser()
    costs = lambda: (10 ** 8, 6 * 10 ** 7)  # noqa: E731
    inner = []

    def make_run():
        def run(strategy):
            if not inner:
                inner.append(chooser.decide("k", "auto", costs, make_run, torch.device("cpu")))
        return run
    outer = chooser.decide("k", "auto", costs, make_run, torch.device("cpu"))
    assert inner == ["factorized"]  # the FLOP rule, at once
    assert outer in ("dense", "factorized")


@pytest.mark.parametrize("module", ["layer", "adapter"])
def test_flops_never_times_and_never_asks_torch_distributed(time_everything, monkeypatch, module):
    """strategy="flops": the FLOP rule alone, so runs and ranks cannot differ (the deterministic mode)."""
    def no_clock(*args):
        raise AssertionError("strategy='flops' must not time")
    monkeypatch.setattr(strategy_module, "_time", no_clock)
    monkeypatch.setattr(strategy_module, "_timed_choice", no_clock)
    monkeypatch.setattr(strategy_module, "_distributed", no_clock)
    monkeypatch.setattr(time, "perf_counter", no_clock)
    torch.manual_seed(0)
    if module == "layer":
        small, big = (tnlayers.TTConv2d(16, 16, 3, padding=1, rank=r, strategy="flops") for r in (2, [1, 16, 16, 1]))
        x = torch.randn(4, 16, 8, 8)
        for layer in (small, big):
            layer(x)
            dense, factorized = layer._costs(x)
            assert layer.last_strategy == ("factorized" if factorized < dense else "dense")
        assert {small.last_strategy, big.last_strategy} == {"dense", "factorized"}  # both outcomes seen
    else:
        adapter = LinearAdapter(nn.Linear(16, 16), "tt", rank=2, init="random", strategy="flops")
        adapter(torch.randn(4, 16))
        assert len(adapter._choices) == 1
    with tnlayers.set_strategy("flops"):  # the global override gives every auto layer the same mode
        auto = tnlayers.CPConv2d(8, 8, 3, padding=1, rank=4)
        auto(torch.randn(2, 8, 6, 6))
        assert [key[0] for key in auto._choices] == ["flops"]


def test_clear_decisions_retakes_a_modules_own_choices_too(time_everything, monkeypatch):
    layer = tnlayers.CPConv2d(8, 8, 3, padding=1, rank=4)
    x = torch.randn(2, 8, 6, 6)
    fake_timings(monkeypatch, {"dense": 1.0, "factorized": 4.0})
    layer(x)
    assert layer.last_strategy == "dense"
    calls = fake_timings(monkeypatch, {"dense": 4.0, "factorized": 1.0})  # the machine changed
    layer(x)
    assert layer.last_strategy == "dense" and calls == []  # remembered
    tnlayers.strategy.clear_decisions()
    layer(x)
    assert layer.last_strategy == "factorized" and calls == ["dense", "factorized"]


def test_a_layer_with_choices_copies_and_pickles(time_everything, monkeypatch):
    fake_timings(monkeypatch, {"dense": 1.0, "factorized": 4.0})
    layer = tnlayers.CPConv2d(8, 8, 3, padding=1, rank=4)
    x = torch.randn(2, 8, 6, 6)
    layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert list(clone._choices) == list(layer._choices)
        torch.testing.assert_close(clone(x), layer(x))


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="config must be a tuple"):
        ModuleChoices(["TTLinear"])
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="max_decisions must be a positive int"):
            StrategyChooser(bad)


def test_the_shared_cache_is_bounded():
    chooser = StrategyChooser(max_decisions=3)
    for i in range(7):
        chooser.decide(i, "flops", lambda: (2, 1), lambda: None, torch.device("cpu"))
        assert 1 <= len(chooser) <= 3


def test_a_layer_pickled_before_module_choices_loads_and_runs():
    """Whole-module pickles from before this front end hold ``_choices`` as a dict next to ``_config``."""
    layer = tnlayers.TTLinear(16, 16, rank=2)
    state = dict(layer.__dict__, _config=layer._choices.config, _choices={("auto", 4): "dense"})
    old = tnlayers.TTLinear.__new__(tnlayers.TTLinear)
    old.__setstate__(state)
    assert isinstance(old._choices, ModuleChoices) and old._choices.config == layer._choices.config
    x = torch.randn(3, 16)
    torch.testing.assert_close(old(x), layer(x))
