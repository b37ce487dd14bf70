"""The model zoo: plain ResNets against hand-computed parameter counts, tensorized ones against the
closed-form count of each format, and the paper's TT-ResNet-18 / TR-ResNet-32 sizes."""
import pytest
import torch
from torch import nn

import tnlayers.layers.base
from tnlayers import TensorizedConv2d, TRConv2d, TTConv2d
from tnlayers.models import (ShortcutA, TABLE9, cifar_resnet, resnet18, resnet20, resnet32, tr_resnet20, tr_resnet32,
                             tt_resnet18)
from tnlayers.convert import summary, tensorize

from test_paper_models import TABLE9 as PAPER_TABLE9  # the paper's table, transcribed apart from the package
TABLE8_MODES = {3: (3,), 16: (4, 2, 2), 32: (4, 4, 2), 64: (4, 4, 4)}  # paper Table 8 channel splits


def count(model):
    return sum(p.numel() for p in model.parameters())


def cifar_convs(depth):
    """(C_in, C_out, k) of every conv of a CIFAR ResNet (option A: no shortcut convs), in order."""
    n = (depth - 2) // 6
    convs = [(3, 16, 3)]
    for c_in, c_out in ((16, 16), (16, 32), (32, 64)):
        convs += [(c_in, c_out, 3)] + [(c_out, c_out, 3)] * (2 * n - 1)
    return convs


def resnet18_convs():
    """(C_in, C_out, k) of every conv of ResNet-18: stem, 3x3 convs, 1x1 downsample convs."""
    convs = [(3, 64, 7)]
    for c_in, c_out in ((64, 64), (64, 128), (128, 256), (256, 512)):
        convs += [(c_in, c_out, 3), (c_out, c_out, 3), (c_out, c_out, 3), (c_out, c_out, 3)]
        if c_in != c_out:
            convs.append((c_in, c_out, 1))
    return convs


def cifar_dense_count(depth, classes=10):
    n = (depth - 2) // 6
    bn = 2 * 16 + 2 * n * 2 * (16 + 32 + 64)  # the stem's BN and two per block
    return sum(ci * co * k * k for ci, co, k in cifar_convs(depth)) + bn + 64 * classes + classes


def conv_params(fmt, c_in, c_out, k, r):
    """Closed-form parameter count of one tensorized conv with uniform rank r (README's table)."""
    if fmt == "tt":
        return c_in * r + r * k * k * r + r * c_out
    if fmt == "tr":
        return r * r * (sum(TABLE8_MODES[c_in]) + k * k + sum(TABLE8_MODES[c_out]))
    if fmt == "cp":
        return r * (c_in + k + k + c_out)
    return r * k * k * r + c_in * r + c_out * r  # Tucker-2


def test_dense_counts_match_hand_counts():
    assert count(resnet20()) == cifar_dense_count(20) == 269_722
    assert count(resnet32()) == cifar_dense_count(32) == 464_154
    assert round(count(resnet20()) / 1e6, 2) == 0.27 and round(count(resnet32()) / 1e6, 2) == 0.46
    bn18 = 2 * 64 + 2 * 2 * 2 * (64 + 128 + 256 + 512) + 2 * (128 + 256 + 512)  # blocks' and shortcuts' BN
    assert count(resnet18()) == sum(ci * co * k * k for ci, co, k in resnet18_convs()) + bn18 + 512 * 1000 + 1000
    assert count(resnet18()) == 11_689_512  # torchvision's resnet18


@pytest.mark.parametrize("build,shape,classes", [(resnet20, (2, 3, 16, 16), 10), (resnet32, (2, 3, 16, 16), 10),
                                                 (resnet18, (2, 3, 32, 32), 1000)])
def test_dense_models_run_forward_backward(build, shape, classes):
    model = build()
    y = model(torch.randn(*shape))
    assert y.shape == (shape[0], classes)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("fmt", ["tt", "tr", "cp", "tucker"])
def test_tensorized_resnet20_summary_matches_closed_form(fmt):
    torch.manual_seed(0)
    model = tensorize(resnet20(), format=fmt, rank=4)
    rows = summary(model, print_table=False)
    convs = cifar_convs(20)
    assert [row["params"] for row in rows] == [conv_params(fmt, *c, 4) for c in convs]
    assert rows.dense_params == 269_722
    expected = 269_722 - sum(ci * co * k * k for ci, co, k in convs) + sum(conv_params(fmt, *c, 4) for c in convs)
    assert rows.params == expected == count(model)
    assert type(model.fc) is nn.Linear  # the classifier stays dense
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tensorized_resnet18_summary_matches_closed_form():
    model = tensorize(resnet18(), format="tucker", rank=16)  # stem, 3x3 and 1x1 shortcut convs
    convs = resnet18_convs()
    rows = summary(model, print_table=False)
    assert sorted(row["params"] for row in rows) == sorted(conv_params("tucker", *c, 16) for c in convs)
    assert rows.params == count(model) == 11_689_512 - sum(ci * co * k * k for ci, co, k in convs) + sum(
        conv_params("tucker", *c, 16) for c in convs)
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_tt_resnet18_table9_is_4_4M(monkeypatch):
    monkeypatch.setattr(tnlayers.layers.base, "_warned", set())  # the excess warning is one-time per config
    assert {k: list(v) for k, v in TABLE9.items()} == PAPER_TABLE9
    with pytest.raises(TypeError):
        TABLE9["layer1.0.conv1"] = (1, 2, 2, 1)  # package data, read-only
    with pytest.warns(UserWarning, match="r1=120 > 64"):
        model = tt_resnet18()
    assert sorted(n for n, m in model.named_modules() if isinstance(m, TTConv2d)) == sorted(PAPER_TABLE9)
    convs3x3 = [c for c in resnet18_convs() if c[2] == 3]
    tt = sum(ci * r[1] + r[1] * 9 * r[2] + r[2] * co for (ci, co, _), r in zip(convs3x3, PAPER_TABLE9.values()))
    expected = 11_689_512 - sum(ci * co * 9 for ci, co, _ in convs3x3) + tt
    rows = summary(model, print_table=False)
    assert count(model) == rows.params == expected and round(expected / 1e6, 1) == 4.4
    assert rows.dense_params == 11_689_512
    model(torch.randn(2, 3, 32, 32)).sum().backward()


@pytest.mark.parametrize("build,depth,millions", [(tr_resnet32, 32, 0.20), (tr_resnet20, 20, None)])
def test_tr_resnets_rank15(build, depth, millions):
    model = build(rank=15)
    convs = [m for m in model.modules() if isinstance(m, TensorizedConv2d)]
    assert all(isinstance(c, TRConv2d) for c in convs) and len(convs) == len(cifar_convs(depth))
    assert [c.network.modes for c in convs] == [TABLE8_MODES[ci] + (9,) + TABLE8_MODES[co]
                                                for ci, co, _ in cifar_convs(depth)]
    dense = cifar_dense_count(depth)
    expected = dense - sum(ci * co * 9 for ci, co, _ in cifar_convs(depth)) + sum(
        conv_params("tr", *c, 15) for c in cifar_convs(depth))
    assert count(model) == summary(model, print_table=False).params == expected
    if millions is not None:
        assert round(expected / 1e6, 2) == millions
    model(torch.randn(2, 3, 16, 16)).sum().backward()


def test_resnet18_uses_torchvision_names():
    keys = set(resnet18().state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.running_var", "layer4.1.bn2.weight", "fc.weight", "fc.bias"} <= keys
    assert len([k for k in keys if k.endswith("num_batches_tracked")]) == 20  # 1 + 16 in blocks + 3 shortcuts


def test_torchvision_resnet18_tensorizes_like_ours():
    torchvision = pytest.importorskip("torchvision")
    theirs = torchvision.models.resnet18()
    assert set(theirs.state_dict()) == set(resnet18().state_dict())
    tensorize(theirs, rank=TABLE9)
    assert count(theirs) == count(tt_resnet18())


def test_option_a_shortcut_subsamples_and_zero_pads():
    shortcut = ShortcutA(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4) and count(shortcut) == 0
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


@pytest.mark.parametrize("depth", [21, 7, 20.0, True])
def test_cifar_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(depth)
