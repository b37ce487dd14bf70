"""The eight layers against nn.Conv2d / nn.Linear and independent einsum references."""
import copy
import io
import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import tnlayers
from tnlayers import (CPConv2d, CPLinear, TRConv2d, TRLinear, TTConv2d, TTLinear, TuckerConv2d,
                      TuckerLinear)

from _references import conv_weight, linear_weight

CONVS = {"tt": TTConv2d, "tr": TRConv2d, "cp": CPConv2d, "tucker": TuckerConv2d}
LINEARS = {"tt": TTLinear, "tr": TRLinear, "cp": CPLinear, "tucker": TuckerLinear}
BIG = {"tt": 512, "tr": 512, "tucker": 64}  # ranks at or above the maximal useful one


@pytest.fixture(autouse=True)
def _quiet_excess_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*adds parameters but no expressiveness")
        warnings.filterwarnings("ignore", message=".*of the dense nn.* it replaces")  # small shapes, high ranks
        yield


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


CONV_GRID = [  # in, out, kernel, stride, padding, dilation, bias, input HxW
    (4, 6, 3, 1, 1, 1, True, (7, 7)),
    (8, 4, (3, 1), (2, 1), (1, 0), 1, False, (9, 6)),
    (6, 8, 5, 2, 2, (2, 1), True, (13, 11)),
    (3, 16, 1, 1, 0, 1, True, (5, 5)),
    (16, 16, 3, 1, "same", 2, True, (8, 10)),
    (12, 8, (2, 4), 1, "same", 1, False, (6, 7)),
    (8, 8, 3, 3, "valid", 1, True, (10, 10)),
]


@pytest.mark.parametrize("fmt", CONVS)
@pytest.mark.parametrize("cfg", CONV_GRID)
def test_conv_matches_nn_and_reference(fmt, cfg):
    c_in, c_out, k, stride, padding, dilation, bias, hw = cfg
    torch.manual_seed(0)
    layer = CONVS[fmt](c_in, c_out, k, stride, padding, dilation, bias=bias, rank=3, dtype=torch.float64)
    dense = nn.Conv2d(c_in, c_out, k, stride, padding, dilation, bias=bias, dtype=torch.float64)
    kh, kw = dense.kernel_size
    expected_weight = conv_weight(fmt, [c.detach() for c in layer.cores], c_out, c_in, kh, kw)
    torch.testing.assert_close(layer.weight, expected_weight)
    with torch.no_grad():
        dense.weight.copy_(expected_weight)
        if bias:
            dense.bias.copy_(layer.bias)
    x = torch.randn(2, c_in, *hw, dtype=torch.float64)
    expected = dense(x)
    for strategy in ("dense", "factorized", "auto"):
        layer.strategy = strategy
        y = layer(x)
        assert y.shape == expected.shape
        assert rel(y, expected) < 1e-10, strategy


@pytest.mark.parametrize("fmt", CONVS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_factorized_conv_first_and_second_order_gradients_match_reference(fmt, memory_format):
    """The factorized chain (1x1 maps as batched GEMMs on NCHW CPU input, as convs otherwise) against
    F.conv2d with the reference weight: output, gradients of input, cores and bias, and a second-order
    gradient (what Hessian-vector products and gradient penalties take)."""
    torch.manual_seed(0)
    layer = CONVS[fmt](6, 8, 3, stride=2, padding=1, rank=3, dtype=torch.float64, strategy="factorized")
    x = torch.randn(3, 6, 9, 7, dtype=torch.float64).to(memory_format=memory_format).requires_grad_()
    params = [x, *layer.cores, layer.bias]

    def outputs(forward):
        y = forward(x)
        first = torch.autograd.grad(y.pow(2).sum(), params, create_graph=True)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in first), params)
        return y, *first, *second

    def reference(inp):
        weight = conv_weight(fmt, list(layer.cores), 8, 6, 3, 3)
        return nn.functional.conv2d(inp, weight, layer.bias, stride=2, padding=1)

    for ours, expected in zip(outputs(layer), outputs(reference)):
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-11)


LINEAR_GRID = [(64, 48, True, (5, 64)), (16, 32, False, (2, 3, 16)), (12, 7, True, (12,)), (30, 30, True, (1, 30))]


@pytest.mark.parametrize("fmt", LINEARS)
@pytest.mark.parametrize("cfg", LINEAR_GRID)
def test_linear_matches_nn_and_reference(fmt, cfg):
    n_in, n_out, bias, x_shape = cfg
    torch.manual_seed(0)
    layer = LINEARS[fmt](n_in, n_out, bias, rank=3, dtype=torch.float64)
    dense = nn.Linear(n_in, n_out, bias, dtype=torch.float64)
    expected_weight = linear_weight(fmt, [c.detach() for c in layer.cores], n_out, n_in)
    torch.testing.assert_close(layer.weight, expected_weight)
    with torch.no_grad():
        dense.weight.copy_(expected_weight)
        if bias:
            dense.bias.copy_(layer.bias)
    x = torch.randn(*x_shape, dtype=torch.float64)
    for strategy in ("dense", "factorized", "auto"):
        layer.strategy = strategy
        y = layer(x)
        assert y.shape == dense(x).shape
        torch.testing.assert_close(y, dense(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt", CONVS)
def test_dense_and_factorized_agree_float32(fmt):
    torch.manual_seed(3)
    layer = CONVS[fmt](16, 32, 3, stride=2, padding=1, rank=6)
    x = torch.randn(4, 16, 15, 15)
    layer.strategy = "dense"
    a = layer(x)
    layer.strategy = "factorized"
    assert rel(layer(x), a) < 1e-5


@pytest.mark.parametrize("fmt", ["tt", "tr", "tucker"])
@pytest.mark.parametrize("padding,mode", [(1, "zeros"), ("same", "reflect"), (2, "circular"), (1, "replicate")])
def test_conv_from_dense_max_rank_reproduces_module(fmt, padding, mode):
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 12, 3, padding=padding, padding_mode=mode)
    layer = CONVS[fmt].from_dense(dense, rank=BIG[fmt])
    x = torch.randn(2, 8, 9, 9)
    assert layer.decomposition_error < 1e-5
    for strategy in ("dense", "factorized"):
        layer.strategy = strategy
        assert rel(layer(x), dense(x)) < 1e-4


@pytest.mark.parametrize("fmt", ["tt", "tr", "tucker"])
def test_linear_from_dense_max_rank_reproduces_module(fmt):
    torch.manual_seed(0)
    dense = nn.Linear(24, 20)
    layer = LINEARS[fmt].from_dense(dense, rank=BIG[fmt])
    x = torch.randn(5, 24)
    assert rel(layer(x), dense(x)) < 1e-4


def test_cp_recovers_a_cp_weight_and_error_falls_with_rank():
    torch.manual_seed(0)
    factors = [torch.randn(n, 5, dtype=torch.float64) for n in (8, 3, 3, 12)]
    dense = nn.Conv2d(8, 12, 3, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(torch.einsum("ir,hr,wr,or->oihw", *factors))
    errors = [CPConv2d.from_dense(dense, rank=r).decomposition_error for r in (1, 2, 3, 4, 5)]
    assert errors[-1] < 1e-3
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    assert rel(CPConv2d.from_dense(dense, rank=5)(x), dense(x)) < 1e-3


def test_cp_linear_error_falls_with_rank():  # CP-ALS up to rank 64: ~1 s (was 30-110 s with tensorly's)
    torch.manual_seed(0)
    dense = nn.Linear(16, 16, dtype=torch.float64)
    errors = [CPLinear.from_dense(dense, rank=r).decomposition_error for r in (1, 4, 16, 64)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


ALL_LAYERS = [(cls, (8, 12, 3), dict(padding=1)) for cls in CONVS.values()] + \
             [(cls, (16, 12), {}) for cls in LINEARS.values()]


def _input(layer):
    return torch.randn(3, 8, 6, 6) if isinstance(layer, nn.Conv2d) or hasattr(layer, "kernel_size") \
        else torch.randn(3, 16)


@pytest.mark.parametrize("cls,args,kwargs", ALL_LAYERS)
@pytest.mark.parametrize("strategy", ["dense", "factorized"])
def test_gradients_reach_every_core(cls, args, kwargs, strategy):
    torch.manual_seed(0)
    layer = cls(*args, rank=3, strategy=strategy, **kwargs)
    layer(_input(layer)).pow(2).sum().backward()
    for k, core in enumerate(layer.cores):
        assert core.grad is not None and torch.isfinite(core.grad).all() and core.grad.abs().sum() > 0, k
    assert layer.bias.grad is not None


@pytest.mark.parametrize("cls,args,kwargs", ALL_LAYERS)
def test_scale_invariance(cls, args, kwargs):
    torch.manual_seed(0)
    layer = cls(*args, rank=3, dtype=torch.float64, **kwargs)
    x = _input(layer).double()
    before = layer(x).detach()
    n = len(layer.cores)
    for i, j in itertools.permutations(range(n), 2):
        with torch.no_grad():
            layer.cores[i].mul_(2.5)
            layer.cores[j].div_(2.5)
        torch.testing.assert_close(layer(x), before)


@pytest.mark.parametrize("cls,args,kwargs", ALL_LAYERS)
def test_state_dict_round_trip(cls, args, kwargs):
    torch.manual_seed(0)
    a = cls(*args, rank=3, **kwargs)
    torch.manual_seed(1)
    b = cls(*args, rank=3, **kwargs)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    x = _input(a)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    assert set(a.state_dict()) == {f"cores.{k}" for k in range(len(a.cores))} | {"bias"}


def test_deepcopy_and_pickle_keep_groups_marked_and_distinct():
    model = nn.Sequential(TTConv2d(4, 4, 3, rank=2), nn.ReLU(), TRConv2d(4, 4, 3, rank=2))
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (model, clone, loaded):
        tokens = [{tnlayers.groups.group_of(p) for p in cores} for _, cores in tnlayers.core_groups(m)]
        assert all(len(t) == 1 and None not in t for t in tokens)
        assert len({t.pop() for t in tokens}) == 2
    groups, rest = tnlayers.groups.split_by_group(list(model.parameters()) + list(clone.parameters()))
    assert len(groups) == 4 and len(rest) == 4  # the biases


def test_core_groups_order_and_non_core_params():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), TuckerConv2d(8, 8, 3, rank=4), nn.BatchNorm2d(8),
                          nn.Sequential(TTConv2d(8, 8, 3, rank=2)), nn.Flatten(), TTLinear(8, 10, rank=2))
    groups = tnlayers.core_groups(model)
    assert [name for name, _ in groups] == ["1", "3.0", "5"]
    core_ids = {id(p) for _, cores in groups for p in cores}
    for name, p in model.named_parameters():
        assert (id(p) in core_ids) == (".cores." in name), name


def test_excess_rank_kept_and_warned_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = TTConv2d(48, 96, 3, rank=[1, 100, 50, 1])  # a configuration no other test builds
        TTConv2d(48, 96, 3, rank=[1, 100, 50, 1])
    excess = [w for w in caught if "no expressiveness" in str(w.message)]
    assert len(excess) == 1 and "r1=100 > 48" in str(excess[0].message)
    assert [tuple(c.shape) for c in a.cores] == [(48, 100), (100, 9, 50), (50, 96)]


def test_paper_tr_shapes_and_explicit_shapes():
    stem = TRConv2d(3, 16, 3, padding=1, rank=15)
    assert stem.network.modes == (3, 9, 4, 2, 2)
    block = TRConv2d(16, 32, 3, padding=1, rank=15)
    assert block.network.modes == (4, 2, 2, 9, 4, 4, 2)
    custom = TTLinear(4096, 4096, rank=16, in_shape=(4, 4, 16, 16), out_shape=(16, 16, 4, 4))
    assert custom.network.modes == (4, 4, 16, 16, 16, 16, 4, 4)


def test_float_rank_keeps_fraction_of_dense_params():
    for cls in CONVS.values():
        layer = cls(32, 64, 3, rank=0.1)
        assert layer.network.num_params <= 0.1 * 32 * 64 * 9
        assert layer.network.num_params > 0.02 * 32 * 64 * 9


def test_flops_strategy_picks_cheaper_per_input_shape():
    cheap = TTConv2d(64, 64, 3, padding=1, rank=4, strategy="flops")
    big = TTConv2d(64, 64, 3, padding=1, rank=[1, 64, 64, 1], strategy="flops")
    x = torch.randn(16, 64, 16, 16)
    cheap(x), big(x)  # factorized: 1x1 + 3x3 + 1x1 at full rank costs more than one dense 3x3 conv
    assert (cheap.last_strategy, big.last_strategy) == ("factorized", "dense")
    assert [key[1] for key in cheap._choices] == [(16, 64, 16, 16)]


def test_unbatched_conv_input():
    layer = CPConv2d(4, 6, 3, padding=1, rank=3)
    x = torch.randn(4, 5, 5)
    torch.testing.assert_close(layer(x), layer(x[None])[0])


@pytest.mark.parametrize("weight_std, dense_init", [
    ("nn", lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5))),  # the default: nn's own default init
    ("kaiming_normal", nn.init.kaiming_normal_)])
def test_variance_preserving_init(weight_std, dense_init):
    """The reconstructed weight's std matches the dense layer's init (nn's default, or kaiming_normal_ by
    name) within 10%, estimated as the root of the mean square over many seeds (products of cores are
    heavy-tailed)."""
    configs = [(cls, (16, 32, 3), r) for cls in CONVS.values() for r in (2, 8)] + \
              [(cls, (64, 48), r) for cls in LINEARS.values() for r in (2, 6)]
    for cls, args, rank in configs:
        layer = cls(*args, rank=rank, weight_std=weight_std)
        dense = (nn.Conv2d if len(args) == 3 else nn.Linear)(*args)
        reference = torch.stack([dense_init(torch.empty_like(dense.weight)).pow(2).mean()
                                 for _ in range(20)]).mean().sqrt()
        squares = []
        for seed in range(600 if cls in (CPLinear, CPConv2d) else 150):
            torch.manual_seed(seed)
            layer.reset_parameters()
            squares.append(layer.weight.detach().pow(2).mean())
        std = torch.stack(squares).mean().sqrt()
        assert abs(float(std / reference) - 1) < 0.10, (cls.__name__, rank, float(std / reference))


BAD = [
    (lambda: TTConv2d(4, 3, 3, groups=2, rank=2), ValueError, "groups=2 must divide"),
    (lambda: TTConv2d(4, 4, 3, rank=0), ValueError, "rank"),
    (lambda: TTConv2d(4, 4, 3, rank="big"), TypeError, "rank"),
    (lambda: TTConv2d(4, 4, 3, rank=None), TypeError, "rank"),
    (lambda: TRConv2d(4, 4, 3, rank=1.2), ValueError, r"\(0, 1\]"),
    (lambda: TRConv2d(4, 4, 3, rank=-0.5), ValueError, r"\(0, 1\]"),
    (lambda: TRConv2d(16, 4, 3, rank=2, in_shape=(4, 3)), ValueError, "in_shape"),
    (lambda: TTLinear(16, 4, rank=2, out_shape=(3,)), ValueError, "out_shape"),
    (lambda: TTLinear(16, 4, rank=2, in_shape="44"), TypeError, "in_shape"),
    (lambda: tnlayers.TensorizedConv2d(4, 4, 3, rank=2, format="ht"), ValueError, "format must be one of"),
    (lambda: tnlayers.TensorizedLinear(4, 4, rank=2), TypeError, "format"),
    (lambda: TTConv2d(4, 4, 3, rank=2, format="cp"), ValueError, "format"),
    (lambda: TTConv2d(4, 4, 3, stride=2, padding="same", rank=2), ValueError, "padding='same'"),
    (lambda: TTConv2d(4, 4, 3, padding="full", rank=2), ValueError, "padding"),
    (lambda: TTConv2d(4, 4, 3, padding_mode="mirror", rank=2), ValueError, "padding_mode"),
    (lambda: TTConv2d(4, 4, 0, rank=2), ValueError, "kernel_size"),
    (lambda: TTConv2d(0, 4, 3, rank=2), ValueError, "in_channels"),
    (lambda: TTConv2d(4, 4, 3, rank=2, strategy="fast"), ValueError, "strategy"),
    (lambda: TuckerConv2d(4, 4, 3, rank=[2, 2, 2]), ValueError, "tucker rank"),
    (lambda: TTConv2d(4, 4, 3, rank=2)(torch.randn(2, 4, 5)), ValueError, r"\(N, 4, H, W\)"),
    (lambda: TTConv2d(4, 4, 3, rank=2)(torch.randn(1, 2, 4, 5, 5)), ValueError, "expects input"),
    (lambda: TTConv2d(4, 4, 3, rank=2)(torch.randn(1, 3, 5, 5)), ValueError, "expects input"),
    (lambda: TTLinear(8, 4, rank=2)(torch.randn(3, 7)), ValueError, r"\(\*, 8\)"),
    (lambda: TTLinear(8, 4, rank=2)(torch.tensor(1.0)), ValueError, "expects input"),
    (lambda: TTConv2d.from_dense(nn.Linear(4, 4), rank=2), TypeError, "nn.Conv2d"),
    (lambda: TTLinear.from_dense(nn.Conv2d(4, 4, 1), rank=2), TypeError, "nn.Linear"),
]


@pytest.mark.parametrize("make,error,match", BAD)
def test_bad_input_raises_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_norm_deviation_matches_formula():
    torch.manual_seed(0)
    layer = TTConv2d(8, 8, 3, rank=4)
    s = [float(c.detach().pow(2).sum()) for c in layer.cores]
    mean = sum(s) / len(s)
    expected = sum((v - mean) ** 2 for v in s)
    pairwise = sum((a - b) ** 2 for a in s for b in s) / (2 * len(s))
    assert abs(float(tnlayers.norm_deviation(layer.cores).detach()) - expected) < 1e-6 * expected
    assert abs(expected - pairwise) < 1e-6 * expected
    report = tnlayers.norm_report(nn.Sequential(layer, nn.ReLU(), TRConv2d(8, 8, 1, rank=2)))
    assert set(report) == {"0", "2"} and abs(report["0"] - expected) < 1e-6 * expected


@pytest.mark.parametrize("cls,args,kwargs", ALL_LAYERS)
@pytest.mark.parametrize("strategy", ["dense", "factorized"])
def test_bf16_autocast_with_fp32_cores(cls, args, kwargs, strategy):
    torch.manual_seed(0)
    layer = cls(*args, rank=3, strategy=strategy, **kwargs)
    x = _input(layer)
    reference = layer(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel(y.float(), reference) < 3e-2
    y.float().pow(2).sum().backward()
    assert all(c.grad is not None and c.grad.dtype == torch.float32 for c in layer.cores)


@pytest.mark.parametrize("cls,args,kwargs", ALL_LAYERS)
def test_module_conversions_keep_the_layer_working(cls, args, kwargs):
    torch.manual_seed(0)
    layer = cls(*args, rank=3, **kwargs)
    x = _input(layer)
    expected = layer(x).double()
    layer.to(torch.float64)
    assert all(c.dtype == torch.float64 for c in layer.cores)
    torch.testing.assert_close(layer(x.double()), expected, rtol=1e-5, atol=1e-6)
    layer.float().train(False).requires_grad_(False)
    assert layer(x).dtype == torch.float32
    assert tnlayers.groups.group_of(layer.cores[0]) is not None
