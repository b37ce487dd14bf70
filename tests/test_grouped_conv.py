"""Grouped and depthwise convs, and Conv1d/Conv3d, through the rest of the library: tensorize's selection (depthwise
dense by default, by choice) on a torchvision-shaped MobileNetV2, to_dense, summary, the saved configuration, the
strategy choice, and the core groups DAS/SAM/BAR act on."""
import copy
import math
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import tnlayers
from tnlayers import strategy as strategy_module
from tnlayers.layers import (CPConv3d, TensorizedConv1d, TensorizedConv3d, TRConv1d, TTConv1d, TTConv2d, TTConv3d,
                             TuckerConv1d, TuckerConv3d)

from _conv_references import nd_conv_weight
from _mobilenet_v2 import MobileNetV2
from _strategy_helpers import fake_timings


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*adds parameters but no expressiveness")
        warnings.filterwarnings("ignore", message=".*of the dense nn.* it replaces")
        yield
    strategy_module.clear_decisions()


def test_mobilenet_v2_leaves_only_depthwise_and_classifier_dense_by_choice():
    """17 depthwise convs and the classifier stay dense by default (no warning: nothing is unsupported); every other
    conv is tensorized; selecting the depthwise convs tensorizes them too. Forward and backward are finite."""
    torch.manual_seed(0)
    base = MobileNetV2(num_classes=10)
    depthwise = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(base.get_submodule(n).groups == base.get_submodule(n).in_channels
                                        for n in depthwise)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "left dense" would be a warning
        warnings.filterwarnings("ignore", message=".*adds parameters but no expressiveness")
        model = tnlayers.tensorize(copy.deepcopy(base), format="tucker", rank=0.5)
    report = tnlayers.summary(model, print_table=False)
    assert len(report) == 52 - 17 and sorted(report.dense_layers) == sorted(depthwise + ["classifier.1"])
    assert report.params < 0.7 * report.dense_params
    everything = tnlayers.tensorize(copy.deepcopy(base), format="tt", rank=0.5,
                                    filter=lambda name, m: isinstance(m, nn.Conv2d))
    for name in depthwise:
        layer = everything.get_submodule(name)
        assert type(layer) is TTConv2d and layer.groups == layer.in_channels
        assert [c.shape[0] for c in layer.cores] == [9, layer.cores[1].shape[0]]  # (3*3, r), (r, C): across channels
    for net in (model, everything):
        x = torch.randn(2, 3, 32, 32, requires_grad=True)
        net(x).logsumexp(1).sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)


def test_depthwise_layout_has_no_input_modes_and_refuses_in_shape():
    layer = TTConv2d(32, 64, 3, groups=32, rank=4)  # depth multiplier 2: still one input channel per group
    assert layer.in_shape == () and [tuple(c.shape) for c in layer.cores] == [(9, 4), (4, 64)]
    assert layer.weight.shape == (64, 1, 3, 3) and layer.dense_params == 64 * 9 + 64
    assert [tuple(c.shape) for c in CPConv3d(8, 8, 3, groups=8, rank=2).cores] == [(3, 2)] * 3 + [(8, 2)]
    assert [tuple(c.shape) for c in TuckerConv1d(8, 8, 5, groups=8, rank=2).cores] == [(5, 2), (8, 2)]
    assert [tuple(c.shape) for c in TRConv1d(8, 8, 5, groups=8, rank=2).cores] == [(2, 5, 2)] + [(2, 2, 2)] * 3
    with pytest.raises(ValueError, match="in_shape: TTConv2d is depthwise"):
        TTConv2d(4, 4, 3, groups=4, rank=2, in_shape=(1,))
    grouped = TTConv2d(8, 6, 3, groups=2, rank=2)  # 4 input channels per group: input modes as usual
    assert grouped.in_shape == (4,) and grouped.weight.shape == (6, 4, 3, 3)


def test_tensorize_decompose_then_to_dense_gives_back_the_model():
    """Conv1d, grouped Conv1d, Conv3d, depthwise Conv3d (selected): full-rank TT decompositions, then to_dense:
    the nn classes and arguments come back and the model computes what it did."""
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(
        one=nn.Sequential(OrderedDict(a=nn.Conv1d(4, 6, 3, padding=1),
                                      b=nn.Conv1d(6, 9, 3, padding="same", groups=3, padding_mode="reflect"))),
        three=nn.Sequential(OrderedDict(c=nn.Conv3d(9, 8, (1, 3, 3), padding=(0, 1, 1)),
                                        d=nn.Conv3d(8, 8, 3, padding=1, groups=8, padding_mode="replicate",
                                                    bias=False))))).double()
    names = ["one.a", "one.b", "three.c", "three.d"]
    x1, x3 = torch.randn(2, 4, 9, dtype=torch.float64), torch.randn(2, 9, 3, 5, 5, dtype=torch.float64)
    run = lambda net: (net["one"](x1).detach(), net["three"](x3).detach())  # noqa: E731
    expected = run(model)
    tensorized = tnlayers.tensorize(copy.deepcopy(model), rank=9, init="decompose", progress=False, filter=names)
    assert [type(tensorized.get_submodule(n)).__name__ for n in names] == ["TTConv1d", "TTConv1d", "TTConv3d",
                                                                          "TTConv3d"]
    for got, want in zip(run(tensorized), expected):
        assert float((got - want).norm() / want.norm()) < 1e-10
    dense = tnlayers.to_dense(tensorized)
    for name in names:
        new, old = dense.get_submodule(name), model.get_submodule(name)
        assert type(new) is type(old) and (new.bias is None) == (old.bias is None)
        assert all(getattr(new, a) == getattr(old, a) for a in ("in_channels", "out_channels", "kernel_size", "stride",
                                                                "padding", "dilation", "groups", "padding_mode"))
    for got, want in zip(run(dense), expected):
        assert float((got - want).norm() / want.norm()) < 1e-10


def test_summary_counts_the_dense_counterparts():
    model = nn.Sequential(TTConv1d(6, 8, 5, groups=2, rank=2), TuckerConv3d(8, 4, 3, rank=2, bias=False),
                          TTConv2d(8, 16, 3, groups=8, rank=2))
    rows = tnlayers.summary(model, print_table=False).rows
    dense = [nn.Conv1d(6, 8, 5, groups=2), nn.Conv3d(8, 4, 3, bias=False), nn.Conv2d(8, 16, 3, groups=8)]
    assert [r["dense_params"] for r in rows] == [sum(p.numel() for p in m.parameters()) for m in dense]
    assert [r["shape"] for r in rows] == [(3, 5, 8), (8, 3, 3, 3, 4), (9, 16)]


def test_saved_configuration_tells_grouped_from_ungrouped_and_1d_from_2d():
    """Same core shapes, other meaning: refused on load, as a 3x3 kernel read as 1x9 is."""
    grouped, plain = TTConv2d(8, 8, 3, groups=2, rank=2), TTConv2d(4, 8, 3, rank=2)
    assert [c.shape for c in grouped.cores] == [c.shape for c in plain.cores]
    with pytest.raises(ValueError, match="groups differ"):
        plain.load_state_dict(grouped.state_dict())
    one_d, two_d = TTConv1d(4, 8, 9, rank=2), TTConv2d(4, 8, 3, rank=2)
    with pytest.raises(ValueError, match="kernel_size differ"):
        two_d.load_state_dict(one_d.state_dict())
    TTConv2d(8, 8, 3, groups=2, rank=2).load_state_dict(grouped.state_dict())  # the same configuration loads


def test_flops_choose_factorized_where_it_pays_and_dense_for_depthwise():
    """The same strategy machinery for every dims: wide low-rank 1-D and 3-D convs go factorized by the FLOP
    estimate; a depthwise conv (no factorized chain) stays dense."""
    cases = [(TuckerConv1d(128, 128, 9, padding=4, rank=8, strategy="flops"), torch.randn(4, 128, 256), "factorized"),
             (TuckerConv3d(64, 64, 3, padding=1, rank=8, strategy="flops"), torch.randn(2, 64, 6, 12, 12),
              "factorized"),
             (TTConv3d(64, 64, 3, padding=1, groups=64, rank=4, strategy="flops"), torch.randn(2, 64, 6, 12, 12),
              "dense")]
    for layer, x, expected in cases:
        dense_flops, factorized_flops = layer._costs(x)
        taps, pixels = math.prod(layer.kernel_size), x[0, 0].numel()  # 'same' padding: as many pixels out as in
        conv = 2 * x.shape[0] * pixels * layer.out_channels * (layer.in_channels // layer.groups) * taps
        assert dense_flops == layer.plan.weight_cost + conv
        with torch.no_grad():
            layer(x)
        assert layer.last_strategy == expected, (type(layer).__name__, dense_flops, factorized_flops)


@pytest.mark.parametrize("faster", ["dense", "factorized"])
def test_auto_times_1d_and_3d_layers_where_flops_are_close(monkeypatch, faster):
    layer = TensorizedConv3d(32, 32, 3, padding=1, rank=100, format="cp")
    x = torch.randn(4, 32, 8, 8, 8)
    dense_flops, factorized_flops = layer._costs(x)
    assert max(dense_flops, factorized_flops) < strategy_module.TRUST_RATIO * min(dense_flops, factorized_flops)
    calls = fake_timings(monkeypatch, {faster: 1.0, {"dense": "factorized", "factorized": "dense"}[faster]: 2.0})
    y = layer(x)
    assert layer.last_strategy == faster and calls
    weight = nd_conv_weight("cp", [c.detach() for c in layer.cores], 32, 32, (3, 3, 3))
    torch.testing.assert_close(y, nn.functional.conv3d(x, weight, layer.bias, padding=1), rtol=1e-4, atol=1e-4)
    one_d = TensorizedConv1d(64, 64, 5, padding=2, rank=60, format="cp")
    x1 = torch.randn(8, 64, 256)
    assert one_d._costs(x1)[1] is not None
    one_d(x1)
    assert one_d.last_strategy == faster


def test_core_groups_and_bar_act_on_the_new_layers():
    """Each new layer is one core group; BAR balances its cores (plain SGD, from the same start, does not)."""
    torch.manual_seed(0)
    model = nn.Sequential(TTConv1d(4, 6, 3, groups=2, rank=3), nn.Unflatten(2, (1, 1, 6)),
                          TuckerConv3d(6, 6, 1, groups=3, rank=2), CPConv3d(6, 6, 1, groups=6, rank=2))
    for layer in (model[0], model[2], model[3]):
        with torch.no_grad():
            layer.cores[0].mul_(4.0)
            layer.cores[1].div_(4.0)  # the same weight, unbalanced cores
    groups = tnlayers.core_groups(model)
    assert [(n, len(c)) for n, c in groups] == [("0", 3), ("2", 3), ("3", 4)]
    x = torch.randn(3, 4, 8)

    def train(make):
        net = copy.deepcopy(model)
        opt = make(net.parameters())
        for _ in range(5):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
        return [float(tnlayers.norm_deviation(net[i].cores)) for i in (0, 2, 3)]
    sgd = train(lambda p: torch.optim.SGD(p, lr=0.01))
    bar = train(lambda p: tnlayers.BAR(p, torch.optim.SGD, alpha=0.5, total_steps=5, lr=0.01))
    das = train(lambda p: tnlayers.DAS(p, torch.optim.SGD, alpha=0.5, lr=0.01))
    assert all(b < 0.97 * s for b, s in zip(bar, sgd)), (bar, sgd)  # measured: 0.94x, 0.94x, 0.94x
    assert all(math.isfinite(d) for d in das)
