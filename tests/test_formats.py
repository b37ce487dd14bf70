"""FactorizedTensor against independent references, for random shapes and ranks (hypothesis)."""
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import tnlayers
from tnlayers.shapes import tensorize_dim

from _references import closed_form_params, full_tensor, tucker_full

FORMATS = ["cp", "tucker", "tt", "tr"]

shapes = st.lists(st.integers(1, 5), min_size=2, max_size=4)


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(FORMATS), shape=shapes, rank=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_reconstruction_matches_reference(fmt, shape, rank, seed):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = tnlayers.FactorizedTensor(shape, fmt, rank, dtype=torch.float64)
    cores = [c.detach() for c in t.cores]
    expected = full_tensor(fmt, cores)
    assert t().shape == tuple(shape)
    torch.testing.assert_close(t(), expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(FORMATS), shape=shapes, rank=st.integers(1, 6))
def test_parameter_count_closed_form(fmt, shape, rank):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = tnlayers.FactorizedTensor(shape, fmt, rank)
    assert sum(c.numel() for c in t.parameters()) == closed_form_params(fmt, shape, rank)
    assert t.network.num_params == closed_form_params(fmt, shape, rank)


def test_tucker_with_unfactored_modes():
    t = tnlayers.FactorizedTensor((4, 3, 5), "tucker", [2, None, 3], dtype=torch.float64)
    core, u0, u2 = [c.detach() for c in t.cores]
    assert core.shape == (2, 3, 3)
    torch.testing.assert_close(t(), tucker_full(core, [u0, u2], [0, 2]))


def test_tt_rank_with_boundary_bonds():
    a = tnlayers.FactorizedTensor((3, 4, 5), "tt", [1, 2, 3, 1])
    assert [tuple(c.shape) for c in a.cores] == [(3, 2), (2, 4, 3), (3, 5)]
    with pytest.raises(ValueError, match="start and end with 1"):
        tnlayers.FactorizedTensor((3, 4, 5), "tt", [2, 2, 3, 1])


def test_cores_form_one_group():
    t = tnlayers.FactorizedTensor((4, 5, 6), "tt", 3)
    groups = tnlayers.core_groups(t)
    assert [name for name, _ in groups] == [""]
    assert [id(p) for p in groups[0][1]] == [id(p) for p in t.cores]


@pytest.mark.parametrize("fmt", FORMATS)
def test_scale_invariance(fmt):
    torch.manual_seed(0)
    t = tnlayers.FactorizedTensor((3, 4, 5), fmt, 2, dtype=torch.float64)
    before = t().detach()
    with torch.no_grad():
        t.cores[0].mul_(3.0)
        t.cores[-1].div_(3.0)
    torch.testing.assert_close(t(), before)


@pytest.mark.parametrize("fmt,rank", [("tt", 20), ("tr", 20), ("tucker", 6), ("cp", 40)])
def test_from_tensor_exact_at_full_rank(fmt, rank):
    torch.manual_seed(1)
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = tnlayers.FactorizedTensor.from_tensor(x, fmt, rank)
    err = (t().detach() - x).norm() / x.norm()
    assert err < (1e-3 if fmt == "cp" else 1e-10)


@pytest.mark.parametrize("n,expected", [(16, (4, 2, 2)), (32, (4, 4, 2)), (64, (4, 4, 4)), (3, (3,)),
                                        (128, (8, 4, 4)), (10, (5, 2)), (7, (7,)), (1, (1,)), (4096, (16, 16, 16))])
def test_tensorize_dim(n, expected):
    assert tensorize_dim(n) == expected


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000))
def test_tensorize_dim_properties(n):
    modes = tensorize_dim(n)
    assert 1 <= len(modes) <= 3
    assert list(modes) == sorted(modes, reverse=True)
    product = 1
    for m in modes:
        product *= m
    assert product == n
    assert n == 1 or 1 not in modes


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(shape=(3, 4), format="ht", rank=2), ValueError, "format must be one of"),
    (dict(shape=(3, 4), format="tt", rank=0), ValueError, "rank"),
    (dict(shape=(3, 4), format="tt", rank=-2), ValueError, "rank"),
    (dict(shape=(3, 4), format="tt", rank="2"), TypeError, "rank"),
    (dict(shape=(3, 4), format="tt", rank=1.5), ValueError, r"\(0, 1\]"),
    (dict(shape=(3, 4), format="tt", rank=0.0), ValueError, r"\(0, 1\]"),
    (dict(shape=(3, 4), format="tr", rank=[2, 2, 2]), ValueError, "2 entries"),
    (dict(shape=(3,), format="cp", rank=2), ValueError, "at least 2 modes"),
    (dict(shape=(3, 0), format="cp", rank=2), ValueError, "positive ints"),
    (dict(shape=(3, 4), format="tucker", rank=[None, None]), ValueError, "at least one mode"),
])
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        tnlayers.FactorizedTensor(**kwargs)


def test_float_rank_is_fraction_of_parameters():
    t = tnlayers.FactorizedTensor((8, 8, 8), "tt", 0.25)
    r = t.ranks["r1"]
    assert t.network.num_params <= 0.25 * 512 < closed_form_params("tt", (8, 8, 8), r + 1)
