"""Initialization matches what a layer replaces (issue 18): a standalone layer's weight starts with the std of
its ``nn`` counterpart's default init (``weight_std="nn"``), or He's (``"kaiming_normal"``), or a given std;
``tensorize(init="random")`` matches each replaced module's actual weight std and keeps its bias.

The std of a reconstructed weight is estimated as the root mean square of its entries over many seeds (the
weight is zero-mean), and compared with a tolerance computed from the spread of the per-seed estimates:
products of cores are heavy-tailed, so the sample, not a constant, says how close the estimate must be.
"""
import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tnlayers
from tnlayers import models
from tnlayers.layers.tensorized import TensorizedLayer

FORMATS = ("tt", "tr", "cp", "tucker")
NAMED = {("conv", "tt"): tnlayers.TTConv2d, ("conv", "tr"): tnlayers.TRConv2d, ("conv", "cp"): tnlayers.CPConv2d,
         ("conv", "tucker"): tnlayers.TuckerConv2d, ("linear", "tt"): tnlayers.TTLinear,
         ("linear", "tr"): tnlayers.TRLinear, ("linear", "cp"): tnlayers.CPLinear,
         ("linear", "tucker"): tnlayers.TuckerLinear}
Z = 5.0  # standard errors allowed: a correct init fails with probability ~1e-6 per check
MAX_TOLERANCE = 0.2  # the test must tell nn's std from He's (a factor sqrt(6) = 2.45) and a wrong std from a right one


def nn_default_std(fan_in: int) -> float:
    """kaiming_uniform_(a=sqrt(5)), nn's default: uniform on ±1/sqrt(fan_in), std = bound / sqrt(3)."""
    return 1.0 / math.sqrt(3.0 * fan_in)


def kaiming_std(fan_in: int) -> float:
    """kaiming_normal_ (fan_in, ReLU gain sqrt(2))."""
    return math.sqrt(2.0 / fan_in)


def mean_squares(layer, seeds: range) -> list:
    """The mean square of the reconstructed weight after a reset with each seed."""
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        layer.reset_parameters()
        out.append(float(layer.weight.detach().double().pow(2).mean()))
    return out


def weight_rms(layer, seeds: int = 200, max_seeds: int = 6400):
    """(root mean square of the reconstructed weight over resets, its relative standard error). Low-rank CP
    weights are heavy-tailed (a few products of Gaussians per entry): seeds are doubled, up to ``max_seeds``,
    until the error allows a meaningful test (the stopping rule looks at the spread only, not at the mean)."""
    squares = mean_squares(layer, range(seeds))
    while True:
        values = torch.tensor(squares, dtype=torch.float64)
        mean = values.mean()
        # delta method: the relative error of a square root is half that of its argument
        rel_se = float(values.std() / math.sqrt(len(squares)) / mean) / 2
        if Z * rel_se < MAX_TOLERANCE or len(squares) >= max_seeds:
            return float(mean.sqrt()), rel_se
        squares += mean_squares(layer, range(len(squares), 2 * len(squares)))


def assert_std(layer, target: float, seeds: int = 200) -> None:
    rms, rel_se = weight_rms(layer, seeds)
    tolerance = Z * rel_se
    assert tolerance < MAX_TOLERANCE, f"too few seeds for a meaningful test (tolerance {tolerance:.3f})"
    assert abs(rms / target - 1) < tolerance, (type(layer).__name__, layer.ranks, rms, target, tolerance)


def build(kind: str, fmt: str, c_in: int, c_out: int, kernel: int, rank: int, **kwargs):
    if kind == "conv":
        return NAMED[kind, fmt](c_in, c_out, kernel, rank=rank, **kwargs)
    return NAMED[kind, fmt](c_in, c_out, rank=rank, **kwargs)


def fan_in(kind: str, c_in: int, kernel: int) -> int:
    return c_in * (kernel * kernel if kind == "conv" else 1)


# -- standalone layers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(16, 32, 3, 4), (24, 12, 1, 8), (36, 36, 3, 2)])
def test_default_std_is_nn_default(kind, fmt, shape):
    """Without weight_std, a layer starts at nn.Conv2d / nn.Linear's default std, 1/sqrt(3 fan_in)."""
    c_in, c_out, kernel, rank = shape
    layer = build(kind, fmt, c_in, c_out, kernel, rank)
    dense = nn.Conv2d(c_in, c_out, kernel) if kind == "conv" else nn.Linear(c_in, c_out)
    reference = float(dense.weight.detach().double().std())  # nn's own init, the thing to match
    assert abs(reference / nn_default_std(fan_in(kind, c_in, kernel)) - 1) < 0.1
    assert_std(layer, nn_default_std(fan_in(kind, c_in, kernel)))
    assert layer.weight_std == "nn"


def test_nn_default_std_formula():
    """1/sqrt(3 fan_in): the std of kaiming_uniform_(a=sqrt(5)), which nn.Conv2d/nn.Linear use."""
    weight = torch.empty(512, 256, dtype=torch.float64)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    assert abs(float(weight.std()) / nn_default_std(256) - 1) < 0.01  # 131k samples: ~0.2% sampling error


@pytest.mark.slow  # 20 random layers, ~11 s on 2 cores
@settings(max_examples=20, deadline=None, derandomize=True)
@given(kind=st.sampled_from(["conv", "linear"]), fmt=st.sampled_from(FORMATS),
       c_in=st.sampled_from([4, 8, 12, 16, 30]), c_out=st.sampled_from([4, 8, 16, 20, 32]),
       kernel=st.sampled_from([1, 3]), rank=st.integers(1, 8),
       target=st.sampled_from(["nn", "kaiming_normal", 0.3, 1e-3]))
def test_std_matches_target_for_any_shape(kind, fmt, c_in, c_out, kernel, rank, target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ranks larger than the dense layer warn; irrelevant here
        layer = build(kind, fmt, c_in, c_out, kernel, rank, weight_std=target)
    fan = fan_in(kind, c_in, kernel)
    expected = {"nn": nn_default_std(fan), "kaiming_normal": kaiming_std(fan)}.get(target, target)
    assert_std(layer, expected, seeds=400)


@pytest.mark.parametrize("fmt", FORMATS)
def test_kaiming_normal_by_name(fmt):
    """He's std sqrt(2/fan_in) (fan-in, ReLU gain), what the paper's ResNets use, stays available by name."""
    layer = tnlayers.TensorizedConv2d(16, 32, 3, rank=4, format=fmt, weight_std="kaiming_normal")
    assert_std(layer, kaiming_std(16 * 9))
    assert_std(tnlayers.TensorizedLinear(48, 32, rank=4, format=fmt, weight_std="kaiming_normal"), kaiming_std(48))


def test_reset_parameters_keeps_the_chosen_std():
    layer = tnlayers.TTLinear(64, 32, rank=4, weight_std=0.05)
    assert layer.weight_std == 0.05
    assert_std(layer, 0.05)


BAD_WEIGHT_STD = [("he", ValueError, "weight_std must be one of"), ("", ValueError, "weight_std must be one of"),
                  (0.0, ValueError, "weight_std must be a finite number > 0"),
                  (-0.1, ValueError, "weight_std must be a finite number > 0"),
                  (math.nan, ValueError, "weight_std must be a finite"), (math.inf, ValueError, "weight_std must be a finite"),
                  (True, TypeError, "weight_std must be one of .* got bool"),
                  (None, TypeError, "weight_std must be one of .* got NoneType"),
                  ([0.1], TypeError, "weight_std must be one of .* got list")]


@pytest.mark.parametrize("value, error, match", BAD_WEIGHT_STD)
@pytest.mark.parametrize("make", [
    lambda v: tnlayers.TTConv2d(4, 4, 3, rank=2, weight_std=v),
    lambda v: tnlayers.TuckerLinear(4, 4, rank=2, weight_std=v),
    lambda v: tnlayers.TensorizedConv2d(4, 4, 3, rank=2, format="cp", weight_std=v),
    lambda v: tnlayers.TensorizedLinear(4, 4, rank=2, format="tr", weight_std=v)])
def test_bad_weight_std_is_refused(make, value, error, match):
    with pytest.raises(error, match=match):
        make(value)


# -- tensorize(init="random") -----------------------------------------------------------------------------------
def small_net():
    return nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def tensorized_pairs(net, **kwargs):
    """[(dense module, the layer that replaced it)] after tensorize(net, ...) of a copy."""
    dense = copy.deepcopy(net)
    tnlayers.tensorize(net, **kwargs)
    pairs = [(dense.get_submodule(n), t) for n, t in net.named_modules() if isinstance(t, TensorizedLayer)]
    assert pairs
    return pairs


def assert_matched(pairs) -> None:
    for dense, layer in pairs:
        assert torch.equal(layer.bias, dense.bias)  # the bias is kept as it is
        std = float(dense.weight.detach().double().std())
        assert layer.weight_std == std  # exactly the replaced weight's std ...
        assert_std(layer, std)  # ... which the reconstructed weight has (over resets of the cores)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensorize_matches_nn_default(fmt):
    torch.manual_seed(0)
    assert_matched(tensorized_pairs(small_net(), format=fmt, rank=4))


@pytest.mark.parametrize("fmt", ["tt", "tucker"])
def test_tensorize_matches_a_custom_init(fmt):
    torch.manual_seed(0)
    net = small_net()
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=0.3)
            nn.init.normal_(m.bias, std=0.5)
    pairs = tensorized_pairs(net, format=fmt, rank=4)
    assert all(abs(float(d.weight.std()) / 0.3 - 1) < 0.1 for d, _ in pairs)
    assert_matched(pairs)


def test_tensorize_matches_he_fan_out():
    """torchvision's (and the model zoo's) fan-out He init: std sqrt(2/fan_out), not the fan-in one."""
    torch.manual_seed(0)
    net = small_net()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    pairs = tensorized_pairs(net, format="tr", rank=4, filter=lambda name, m: isinstance(m, nn.Conv2d))
    first = pairs[0][1]
    assert abs(first.weight_std / math.sqrt(2 / (32 * 9)) - 1) < 0.05  # fan-out of the 16 -> 32 conv
    assert_matched(pairs)


def test_tensorized_resnet20_keeps_the_zoo_init():
    torch.manual_seed(0)
    dense = models.resnet20()
    torch.manual_seed(0)
    tensorized = models.tr_resnet20(rank=4)
    layers = {n: m for n, m in tensorized.named_modules() if isinstance(m, TensorizedLayer)}
    assert len(layers) > 10
    for name, layer in layers.items():
        assert layer.weight_std == float(dense.get_submodule(name).weight.detach().double().std()), name


def test_tensorize_meta_weights_start_at_nn_default():
    with torch.device("meta"):
        net = small_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tnlayers.tensorize(net, rank=4)
    layer = net[0]
    assert layer.weight_std == "nn" and layer.cores[0].is_meta
    layer.to_empty(device="cpu")
    assert_std(layer, nn_default_std(16 * 9))


@pytest.mark.parametrize("fill", [0.0, 0.25, math.nan])
def test_tensorize_weight_without_spread_warns_and_starts_at_nn_default(fill):
    """A constant (zero-initialized, say) or non-finite weight has no std to match: cores all at zero would
    never get a gradient, so the layer starts at nn's default, and the user is told."""
    net = small_net()
    nn.init.constant_(net[2].weight, fill)
    with pytest.warns(UserWarning, match=r"no spread to match.*'2'.*init='decompose'"):
        tnlayers.tensorize(net, rank=4)
    assert net[2].weight_std == "nn" and net[0].weight_std != "nn"
    assert bool(torch.isfinite(net[2].weight).all())


def test_tensorize_decompose_is_unchanged():
    torch.manual_seed(0)
    net = small_net()
    reference = copy.deepcopy(net)
    tnlayers.tensorize(net, rank=64, init="decompose", filter=["0"])
    assert torch.allclose(net[0].weight, reference[0].weight, atol=1e-5)
    assert torch.equal(net[0].bias, reference[0].bias)
