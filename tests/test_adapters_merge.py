"""Merging adapters in place: the merged weight against W + scale·ΔW from plain-torch references, unmerge
within the documented round-off (per entry u (|W| + |W + sΔW|)) on float64/float32/bfloat16, keep_original
restoring bit for bit, refusals when the cores changed while merged, loading a state dict while merged, and
merge's peak memory measured in a fresh process (benchmarks/adapter_merge.py's measurement)."""
import copy
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from _benchmarks import load_benchmark
from test_adapters import FORMATS, assert_within_merge_round_off, dense_net, reference_delta, train_a_little
from tnlayers.adapters import Conv2dAdapter, LinearAdapter, adapt, merge, named_adapters, unadapt, unmerge



@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ranks above a tiny layer's size warn (excess bonds)
        yield


def scaled_cores_(adapter, ratio):
    """Scale the first core so that ‖sΔW‖ is ``ratio``·‖W‖ (ΔW is linear in each core)."""
    with torch.no_grad():
        factor = ratio * adapter.base.weight.double().norm() / adapter.delta_weight().double().norm()
        adapter.cores[0].mul_(factor.to(adapter.cores[0].dtype))


# -- the merged weight and the round trip -----------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_adds_the_reference_delta_in_place_for_linear_and_conv(fmt):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, dtype=torch.float64)
    conv = nn.Conv2d(6, 16, (3, 2), groups=2, dtype=torch.float64).to(memory_format=torch.channels_last)
    odd = nn.Conv2d(6, 16, (3, 2), groups=2, dtype=torch.float64)  # kh and kw stored swapped: (kh, kw) has no
    odd.weight = nn.Parameter(odd.weight.detach().transpose(2, 3).contiguous().transpose(2, 3))  # flat view
    for layer, cls, kernel in ((linear, LinearAdapter, ()), (conv, Conv2dAdapter, (3, 2)),
                               (odd, Conv2dAdapter, (3, 2))):
        w0 = layer.weight.detach().clone()
        adapter = cls(layer, fmt, rank=3, alpha=6, init="random")
        expected = w0 + 2.0 * reference_delta(fmt, adapter.cores, adapter.out_shape, adapter.in_shape, kernel)
        storage = layer.weight.data_ptr()
        adapter.merge()
        assert layer.weight.data_ptr() == storage  # in place, into the weight the base layer owns
        torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-12, atol=1e-12)
        assert adapter.weight_before_merge is None  # no copy kept by default
        x = torch.randn(2, 24, dtype=torch.float64) if cls is LinearAdapter else \
            torch.randn(2, 6, 5, 4, dtype=torch.float64)
        ref = x @ expected.t() + layer.bias if cls is LinearAdapter else \
            nn.functional.conv2d(x, expected, layer.bias, groups=2)
        torch.testing.assert_close(adapter(x), ref)  # merged forward: base(x) with the merged weight


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(FORMATS), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       out_dim=st.integers(2, 48), in_dim=st.integers(2, 48), rank=st.integers(1, 4),
       ratio=st.sampled_from([1e-4, 1e-2, 1.0, 30.0]), seed=st.integers(0, 2 ** 16))
def test_property_unmerge_is_within_the_documented_round_off(fmt, dtype, out_dim, in_dim, rank, ratio, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(in_dim, out_dim, dtype=dtype)
    original = layer.weight.detach().clone()
    adapter = LinearAdapter(layer, fmt, rank=rank, alpha=3, init="random")
    scaled_cores_(adapter, ratio)
    adapter.merge()
    merged = layer.weight.detach().clone()
    adapter.unmerge()
    assert not adapter.merged
    assert_within_merge_round_off(layer.weight, original, merged)
    adapter.merge(keep_original=True)
    adapter.unmerge()
    restored = layer.weight.detach().clone()
    adapter.merge(keep_original=True)  # from a weight the default round trip left: bit for bit back to it
    adapter.unmerge()
    assert torch.equal(layer.weight, restored)


def test_keep_original_is_bitwise_where_the_default_is_not():
    torch.manual_seed(1)
    model = adapt(dense_net(torch.bfloat16), "tucker", rank=3, target_modules=["0", "3", "5"], init="random")
    for _, adapter in named_adapters(model):
        scaled_cores_(adapter, 0.5)
    before = {name: a.base.weight.detach().clone() for name, a in named_adapters(model)}
    unmerge(merge(model))
    assert any(not torch.equal(a.base.weight, before[name]) for name, a in named_adapters(model))  # bf16 round-off
    before = {name: a.base.weight.detach().clone() for name, a in named_adapters(model)}
    merge(model, keep_original=True)
    assert all(a.weight_before_merge is not None for _, a in named_adapters(model))
    unmerge(model)
    assert all(torch.equal(a.base.weight, before[name]) for name, a in named_adapters(model))
    assert all(a.weight_before_merge is None for _, a in named_adapters(model))


def test_merge_under_autocast_adds_the_full_precision_delta():
    torch.manual_seed(2)
    model = adapt(dense_net(), "tt", rank=2, target_modules=["3", "5"], init="random")
    plain = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merge(model)
    merge(plain)
    assert all(torch.equal(a.base.weight, b.base.weight) for (_, a), (_, b) in
               zip(named_adapters(model), named_adapters(plain)))


def test_bad_merge_arguments_and_a_non_finite_update_of_one_adapter():
    model = adapt(dense_net(), "lora", rank=2, target_modules=["5"], init="random")
    with pytest.raises(TypeError, match="keep_original must be True or False, got 'yes'"):
        merge(model, keep_original="yes")
    with pytest.raises(TypeError, match="keep_original must be True or False, got 1"):
        model[5].merge(keep_original=1)
    weight = model[5].base.weight.detach().clone()
    with torch.no_grad():
        model[5].cores[0][0, 0] = float("inf")
    with pytest.raises(ValueError, match="merge: the update of this LinearAdapter holds non-finite values"):
        model[5].merge()
    assert not model[5].merged and torch.equal(model[5].base.weight, weight)


# -- cores changed while merged, state dicts -----------------------------------------------------------------
def test_unmerge_refuses_after_the_cores_changed_while_merged_and_changes_nothing():
    torch.manual_seed(3)
    model = adapt(dense_net(), "lora", rank=2, target_modules=["3", "5"], init="random")
    merge(model)
    merged = {name: a.base.weight.detach().clone() for name, a in named_adapters(model)}
    with torch.no_grad():
        model[5].cores[1].mul_(2.0)
    with pytest.raises(ValueError, match=r"unmerge: cores \[1\] of LinearAdapter '5' changed since merge"):
        unmerge(model)
    assert all(a.merged and torch.equal(a.base.weight, merged[n]) for n, a in named_adapters(model))  # all or nothing
    with pytest.raises(ValueError, match="unmerge: cores"):
        unadapt(model)
    kept = unadapt(copy.deepcopy(model), merge=True)  # the fix the message names: keep the merged weights
    assert torch.equal(kept[5].weight, merged["5"])
    original = dense_net()
    model = adapt(copy.deepcopy(original), "lora", rank=2, target_modules=["5"], init="random")
    merge(model, keep_original=True)
    with torch.no_grad():
        model[5].cores[1].mul_(2.0)
    unmerge(model)  # the kept copy does not depend on the cores
    assert torch.equal(model[5].base.weight, original[5].weight)


def test_an_optimizer_step_while_merged_leaves_the_cores_and_unmerge_works():
    torch.manual_seed(4)
    model = adapt(dense_net(), "cp", rank=2, target_modules=["0", "3"], init="random", freeze_model=False)
    x = torch.randn(4, 3, 5, 5)
    original = {name: a.base.weight.detach().clone() for name, a in named_adapters(model)}
    merge(model)
    merged = {name: a.base.weight.detach().clone() for name, a in named_adapters(model)}
    cores = [c.detach().clone() for _, a in named_adapters(model) for c in a.cores]
    train_a_little(model, x, steps=2)  # layer 5 trains; merged, the adapters' forward is base(x): no core moves
    assert all(torch.equal(c, k) for c, k in zip([c for _, a in named_adapters(model) for c in a.cores], cores))
    unmerge(model)
    for name, adapter in named_adapters(model):
        assert_within_merge_round_off(adapter.base.weight, original[name], merged[name])


def test_load_state_dict_while_merged_unmerges_the_loaded_weight():
    torch.manual_seed(5)
    base = dense_net()
    source = adapt(copy.deepcopy(base), "tucker", rank=2, target_modules=["3"], init="random")
    merge(source)
    state = copy.deepcopy(source.state_dict())
    target = adapt(dense_net(), "tucker", rank=2, target_modules=["3"], init="random")  # another base, other cores
    merge(target, keep_original=True)
    target.load_state_dict(state)  # the whole merged state: base weight and the cores merged into it
    unmerge(target)  # subtracts the loaded cores' ΔW from the loaded weight, not the stale kept copy
    assert_within_merge_round_off(target[3].base.weight, base[3].weight, state["3.base.weight"])
    merge(target)
    target.load_state_dict({k: v for k, v in state.items() if ".cores." not in k}, strict=False)
    with pytest.raises(ValueError, match="unmerge: load_state_dict replaced the base weight of LinearAdapter '3' "
                                         "while merged, without the cores"):
        unmerge(target)


def test_merged_flag_survives_state_dict_and_copies():
    torch.manual_seed(6)
    model, x = adapt(dense_net(), "tt", rank=2, target_modules=["3", "5"], init="random"), torch.randn(4, 3, 5, 5)
    y = model(x)
    merge(model)
    assert bool(model.state_dict()["3._extra_state"])
    copied = copy.deepcopy(model)  # new core objects: their version counters start afresh, not a change
    unmerge(copied)
    torch.testing.assert_close(copied(x), y, atol=1e-5, rtol=0)


# -- peak memory, measured in a fresh process --------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux")
def test_merge_peak_memory_is_below_one_layer_above_the_model():
    bench = load_benchmark("adapter_merge")
    layers, dim, layer_bytes = 4, 1024, 1024 * 1024 * 4
    for fmt in ("lora", "tt"):
        row = bench.run_case(fmt, layers, dim, 16, "in place")
        assert row["layer_bytes"] == layer_bytes
        assert row["peak_above"] <= layer_bytes, row  # the acceptance: at most one layer's weight above the model
        assert row["peak_above"] <= layer_bytes / 4, row  # in fact one block of up to 1/8 of the rows
        assert row["left_above"] <= layer_bytes / 8, row
    kept = bench.run_case("lora", layers, dim, 16, "keep_original")  # the measurement sees copies when kept
    assert kept["left_above"] >= layers * layer_bytes * 0.95, kept


def test_benchmark_writes_its_tables(tmp_path):
    out = tmp_path / "merge.md"
    load_benchmark("adapter_merge").main(["--dim", "64", "--layers", "1", "--formats", "lora", "--error-dim", "16",
                           "--ways", "in place", "--out", str(out)])
    text = out.read_text()
    assert "| lora | 1 |" in text and "| in place |" in text and "| lora | bfloat16 |" in text
