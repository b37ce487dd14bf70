"""Parameter counts of the paper's tensorized ResNets, built from the package's zoo (no torchvision) and
tensorize, checked against counts computed here from the paper's tables."""
import warnings

import pytest
import torch
from torch import nn

import tnlayers.layers.base
from tnlayers import TRConv2d, TTConv2d
from tnlayers.models import cifar_resnet, resnet18
from tnlayers.convert import tensorize

# Paper, appendix B, Table 9: TT ranks of TT-ResNet-18 (the 3x3 convs of layer1..layer4)
TABLE9 = {
    "layer1.0.conv1": [1, 64, 64, 1], "layer1.0.conv2": [1, 64, 64, 1],
    "layer1.1.conv1": [1, 64, 64, 1], "layer1.1.conv2": [1, 64, 64, 1],
    "layer2.0.conv1": [1, 120, 60, 1], "layer2.0.conv2": [1, 100, 100, 1],
    "layer2.1.conv1": [1, 100, 100, 1], "layer2.1.conv2": [1, 100, 100, 1],
    "layer3.0.conv1": [1, 200, 150, 1], "layer3.0.conv2": [1, 135, 135, 1],
    "layer3.1.conv1": [1, 135, 135, 1], "layer3.1.conv2": [1, 135, 135, 1],
    "layer4.0.conv1": [1, 320, 200, 1], "layer4.0.conv2": [1, 170, 170, 1],
    "layer4.1.conv1": [1, 170, 170, 1], "layer4.1.conv2": [1, 170, 170, 1],
}


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_tt_resnet18_table9_has_4_4M_parameters(monkeypatch):
    monkeypatch.setattr(tnlayers.layers.base, "_warned", set())  # the excess warning is one-time per config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tensorize(resnet18(), format="tt", rank=TABLE9)
    dense = resnet18()
    assert count(dense) == 11_689_512  # torchvision's resnet18
    assert sorted(n for n, m in model.named_modules() if isinstance(m, TTConv2d)) == sorted(TABLE9)
    tt_cores = sum(c_in * r[1] + r[1] * 9 * r[2] + r[2] * c_out for (c_in, c_out), r in zip(
        [(64, 64)] * 4 + [(64, 128)] + [(128, 128)] * 3 + [(128, 256)] + [(256, 256)] * 3 + [(256, 512)]
        + [(512, 512)] * 3, TABLE9.values()))
    assert count(model) == count(dense) - sum(
        m.weight.numel() for m in dense.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)) + tt_cores
    assert round(count(model) / 1e6, 1) == 4.4
    # layer2.0.conv1 (r1=120 > C_in=64) and friends keep their ranks, with a warning
    assert any("r1=120 > 64" in str(w.message) for w in caught)
    model(torch.randn(2, 3, 32, 32)).sum().backward()


@pytest.mark.parametrize("depth,expected_m,dense_m", [(32, 0.20, 0.46), (20, None, 0.27)])
def test_tr_resnet_rank15_parameters(depth, expected_m, dense_m):
    model = tensorize(cifar_resnet(depth), format="tr", rank=15)  # every conv, stem included; fc dense
    dense = cifar_resnet(depth)
    assert round(count(dense) / 1e6, 2) == dense_m
    n = (depth - 2) // 6
    # Table 8 tensorization: one (15, n_i, 15) core per mode
    modes = [(3, 9, 4, 2, 2)] + [(4, 2, 2, 9, 4, 2, 2)] * (2 * n) + [(4, 2, 2, 9, 4, 4, 2)] \
        + [(4, 4, 2, 9, 4, 4, 2)] * (2 * n - 1) + [(4, 4, 2, 9, 4, 4, 4)] + [(4, 4, 4, 9, 4, 4, 4)] * (2 * n - 1)
    tr_params = sum(225 * sum(m) for m in modes)
    convs = [m for m in model.modules() if isinstance(m, TRConv2d)]
    assert [c.network.modes for c in convs] == modes
    assert isinstance(model.fc, nn.Linear)
    non_conv = count(dense) - sum(m.weight.numel() for m in dense.modules() if isinstance(m, nn.Conv2d))
    assert count(model) == tr_params + non_conv
    if expected_m is not None:
        assert round(count(model) / 1e6, 2) == expected_m
    model(torch.randn(2, 3, 32, 32)).sum().backward()
