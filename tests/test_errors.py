"""Bad input, everywhere: every row of docs/errors.md is tested here (ROWS, by id) or names a test that exists.

Each row: (id, call, exception type, regex the message must match). The message names the argument.
"""
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import tnlayers
from tnlayers import (BAR, DAS, SAM, FactorizedTensor, TensorizedConv2d, TRConv2d, TTConv2d, TTLinear,
                      TuckerConv2d)
from tnlayers.cli import main as cli_main
from tnlayers.training import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))


def _meta_net():
    with torch.device("meta"):
        return _net()


def _nan_net():
    net = _net()
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = NAN
    return net


def _params(seed=0):
    torch.manual_seed(seed)
    return list(TTLinear(4, 4, rank=2).parameters())


def _meta_layer():
    return TTConv2d(4, 4, 3, rank=2, device="meta")


ROWS = [
    # layers: sizes, ranks, shapes, types
    ("conv-in-channels-zero", lambda: TTConv2d(0, 4, 3, rank=2), ValueError, "in_channels must be a positive int"),
    ("conv-in-channels-float", lambda: TTConv2d(4.0, 4, 3, rank=2), ValueError, "in_channels"),
    ("linear-out-features-negative", lambda: TTLinear(4, -1, rank=2), ValueError, "out_features"),
    ("conv-kernel-zero", lambda: TTConv2d(4, 4, 0, rank=2), ValueError, "kernel_size"),
    ("conv-kernel-triple", lambda: TTConv2d(4, 4, (3, 3, 3), rank=2), ValueError, "kernel_size"),
    ("conv-stride-zero", lambda: TTConv2d(4, 4, 3, stride=0, rank=2), ValueError, "stride"),
    ("conv-dilation-negative", lambda: TTConv2d(4, 4, 3, dilation=-1, rank=2), ValueError, "dilation"),
    ("conv-padding-negative", lambda: TTConv2d(4, 4, 3, padding=-1, rank=2), ValueError, "padding"),
    ("conv-padding-unknown", lambda: TTConv2d(4, 4, 3, padding="full", rank=2), ValueError, "padding"),
    ("conv-same-strided", lambda: TTConv2d(4, 4, 3, stride=2, padding="same", rank=2), ValueError, "padding='same'"),
    ("conv-padding-mode", lambda: TTConv2d(4, 4, 3, padding_mode="mirror", rank=2), ValueError, "padding_mode"),
    ("conv-groups-str", lambda: TTConv2d(4, 4, 3, groups="2", rank=2), TypeError, "groups must be an int"),
    ("conv-groups-zero", lambda: TTConv2d(4, 4, 3, groups=0, rank=2), ValueError, "groups must be a positive"),
    ("conv-groups-two", lambda: TTConv2d(4, 3, 3, groups=2, rank=2), ValueError, "groups=2 must divide"),
    ("bias-not-bool", lambda: TTConv2d(4, 4, 3, bias="yes", rank=2), TypeError, "bias must be True or False"),
    ("dtype-int", lambda: TTConv2d(4, 4, 3, rank=2, dtype=torch.int64), TypeError, "dtype must be"),
    ("strategy-unknown", lambda: TTConv2d(4, 4, 3, rank=2, strategy="fast"), ValueError, "strategy"),
    ("format-unknown", lambda: TensorizedConv2d(4, 4, 3, rank=2, format="ht"), ValueError, "format must be one of"),
    ("format-not-str", lambda: TensorizedConv2d(4, 4, 3, rank=2, format=3), TypeError, "format must be a str"),
    ("format-missing", lambda: tnlayers.TensorizedLinear(4, 4, rank=2), TypeError, "format"),
    ("format-conflict", lambda: TTConv2d(4, 4, 3, rank=2, format="cp"), ValueError, "format"),
    ("rank-none", lambda: TTConv2d(4, 4, 3, rank=None), TypeError, "rank must be"),
    ("rank-zero", lambda: TTConv2d(4, 4, 3, rank=0), ValueError, "rank must be a positive int"),
    ("rank-str", lambda: TTConv2d(4, 4, 3, rank="big"), TypeError, "rank must be"),
    ("rank-float-out-of-range", lambda: TRConv2d(4, 4, 3, rank=1.2), ValueError, r"\(0, 1\]"),
    ("rank-float-nan", lambda: TRConv2d(4, 4, 3, rank=NAN), ValueError, r"\(0, 1\]"),
    ("rank-list-length", lambda: TTConv2d(4, 4, 3, rank=[2, 2, 2]), ValueError, "needs 2 entries"),
    ("rank-list-negative", lambda: TTConv2d(4, 4, 3, rank=[2, -1]), ValueError, r"rank\[1\]"),
    ("rank-list-float", lambda: TTConv2d(4, 4, 3, rank=[2, 1.5]), TypeError, r"rank\[1\]"),
    ("tt-rank-boundary", lambda: TTConv2d(4, 4, 3, rank=[2, 3, 3, 1]), ValueError, "start and end with 1"),
    ("tucker-rank-length", lambda: TuckerConv2d(4, 4, 3, rank=[2, 2, 2]), ValueError, "tucker rank"),
    ("rank-too-large", lambda: TTConv2d(4, 4, 3, rank=10 ** 9), ValueError, "rank is out of range"),
    ("in-shape-product", lambda: TRConv2d(16, 4, 3, rank=2, in_shape=(4, 3)), ValueError, "in_shape"),
    ("in-shape-zero", lambda: TRConv2d(4, 4, 3, rank=2, in_shape=(4, 0)), ValueError, "in_shape"),
    ("in-shape-str", lambda: TTLinear(16, 4, rank=2, in_shape="44"), TypeError, "in_shape"),
    ("out-shape-product", lambda: TTLinear(16, 4, rank=2, out_shape=(3,)), ValueError, "out_shape"),
    # layers: forward
    ("forward-not-tensor", lambda: TTConv2d(4, 4, 3, rank=2)([1, 2]), TypeError, "expects a torch.Tensor"),
    ("forward-int-tensor", lambda: TTLinear(4, 4, rank=2)(torch.ones(2, 4, dtype=torch.long)), TypeError,
     "floating-point input"),
    ("conv-forward-channels", lambda: TTConv2d(4, 4, 3, rank=2)(torch.randn(1, 3, 5, 5)), ValueError,
     r"\(N, 4, H, W\)"),
    ("conv-forward-too-small", lambda: TTConv2d(4, 4, 3, rank=2)(torch.randn(1, 4, 2, 2)), ValueError,
     "smaller than the dilated kernel"),
    ("linear-forward-features", lambda: TTLinear(8, 4, rank=2)(torch.randn(3, 7)), ValueError, r"\(\*, 8\)"),
    ("meta-forward", lambda: _meta_layer()(torch.randn(1, 4, 5, 5, device="meta")), NotImplementedError,
     "meta device.*to_empty"),
    ("meta-weight", lambda: _meta_layer().weight, NotImplementedError, "meta device"),
    # layers: from_dense / init_from_weight
    ("from-dense-wrong-module", lambda: TTConv2d.from_dense(nn.Linear(4, 4), rank=2), TypeError, "nn.Conv2d"),
    ("from-dense-meta", lambda: TTLinear.from_dense(nn.Linear(4, 4, device="meta"), rank=2), ValueError,
     "weight is on the meta device"),
    ("from-dense-nan", lambda: TTConv2d.from_dense(_nan_net()[0], rank=2), ValueError, "weight holds non-finite"),
    ("init-weight-shape", lambda: TTLinear(4, 4, rank=2).init_from_weight(torch.ones(3, 4)), ValueError,
     "does not fit"),
    ("init-weight-not-tensor", lambda: TTLinear(4, 4, rank=2).init_from_weight([[1.0]]), TypeError,
     "weight must be a torch.Tensor"),
    ("init-bias-shape", lambda: TTLinear(4, 4, rank=2).init_from_weight(torch.ones(4, 4), torch.ones(3)), ValueError,
     "bias of shape"),
    # FactorizedTensor
    ("ft-shape-int", lambda: FactorizedTensor(5, "tt", 2), TypeError, "shape must be a sequence"),
    ("ft-shape-one-mode", lambda: FactorizedTensor((3,), "cp", 2), ValueError, "at least 2 modes"),
    ("ft-shape-zero", lambda: FactorizedTensor((3, 0), "cp", 2), ValueError, "positive ints"),
    ("ft-std-negative", lambda: FactorizedTensor((3, 4), "tt", 2, std=-1.0), ValueError, "std must be"),
    ("ft-std-str", lambda: FactorizedTensor((3, 4), "tt", 2, std="a"), TypeError, "std must be a number"),
    ("ft-from-tensor-list", lambda: FactorizedTensor.from_tensor([1.0, 2.0], "tt", 2), TypeError,
     "tensor must be a torch.Tensor"),
    ("ft-from-tensor-nan", lambda: FactorizedTensor.from_tensor(torch.full((3, 4), NAN), "tt", 2), ValueError,
     "tensor holds non-finite"),
    ("ft-from-tensor-meta", lambda: FactorizedTensor.from_tensor(torch.ones(3, 4, device="meta"), "tt", 2),
     ValueError, "meta device"),
    # tensorize / summary / to_dense
    ("tensorize-not-module", lambda: tnlayers.tensorize("model", rank=2), TypeError, "nn.Module"),
    ("tensorize-rank-missing", lambda: tnlayers.tensorize(_net()), TypeError, "rank="),
    ("tensorize-init", lambda: tnlayers.tensorize(_net(), rank=2, init="svd"), ValueError, "init must be one of"),
    ("tensorize-strategy", lambda: tnlayers.tensorize(_net(), rank=2, strategy="x"), ValueError, "strategy"),
    ("tensorize-inplace", lambda: tnlayers.tensorize(_net(), rank=2, inplace=1), TypeError, "inplace"),
    ("tensorize-progress", lambda: tnlayers.tensorize(_net(), rank=2, progress="y"), TypeError, "progress"),
    ("tensorize-filter-type", lambda: tnlayers.tensorize(_net(), rank=2, filter=3), TypeError, "filter must be"),
    ("tensorize-unknown-name", lambda: tnlayers.tensorize(_net(), rank={"conv9": 2}), ValueError,
     "no Conv/Linear module named"),
    ("tensorize-bad-layer-rank", lambda: tnlayers.tensorize(_net(), rank={"0": -1}), ValueError,
     "tensorizing '0'.*rank"),
    ("tensorize-shapes-type", lambda: tnlayers.tensorize(_net(), rank=2, shapes=3), TypeError, "shapes must be"),
    ("tensorize-decomposition-options", lambda: tnlayers.tensorize(_net(), rank=2, decomposition_options=3),
     TypeError, "decomposition_options"),
    ("tensorize-shapes-do-not-factor", lambda: tnlayers.tensorize(_net(), rank=2, shapes={"0": {"in_shape": (2, 3)}}),
     ValueError, r"tensorizing '0' \(Conv2d\): in_shape=\(2, 3\) has product 6"),
    ("tensorize-shapes-bad-key", lambda: tnlayers.tensorize(_net(), rank=2, shapes={"0": {"shape": (3,)}}), ValueError,
     "shapes for '0' must be a dict with keys among"),
    ("tensorize-decomposition-option-typo", lambda: tnlayers.tensorize(_net(), rank=2, init="decompose",
                                                                       decomposition_options={"n_iter": 5}),
     TypeError, r"decomposition_options: unknown option\(s\) \['n_iter'\]"),
    ("from-dense-option-typo", lambda: TTLinear.from_dense(nn.Linear(4, 4), rank=2, tolerance=1e-3), TypeError,
     "unknown option"),
    ("tensorize-decompose-meta", lambda: tnlayers.tensorize(_meta_net(), rank=2, init="decompose"), ValueError,
     "init='decompose': the weight of '0' is on the meta device"),
    ("tensorize-decompose-nan", lambda: tnlayers.tensorize(_nan_net(), rank=2, init="decompose"), ValueError,
     "the weight of '0' holds non-finite"),
    ("summary-not-module", lambda: tnlayers.summary(3), TypeError, "nn.Module"),
    ("summary-print-table", lambda: tnlayers.summary(_net(), print_table="no"), TypeError, "print_table"),
    ("to-dense-inplace", lambda: tnlayers.to_dense(_net(), inplace="no"), TypeError, "inplace"),
    ("to-dense-meta", lambda: tnlayers.to_dense(tnlayers.tensorize(_meta_net(), rank=2)), NotImplementedError,
     "to_dense: '0' has its cores on the meta device"),
    # optimizers
    ("opt-base-not-optimizer", lambda: DAS(_params(), "SGD", lr=0.1), TypeError, "base_optimizer must be"),
    ("opt-base-instance-kwargs", lambda: DAS(None, torch.optim.SGD(_params(), lr=0.1), lr=0.2), TypeError,
     "base_optimizer is an already-built optimizer"),
    ("opt-params-missing", lambda: DAS(None, torch.optim.SGD, lr=0.1), TypeError, "params is required"),
    ("opt-base-owns-other-params", lambda: DAS(_params(0), torch.optim.SGD(_params(1), lr=0.1)), ValueError,
     "params must be None or exactly the parameters of the base_optimizer"),
    ("sam-base-owns-other-params", lambda: SAM(_params(0), torch.optim.SGD(_params(1), lr=0.1)), ValueError,
     "params must be None or exactly"),
    ("opt-alpha-negative", lambda: DAS(_params(), torch.optim.SGD, alpha=-1, lr=0.1), ValueError, "alpha must be"),
    ("opt-alpha-nan", lambda: DAS(_params(), torch.optim.SGD, alpha=NAN, lr=0.1), ValueError, "alpha must be"),
    ("opt-alpha-str", lambda: DAS(_params(), torch.optim.SGD, alpha="a", lr=0.1), TypeError, "alpha must be a number"),
    ("opt-group-alpha", lambda: DAS([{"params": _params(), "alpha": -1}], torch.optim.SGD, lr=0.1), ValueError,
     "alpha must be"),
    ("das-normalization", lambda: DAS(_params(), torch.optim.SGD, normalization="x", lr=0.1), ValueError,
     "normalization"),
    ("das-denominator", lambda: DAS(_params(), torch.optim.SGD, denominator="x", lr=0.1), ValueError, "denominator"),
    ("das-backend", lambda: DAS(_params(), torch.optim.SGD, backend="cuda", lr=0.1), ValueError, "backend"),
    ("opt-schedule-no-total", lambda: DAS(_params(), torch.optim.SGD, alpha_schedule="cosine", lr=0.1), ValueError,
     "total_steps"),
    ("opt-schedule-unknown", lambda: DAS(_params(), torch.optim.SGD, alpha_schedule="step", lr=0.1), ValueError,
     "alpha_schedule"),
    ("bar-variant", lambda: BAR(_params(), torch.optim.SGD, variant="x", total_steps=5, lr=0.1), ValueError,
     "variant"),
    ("sam-rho-negative", lambda: SAM(_params(), torch.optim.SGD, rho=-1, lr=0.1), ValueError, "rho must be"),
    ("sam-eps-nan", lambda: SAM(_params(), torch.optim.SGD, perturb_eps=NAN, lr=0.1), ValueError,
     "perturb_eps must be"),
    ("sam-eps-not-sgd", lambda: SAM(_params(), torch.optim.SGD, eps=1e-8, lr=0.1), TypeError,
     "eps= is neither an option of SAM .* nor a hyper-parameter of base_optimizer SGD; did you mean SAM's perturb_eps"),
    ("opt-unknown-keyword", lambda: DAS(_params(), torch.optim.SGD, momentun=0.9, lr=0.1), TypeError,
     "momentun= is neither an option of DAS .* did you mean SGD's momentum"),
    ("sam-adaptive-not-bool", lambda: SAM(_params(), torch.optim.SGD, adaptive="yes", lr=0.1), TypeError,
     "adaptive must be a bool"),
    ("sam-second-before-first", lambda: SAM(_params(), torch.optim.SGD, lr=0.1).second_step(), RuntimeError,
     "first_step"),
    # checkpoints
    ("checkpoint-path-type", lambda: save_checkpoint(3, _net()), TypeError, "path must be"),
    ("checkpoint-model-type", lambda: save_checkpoint("c.pt", "model"), TypeError, "model must be"),
    ("checkpoint-missing-dir", lambda: save_checkpoint(ROOT / "no-such-dir" / "c.pt", _net()), FileNotFoundError,
     "does not exist"),
    ("checkpoint-path-is-dir", lambda: save_checkpoint(ROOT / "tests", _net()), IsADirectoryError, "is a directory"),
    ("checkpoint-step-negative", lambda: save_checkpoint("c.pt", _net(), step=-1), ValueError, "step must be"),
    ("checkpoint-load-missing", lambda: load_checkpoint(ROOT / "no-such.pt", _net()), FileNotFoundError, "path"),
    ("checkpoint-restore-rng", lambda: load_checkpoint(ROOT / "no-such.pt", _net(), restore_rng="yes"), TypeError,
     "restore_rng"),
]


@pytest.mark.parametrize("make,error,match", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input(make, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            make()


def test_load_state_dict_refuses_non_finite_cores():
    layer = TTConv2d(4, 4, 3, rank=2)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["cores.1"][0, 0, 0] = NAN
    before = [c.detach().clone() for c in layer.cores]
    with pytest.raises(ValueError, match=r"'cores.1' \(core 1 of TTConv2d\) holds non-finite"):
        layer.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.cores))
    tensor = FactorizedTensor((3, 4, 5), "tr", 2)
    nested = nn.Sequential(tensor)
    state = {k: torch.full_like(v, float("inf")) for k, v in nested.state_dict().items()}
    with pytest.raises(ValueError, match="'0.cores.0'"):
        nested.load_state_dict(state)
    nested.load_state_dict(nested.state_dict())  # finite: loads as before


def test_meta_layers_build_and_materialize_for_random_init():
    layer = _meta_layer()
    assert all(c.is_meta for c in layer.cores) and tuple(layer.cores[1].shape) == (2, 9, 2)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert layer(torch.randn(1, 4, 5, 5)).shape == (1, 4, 3, 3)
    assert tnlayers.groups.group_of(layer.cores[0]) is not None  # DAS still sees the cores as a group
    model = tnlayers.tensorize(_meta_net(), rank=2, progress=False)  # init="random" works on meta
    rows = tnlayers.summary(model, print_table=False)
    assert len(rows) == 1 and rows.rows[0]["params"] > 0
    assert FactorizedTensor((3, 4), "tt", 2, device="meta")().is_meta


def test_cli_refuses_bad_paths_and_values_before_training(tmp_path, capsys, monkeypatch):
    import tnlayers.cli as cli

    monkeypatch.setattr(cli, "demo", lambda args: pytest.fail("training started"))
    cases = [(["--out", str(tmp_path / "missing" / "r.json")], "--out.*does not exist"),
             (["--out", str(tmp_path)], "--out.*is a directory"),
             (["--plot", str(tmp_path / "missing" / "p.png")], "--plot.*does not exist"),
             (["--lr", "0"], "--lr must be"), (["--lr", "nan"], "--lr must be"),
             (["--steps", "0"], "--steps must be")]
    for extra, match in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["demo", "--quiet", *extra])
        assert exit_info.value.code == 2
        assert re.search(match, capsys.readouterr().err), extra


def test_every_documented_row_is_tested():
    text = (ROOT / "docs" / "errors.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    rows = [r for r in rows if not set(r) <= set("|- ")]
    ids = {r[0] for r in ROWS}
    sources = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    assert len(rows) >= len(ROWS)
    for row in rows:
        test = row.rstrip(" |").rsplit("|", 1)[1].strip().strip("`")
        match = re.fullmatch(r"(test_\w+\.py)::(\w+)(?:\[(.+)\])?", test)
        assert match, f"row without a test name: {row}"
        file, func, param = match.groups()
        assert f"def {func}(" in sources[file], row
        if file == "test_errors.py" and func == "test_bad_input":
            assert param in ids, row
    assert ids <= {m for m in re.findall(r"test_bad_input\[([\w-]+)\]", text)}
