"""Parameter counts of the paper's tensorized ResNets, built here from plain layers (no torchvision)."""
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from tnlayers import TRConv2d, TTConv2d

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


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride, conv, name, shortcut):
        super().__init__()
        self.conv1 = conv(c_in, c_out, stride, f"{name}.conv1")
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv(c_out, c_out, 1, f"{name}.conv2")
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = shortcut(c_in, c_out, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet18(conv):
    """ImageNet ResNet-18 (He et al.): 7x7 stem, 1x1 downsample shortcuts, fc 512 -> 1000."""
    def shortcut(c_in, c_out, stride):
        if stride == 1 and c_in == c_out:
            return nn.Identity()
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
    layers, c_in = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for stage, c_out in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            stride = 2 if stage > 1 and b == 0 else 1
            layers.append(Block(c_in, c_out, stride, conv, f"layer{stage}.{b}", shortcut))
            c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000))


class ShortcutA(nn.Module):
    """Option-A shortcut of CIFAR ResNets: subsample and zero-pad channels (no parameters)."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.pad, self.stride = c_out - c_in, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


def cifar_resnet(depth, conv, stem):
    n = (depth - 2) // 6
    layers, c_in = [stem, nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, c_out in enumerate((16, 32, 64)):
        for b in range(n):
            stride = 2 if stage > 0 and b == 0 else 1
            layers.append(Block(c_in, c_out, stride, conv, f"s{stage}.{b}", ShortcutA))
            c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_tt_resnet18_table9_has_4_4M_parameters():
    def conv(c_in, c_out, stride, name):
        return TTConv2d(c_in, c_out, 3, stride, 1, bias=False, rank=TABLE9[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = resnet18(conv)
    dense = resnet18(lambda c_in, c_out, stride, name: nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False))
    assert count(dense) == 11_689_512  # torchvision's resnet18
    tt_cores = sum(c_in * r[1] + r[1] * 9 * r[2] + r[2] * c_out for (c_in, c_out), r in zip(
        [(64, 64)] * 4 + [(64, 128)] + [(128, 128)] * 3 + [(128, 256)] + [(256, 256)] * 3 + [(256, 512)]
        + [(512, 512)] * 3, TABLE9.values()))
    assert count(model) == count(dense) - sum(
        m.weight.numel() for m in dense.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)) + tt_cores
    assert round(count(model) / 1e6, 1) == 4.4
    # layer2.0.conv1 (r1=120 > C_in=64) keeps its rank as given (the one-time warning is tested elsewhere)
    assert [tuple(c.shape) for c in model[6].conv1.cores] == [(64, 120), (120, 9, 60), (60, 128)]
    model(torch.randn(2, 3, 32, 32)).sum().backward()


@pytest.mark.parametrize("depth,expected_m,dense_m", [(32, 0.20, 0.46), (20, None, 0.27)])
def test_tr_resnet_rank15_parameters(depth, expected_m, dense_m):
    def conv(c_in, c_out, stride, name):
        return TRConv2d(c_in, c_out, 3, stride, 1, bias=False, rank=15)
    model = cifar_resnet(depth, conv, TRConv2d(3, 16, 3, 1, 1, bias=False, rank=15))
    dense = cifar_resnet(depth, lambda c_in, c_out, s, name: nn.Conv2d(c_in, c_out, 3, s, 1, bias=False),
                         nn.Conv2d(3, 16, 3, 1, 1, bias=False))
    assert round(count(dense) / 1e6, 2) == dense_m
    n = (depth - 2) // 6
    # Table 8 tensorization: one (15, n_i, 15) core per mode
    modes = [(3, 9, 4, 2, 2)] + [(4, 2, 2, 9, 4, 2, 2)] * (2 * n) + [(4, 2, 2, 9, 4, 4, 2)] \
        + [(4, 4, 2, 9, 4, 4, 2)] * (2 * n - 1) + [(4, 4, 2, 9, 4, 4, 4)] + [(4, 4, 4, 9, 4, 4, 4)] * (2 * n - 1)
    tr_params = sum(225 * sum(m) for m in modes)
    convs = [m for m in model.modules() if isinstance(m, TRConv2d)]
    assert [c.network.modes for c in convs] == modes
    non_conv = count(dense) - sum(m.weight.numel() for m in dense.modules() if isinstance(m, nn.Conv2d))
    assert count(model) == tr_params + non_conv
    if expected_m is not None:
        assert round(count(model) / 1e6, 2) == expected_m
    model(torch.randn(2, 3, 32, 32)).sum().backward()
