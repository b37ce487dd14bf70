"""tensorize / summary / to_dense on small hand-built models, checked against the plain nn modules."""
import io
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from tnlayers import TensorizedConv2d, TensorizedLinear, TRConv2d, TTConv2d, TuckerLinear, norm_deviation
from tnlayers.models import cifar_resnet, resnet18, resnet20, TABLE9
from tnlayers.convert import summary, tensorize, to_dense


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def corr(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


class Net(nn.Module):
    """Conv/Linear modules named stem, block.conv1, block.conv2, proj, hidden, fc (the classifier)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(OrderedDict(conv1=nn.Conv2d(8, 8, 3, padding=1), relu=nn.ReLU(),
                                               conv2=nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)))
        self.proj = nn.Conv2d(8, 16, 1, stride=2)
        self.hidden = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.block(x) + self.proj(x)
        return self.fc(torch.relu(self.hidden(x.mean((2, 3)))))


ALL = ("stem", "block.conv1", "block.conv2", "proj", "hidden", "fc")
DEFAULT = ALL[:-1]  # every Conv2d and Linear but the last Linear
CONVS = ALL[:4]


def tensorized(model):
    return {name: m.format for name, m in model.named_modules() if isinstance(m, (TensorizedConv2d, TensorizedLinear))}


# (tensorize arguments, {tensorized module: format}); every other Conv/Linear must stay as it was
SELECTION = [
    (dict(rank=2), dict.fromkeys(DEFAULT, "tt")),
    (dict(rank=2, format="tr"), dict.fromkeys(DEFAULT, "tr")),
    (dict(rank=2, filter=["stem", "block.*"]), dict.fromkeys(CONVS[:3], "tt")),
    (dict(rank=2, filter="proj"), {"proj": "tt"}),
    (dict(rank=2, filter=lambda name, m: isinstance(m, nn.Linear)), {"hidden": "tt", "fc": "tt"}),
    (dict(rank={"block.conv1": 2, "fc": 3}), {"block.conv1": "tt", "fc": "tt"}),  # a dict selects, fc too
    (dict(rank={"block.*": 2}), {"block.conv1": "tt", "block.conv2": "tt"}),
    (dict(rank={"block.*": 2, "*": 3}), dict.fromkeys(DEFAULT, "tt")),  # with "*": default selection
    (dict(rank={"*": 2, "proj": None}), dict.fromkeys(("stem", "block.conv1", "block.conv2", "hidden"), "tt")),
    (dict(rank={"block.*": 2}, filter=["block.conv2", "stem"]), {"block.conv2": "tt"}),  # both must agree
    (dict(rank=lambda name, m: 2 if isinstance(m, nn.Conv2d) else None), dict.fromkeys(CONVS, "tt")),
    (dict(rank=2, format={"stem": "tr", "*": "tucker"}), {"stem": "tr", **dict.fromkeys(DEFAULT[1:], "tucker")}),
    (dict(rank=2, format={"hidden": "cp"}), {"hidden": "cp"}),
    (dict(rank=2, format=lambda name, m: "tr" if name.startswith("block") else "cp"),
     {"stem": "cp", "block.conv1": "tr", "block.conv2": "tr", "proj": "cp", "hidden": "cp"}),
]


@pytest.mark.parametrize("kwargs,expected", SELECTION)
def test_selection(kwargs, expected):
    torch.manual_seed(0)
    model, plain = Net(), Net()
    out = tensorize(model, **kwargs)
    assert out is model
    assert tensorized(model) == expected
    for name, m in model.named_modules():
        if name in ALL and name not in expected:
            assert type(m) is type(plain.get_submodule(name))
    out(torch.randn(2, 3, 8, 8)).sum().backward()


# (rank, {module: expected bond sizes}): exact name > globs in order > "*"
RANKS = [
    ({"block.*": 2, "block.conv1": 3, "*": 1}, {"block.conv1": [3, 3], "block.conv2": [2, 2], "stem": [1, 1]}),
    ({"block.conv*": 4, "block.*": 2}, {"block.conv1": [4, 4], "block.conv2": [4, 4]}),
    ({"stem": [1, 3, 2, 1], "proj": [5, 6]}, {"stem": [3, 2], "proj": [5, 6]}),
    (lambda name, m: m.in_channels if isinstance(m, nn.Conv2d) else 1, {"stem": [3, 3], "proj": [8, 8]}),
]


@pytest.mark.parametrize("rank,expected", RANKS)
def test_rank_per_layer(rank, expected):
    model = tensorize(Net(), rank=rank)
    for name, bonds in expected.items():
        assert list(model.get_submodule(name).ranks.values()) == bonds


def test_float_rank_keeps_a_fraction_of_each_layer():
    model = tensorize(Net(), format="tucker", rank=0.5)
    for name in DEFAULT:
        layer = model.get_submodule(name)
        assert 0 < layer.network.num_params <= 0.5 * layer.weight.numel()


def test_shapes_override():
    model = tensorize(Net(), format="tr", rank=2, shapes={"hidden": {"in_shape": (2, 8), "out_shape": (16,)},
                                                          "block.*": {"in_shape": (8,)}})
    assert model.hidden.network.modes == (2, 8, 16)
    assert model.block.conv1.network.modes == (8, 9, 2, 2, 2)
    assert model.block.conv2.network.modes == (8, 9, 4, 2, 2)
    model = tensorize(Net(), format="tr", rank=2, shapes=lambda name, m: {"in_shape": (8,)} if name == "proj" else None)
    assert model.proj.network.modes == (8, 1, 4, 2, 2)


UNKNOWN = [  # a typo must not be silently ignored: the error lists the close matches
    (dict(rank={"block.conv3": 2}), ValueError, r"no Conv/Linear module named 'block.conv3'.*block.conv"),
    (dict(rank={"layr1.0.conv1": 2}), ValueError, r"close matches|start"),
    (dict(rank=2, filter=["stme"]), ValueError, r"'stme'.*close matches: \['stem'\]"),
    (dict(rank=2, format={"fcc": "tt"}), ValueError, r"'fcc'.*'fc'"),
    (dict(rank={"layer*": 2}), ValueError, "pattern 'layer\\*' matches no"),
    (dict(rank=2, shapes={"hiden": {"in_shape": (16,)}}), ValueError, "'hidden'"),
]

BAD = [
    (dict(rank={3: 2}), TypeError, "must be str"),
    (dict(), TypeError, "needs rank="),
    (dict(rank=2, format="ht"), ValueError, "format must be one of"),
    (dict(rank=2, format=None), TypeError, "format must be"),
    (dict(rank=2, format={"*": "ht"}), ValueError, "format must be one of"),
    (dict(rank=2, init="svd"), ValueError, "init must be one of"),
    (dict(rank=2, strategy="fast"), ValueError, "strategy must be one of"),
    (dict(rank=2, filter=3), TypeError, "filter must be"),
    (dict(rank=2, shapes=[(2, 4)]), TypeError, "shapes must be"),
    (dict(rank=2, shapes={"stem": {"in": (3,)}}), ValueError, "in_shape"),
    (dict(rank=2, format="tr", shapes={"stem": {"in_shape": (2, 2)}}), ValueError, r"'stem'.*in_shape"),
    (dict(rank=[1, 3, 2, 1]), ValueError, "'hidden'"),  # a TT conv's ranks do not fit the 6-mode TT Linear
    (dict(rank="big"), ValueError, "'stem'.*rank='big' is not a rank"),  # strings: "auto", "vbmf", "energy:0.9"
    (dict(rank=2, progress="yes"), TypeError, "progress"),
    (dict(rank=2, inplace="no"), TypeError, "inplace"),
    (dict(rank=2, decomposition_options=3), TypeError, "decomposition_options"),
]


@pytest.mark.parametrize("kwargs,error,match", UNKNOWN + BAD)
def test_bad_arguments_raise_and_leave_the_model_alone(kwargs, error, match):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        tensorize(model, **kwargs)
    assert tensorized(model) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("call", [lambda: tensorize("model", rank=2), lambda: summary(3), lambda: to_dense([])])
def test_non_modules_are_rejected(call):
    with pytest.raises(TypeError, match="nn.Module"):
        call()


def test_nothing_to_tensorize_warns_and_returns_the_model_unchanged():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))  # the only Linear is the classifier
    with pytest.warns(UserWarning, match="nothing to tensorize"):
        assert tensorize(model, rank=2) is model
    assert type(model[1]) is nn.Linear
    with pytest.warns(UserWarning, match="nothing to tensorize"):
        tensorize(Net(), rank={"block.conv1": 2}, filter=["stem"])


def test_unsupported_convs_are_left_dense_with_a_warning():
    """Conv1d, Conv3d and grouped convs are tensorized; transposed convs have no counterpart (left dense, with a
    warning); depthwise convs stay dense by default, as the classifier does (no warning), and are tensorized
    when selected."""
    from tnlayers.layers import TTConv1d, TTConv3d
    model = nn.Sequential(OrderedDict(
        c1=nn.Conv1d(4, 4, 3), c3=nn.Conv3d(4, 4, 3), grouped=nn.Conv2d(4, 8, 3, groups=2),
        depthwise=nn.Conv2d(4, 4, 3, groups=4), transposed=nn.ConvTranspose2d(4, 4, 3), ok=nn.Conv2d(4, 4, 3),
        fc=nn.Linear(4, 2)))
    with pytest.warns(UserWarning, match="left 1 module") as caught:
        tensorize(model, rank=2)
    message = str(caught[0].message)
    assert "transposed: ConvTranspose2d" in message and "depthwise" not in message
    assert [type(m) for m in list(model)[:6]] == [TTConv1d, TTConv3d, TTConv2d, nn.Conv2d, nn.ConvTranspose2d,
                                                  TTConv2d]
    assert model.grouped.groups == 2 and model.grouped.weight.shape == (8, 2, 3, 3)
    with pytest.warns(UserWarning, match="nothing to tensorize"):
        tensorize(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Linear(4, 2)), rank=2)
    picked = tensorize(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Linear(4, 2)), rank=2, filter=["0"])
    assert isinstance(picked[0], TTConv2d) and picked[0].groups == 4


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 10, 3, stride=2, padding=1),
    nn.Conv2d(6, 10, (3, 1), stride=(1, 2), padding=(2, 0), dilation=(2, 1), bias=False),
    nn.Conv2d(6, 10, 3, padding="same", padding_mode="reflect"),
    nn.Conv2d(6, 10, 3, padding=1, padding_mode="circular", dtype=torch.float64),
])
def test_keeps_conv_arguments_dtype_and_mode(conv):
    torch.manual_seed(0)
    conv.eval()
    model = nn.Sequential(conv)
    out = tensorize(model, rank=lambda name, m: [m.in_channels, m.out_channels], init="decompose", inplace=False)
    layer = out[0]
    assert isinstance(layer, TTConv2d) and not layer.training and type(model[0]) is nn.Conv2d
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "padding", "padding_mode"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert (layer.bias is None) == (conv.bias is None)
    assert all(p.dtype == conv.weight.dtype for p in layer.parameters())
    x = torch.randn(2, 6, 9, 9, dtype=conv.weight.dtype)
    assert rel(layer(x), conv(x)) < 1e-5


def test_root_module_and_shared_modules():
    conv = nn.Conv2d(4, 4, 3)
    assert isinstance(tensorize(conv, format="tr", rank=2), TRConv2d)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(8, 2))
    tensorize(model, rank=2)
    assert isinstance(model[0], TensorizedLinear) and model[0] is model[2] and type(model[3]) is nn.Linear


def test_inplace_false_copies():
    model = Net()
    out = tensorize(model, rank=2, inplace=False)
    assert out is not model and tensorized(model) == {} and set(tensorized(out)) == set(DEFAULT)


def narrow_resnet():
    torch.manual_seed(0)
    return cifar_resnet(20, widths=(4, 8, 8)).eval()  # eval: BatchNorm uses its (fixed) running statistics


def full_rank(fmt):
    """Ranks at which each format represents any weight exactly."""
    if fmt == "tr":
        return 8
    return lambda name, m: [m.in_channels, m.out_channels] if isinstance(m, nn.Conv2d) else \
        ([m.in_features] * 2 if fmt == "tucker" else 16)


@pytest.mark.parametrize("fmt", ["tt", "tr", "tucker"])
def test_decompose_at_full_rank_reproduces_the_model(fmt):
    model = narrow_resnet()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the excess-rank warnings
        out = tensorize(model, format=fmt, rank=full_rank(fmt), filter=lambda name, m: True, init="decompose",
                        inplace=False)
    assert len(tensorized(out)) == 20  # 19 convs and the fc
    assert rel(out(x), model(x)) < 1e-4
    rows = summary(out, print_table=False)
    assert all(row["error"] < 1e-5 for row in rows)


def test_decompose_at_paper_ranks_correlates():
    torch.manual_seed(0)
    model = resnet20().eval()
    x = torch.randn(8, 3, 16, 16)
    out = tensorize(model, format="tr", rank=15, init="decompose", inplace=False)
    errors = [row["error"] for row in summary(out, print_table=False)]
    assert len(errors) == 19 and all(0 < e < 1 for e in errors)
    with torch.no_grad():
        assert corr(out(x), model(x)) > 0.3
    # TT-ResNet-18 with Table 9 ranks in stages 1-2 (filter and rank dict together; the SVDs of the wider
    # stages take seconds each)
    model = resnet18(num_classes=10).eval()
    out = tensorize(model, rank=TABLE9, filter=["layer1.*", "layer2.*"], init="decompose", inplace=False)
    errors = {row["name"]: row["error"] for row in summary(out, print_table=False)}
    assert len(errors) == 8 and errors["layer1.0.conv1"] < 1e-5 and 0.01 < errors["layer2.1.conv2"] < 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert corr(out(x), model(x)) > 0.5


def test_progress_bar_only_when_asked(capsys):
    tensorize(Net(), rank=2, init="decompose", progress=True)
    assert "tensorize" in capsys.readouterr().err
    tensorize(Net(), rank=2, init="decompose", progress=False)
    assert capsys.readouterr().err == ""


def test_progress_bar_advances_by_layer_cost(capsys):
    """A 1x1 conv on 3 channels then a 64->64 3x3 conv: the first is a sliver of the work, so the bar must
    stand near 0% after it (one tick per layer would say 50%), and at 100% with both counted at the end."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 64, 1), nn.Conv2d(64, 64, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 1x1 conv's factors outnumber its weight
        tensorize(model, format="cp", rank={"0": 2, "2": 8}, filter=["0", "2"], init="decompose", progress=True)
    states = [s for s in capsys.readouterr().err.split("\r") if "layers" in s]
    first = next(s for s in states if "1/2 layers" in s)
    assert int(first.split("%")[0].split()[-1]) < 5, first
    assert "100%" in states[-1] and "2/2 layers" in states[-1], states[-1]


def test_decomposition_options_reach_the_decomposition():
    model = tensorize(Net(), format="cp", rank=2, filter=["stem"], init="decompose",
                      decomposition_options={"n_iter_max": 1})
    assert 0 < model.stem.decomposition_error < 1


@pytest.mark.parametrize("fmt", ["tt", "tr", "cp", "tucker"])
def test_to_dense_inverts_tensorize(fmt):
    torch.manual_seed(0)
    model = tensorize(Net(), format=fmt, rank=3).eval()
    x = torch.randn(2, 3, 8, 8)
    dense = to_dense(model, inplace=False)
    assert tensorized(dense) == {} and tensorized(model) != {}
    assert {type(m) for m in dense.modules()} >= {nn.Conv2d, nn.Linear}
    assert rel(dense(x), model(x)) < 1e-5
    assert torch.equal(dense.stem.weight, model.stem.weight.detach())
    assert dense.block.conv2.bias is None and dense.block.conv2.stride == (2, 2)
    assert isinstance(to_dense(TuckerLinear(4, 4, rank=2)), nn.Linear)


def test_state_dict_loads_into_a_freshly_tensorized_model():
    config = dict(format={"layer1.*": "tt", "*": "tr"}, rank={"layer3.*": 2, "*": 3})
    model = tensorize(narrow_resnet(), **config)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = narrow_resnet()
    torch.manual_seed(1)
    fresh = tensorize(fresh, **config)
    x = torch.randn(2, 3, 16, 16)
    assert rel(fresh(x), model(x)) > 1e-3  # different random cores before loading
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh(x), model(x))


def test_summary_rows_and_totals():
    torch.manual_seed(0)
    model = tensorize(Net(), format="tucker", rank=2, filter=["stem", "hidden"])
    rows = summary(model, print_table=False)
    stem, hidden = rows.rows
    # Tucker-2 stem: core (2, 3, 3, 2), U_in (3, 2), U_out (8, 2), bias 8; TuckerLinear: (2, 2), (16, 2) x 2
    assert (stem["name"], stem["format"], stem["shape"], stem["params"]) == ("stem", "tucker", (3, 3, 3, 8),
                                                                             36 + 6 + 16 + 8)
    assert stem["dense_params"] == 8 * 3 * 9 + 8 and hidden["params"] == 4 + 64 + 16
    assert stem["error"] is None and stem["Q"] == pytest.approx(float(norm_deviation(model.stem.cores)), rel=1e-6)
    dense = sum(p.numel() for p in Net().parameters())
    assert rows.dense_params == dense
    assert rows.params == dense - (216 + 8 + 256 + 16) + (66 + 84) == sum(p.numel() for p in model.parameters())


def test_summary_prints_a_table(capsys):
    rows = summary(tensorize(Net(), rank=2, filter=["stem"], init="decompose"))
    printed = capsys.readouterr().out
    assert "stem" in printed and "total:" in printed and f"{rows.params:,}" in printed and len(rows) == 1
