"""Model zoo: the ResNets the DAS paper uses, without torchvision, and their tensorized versions.

- ``resnet20`` / ``resnet32`` (``cifar_resnet(depth)``): He et al.'s CIFAR ResNets, 16/32/64 channels,
  option-A shortcuts (subsample + zero-pad channels, no parameters): 0.27M / 0.46M parameters.
- ``resnet18``: the ImageNet ResNet-18 layout with torchvision's module names, so torchvision's
  checkpoints load into it and ``TABLE9``'s names apply (11,689,512 parameters).
- ``tr_resnet20`` / ``tr_resnet32``: Tensor-Ring, every conv (stem included) with the paper's Table 8
  shapes, fc dense (rank 15: 0.20M parameters for ResNet-32).
- ``tt_resnet18``: Tensor-Train 3x3 convs of layer1..layer4 with the paper's Table 9 ranks (4.4M).
- ``TABLE9``: those ranks, ``{conv name: (1, r1, r2, 1)}`` (read-only), a ``rank=`` mapping for ``tensorize``.

    >>> import tnlayers
    >>> from tnlayers.models import TABLE9
    >>> len(TABLE9), TABLE9["layer2.0.conv1"]
    (16, (1, 120, 60, 1))
    >>> model = tnlayers.tensorize(tnlayers.models.resnet18(), format="tt", rank=TABLE9)  # TT-ResNet-18
    >>> type(model.layer2[0].conv1).__name__, type(model.conv1).__name__
    ('TTConv2d', 'Conv2d')
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .convert import tensorize
from .types import LayerRank

__all__ = ["BasicBlock", "ShortcutA", "CifarResNet", "ResNet", "cifar_resnet", "resnet20", "resnet32",
           "resnet18", "tr_resnet20", "tr_resnet32", "tt_resnet18", "TABLE9"]

# DAS paper (arXiv 2508.10435), appendix B, Table 9: TT ranks [1, r1, r2, 1] of TT-ResNet-18, taken from
# the appendix of its reference [71]. Only these 16 convs are tensorized (stem, 1x1 shortcuts and fc stay
# dense). Some r1 exceed C_in (120 > 64): kept as the paper has them, the layers warn once.
TABLE9 = MappingProxyType({
    "layer1.0.conv1": (1, 64, 64, 1), "layer1.0.conv2": (1, 64, 64, 1),
    "layer1.1.conv1": (1, 64, 64, 1), "layer1.1.conv2": (1, 64, 64, 1),
    "layer2.0.conv1": (1, 120, 60, 1), "layer2.0.conv2": (1, 100, 100, 1),
    "layer2.1.conv1": (1, 100, 100, 1), "layer2.1.conv2": (1, 100, 100, 1),
    "layer3.0.conv1": (1, 200, 150, 1), "layer3.0.conv2": (1, 135, 135, 1),
    "layer3.1.conv1": (1, 135, 135, 1), "layer3.1.conv2": (1, 135, 135, 1),
    "layer4.0.conv1": (1, 320, 200, 1), "layer4.0.conv2": (1, 170, 170, 1),
    "layer4.1.conv1": (1, 170, 170, 1), "layer4.1.conv2": (1, 170, 170, 1),
})


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)


class ShortcutA(nn.Module):
    """Option-A shortcut (He et al., CIFAR): subsample by ``stride`` and zero-pad the new channels evenly
    on both sides. No parameters, so the CIFAR ResNets' counts are those of the paper.

        >>> import torch
        >>> from tnlayers.models import ShortcutA
        >>> ShortcutA(4, 8, stride=2)(torch.randn(1, 4, 8, 8)).shape
        torch.Size([1, 8, 4, 4])
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.c_in, self.c_out, self.stride = c_in, c_out, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        extra = self.c_out - self.c_in
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"{self.c_in}, {self.c_out}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and a residual connection; torchvision's names (conv1, bn1, conv2,
    bn2, downsample). ``downsample`` maps the input to the output's shape when they differ (None: identity).

        >>> import torch
        >>> from tnlayers.models import BasicBlock, ShortcutA
        >>> BasicBlock(8, 16, stride=2, downsample=ShortcutA(8, 16, 2))(torch.randn(1, 8, 8, 8)).shape
        torch.Size([1, 16, 4, 4])
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


def _init_weights(model: nn.Module) -> None:
    """He init of the convs (fan_out, as torchvision), BatchNorm at identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet of depth 6n+2: 3x3 stem to 16 channels, three stages of n blocks
    (16, 32, 64 channels; stride 2 entering stages 2 and 3; option-A shortcuts), global pool, fc.

        >>> import torch
        >>> from tnlayers.models import CifarResNet
        >>> model = CifarResNet(8, num_classes=10, widths=(4, 8, 16))
        >>> model(torch.randn(2, 3, 16, 16)).shape, sum(p.numel() for p in model.parameters())
        (torch.Size([2, 10]), 5006)
    """

    def __init__(self, depth: int, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}")
        if len(widths) != 3 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be three positive ints (one per stage), got {widths!r}")
        blocks = (depth - 2) // 6
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c_in = widths[0]
        for stage, c_out in enumerate(widths, start=1):
            layers = []
            for b in range(blocks):
                stride = 2 if stage > 1 and b == 0 else 1
                shortcut = ShortcutA(c_in, c_out, stride) if stride != 1 or c_in != c_out else None
                layers.append(BasicBlock(c_in, c_out, stride, shortcut))
                c_in = c_out
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet(nn.Module):
    """The ImageNet ResNet of BasicBlocks (He et al.), laid out and named as torchvision's: 7x7 stride-2
    stem, max pool, four stages (64..512 channels, 1x1 conv + batch norm shortcuts), global pool, fc.

        >>> from tnlayers.models import ResNet
        >>> model = ResNet((1, 1, 1, 1), num_classes=10)  # ResNet-10
        >>> [name for name, _ in model.named_children()]
        ['conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4', 'avgpool', 'fc']
    """

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 1000):
        super().__init__()
        if len(blocks) != 4 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
            raise ValueError(f"blocks must be four positive ints (blocks per stage), got {blocks!r}")
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for stage, (c_out, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            layers = []
            for b in range(n):
                stride = 2 if stage > 1 and b == 0 else 1
                downsample = None
                if stride != 1 or c_in != c_out:
                    downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                layers.append(BasicBlock(c_in, c_out, stride, downsample))
                c_in = c_out
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64)) -> CifarResNet:
    """CIFAR ResNet of depth 6n+2 (``widths``: channels per stage; narrower ones make quick tests).

        >>> import tnlayers
        >>> len(tnlayers.models.cifar_resnet(14, widths=(4, 8, 16)).layer1)  # n = (14 - 2) / 6 blocks per stage
        2
    """
    return CifarResNet(depth, num_classes, widths)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-20 (0.27M parameters).

        >>> import tnlayers
        >>> sum(p.numel() for p in tnlayers.models.resnet20().parameters())
        269722
    """
    return CifarResNet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-32 (0.46M parameters).

        >>> import tnlayers
        >>> sum(p.numel() for p in tnlayers.models.resnet32(num_classes=10).parameters())
        464154
    """
    return CifarResNet(32, num_classes)


def resnet18(num_classes: int = 1000) -> ResNet:
    """ImageNet ResNet-18 without torchvision (same module names and parameter count, 11,689,512).

        >>> import tnlayers
        >>> sum(p.numel() for p in tnlayers.models.resnet18().parameters())
        11689512
    """
    return ResNet((2, 2, 2, 2), num_classes)


def tr_resnet20(rank: LayerRank = 15, num_classes: int = 10, strategy: str = "auto") -> CifarResNet:
    """TR-ResNet-20: every conv Tensor-Ring (Table 8 shapes), fc dense.

        >>> import tnlayers
        >>> model = tnlayers.models.tr_resnet20(rank=15)
        >>> type(model.conv1).__name__, type(model.fc).__name__, sum(p.numel() for p in model.parameters())
        ('TRConv2d', 'Linear', 123076)
    """
    return tensorize(resnet20(num_classes), format="tr", rank=rank, strategy=strategy)


def tr_resnet32(rank: LayerRank = 15, num_classes: int = 10, strategy: str = "auto") -> CifarResNet:
    """TR-ResNet-32 of the paper: every conv Tensor-Ring (Table 8 shapes), fc dense; rank 15 -> 0.20M.

        >>> import tnlayers
        >>> sum(p.numel() for p in tnlayers.models.tr_resnet32().parameters())
        202272
    """
    return tensorize(resnet32(num_classes), format="tr", rank=rank, strategy=strategy)


def tt_resnet18(ranks: Optional[LayerRank] = None, num_classes: int = 1000, strategy: str = "auto") -> ResNet:
    """TT-ResNet-18 of the paper: the 3x3 convs of layer1..layer4 in Tensor-Train with ``ranks`` (default
    ``TABLE9``; a ``{name: rank}`` mapping selects the layers it names), the rest dense: 4.4M parameters.
    To compress a trained ResNet-18 instead: ``tensorize(model, rank=TABLE9, init="decompose")``.

        >>> import tnlayers
        >>> model = tnlayers.models.tt_resnet18(ranks={"layer1.0.conv1": 8})  # only the layers named
        >>> model.layer1[0].conv1.ranks, type(model.layer1[0].conv2).__name__
        ({'r1': 8, 'r2': 8}, 'Conv2d')
    """
    return tensorize(resnet18(num_classes), format="tt", rank=TABLE9 if ranks is None else ranks,
                     strategy=strategy)
