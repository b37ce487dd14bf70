"""set_recompute: a factorized layer keeps only its input for backward (like nn.Conv2d / nn.Linear) and reruns the
chain there; values and gradients are those of the reference weight's dense op."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import tnlayers
from _references import conv_weight, linear_weight
from _strategy_helpers import fake_timings

FORMATS = ["tt", "tr", "cp", "tucker"]


def held_bytes(module, x) -> int:
    """Bytes still allocated after a forward (its output and whatever autograd keeps for backward), from the
    profiler's allocator events: allocations minus frees over the forward."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = module(x)
    del y
    return sum(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("fmt", FORMATS)
def test_recomputed_conv_holds_no_more_than_nn_conv(fmt):
    torch.manual_seed(0)
    layer = tnlayers.TensorizedConv2d(32, 32, 3, padding=1, rank=0.2, format=fmt, strategy="factorized")
    x = torch.randn(8, 32, 16, 16, requires_grad=True)
    reference = held_bytes(torch.nn.Conv2d(32, 32, 3, padding=1), x)  # the output; x and W are held elsewhere
    assert held_bytes(layer, x) > reference  # the chain's intermediates: the measure sees them
    assert tnlayers.set_recompute(layer) == 1 and layer.recompute
    assert held_bytes(layer, x) <= reference


def test_recomputed_linear_holds_no_more_than_nn_linear():
    torch.manual_seed(0)
    layer = tnlayers.TTLinear(64, 64, rank=4, strategy="factorized")
    x = torch.randn(256, 64, requires_grad=True)
    reference = held_bytes(torch.nn.Linear(64, 64), x)
    assert held_bytes(layer, x) > reference
    tnlayers.set_recompute(layer)
    assert held_bytes(layer, x) <= reference


@pytest.mark.parametrize("fmt", FORMATS)
def test_recomputed_conv_gradients_match_the_dense_conv(fmt):
    torch.manual_seed(0)
    layer = tnlayers.TensorizedConv2d(6, 8, 3, padding=1, rank=3, format=fmt, strategy="factorized",
                                      dtype=torch.float64)
    tnlayers.set_recompute(layer)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    params = [x, *layer.cores, layer.bias]
    y = layer(x)
    got = torch.autograd.grad(y.square().sum(), params)
    want_y = F.conv2d(x, conv_weight(fmt, list(layer.cores), 8, 6, 3, 3), layer.bias, padding=1)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-12)
    for g, w in zip(got, torch.autograd.grad(want_y.square().sum(), params)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_recomputed_linear_gradients_match_f_linear():
    torch.manual_seed(0)
    layer = tnlayers.TuckerLinear(12, 10, rank=3, strategy="factorized", dtype=torch.float64)
    tnlayers.set_recompute(layer)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    params = [x, *layer.cores, layer.bias]
    y = layer(x)
    got = torch.autograd.grad(y.square().sum(), params)
    want_y = F.linear(x, linear_weight("tucker", list(layer.cores), 10, 12), layer.bias)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-12)
    for g, w in zip(got, torch.autograd.grad(want_y.square().sum(), params)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_auto_times_the_recomputed_chain_as_a_choice_of_its_own(monkeypatch):
    """auto's timing runs the chain as training will run it: with recompute on, a new timing whose factorized
    run goes through the checkpoint."""
    import tnlayers.strategy as strategy_module
    import tnlayers.layers.tensorized as tensorized
    monkeypatch.setattr(strategy_module, "MIN_TIMED_FLOPS", 0)  # time even this small layer
    monkeypatch.setattr(strategy_module, "TRUST_RATIO", float("inf"))
    timed = fake_timings(monkeypatch, {"dense": 2.0, "factorized": 1.0})
    checkpointed = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(tensorized.torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: checkpointed.append(1) or real(*a, **k))
    layer = tnlayers.TTConv2d(16, 16, 3, padding=1, rank=4, strategy="auto")
    x = torch.randn(4, 16, 12, 12)
    layer(x).sum().backward()
    assert set(timed) == {"dense", "factorized"} and not checkpointed
    del timed[:]
    tnlayers.set_recompute(layer)
    layer(x).sum().backward()
    assert timed and len(layer._choices) == 2  # a second key, timed again
    assert len(checkpointed) >= 2  # the timing's factorized run and the training forward


def test_recompute_checkpoints_only_when_there_is_a_graph_to_record(monkeypatch):
    """Frozen cores and an input without grad (grad mode on), or no_grad: nothing to save, so no checkpoint; the
    output is the reference conv's either way."""
    import tnlayers.layers.tensorized as tensorized
    checkpointed = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(tensorized.torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: checkpointed.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = tnlayers.TTConv2d(6, 8, 3, padding=1, rank=3, strategy="factorized", dtype=torch.float64)
    tnlayers.set_recompute(layer)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    want = F.conv2d(x, conv_weight("tt", [c.detach() for c in layer.cores], 8, 6, 3, 3), layer.bias.detach(),
                    padding=1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-12)
    layer.requires_grad_(False)
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-12)
    assert not checkpointed
    layer(x.requires_grad_())  # an input that needs its gradient: checkpointed
    assert checkpointed


def test_recompute_compiles_with_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = tnlayers.TTConv2d(6, 8, 3, padding=1, rank=3, strategy="factorized")
    tnlayers.set_recompute(layer)
    x = torch.randn(2, 6, 7, 7)
    got_y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    got = torch.autograd.grad(got_y.square().sum(), list(layer.cores))
    want_y = F.conv2d(x, conv_weight("tt", list(layer.cores), 8, 6, 3, 3), layer.bias, padding=1)
    torch.testing.assert_close(got_y, want_y, rtol=1e-4, atol=1e-5)
    for g, w in zip(got, torch.autograd.grad(want_y.square().sum(), list(layer.cores))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_set_recompute_walks_a_model_and_turns_off():
    net = torch.nn.Sequential(tnlayers.TTConv2d(8, 8, 3, rank=2), torch.nn.ReLU(), torch.nn.Flatten(),
                              tnlayers.CPLinear(8 * 36, 16, rank=2), torch.nn.Linear(16, 4))
    layers = [m for m in net.modules() if isinstance(m, tnlayers.layers.tensorized.TensorizedLayer)]
    assert tnlayers.set_recompute(net) == len(layers) == 2 and all(m.recompute for m in layers)
    assert tnlayers.set_recompute(net, False) == 2 and not any(m.recompute for m in layers)
    assert tnlayers.set_recompute(torch.nn.ReLU()) == 0


@pytest.mark.parametrize("args,match", [((None,), "nn.Module"), ((torch.nn.ReLU(), 1), "enabled must be a bool")])
def test_set_recompute_refuses_bad_arguments(args, match):
    with pytest.raises(TypeError, match=match):
        tnlayers.set_recompute(*args)
