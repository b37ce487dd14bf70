"""The pieces split out of TensorizedLayer and tensorize, tested alone: a layer's layout from its arguments
(tnlayers/layers/layout.py), the inference-weight guard (tnlayers/layers/weight_cache.py), which modules
``tensorize`` would replace (tnlayers/conversion_plan.py) and the RNG state of checkpoints
(tnlayers/rng_state.py).

References: core shapes written out from the formats' definitions (TT: (C_in, r1), (r1, kh*kw, r2),
(r2, C_out); CP: one (mode, R) factor per mode), dense parameter counts of nn.Conv2d/nn.Linear counted
by torch, weights rebuilt with plain matrix products."""
import random

import numpy as np
import pytest
import torch
from torch import nn

import tnlayers
from tnlayers.conversion_plan import layer_class, plan_layers
from tnlayers.layers.layout import layer_layout
from tnlayers.layers.weight_cache import reuse_or_build
from tnlayers.rng_state import check_rng_state, get_rng_state, set_rng_state


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# -- layout -------------------------------------------------------------------------------------------------
def test_tt_conv_layout_is_the_papers():
    layout = layer_layout("TTConv2d", "tt", "conv", None, 64, 128, (3, 3), 16, None, None, True)
    assert layout.network.shapes == [(64, 16), (16, 9, 16), (16, 128)]
    assert layout.roles == ("in", "spatial", "out") and (layout.in_shape, layout.out_shape) == ((64,), (128,))
    assert layout.dense_params == n_params(nn.Conv2d(64, 128, 3)) and layout.fan_in == 64 * 9


def test_cp_linear_layout_with_given_shapes():
    layout = layer_layout("CPLinear", None, "linear", "cp", 64, 128, (), 4, (8, 8), (8, 16), False)
    assert layout.network.shapes == [(8, 4), (8, 4), (8, 4), (16, 4)]
    assert layout.roles == ("in", "in", "out", "out")
    assert layout.dense_params == n_params(nn.Linear(64, 128, bias=False)) and layout.fan_in == 64


def test_a_float_rank_keeps_at_most_that_fraction():
    layout = layer_layout("TRConv2d", "tr", "conv", None, 32, 64, (3, 3), 0.1, None, None, False)
    assert 0.02 * 32 * 64 * 9 < layout.network.num_params <= 0.1 * 32 * 64 * 9


@pytest.mark.parametrize("args, error, message", [
    (("TTConv2d", "tt", "conv", "cp", 8, 8, (3, 3), 2, None, None, True), ValueError, "is format 'tt'; got format='cp'"),
    (("TensorizedConv2d", None, "conv", None, 8, 8, (3, 3), 2, None, None, True), TypeError, "needs format="),
    (("TTLinear", "tt", "linear", None, 8, 8, (), 2, None, None, 1), TypeError, "bias must be True or False"),
    (("TTLinear", "tt", "dense", None, 8, 8, (), 2, None, None, True), ValueError, "kind must be one of"),
    (("TTLinear", "tt", "linear", None, 8, 8, (), 2, (3, 3), None, True), ValueError, "in_shape"),
], ids=["format-mismatch", "format-missing", "bias-not-bool", "kind-unknown", "in_shape-not-a-factoring"])
def test_layout_refuses_bad_arguments_by_name(args, error, message):
    with pytest.raises(error, match=message):
        layer_layout(*args)


def test_the_layer_is_built_from_its_layout():
    layer = tnlayers.TTConv2d(64, 128, 3, rank=16)
    assert [tuple(c.shape) for c in layer.cores] == [(64, 16), (16, 9, 16), (16, 128)]
    assert layer.dense_params == n_params(nn.Conv2d(64, 128, 3))


# -- inference-weight guard -----------------------------------------------------------------------------------
def test_reuse_or_build_reuses_until_a_core_changes_by_any_route():
    torch.manual_seed(0)
    cores = [torch.randn(3, 4), torch.randn(4, 5)]
    builds = []

    def build():
        builds.append(1)
        return cores[0] @ cores[1]
    entry = reuse_or_build(cores, None, build)
    torch.testing.assert_close(entry[1], cores[0] @ cores[1])
    assert reuse_or_build(cores, entry, build) is entry and len(builds) == 1
    version = cores[0]._version
    cores[0].data[0, 0] += 1.0  # through .data: the version counter does not see it
    assert cores[0]._version == version
    entry = reuse_or_build(cores, entry, build)
    assert len(builds) == 2
    torch.testing.assert_close(entry[1], cores[0] @ cores[1])
    cores[1].mul_(2.0)  # in place: the version counter sees it
    assert reuse_or_build(cores, entry, build) is not entry and len(builds) == 3
    with torch.inference_mode():  # a weight built outside inference mode is not reused inside it
        assert reuse_or_build(cores, entry, build) is not entry


# -- conversion plan ------------------------------------------------------------------------------------------
def test_the_plan_names_what_tensorize_replaces_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 8), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    children = list(model)
    plans, left_dense, already = plan_layers(model, "tt", {"0": 2, "4": 3, "*": 2}, None, None)
    assert sorted(plans) == ["0", "4"]  # "5" is the classifier, kept dense by default
    assert plans["0"].module is children[0] and plans["4"].rank == 3
    assert (layer_class(plans["0"]), layer_class(plans["4"])) == (tnlayers.TTConv2d, tnlayers.TTLinear)
    assert left_dense == ["1: ConvTranspose2d (no tensorized counterpart)"] and already == []
    assert list(model) == children and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_plan_refuses_another_format_for_a_tensorized_layer():
    model = nn.Sequential(tnlayers.TTLinear(8, 8, rank=2), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="already tensorized in another format"):
        plan_layers(model, "cp", 2, ["0"], None)
    assert plan_layers(model, "tt", 2, ["0"], None) == ({}, [], ["0"])


# -- RNG state ------------------------------------------------------------------------------------------------
def test_rng_state_restores_every_generator():
    state = get_rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    second = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
    with pytest.raises(ValueError, match="rng state must be a dict"):
        check_rng_state({"python": []})
