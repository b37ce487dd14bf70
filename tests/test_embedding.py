"""Tensorized embeddings against nn.Embedding on the same table, in float64: lookups and the gradients that reach
the cores, for every format, over shapes, ranks and index patterns (repeats, padding_idx, max_norm,
scale_grad_by_freq), with the table rebuilt here from the formats' definitions written out (not by the layer)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import tnlayers
from tnlayers import TensorizedEmbedding

FORMATS = ("tt", "tr", "cp", "tucker")
F64 = torch.float64


def full_tensor(fmt, cores):
    """The network's full tensor over its merged modes, from the formats' definitions."""
    if fmt == "tt":  # (n0, r1), (r1, n1, r2), ..., (r, n_last)
        out = cores[0]
        for core in cores[1:-1]:
            out = torch.einsum("...a,anb->...nb", out, core)
        return torch.einsum("...a,an->...n", out, cores[-1])
    if fmt == "tr":  # (r0, n0, r1), ..., (r_last, n_last, r0), closed by a trace
        out = cores[0]
        for core in cores[1:]:
            out = torch.einsum("x...a,anb->x...nb", out, core)
        return out.diagonal(dim1=0, dim2=-1).sum(-1)
    if fmt == "cp":  # sum_r prod_k f_k[n_k, r]
        out = cores[0]
        for factor in cores[1:]:
            out = torch.einsum("...r,nr->...nr", out, factor)
        return out.sum(-1)
    assert fmt == "tucker"  # core (R_0, ..., R_last), factors (n_k, R_k)
    out = cores[0]
    for k, factor in enumerate(cores[1:]):
        out = torch.movedim(torch.tensordot(out, factor, dims=([k], [1])), -1, k)
    return out


def reference_table(layer, cores=None):
    """(num_embeddings, embedding_dim): merged mode k split (i_k, j_k) row-major (CP: the modes are (i..., j...)
    already), index digits most significant first, rows past num_embeddings dropped. No padding mask: that is
    nn.Embedding's business."""
    cores = list(layer.cores) if cores is None else cores
    full = full_tensor(layer.format, cores)
    d = len(layer.in_shape)
    if layer.format == "cp":
        table = full
    else:
        split = full.reshape([n for pair in zip(layer.in_shape, layer.out_shape) for n in pair])
        table = split.permute(list(range(0, 2 * d, 2)) + list(range(1, 2 * d, 2)))
    return table.reshape(math.prod(layer.in_shape), layer.embedding_dim)[:layer.num_embeddings]


def dense_twin(layer):
    """nn.Embedding on the layer's table, the padding row zeroed as nn.Embedding's init leaves it."""
    table = reference_table(layer).detach().clone()
    if layer.padding_idx is not None:
        table[layer.padding_idx] = 0
    return nn.Embedding.from_pretrained(table, freeze=False, padding_idx=layer.padding_idx, max_norm=layer.max_norm,
                                        norm_type=layer.norm_type, scale_grad_by_freq=layer.scale_grad_by_freq)


def check_against_dense(layer, indices, atol=1e-10):
    """Output and core gradients of ``layer`` against nn.Embedding on the same table: the cores' gradient is
    the reconstruction's vector-Jacobian product with nn's table gradient."""
    before = [c.detach().clone() for c in layer.cores]
    out = layer(indices)
    dense = dense_twin(layer)
    expected = dense(indices)
    torch.testing.assert_close(out, expected, atol=atol, rtol=0)
    upstream = torch.randn_like(out)
    layer.zero_grad(set_to_none=True)
    out.backward(upstream)
    expected.backward(upstream)
    cores = [c.detach().clone().requires_grad_() for c in layer.cores]
    table = reference_table(layer, cores)
    reference = torch.autograd.grad(table, cores, dense.weight.grad, allow_unused=True)
    for k, (core, ref) in enumerate(zip(layer.cores, reference)):
        got = torch.zeros_like(core) if core.grad is None else core.grad
        torch.testing.assert_close(got, torch.zeros_like(core) if ref is None else ref, atol=atol, rtol=0,
                                   msg=lambda m: f"core {k}: {m}")
    assert all(torch.equal(a, c) for a, c in zip(before, layer.cores))  # a lookup never writes the cores
    return out


def layer_of(fmt, n, dim, rank, **kwargs):
    torch.manual_seed(0)
    return TensorizedEmbedding(n, dim, format=fmt, rank=rank, dtype=F64, **kwargs)


@st.composite
def configurations(draw):
    fmt = draw(st.sampled_from(FORMATS))
    modes = draw(st.sampled_from([2, 3]))
    in_shape = tuple(draw(st.lists(st.integers(1, 5), min_size=modes, max_size=modes)))
    out_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=modes, max_size=modes)))
    n = draw(st.integers(1, math.prod(in_shape)))  # rows past n pad the index space
    bonds = {"tt": modes - 1, "tr": modes, "cp": 1, "tucker": modes}[fmt]
    rank = draw(st.lists(st.integers(1, 4), min_size=bonds, max_size=bonds))
    padding_idx = draw(st.one_of(st.none(), st.integers(-n, n - 1)))
    max_norm = draw(st.one_of(st.none(), st.floats(0.05, 3.0)))
    norm_type = draw(st.sampled_from([1.0, 2.0, 3.5]))
    freq = draw(st.booleans())
    length = draw(st.integers(0, 24))
    pool = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4))  # few values: many repeats
    values = draw(st.lists(st.one_of(st.sampled_from(pool), st.integers(0, n - 1)), min_size=length,
                           max_size=length))
    batch_shape = draw(st.sampled_from(["flat", "2d", "scalar"])) if length else "flat"
    strategy = draw(st.sampled_from(["factorized", "dense", "auto"]))
    return dict(fmt=fmt, in_shape=in_shape, out_shape=out_shape, n=n, rank=rank, padding_idx=padding_idx,
                max_norm=max_norm, norm_type=norm_type, freq=freq, values=values, batch_shape=batch_shape,
                strategy=strategy)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configurations())
def test_lookups_and_gradients_match_nn_embedding_on_the_same_table(c):
    torch.manual_seed(len(c["values"]))
    layer = TensorizedEmbedding(c["n"], math.prod(c["out_shape"]), c["padding_idx"], c["max_norm"], c["norm_type"],
                                c["freq"], dtype=F64, format=c["fmt"], rank=c["rank"], in_shape=c["in_shape"],
                                out_shape=c["out_shape"], strategy=c["strategy"])
    indices = torch.tensor(c["values"], dtype=torch.long)
    if c["batch_shape"] == "2d" and len(indices) % 2 == 0:
        indices = indices.reshape(2, -1)
    elif c["batch_shape"] == "scalar":
        indices = indices[0]
    out = check_against_dense(layer, indices)
    assert out.shape == (*indices.shape, layer.embedding_dim)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("strategy", ["factorized", "dense"])
def test_each_format_and_strategy_on_a_padded_index_space(fmt, strategy):
    # 50 rows over index modes (4, 4, 4): rows 50..63 exist in the cores but are never returned
    layer = layer_of(fmt, 50, 12, 3, in_shape=(4, 4, 4), out_shape=(3, 2, 2), padding_idx=7, strategy=strategy)
    indices = torch.tensor([[0, 7, 49, 7], [13, 13, 13, 2]])
    check_against_dense(layer, indices)
    assert layer.last_strategy == strategy
    assert layer.weight.shape == (50, 12) and torch.count_nonzero(layer.weight[7]) == 0
    assert torch.count_nonzero(reference_table(layer)[7]) > 0  # the cores' own product is not zero there


@pytest.mark.parametrize("fmt", FORMATS)
def test_max_norm_scales_at_lookup_time_without_touching_the_cores(fmt):
    layer = layer_of(fmt, 40, 8, 3, max_norm=0.5, norm_type=1.0)
    table = layer.weight.detach().clone()
    indices = torch.tensor([1, 5, 5, 39, 0])
    out = check_against_dense(layer, indices)
    norms = out.norm(p=1, dim=-1)
    assert bool((norms <= 0.5 + 1e-9).all())
    assert bool((table[indices].norm(p=1, dim=-1) > 0.5).any())  # the bound did act
    torch.testing.assert_close(layer.weight, table, atol=0, rtol=0)  # the table keeps its unscaled rows


def test_scale_grad_by_freq_divides_each_rows_gradient_by_its_count():
    layer = layer_of("tt", 20, 6, 2, scale_grad_by_freq=True)
    indices = torch.tensor([3, 3, 3, 4, 9, 9])
    check_against_dense(layer, indices)
    # by hand: d(sum of outputs)/d(table row) is 1 per entry for every looked-up row, whatever its count
    cores = [c.detach().clone().requires_grad_() for c in layer.cores]
    expected_rows = torch.zeros(20, 6, dtype=F64)
    expected_rows[[3, 4, 9]] = 1.0
    reference = torch.autograd.grad(reference_table(layer, cores), cores, expected_rows)
    layer.zero_grad()
    layer(indices).sum().backward()
    for core, ref in zip(layer.cores, reference):
        torch.testing.assert_close(core.grad, ref, atol=1e-10, rtol=0)


def test_int32_indices_empty_batches_and_scalar_indices():
    layer = layer_of("tr", 30, 8, 2)
    table = reference_table(layer).detach()
    torch.testing.assert_close(layer(torch.tensor([[2, 29]], dtype=torch.int32)), table[torch.tensor([[2, 29]])], atol=1e-12, rtol=0)
    assert layer(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5, 8)
    torch.testing.assert_close(layer(torch.tensor(4)), table[4], atol=1e-12, rtol=0)


@pytest.mark.parametrize("bad", [30, 31, 32, -1])
def test_indices_past_num_embeddings_are_refused_like_nn_embedding(bad):
    layer = layer_of("tt", 30, 8, 2, in_shape=(4, 4, 2))  # 32 rows in the cores: 30 and 31 exist there
    with pytest.raises(IndexError, match=f"index {bad} is out of range for num_embeddings=30"):
        layer(torch.tensor([0, bad, 3]))
    with pytest.raises(IndexError):
        nn.Embedding(30, 8)(torch.tensor([0, bad, 3]))


@pytest.mark.parametrize("fmt,rank", [("tt", 8), ("tr", 4), ("cp", 16), ("tucker", 8)])
def test_reset_parameters_gives_nn_embeddings_variance(fmt, rank):
    # an entry's variance, pooled over 40 inits: one init's tables share their few cores, so a single table's
    # spread varies by +-30% (CP's six factors most); the pooled mean square is within +-11% at these seeds
    squares = []
    for seed in range(40):
        torch.manual_seed(seed)
        squares.append(TensorizedEmbedding(256, 64, format=fmt, rank=rank, dtype=F64).weight.detach().square().mean())
    assert 0.8 < float(torch.stack(squares).mean()) < 1.2  # nn.Embedding's N(0, 1): variance 1
    torch.manual_seed(0)
    small = [TensorizedEmbedding(256, 64, format=fmt, rank=rank, weight_std=0.02, dtype=F64).weight.detach()
             for _ in range(40)]
    assert 0.8 < float(torch.stack([t.square().mean() for t in small]).mean()) / 0.02 ** 2 < 1.2


@pytest.mark.parametrize("fmt,rank", [("tt", 6), ("tr", [2, 6]), ("tucker", [12, 6])])
def test_from_dense_at_full_rank_is_exact_and_keeps_nn_arguments(fmt, rank):
    torch.manual_seed(0)
    dense = nn.Embedding(10, 6, padding_idx=3, max_norm=2.0, scale_grad_by_freq=True, dtype=F64)
    layer = TensorizedEmbedding.from_dense(dense, format=fmt, rank=rank, in_shape=(4, 3), out_shape=(3, 2))
    assert layer.decomposition_error < 1e-10
    torch.testing.assert_close(layer.weight, dense.weight.detach(), atol=1e-10, rtol=0)
    assert (layer.padding_idx, layer.max_norm, layer.scale_grad_by_freq) == (3, 2.0, True)
    back = tnlayers.to_dense(nn.Sequential(layer))[0]
    assert type(back) is nn.Embedding and (back.padding_idx, back.max_norm, back.scale_grad_by_freq) == (3, 2.0, True)
    torch.testing.assert_close(back.weight, dense.weight.detach(), atol=1e-10, rtol=0)


def test_from_dense_of_a_frozen_table_gives_frozen_cores_and_cp_fits_as_well_as_the_svd():
    torch.manual_seed(0)
    dense = nn.Embedding.from_pretrained(torch.randn(12, 6, dtype=F64))  # frozen
    layer = tnlayers.CPEmbedding.from_dense(dense, rank=2, in_shape=(12, 1), out_shape=(1, 6),
                                            n_iter_max=500, tol=0.0)
    assert not any(c.requires_grad for c in layer.cores)
    # a 2-mode CP of rank 2 is a rank-2 matrix: at best the truncated SVD's error (Eckart-Young)
    s = torch.linalg.svdvals(dense.weight)
    best = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())
    assert layer.decomposition_error == pytest.approx(best, rel=1e-4)


def test_auto_looks_rows_up_in_the_cores_for_a_large_table_and_may_rebuild_a_small_one():
    big = TensorizedEmbedding(100_000, 64, format="tt", rank=8)
    big(torch.randint(0, 100_000, (256,)))
    assert big.last_strategy == "factorized"
    small = TensorizedEmbedding(16, 64, format="tt", rank=8, strategy="flops")
    small(torch.arange(16).repeat(64))  # every row, many times: rebuilding 16 rows is cheaper
    assert small.last_strategy == "dense"
    with tnlayers.set_strategy("factorized"):
        small(torch.arange(16))
    assert small.last_strategy == "factorized"


def test_state_dict_round_trip_and_configuration_check():
    layer = layer_of("tt", 30, 8, 2)
    twin = layer_of("tt", 30, 8, 2)
    with torch.no_grad():
        twin.cores[0].add_(1.0)
    twin.load_state_dict(layer.state_dict())
    torch.testing.assert_close(twin.weight, layer.weight, atol=0, rtol=0)
    assert (layer.in_shape, layer.out_shape) == ((5, 3, 2), (2, 2, 2))  # merged modes (10, 6, 4)
    other = layer_of("tt", 30, 8, 2, in_shape=(10, 3, 1), out_shape=(1, 2, 4))  # the same merged modes
    assert [c.shape for c in other.cores] == [c.shape for c in layer.cores]
    with pytest.raises(ValueError, match="in_shape"):  # same core shapes, another table: refused
        other.load_state_dict(layer.state_dict())


def test_the_table_is_cached_only_when_asked_then_reused_until_a_core_changes():
    layer = layer_of("tt", 64, 8, 3, strategy="dense")
    indices = torch.arange(64)
    with torch.no_grad():
        layer(indices)
    assert layer._weight_cache is None  # by default no table is kept: it is what the factorization saves
    layer.cache_weight = True
    with torch.no_grad():
        first = layer(indices)
        cached = layer._weight_cache[1]
        layer(indices)
        assert layer._weight_cache[1] is cached
        layer.cores[1].mul_(2.0)
        torch.testing.assert_close(layer(indices), 2 * first, atol=1e-12, rtol=0)


def test_logits_equal_x_times_the_table_by_both_strategies():
    for strategy in ("dense", "factorized"):
        layer = layer_of("tr", 30, 12, 2, padding_idx=4, strategy=strategy)
        x = torch.randn(2, 5, 12, dtype=F64, requires_grad=True)
        table = reference_table(layer).detach().clone()
        table[4] = 0
        out = layer.logits(x)
        torch.testing.assert_close(out, x @ table.T, atol=1e-10, rtol=0)
        grad = torch.randn_like(out)
        out.backward(grad)
        torch.testing.assert_close(x.grad, grad @ table, atol=1e-10, rtol=0)
        assert layer.last_strategy is not None


def test_autocast_lookups_and_dtype_mismatch():
    layer = TensorizedEmbedding(30, 8, format="tt", rank=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.tensor([1, 2])).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        layer.logits(torch.randn(2, 8, dtype=F64))
    assert F.embedding(torch.tensor([1]), layer.weight).shape == (1, 8)
