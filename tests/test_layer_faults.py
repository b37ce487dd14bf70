"""Faults a user can cause in a layer (issue 17): each is handled correctly or refused loudly.

References are plain torch: the weight rebuilt by torch.einsum of the cores (tests/_references.py), then
F.conv2d / F.linear; parameter counts by numel sums and nn's own modules."""
import copy
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tnlayers
from tnlayers import FactorizedTensor, TensorizedConv2d, TRLinear, TTConv2d, TTLinear, TuckerLinear
from tnlayers.training import load_checkpoint, save_checkpoint

from _references import conv_weight, full_tensor, linear_weight


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(tnlayers.layers.base, "_warned", set())  # the one-time warnings fire again here


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


# -- 1. the no-grad weight cache never serves a stale weight ----------------------------------------------------
def _layer(kind, strategy):
    """float64: a stale weight is off by O(1), while float32 rounding of the conv against the reference (its
    summation order changes with oneDNN's kernel and thread count) reached 4e-6 relative on a 1-thread run."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    if kind == "conv":  # full TT ranks: dense needs fewer FLOPs, so "auto" runs dense (with the cache)
        return _quiet(lambda: TTConv2d(6, 5, 3, padding=1, rank=[1, 6, 5, 1], strategy=strategy, **f64)), \
            torch.randn(2, 6, 7, 7, **f64)
    return _quiet(lambda: TTLinear(12, 10, rank=10, in_shape=(12,), out_shape=(10,), strategy=strategy, **f64)), \
        torch.randn(64, 12, **f64)


def _reference(layer, x):
    cores = [c.detach() for c in layer.cores]
    if isinstance(layer, TensorizedConv2d):
        w = conv_weight("tt", cores, layer.out_channels, layer.in_channels, *layer.kernel_size)
        return F.conv2d(x, w, layer.bias.detach(), padding=layer.padding)
    return F.linear(x, linear_weight("tt", cores, layer.out_features, layer.in_features), layer.bias.detach())


def _sgd_step(layer, other, x):
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    layer(x).sum().backward()
    opt.step()


def _foreach_data(layer, other, x):
    torch._foreach_mul_([c.data for c in layer.cores], 2.0)  # .data: the version counter stays


def _foreach(layer, other, x):
    with torch.no_grad():
        torch._foreach_mul_(list(layer.cores), 2.0)


def _ema_data(layer, other, x):  # the usual EMA-teacher update, through .data
    for p, q in zip(layer.cores, other.cores):
        p.data.mul_(0.5).add_(q.data, alpha=0.5)


def _ema_lerp(layer, other, x):
    with torch.no_grad():
        for p, q in zip(layer.cores, other.cores):
            p.lerp_(q, 0.5)


def _copy(layer, other, x):
    with torch.no_grad():
        layer.cores[0].copy_(other.cores[0])


MUTATIONS = {
    "data-mul": lambda layer, other, x: layer.cores[1].data.mul_(2.0),
    "data-copy": lambda layer, other, x: layer.cores[0].data.copy_(other.cores[0].data),
    "data-assign": lambda layer, other, x: setattr(layer.cores[0], "data", other.cores[0].data.clone()),
    "foreach-data": _foreach_data,
    "foreach": _foreach,
    "copy": _copy,
    "load-state-dict": lambda layer, other, x: layer.load_state_dict(other.state_dict()),
    "sgd-step": _sgd_step,
    "ema-data": _ema_data,
    "ema-lerp": _ema_lerp,
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("strategy", ["dense", "auto"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_no_grad_output_follows_every_core_write(kind, strategy, mutation):
    layer, x = _layer(kind, strategy)
    other, _ = _layer(kind, strategy)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
        before = _reference(layer, x)
        torch.testing.assert_close(layer(x), before)  # fills the cache
        assert layer.last_strategy == "dense" and layer._weight_cache is not None
    MUTATIONS[mutation](layer, other, x)
    after = _reference(layer, x)
    assert not torch.allclose(before, after)  # the write changed the layer
    for grad_mode in (torch.no_grad, torch.inference_mode):
        with grad_mode():
            torch.testing.assert_close(layer(x), after)
    torch.testing.assert_close(layer(x).detach(), after)  # and with grad enabled


def test_one_entry_written_through_data_in_a_large_core_is_seen():
    torch.manual_seed(0)
    layer = TuckerLinear(512, 512, rank=64, strategy="dense")  # 512x64 factors: the numpy comparison
    x = torch.randn(4, 512)
    assert max(c.numel() for c in layer.cores) >= 2 ** 15
    with torch.no_grad():
        layer(x)
    for k in range(len(layer.cores)):
        layer.cores[k].data.view(-1)[-1] += 0.5
        with torch.no_grad():
            y = layer(x)
        torch.testing.assert_close(y, F.linear(x, layer.weight.detach(), layer.bias.detach()))  # grad on: no cache


def test_cache_is_still_reused_while_the_cores_are_unchanged(monkeypatch):
    layer, x = _layer("conv", "dense")
    builds = []
    original = type(layer.plan).weight
    monkeypatch.setattr(type(layer.plan), "weight", lambda plan, cores: builds.append(1) or original(plan, cores))
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        layer.cores[1].data.mul_(2.0)
        for _ in range(3):
            y = layer(x)
    assert len(builds) == 2  # one build per distinct core content
    torch.testing.assert_close(y, _reference(layer, x))



def test_the_accelerator_snapshot_sees_one_changed_entry_of_any_core():
    """Off the CPU the guard compares one flat copy of all cores (one device sync per call); the same logic,
    run here on CPU tensors, must see a single entry changed in any core."""
    from tnlayers.layers.weight_cache import _flat, unchanged

    torch.manual_seed(0)
    layer = TTLinear(24, 20, rank=3)
    cores = layer.core_parameters()
    copy_ = _flat(cores).clone()
    assert unchanged(cores, copy_)
    for k in range(len(cores)):
        cores[k].data.view(-1)[0] += 1e-3  # invisible to the version counter
        assert not unchanged(cores, copy_)
        cores[k].data.view(-1)[0] -= 1e-3
        copy_ = _flat(cores).clone()  # rounding may leave the entry a bit off: compare with what is there now
        assert unchanged(cores, copy_)


def test_cached_context_trusts_the_cache_like_parametrize_cached():
    """Inside tnlayers.cached() the values are not compared (parametrize.cached's contract: a .data write is
    not seen), but version-counted writes still are; after the context the comparison is back."""
    layer, x = _layer("linear", "dense")
    with torch.no_grad():
        before = layer(x)
        with tnlayers.cached():
            layer.cores[0].data.mul_(2.0)
            torch.testing.assert_close(layer(x), before)  # documented: not seen inside the context
            layer.cores[1].mul_(3.0)  # bumps the version counter: seen even inside
            torch.testing.assert_close(layer(x), _reference(layer, x))
        layer.cores[0].data.mul_(0.5)
        torch.testing.assert_close(layer(x), _reference(layer, x))  # outside: every write is seen again

# -- 2. what the cores mean travels with them in the state_dict --------------------------------------------------
def _tt(kernel, **kw):
    torch.manual_seed(0)
    return TTConv2d(4, 4, kernel, rank=2, **kw)


@pytest.mark.parametrize("strict", [True, False])
def test_state_dict_of_another_kernel_is_refused_before_copying(strict):
    source, target = _tt(3), _tt((1, 9))
    assert [c.shape for c in source.cores] == [c.shape for c in target.cores]  # shapes alone cannot tell
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"kernel_size=\(3, 3\).*kernel_size=\(1, 9\).*kernel_size differ"):
        target.load_state_dict(source.state_dict(), strict=strict)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing copied


@pytest.mark.parametrize("make_target", [
    lambda: TTLinear(36, 4, rank=2, in_shape=(4, 9), out_shape=(4,)),  # same core shapes, a linear layer
    lambda: FactorizedTensor((4, 9, 4), "tt", 2),  # same core shapes, a plain tensor
], ids=["linear", "tensor"])
def test_state_dict_of_another_kind_is_refused(make_target):
    source, target = _tt(3), make_target()
    state = {k: v for k, v in source.state_dict().items() if k.startswith("cores.")}
    state = type(source.state_dict())(state)
    state._metadata = source.state_dict()._metadata
    assert [tuple(v.shape) for v in state.values()] == [tuple(c.shape) for c in target.cores]
    with pytest.raises(ValueError, match="kind='conv'.*differ"):
        target.load_state_dict(state, strict=False)


def test_config_survives_torch_save_weights_only_and_checkpoints(tmp_path):
    source, same, other = _tt(3), _tt(3), _tt((1, 9))
    with torch.no_grad():
        source.cores[1].add_(1.0)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    same.load_state_dict(loaded)
    assert all(torch.equal(a, b) for a, b in zip(same.cores, source.cores))
    with pytest.raises(ValueError, match="kernel_size differ"):
        other.load_state_dict(loaded)
    path = save_checkpoint(tmp_path / "c.pt", nn.Sequential(source))
    load_checkpoint(path, nn.Sequential(_tt(3)))
    with pytest.raises(ValueError, match=r"'0' holds the cores of a module with .*kernel_size differ"):
        load_checkpoint(path, nn.Sequential(_tt((1, 9))))


def test_config_check_survives_deepcopy_and_compile():
    source = copy.deepcopy(_tt(3))
    compiled = torch.compile(_tt((1, 9)), backend="eager")
    with pytest.raises(ValueError, match="kernel_size differ"):
        compiled.load_state_dict(torch.compile(source, backend="eager").state_dict())


def test_whole_model_check_runs_before_anything_loads():
    from tnlayers.layers.base import check_state_configs  # for load_checkpoint's all-or-nothing check

    saved = nn.Sequential(_tt(3), _tt(3)).state_dict()
    model = nn.Sequential(_tt(3), _tt((1, 9)))
    with torch.no_grad():
        model[0].cores[0].add_(1.0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'1' holds the cores of a module with .*kernel_size differ"):
        check_state_configs(model, saved)
    check_state_configs(nn.Sequential(_tt(3), _tt(3)), saved)  # a fitting model passes
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_state_dict_without_the_record_still_loads():
    source, target = _tt(3), _tt(3)
    with torch.no_grad():
        source.cores[0].add_(1.0)
    target.load_state_dict(dict(source.state_dict()))  # a plain dict: no metadata, loads as before
    assert torch.equal(target.cores[0], source.cores[0])
    old = source.state_dict()
    for entry in old._metadata.values():  # a file written before the record existed
        entry.pop("tnlayers", None)
    _tt((1, 9)).load_state_dict(old)  # nothing to check against: loads, as before


# -- 3. a layer larger than the dense one it replaces says so ----------------------------------------------------
def test_layer_larger_than_dense_warns_once_with_both_counts():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = TRLinear(64, 64, rank=512)
        TRLinear(64, 64, rank=512)
        small = TTConv2d(64, 64, 3, rank=8)
    params = sum(p.numel() for p in layer.parameters())
    dense = sum(p.numel() for p in nn.Linear(64, 64).parameters())
    assert (params, dense) == (6_291_520, 4_160) and layer.dense_params == dense
    larger = [w for w in caught if "more than the" in str(w.message)]
    assert len(larger) == 1
    assert f"{params:,}" in str(larger[0].message) and f"{dense:,}" in str(larger[0].message)
    assert small.dense_params == sum(p.numel() for p in nn.Conv2d(64, 64, 3).parameters())


# -- 4. a rank no machine could allocate ---------------------------------------------------------------------------
def test_rank_that_could_never_be_allocated_is_refused_with_both_counts():
    count = 4 * 10 ** 6 + 10 ** 12 * 9 + 10 ** 6 * 4
    dense = sum(p.numel() for p in nn.Conv2d(4, 4, 3).parameters())
    with pytest.raises(ValueError, match=f"{count:,} parameters against {dense:,}.*rank is out of range"):
        TTConv2d(4, 4, 3, rank=10 ** 6)


def test_parameter_bound_is_2_31_and_1000x_dense_on_meta():
    # on meta nothing is allocated: the rule alone decides (TT conv 4->4, 3x3: 8r + 9r^2 parameters)
    with pytest.raises(ValueError, match="rank is out of range"):
        _quiet(lambda: TTConv2d(4, 4, 3, rank=16_000, device="meta"))  # 2.3e9 > 2**31, > 1000x dense
    _quiet(lambda: TTConv2d(4, 4, 3, rank=15_000, device="meta"))  # 2.0e9 < 2**31: allowed
    # a factorization of a huge dense layer (4.3e9 parameters) may itself pass 2**31: under 1000x dense, allowed
    big = _quiet(lambda: TTLinear(2 ** 16, 2 ** 16, rank=20_000, in_shape=(2 ** 16,), out_shape=(2 ** 16,),
                                  device="meta"))
    assert 2 ** 31 < sum(c.numel() for c in big.cores) < big.dense_params


# -- 5. numpy integers, as nn.Conv2d / nn.Linear take them -----------------------------------------------------------
def test_numpy_integers_are_accepted_like_nn():
    i = np.int64
    nn.Conv2d(i(4), i(6), i(3), stride=i(2), padding=i(1), dilation=i(1), groups=i(1))  # nn takes them
    torch.manual_seed(0)
    layer = TTConv2d(i(4), i(6), i(3), stride=i(2), padding=(i(1), np.int32(1)), dilation=i(1), groups=i(1),
                     rank=i(2))
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation"):
        value = getattr(layer, name)
        assert all(type(v) is int for v in (value if isinstance(value, tuple) else (value,))), name
    x = torch.randn(2, 4, 7, 7)
    w = conv_weight("tt", [c.detach() for c in layer.cores], 6, 4, 3, 3)
    torch.testing.assert_close(layer(x), F.conv2d(x, w, layer.bias.detach(), stride=2, padding=1))
    linear = TTLinear(i(12), np.int32(10), rank=i(2))
    assert (type(linear.in_features), type(linear.out_features)) == (int, int)
    assert linear(torch.randn(3, 12)).shape == (3, 10)
    for bad in (True, 4.0):  # bools and floats stay refused
        with pytest.raises(ValueError, match="in_channels must be a positive int"):
            TTConv2d(bad, 4, 3, rank=2)


# -- 6. input dtype other than the cores' -------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["dense", "factorized"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_input_dtype_mismatch_names_layer_dtypes_and_fix(kind, strategy):
    layer = TTConv2d(4, 4, 3, rank=2, strategy=strategy) if kind == "conv" else TTLinear(8, 8, rank=2,
                                                                                         strategy=strategy)
    x = torch.randn(1, 4, 5, 5) if kind == "conv" else torch.randn(2, 8)
    name = type(layer).__name__
    with pytest.raises(TypeError, match=rf"{name} got an input of dtype torch.float64, but its cores are "
                                        rf"torch.float32.*layer.to\(torch.float64\).*autocast"):
        layer(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts both: legal, as for nn.Conv2d
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)


# -- 7. FactorizedTensor's defaults work -------------------------------------------------------------------------------
def test_factorized_tensor_default_rank_is_same_as_tltorch():
    tensor = FactorizedTensor((3, 4, 5))  # tucker, rank "same": the largest uniform rank within 60 parameters
    params = sum(c.numel() for c in tensor.cores)
    assert tensor.ranks == {"r0": 2, "r1": 2, "r2": 2} and params == 2 * (3 + 4 + 5) + 2 ** 3 <= 60
    assert 3 * (3 + 4 + 5) + 3 ** 3 > 60  # rank 3 would not fit
    torch.testing.assert_close(tensor(), full_tensor("tucker", [c.detach() for c in tensor.cores]))
    target = torch.randn(3, 4, 5)
    fitted = FactorizedTensor.from_tensor(target)
    assert fitted.ranks == tensor.ranks and fitted().shape == (3, 4, 5)
    assert FactorizedTensor((3, 4, 5), "tt")().shape == (3, 4, 5)


# -- 8. warnings point at the user's line ---------------------------------------------------------------------------------
# Each case makes its call on the line after its ``def``: that line is where the warning must point.
def _excess_direct():
    TTConv2d(5, 7, 3, rank=[1, 9, 8, 1])


def _excess_from_dense():
    TTConv2d.from_dense(nn.Conv2d(5, 7, 3), rank=[1, 9, 8, 1])


def _excess_tensorize():
    tnlayers.tensorize(nn.Sequential(nn.Conv2d(5, 7, 3)), rank=9, progress=False)


def _excess_tensor():
    FactorizedTensor((3, 4, 5), "tt", [1, 7, 7, 1])


def _larger_direct():
    TRLinear(8, 8, rank=16)


def _larger_tensorize():
    tnlayers.tensorize(nn.Sequential(nn.Linear(8, 8)), format="tr", rank=16, filter=["0"], progress=False)


def _rank_one():
    TRLinear(8, 8, rank=0.01)


OUR_WARNINGS = ("no expressiveness", "more than the", "even rank 1 needs")


@pytest.mark.parametrize("call", [_excess_direct, _excess_from_dense, _excess_tensorize, _excess_tensor,
                                  _larger_direct, _larger_tensorize, _rank_one],
                         ids=lambda f: f.__name__.strip("_").replace("_", "-"))
def test_warnings_point_at_the_users_line(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    ours = [w for w in caught if any(text in str(w.message) for text in OUR_WARNINGS)]
    assert ours, "no warning"
    line = call.__code__.co_firstlineno + 1
    assert [(w.filename, w.lineno) for w in ours] == [(__file__, line)] * len(ours)
