"""TensorizedConv1d/2d/3d, grouped and depthwise included, against nn's conv with the weight rebuilt from the cores
by an einsum written out in tests/_conv_references.py: forward and gradients (input, cores, bias) in float64,
both strategies, over a hypothesis grid of dims, formats, stride, padding ('same'/'valid'/ints), dilation, padding
mode, groups and odd channel counts."""
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from tnlayers.layers import (CPConv1d, CPConv3d, TensorizedConv1d, TensorizedConv2d, TensorizedConv3d, TRConv1d,
                             TRConv3d, TTConv1d, TTConv3d, TuckerConv1d, TuckerConv3d)

from _conv_references import nd_conv_weight, reference_conv

CLASSES = {1: TensorizedConv1d, 2: TensorizedConv2d, 3: TensorizedConv3d}
FORMATS = ("tt", "tr", "cp", "tucker")
TOL = 1e-10


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # excess-rank and larger-than-dense warnings at these tiny shapes
        yield


def rel(a, b):
    return float((a - b).detach().norm() / max(float(b.detach().norm()), 1e-300))


@st.composite
def conv_configs(draw, dims=None):
    n = draw(st.sampled_from([1, 2, 3])) if dims is None else dims
    per_dim = lambda s: tuple(draw(s) for _ in range(n))  # noqa: E731
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_in = groups * draw(st.sampled_from([1, 2, 3, 5]))  # odd counts; 1 per group with groups > 1: depthwise
    c_out = groups * draw(st.sampled_from([1, 2, 3]))
    kernel = per_dim(st.integers(1, 3 if n == 3 else 4))
    stride = per_dim(st.integers(1, 2))
    dilation = per_dim(st.integers(1, 2))
    kind = draw(st.sampled_from(["int", "tuple", "valid"] + (["same"] if all(s == 1 for s in stride) else [])))
    padding = {"int": lambda: draw(st.integers(0, 2)), "tuple": lambda: per_dim(st.integers(0, 2))}.get(
        kind, lambda: kind)()
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    pads = (0,) * n if padding == "valid" else (padding,) * n if isinstance(padding, int) else \
        tuple(d * (k - 1) for d, k in zip(dilation, kernel)) if padding == "same" else padding
    # big enough for the dilated kernel and for reflect padding (pad < size)
    size = tuple(max(d * (k - 1) + 1, p + 1) + draw(st.integers(0, 3))
                 for d, k, p in zip(dilation, kernel, pads))
    return dict(n=n, fmt=draw(st.sampled_from(FORMATS)), c_in=c_in, c_out=c_out, kernel=kernel, stride=stride,
                padding=padding, dilation=dilation, groups=groups, mode=mode, bias=draw(st.booleans()),
                rank=draw(st.integers(1, 3)), batch=draw(st.integers(1, 2)), size=size)


def build(cfg, **kwargs):
    return CLASSES[cfg["n"]](cfg["c_in"], cfg["c_out"], cfg["kernel"], cfg["stride"], cfg["padding"],
                             cfg["dilation"], cfg["groups"], cfg["bias"], cfg["mode"], dtype=torch.float64,
                             rank=cfg["rank"], format=cfg["fmt"], **kwargs)


def check_forward_and_gradients(layer, x, depthwise=False):
    """Both strategies (a depthwise layer has only dense): output and the gradients of a fixed random functional
    against the reference."""
    leaves = [x, *layer.cores] + ([layer.bias] if layer.bias is not None else [])
    expected = reference_conv(layer, x)
    probe = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * probe).sum(), leaves)
    for strategy in ("dense",) if depthwise else ("dense", "factorized"):
        layer.strategy = strategy
        y = layer(x)
        assert layer.last_strategy == strategy
        assert y.shape == expected.shape
        assert rel(y, expected) <= TOL, strategy
        for got, want in zip(torch.autograd.grad((y * probe).sum(), leaves), expected_grads):
            assert rel(got, want) <= TOL, strategy


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=conv_configs())
def test_layer_equals_nn_conv_with_reconstructed_weight(cfg):
    torch.manual_seed(0)
    layer = build(cfg)
    x = torch.randn(cfg["batch"], cfg["c_in"], *cfg["size"], dtype=torch.float64, requires_grad=True)
    depthwise = cfg["groups"] > 1 and cfg["c_in"] == cfg["groups"]
    weight = nd_conv_weight(cfg["fmt"], [c.detach() for c in layer.cores], cfg["c_out"],
                            cfg["c_in"] // cfg["groups"], cfg["kernel"], depthwise)
    assert rel(layer.weight, weight) <= TOL and layer.weight.shape == weight.shape
    check_forward_and_gradients(layer, x, depthwise)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_on_a_fixed_grid(n, fmt):
    """A fixed corner of the grid per dims and format (odd channels, asymmetric 'same', reflect, stride 2, groups),
    so each combination runs on every test run, not only when hypothesis draws it."""
    cases = [dict(c_in=5, c_out=7, kernel=3, stride=2, padding=1, dilation=1, groups=1, mode="zeros"),
             dict(c_in=6, c_out=9, kernel=(2,) * n, stride=1, padding="same", dilation=1, groups=3, mode="reflect"),
             dict(c_in=6, c_out=4, kernel=3, stride=1, padding="same", dilation=2, groups=2, mode="replicate"),
             dict(c_in=4, c_out=8, kernel=3, stride=1, padding="valid", dilation=1, groups=4, mode="zeros"),
             dict(c_in=3, c_out=3, kernel=1, stride=1, padding=0, dilation=1, groups=3, mode="circular")]
    for case in cases:
        torch.manual_seed(1)
        cfg = dict(case, n=n, fmt=fmt, bias=True, rank=3)
        cfg["kernel"] = (cfg["kernel"],) * n if isinstance(cfg["kernel"], int) else cfg["kernel"]
        layer = build(cfg)
        x = torch.randn(2, cfg["c_in"], *(7,) * n, dtype=torch.float64, requires_grad=True)
        check_forward_and_gradients(layer, x, depthwise=case["groups"] == case["c_in"] > 1)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_unbatched_input_and_channels_last(n):
    torch.manual_seed(0)
    layer = CLASSES[n](6, 8, 3, padding=1, rank=3, format="tucker", dtype=torch.float64)
    x = torch.randn(6, *(5,) * n, dtype=torch.float64)
    for strategy in ("dense", "factorized"):
        layer.strategy = strategy
        assert rel(layer(x), reference_conv(layer, x.unsqueeze(0)).squeeze(0)) <= TOL
    if n > 1:  # the factorized chain keeps the input's memory format, as nn does
        fmt = torch.channels_last if n == 2 else torch.channels_last_3d
        xl = torch.randn(2, 6, *(5,) * n, dtype=torch.float64).contiguous(memory_format=fmt)
        layer.strategy = "factorized"
        y = layer(xl)
        assert y.is_contiguous(memory_format=fmt) and rel(y, reference_conv(layer, xl)) <= TOL


def test_named_classes_fix_their_format_and_core_shapes():
    """The thin names: format fixed, core shapes as each format's layout says (k = 5 in 1-D, 3x3x3 in 3-D)."""
    shapes = {TTConv1d: [(16, 4), (4, 5, 4), (4, 32)], CPConv1d: [(16, 4), (5, 4), (32, 4)],
              TuckerConv1d: [(4, 5, 4), (16, 4), (32, 4)],
              TRConv1d: [(4, 4, 4), (4, 2, 4), (4, 2, 4), (4, 5, 4), (4, 4, 4), (4, 4, 4), (4, 2, 4)],
              TTConv3d: [(16, 4), (4, 27, 4), (4, 32)], CPConv3d: [(16, 4), (3, 4), (3, 4), (3, 4), (32, 4)],
              TuckerConv3d: [(4, 3, 3, 3, 4), (16, 4), (32, 4)],
              TRConv3d: [(4, 4, 4), (4, 2, 4), (4, 2, 4), (4, 27, 4), (4, 4, 4), (4, 4, 4), (4, 2, 4)]}
    for cls, expected in shapes.items():
        k = 5 if cls.SPATIAL_DIMS == 1 else 3
        layer = cls(16, 32, k, rank=4)
        assert layer.format == cls.FORMAT and [tuple(c.shape) for c in layer.cores] == expected, cls.__name__
        assert layer.weight.shape == (32, 16, *(k,) * cls.SPATIAL_DIMS)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("fmt", FORMATS)
def test_init_std_matches_nn_for_grouped_and_depthwise(n, fmt):
    """weight_std="nn": the rebuilt weight's std is nn's default 1/sqrt(3 fan_in), fan_in = C_in/groups * taps."""
    for c_in, groups in ((8, 2), (8, 8)):
        layer = CLASSES[n](c_in, 16, 3, groups=groups, rank=4, format=fmt, dtype=torch.float64)
        fan_in = c_in // groups * 3 ** n
        squares = []
        for seed in range(60):
            torch.manual_seed(seed)
            layer.reset_parameters()
            squares.append(layer.weight.detach().pow(2).mean())
        std = float(torch.stack(squares).mean().sqrt())
        assert abs(std * math.sqrt(3 * fan_in) - 1) < 0.15, (c_in, groups, std)


@pytest.mark.parametrize("n", [1, 3])
def test_from_dense_decomposes_and_to_dense_inverts(n):
    """Full-rank TT/Tucker decompositions of an nn conv (grouped, depthwise) rebuild it exactly; ``to_dense`` gives
    back the nn class with every argument, and both equal the original on an input."""
    import tnlayers
    dense_cls = {1: nn.Conv1d, 3: nn.Conv3d}[n]
    for fmt, cls in (("tt", CLASSES[n]), ("tucker", CLASSES[n])):
        for c_in, c_out, groups, mode in ((6, 4, 1, "zeros"), (6, 9, 3, "reflect"), (4, 8, 4, "circular")):
            torch.manual_seed(0)
            dense = dense_cls(c_in, c_out, 3, stride=1, padding=1, dilation=1, groups=groups, padding_mode=mode,
                              dtype=torch.float64)
            full = max(c_in // groups, c_out)  # every bond / channel rank at least the unfolding's rank
            layer = cls.from_dense(dense, rank=full, format=fmt)
            assert layer.decomposition_error < 1e-12 and layer.groups == groups
            x = torch.randn(2, c_in, *(5,) * n, dtype=torch.float64)
            assert rel(layer(x), dense(x)) <= 1e-10
            back = tnlayers.to_dense(nn.Sequential(layer))[0]
            assert type(back) is dense_cls
            for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                         "padding_mode"):
                assert getattr(back, attr) == getattr(dense, attr), attr
            assert rel(back(x), dense(x)) <= 1e-10
    with pytest.raises(TypeError, match=f"expects an nn.Conv{n}d, got Conv2d"):
        CLASSES[n].from_dense(nn.Conv2d(4, 4, 3), rank=2, format="tt")


@pytest.mark.parametrize("fmt", FORMATS)
def test_depthwise_runs_dense_whatever_the_strategy(fmt):
    """A depthwise layer has no factorized chain: "factorized" is refused when asked for, "auto"/"flops" and the
    global override run dense, and the result is the reference's."""
    import tnlayers
    with pytest.raises(ValueError, match="is depthwise .* no factorized chain"):
        TensorizedConv1d(8, 16, 3, groups=8, rank=2, format=fmt, strategy="factorized")
    layer = TensorizedConv3d(8, 16, 3, groups=8, rank=2, format=fmt, dtype=torch.float64)
    x = torch.randn(2, 8, 4, 5, 6, dtype=torch.float64)
    for strategy in ("auto", "flops"):
        layer.strategy = strategy
        assert rel(layer(x), reference_conv(layer, x)) <= TOL and layer.last_strategy == "dense"
    with tnlayers.set_strategy("factorized"):
        assert rel(layer(x), reference_conv(layer, x)) <= TOL and layer.last_strategy == "dense"
