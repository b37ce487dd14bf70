"""tnlayers.decompositions against independent references: numpy's SVD (optimal truncation errors, the error
bounds of TT-SVD and HOSVD), tensorly (the same algorithms, implemented independently), torch.einsum
reconstructions, and tensors built with a known low rank (recovered to ~1e-12 in float64)."""
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tnlayers
from tnlayers.decompositions import cp_als, hooi, leading_subspace, tr_svd, tt_svd, unfold
from tnlayers.decompositions.subspace import mode_gram, mode_product, mode_subspace
from tnlayers.decompositions.threads import one_thread, threads_for


@pytest.fixture(autouse=True)
def _numpy_tensorly():
    """The tensorly references run on numpy arrays: importing tensorly-torch elsewhere in the session switches
    tensorly's global backend to pytorch, so it is pinned here for each test."""
    tl = pytest.importorskip("tensorly")
    with tl.backend_context("numpy"):
        yield

LETTERS = "abcdefgh"


def rel(a, b):
    return float((a - b).norm() / b.norm())


def tail(matrix: np.ndarray, rank: int) -> float:
    """Squared Frobenius error of the best rank-``rank`` approximation (Eckart-Young, numpy's SVD)."""
    s = np.linalg.svd(matrix, compute_uv=False)
    return float((s[rank:] ** 2).sum())


def tt_full(cores):
    """TT cores (1, n, r), ..., (r, n, 1) -> the tensor, by a plain left-to-right einsum chain."""
    out = cores[0]
    for core in cores[1:]:
        out = torch.einsum("a...b,bnc->a...nc", out, core)
    return out[0, ..., 0]


def tr_full(cores):
    out = cores[0]
    for core in cores[1:]:
        out = torch.einsum("a...b,bnc->a...nc", out, core)
    return torch.einsum("a...a->...", out)


def tucker_full(core, factors, modes):
    out = core
    for k, factor in zip(modes, factors):
        out = torch.movedim(torch.tensordot(out, factor, dims=([k], [1])), -1, k)
    return out


def cp_full(factors):
    d = len(factors)
    eq = ",".join(f"{LETTERS[i]}z" for i in range(d)) + "->" + LETTERS[:d]
    return torch.einsum(eq, *factors)


shapes = st.lists(st.integers(1, 6), min_size=2, max_size=4)


def tensor_of(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the truncated SVD and the unfolding helpers ----------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 3), st.integers(1, 14), st.integers(0, 99))
def test_leading_subspace_is_the_optimal_truncation(m, n, blocks, rank, seed):
    a = tensor_of((blocks, m, n), seed)
    matrix = a.permute(1, 0, 2).reshape(m, blocks * n)  # the blocks side by side
    basis, carry, spectrum = leading_subspace(a if blocks > 1 else a[0], rank)
    k = min(rank, m, blocks * n)
    assert basis.shape == (m, k)
    torch.testing.assert_close(basis.T @ basis, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0)
    rebuilt = basis @ (carry.permute(1, 0, 2).reshape(k, -1) if blocks > 1 else carry)
    assert abs(float((matrix - rebuilt).norm() ** 2) - tail(matrix.numpy(), k)) < 1e-9 * float(matrix.norm() ** 2)
    np.testing.assert_allclose(spectrum.numpy(), np.linalg.svd(matrix.numpy(), compute_uv=False), atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(shapes, st.data())
def test_mode_gram_and_mode_product_match_einsum(shape, data):
    x = tensor_of(shape, 0)
    mode = data.draw(st.integers(0, len(shape) - 1))
    u = tensor_of((shape[mode], 3), 1)
    torch.testing.assert_close(mode_gram(x, mode), unfold(x, mode) @ unfold(x, mode).T)
    labels = LETTERS[:len(shape)]
    out = labels.replace(labels[mode], "z")
    torch.testing.assert_close(mode_product(x, u, mode), torch.einsum(f"{labels},{labels[mode]}z->{out}", x, u))


def test_one_thread_restores_and_large_products_get_the_threads_back():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
            with threads_for(1 << 40):
                assert torch.get_num_threads() == 2
            with threads_for(10):
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# -- TT-SVD ------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=2, max_size=5), st.data())
def test_tt_svd_error_within_the_bounds_of_its_unfoldings(shape, data):
    """Oseledets (2011), Thm 2.2: ||A - TT||^2 <= sum_k tail_k(A_<k>); and no TT with these bonds beats the
    best rank-r_k approximation of any single unfolding (Eckart-Young), so TT-SVD cannot either."""
    ranks = data.draw(st.lists(st.integers(1, 6), min_size=len(shape) - 1, max_size=len(shape) - 1))
    x = tensor_of(shape, data.draw(st.integers(0, 99)))
    out = tt_svd(x, ranks)
    error2 = float((tt_full(out.cores) - x).norm() ** 2)
    tails = [tail(x.reshape(math.prod(shape[:k + 1]), -1).numpy(), r) for k, r in enumerate(ranks)]
    scale = float(x.norm() ** 2)
    assert error2 <= sum(tails) + 1e-10 * scale
    assert error2 >= max(tails) - 1e-10 * scale
    for k, core in enumerate(out.cores):
        assert core.shape[1] == shape[k]
        assert core.shape[2] <= (ranks[k] if k < len(ranks) else 1)
    np.testing.assert_allclose(out.spectra["r1"].numpy(), np.linalg.svd(x.reshape(shape[0], -1).numpy(),
                                                                         compute_uv=False), atol=1e-7)


def test_tt_svd_recovers_a_tensor_train_and_matches_tensorly():
    from tensorly.decomposition import tensor_train

    g = torch.Generator().manual_seed(0)
    shapes_ = [(1, 6, 3), (3, 5, 4), (4, 7, 2), (2, 4, 1)]
    cores = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes_]
    x = tt_full(cores)
    assert rel(tt_full(tt_svd(x, [3, 4, 2]).cores), x) < 1e-12
    y = tensor_of((6, 5, 7, 4), 1)  # a generic tensor: the truncation decides, and both must cut alike
    ours = rel(tt_full(tt_svd(y, [3, 4, 2]).cores), y)
    theirs = tensor_train(y.numpy(), rank=[1, 3, 4, 2, 1]).to_tensor()
    assert abs(ours - rel(torch.from_numpy(theirs), y)) < 1e-10


# -- TR-SVD ------------------------------------------------------------------------------------------------------
def test_tr_svd_recovers_a_tensor_ring():
    """A ring with bonds (r0, r1, r2, r3) = (2, 2, 3, 2): its first unfolding has rank r0 r1 = 4, so TR-SVD's first
    cut at 4 is exact; the later bonds of the ring TR-SVD builds need more than the original's (the rotation
    it picks within (r0, r1) mixes the two: up to r0^2 r_k), and asked enough they come back at their
    unfolding's rank, exactly."""
    g = torch.Generator().manual_seed(0)
    shapes_ = [(2, 4, 2), (2, 5, 3), (3, 6, 2), (2, 3, 2)]
    x = tr_full([torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes_])
    out = tr_svd(x, [2, 2, 100, 100])
    assert rel(tr_full(out.cores), x) < 1e-12
    assert [c.shape for c in out.cores] == [(2, 4, 2), (2, 5, 10), (10, 6, 6), (6, 3, 2)]


@pytest.mark.parametrize("shape,ranks", [((4, 5, 6), [2, 2, 3]), ((6, 3, 4, 5), [2, 3, 4, 5]),
                                         ((8, 4, 3, 4), [4, 2, 5, 3])])
def test_tr_svd_matches_tensorly(shape, ranks):
    from tensorly.decomposition import tensor_ring

    x = tensor_of(shape, 3)
    ours = tr_svd(x, ranks)
    theirs = tensor_ring(x.numpy(), rank=ranks + [ranks[0]])
    assert [tuple(c.shape) for c in ours.cores] == [tuple(c.shape) for c in theirs.factors]
    assert abs(rel(tr_full(ours.cores), x) - rel(torch.from_numpy(theirs.to_tensor()), x)) < 1e-10


def test_tr_svd_refuses_a_first_cut_larger_than_the_unfolding():
    with pytest.raises(ValueError, match=r"rank\[0\] \* rank\[1\] = 6 is larger than the first unfolding allows"):
        tr_svd(tensor_of((4, 5, 6), 0), [2, 3, 3])


# -- Tucker: HOSVD and HOOI --------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=2, max_size=4), st.data())
def test_hosvd_and_hooi_within_the_tucker_bounds(shape, data):
    """De Lathauwer et al. (2000): ||A - HOSVD||^2 <= sum_k tail_k(A_(k)); every Tucker approximation is at least
    max_k tail_k away (the mode-k unfolding of a rank-r_k Tucker has rank <= r_k); so HOSVD is within sqrt(m) of
    the best. HOOI starts at HOSVD and never increases the error."""
    ranks = [data.draw(st.one_of(st.none(), st.integers(1, n))) for n in shape]
    if all(r is None for r in ranks):
        ranks[0] = 1
    x = tensor_of(shape, data.draw(st.integers(0, 99)))
    modes = [k for k, r in enumerate(ranks) if r is not None]
    hosvd = hooi(x, ranks, n_iter_max=0)
    refined = hooi(x, ranks, n_iter_max=5, tol=0)
    e_hosvd = float((tucker_full(hosvd.cores[0], hosvd.cores[1:], modes) - x).norm() ** 2)
    e_hooi = float((tucker_full(refined.cores[0], refined.cores[1:], modes) - x).norm() ** 2)
    # the bounds hold for the ranks used: a rank above the product of the core's other sizes is redundant (the
    # core's unfolding cannot have it) and comes back smaller, e.g. [None, 3, None, 1] on (1, 3, 2, 2) -> r1 = 2
    used = dict(zip(modes, (f.shape[1] for f in hosvd.cores[1:])))
    assert used == dict(zip(modes, (f.shape[1] for f in refined.cores[1:])))
    assert all(used[k] <= ranks[k] for k in modes)
    tails = [tail(unfold(x, k).numpy(), used[k]) for k in modes]
    scale = float(x.norm() ** 2)
    assert max(tails) - 1e-10 * scale <= e_hooi <= e_hosvd + 1e-10 * scale
    assert e_hosvd <= sum(tails) + 1e-10 * scale
    assert math.sqrt(e_hosvd) <= math.sqrt(len(modes)) * math.sqrt(max(tails)) + 1e-6 * math.sqrt(scale)


def test_hooi_recovers_a_tucker_tensor_and_follows_tensorly():
    from tensorly.decomposition import partial_tucker

    g = torch.Generator().manual_seed(0)
    core = torch.randn(3, 4, 2, 5, generator=g, dtype=torch.float64)
    factors = [torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)]
    x = tucker_full(core, factors, [0, 3])  # Tucker-2: modes 1 and 2 unfactored
    out = hooi(x, [3, None, None, 5])
    assert [tuple(c.shape) for c in out.cores] == [(3, 4, 2, 5), (7, 3), (6, 5)]
    assert rel(tucker_full(out.cores[0], out.cores[1:], [0, 3]), x) < 1e-12
    # a generic tensor: from the same HOSVD start, the same sweeps reach the same error as tensorly's
    y = tensor_of((7, 4, 2, 6), 1)
    ours = hooi(y, [3, None, None, 4], n_iter_max=10, tol=0)
    (t_core, t_factors), _ = partial_tucker(y.numpy(), rank=[3, 4], modes=[0, 3], n_iter_max=10, tol=0)
    theirs = tucker_full(torch.from_numpy(t_core), [torch.from_numpy(f) for f in t_factors], [0, 3])
    assert abs(rel(tucker_full(ours.cores[0], ours.cores[1:], [0, 3]), y) - rel(theirs, y)) < 1e-9
    np.testing.assert_allclose(ours.spectra["r0"].numpy(), np.linalg.svd(unfold(y, 0).numpy(), compute_uv=False),
                               atol=1e-7)


def test_hooi_stops_at_its_tolerance():
    y = tensor_of((12, 3, 3, 12), 0)
    assert hooi(y, [4, None, None, 4], n_iter_max=50, tol=1e-3).sweeps < 50
    assert hooi(y, [4, None, None, 4], n_iter_max=7, tol=0).sweeps == 7


# -- CP-ALS ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,rank", [((6, 5, 4), 3), ((5, 6, 7, 3), 4), ((8, 3, 3, 8), 5)])
def test_cp_als_recovers_a_cp_tensor(shape, rank):
    """Random factors (the last case: rank 5 above the kernel modes' size 3, so the start has random columns)."""
    g = torch.Generator().manual_seed(0)
    x = cp_full([torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape])
    out = cp_als(x, rank, n_iter_max=800, tol=0)  # ALS converges linearly: ~1e-9 after 400 here, 1e-13 after 800
    assert [tuple(f.shape) for f in out.cores] == [(n, rank) for n in shape]
    assert rel(cp_full(out.cores), x) < 1e-11


@pytest.mark.parametrize("shape,rank", [((6, 5, 4), 3), ((5, 6, 7, 3), 4), ((8, 3, 3, 8), 5), ((3, 4, 5, 6), 3)])
def test_cp_als_within_one_percent_of_tensorly(shape, rank):
    """On a generic tensor, our default budget (<= 100 iterations) against tensorly's parafac with the
    settings tnlayers used (1000 iterations, line search)."""
    import tensorly as tl
    from tensorly.decomposition import parafac

    x = tensor_of(shape, 7)
    ours = rel(cp_full(cp_als(x, rank).cores), x)
    with tl.backend_context("numpy"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = parafac(x.numpy(), rank=rank, init="svd" if rank <= min(shape) else "random", n_iter_max=1000,
                         tol=1e-12, random_state=0, linesearch=True)
    assert ours <= 1.01 * rel(torch.from_numpy(tl.cp_to_tensor(theirs)), x)


def test_cp_als_of_a_matrix_is_the_truncated_svd():
    x = tensor_of((9, 7), 0)
    out = cp_als(x, 3)
    assert abs(float((cp_full(out.cores) - x).norm() ** 2) - tail(x.numpy(), 3)) < 1e-10


def test_cp_als_error_never_rises_and_is_deterministic():
    x = tensor_of((6, 3, 3, 6), 2)
    errors = [rel(cp_full(cp_als(x, 7, n_iter_max=k, tol=0).cores), x) for k in (1, 2, 5, 10, 30)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    a, b = cp_als(x, 7, seed=3), cp_als(x, 7, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.cores, b.cores))


def test_cp_als_bounded_blocks_give_the_same_result(monkeypatch):
    """The first contraction is cut into rank-column blocks when it would exceed the budget; the blocks
    must add up to the same factors."""
    from tnlayers.decompositions import alternating_least_squares as als

    x = tensor_of((6, 3, 3, 6), 4)
    whole = cp_als(x, 7, n_iter_max=5, tol=0)
    original = als._partial
    monkeypatch.setattr(als, "_partial", lambda t, f, keep, budget: original(t, f, keep, 1))  # blocks of 1 column
    blocked = cp_als(x, 7, n_iter_max=5, tol=0)
    for p, q in zip(whole.cores, blocked.cores):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


# -- options and shapes the routines refuse ----------------------------------------------------------------------
@pytest.mark.parametrize("call,error,match", [
    (lambda: cp_als(tensor_of((3, 4, 5), 0), 2, n_iter_max=-1), ValueError, "n_iter_max must be an int >= 0"),
    (lambda: cp_als(tensor_of((3, 4, 5), 0), 2, n_iter_max=2.5), TypeError, "n_iter_max must be an int >= 0"),
    (lambda: hooi(tensor_of((3, 4, 5), 0), [2, 2, 2], tol=float("nan")), ValueError, "tol must be a finite number"),
    (lambda: hooi(tensor_of((3, 4, 5), 0), [2, 2]), ValueError, "one rank .* per mode"),
    (lambda: hooi(tensor_of((3, 4, 5), 0), [2, 0, None]), ValueError, "a positive int, or None"),
    (lambda: tt_svd(tensor_of((3, 4, 5), 0), [2]), ValueError, "needs 2 positive int ranks"),
    (lambda: cp_als(tensor_of((3, 4, 5), 0), 0), ValueError, "rank must be a positive int"),
])
def test_bad_arguments_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_mode_subspace_of_a_tall_unfolding():
    """n > N / n: the Gram of the columns, then QR (the other branch of the truncated SVD)."""
    x = tensor_of((9, 2), 5)
    basis, spectrum = mode_subspace(x, 0, 2)
    np.testing.assert_allclose(spectrum.numpy(), np.linalg.svd(x.numpy(), compute_uv=False), atol=1e-10)
    assert float((basis @ (basis.T @ x) - x).norm()) < 1e-12


# -- through the layers ----------------------------------------------------------------------------------------
def _small_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))


@pytest.mark.parametrize("call,error,match", [
    (lambda: tnlayers.TTLinear.from_dense(torch.nn.Linear(4, 4), rank=2, n_iter_max=-1), ValueError,
     r"decomposition options: n_iter_max must be an int >= 0"),
    (lambda: tnlayers.tensorize(_small_net(), rank=2, init="decompose", decomposition_options={"tol": float("inf")}),
     ValueError, r"decomposition_options: tol must be a finite number >= 0"),
    (lambda: tnlayers.CPConv2d.from_dense(torch.nn.Conv2d(3, 4, 3), rank=2, n_iter_max="10"), TypeError,
     r"decomposition options: n_iter_max must be an int >= 0"),
])
def test_bad_option_values_are_refused_whichever_the_format(call, error, match):
    """TT ignores n_iter_max, yet a bad value is refused there too: one tensorize call may mix formats."""
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("fmt", ["tt", "tr", "tucker", "cp"])
def test_from_dense_reports_its_true_error_and_is_deterministic(fmt):
    torch.manual_seed(0)
    dense = torch.nn.Conv2d(16, 24, 3)
    make = {"tt": tnlayers.TTConv2d, "tr": tnlayers.TRConv2d, "tucker": tnlayers.TuckerConv2d, "cp": tnlayers.CPConv2d}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = (make[fmt].from_dense(dense, rank=0.3) for _ in range(2))
    truth = float((a.weight.double() - dense.weight.double()).norm() / dense.weight.double().norm())
    assert 0 < truth < 1 and abs(a.decomposition_error - truth) < 1e-6
    assert all(torch.equal(p, q) for p, q in zip(a.cores, b.cores))


def test_full_rank_cuts_reuse_no_memory_and_return_cores_of_their_own():
    """Cuts that keep every row take the identity basis (no copy of the carry); the cores still rebuild the tensor
    exactly, and none of them is a view of the input (writing into one leaves the input as it was)."""
    x = tensor_of((3, 4, 5), 0)
    before = x.clone()
    out = tt_svd(x, [3, 15])  # both cuts keep every row
    torch.testing.assert_close(torch.einsum("aib,bjc,ckd->ijk", *out.cores), x, atol=1e-12, rtol=0)
    for core in out.cores:
        core.add_(1.0)
    torch.testing.assert_close(x, before, atol=0, rtol=0)
    np.testing.assert_allclose(out.spectra["r1"].numpy(), np.linalg.svd(before.reshape(3, -1).numpy(),
                                                                       compute_uv=False), atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(2, 5), min_size=3, max_size=5), st.data())
def test_tr_svd_overwriting_its_input_gives_the_same_ring(shape, data):
    """overwrite=True (the caller's own copy): where the first cut keeps every row (r0 r1 = n_1) its carry is
    written over the input a block at a time; the cores and spectra are those of the copy-keeping run, and
    decompose_network never writes into a tensor the caller passed (a float64 contiguous one is not copied)."""
    from tnlayers.decompose import decompose_network
    from tnlayers.decompositions.subspace import _rotate_rows_
    from tnlayers.formats import get_format

    n0 = shape[0]
    if n0 > math.prod(shape[1:]):
        shape = [*shape, n0]  # the first cut keeps n_1 rows: the unfolding needs at least as many columns
    r0 = data.draw(st.sampled_from([q for q in range(1, n0 + 1) if n0 % q == 0]))
    ranks = [r0, n0 // r0] + data.draw(st.lists(st.integers(1, 6), min_size=len(shape) - 2, max_size=len(shape) - 2))
    x = tensor_of(tuple(shape), len(shape))
    kept = tr_svd(x, ranks)
    mine = x.clone()
    over = tr_svd(mine, ranks, overwrite=True)
    for a, b in zip(kept.cores, over.cores):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert over.cores[-1].untyped_storage().data_ptr() != mine.untyped_storage().data_ptr()
    assert not torch.equal(mine, x) or r0 * ranks[1] != n0  # the input did serve as the carry
    # the in-place rotation, in blocks smaller than a row, against a plain matmul
    blocks, rot = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    want = rot @ blocks
    _rotate_rows_(blocks, rot, chunk=5)
    torch.testing.assert_close(blocks, want, rtol=1e-12, atol=1e-12)
    net = get_format("tr").network(tuple(shape), ranks)
    before = x.clone()
    decompose_network(x, net)
    assert torch.equal(x, before)
