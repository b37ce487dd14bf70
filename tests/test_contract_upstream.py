"""What tnlayers reads from opt_einsum, checked against the installed release (CI runs this file on the
newest release pip picks and on the oldest one pyproject.toml admits, see .ci/run).

tnlayers.contract asks opt_einsum only for ``contract_path(equation, *shapes, shapes=True)``: the path
(documented: a list of tuples of positions) and the FLOP estimate ``PathInfo.opt_cost``. The pairwise
step equations are built by ``tnlayers.contract.pairwise_steps``, not unpacked from the undocumented
``PathInfo.contraction_list``. If a release changes what is checked here, these tests fail by name.
"""
import random

import opt_einsum
import pytest
import torch

from tnlayers.contract import Contraction, pairwise_steps

# (equation, shapes): a TT linear layer's weight and factorized input path, a tensor ring (closing bond),
# CP (a hyperedge shared by every core), a Tucker conv (core tensor + factors), one operand, two operands
CASES = [
    ("abc,cde,efg->bdf", ((1, 4, 3), (3, 5, 2), (2, 6, 1))),
    ("Xbdf,abc,cde,efg->Xaceg", ((7, 4, 5, 6), (1, 4, 3), (3, 5, 2), (2, 6, 1))),
    ("abc,cde,efa->bdf", ((3, 4, 2), (2, 5, 4), (4, 6, 3))),
    ("ar,br,cr,dr->abcd", ((4, 3), (5, 3), (6, 3), (2, 3))),
    ("pqrs,ap,bq,cr,ds->abcd", ((3, 2, 2, 1), (8, 3), (6, 2), (3, 2), (3, 1))),
    ("abc->cb", ((2, 3, 4),)),
    ("ab,bc->ac", ((2, 3), (3, 4))),
]


def _random_case(rng: random.Random):
    """A random connected network of 3-6 operands over up to 8 labels, some kept in the output."""
    labels = "abcdefgh"
    n_ops = rng.randint(3, 6)
    sizes = {label: rng.randint(1, 5) for label in labels}
    terms = ["".join(rng.sample(labels, rng.randint(1, 3))) for _ in range(n_ops)]
    used = sorted(set("".join(terms)))
    output = "".join(label for label in used if rng.random() < 0.4)
    shapes = tuple(tuple(sizes[c] for c in t) for t in terms)
    return ",".join(terms) + "->" + output, shapes


def test_contract_path_returns_a_documented_path_and_a_flop_estimate():
    path, info = opt_einsum.contract_path("ab,bc->ac", (2, 3), (3, 4), shapes=True, optimize="auto")
    assert [tuple(p) for p in path] == [(0, 1)]
    # opt_einsum's FLOP model (what strategy="flops" and "auto" start from): 2*3*4 multiply-adds, 2 ops each.
    # A release that changes it changes layer strategy decisions: update tnlayers.strategy's notes then.
    assert int(info.opt_cost) == 48


@pytest.mark.parametrize("equation, shapes", CASES)
def test_pairwise_steps_match_opt_einsums_own_plan(equation, shapes):
    path, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize="auto")
    steps = pairwise_steps(equation, path)
    assert len(steps) == len(path)
    # opt_einsum's own step equations, where this release still exposes them in the layout tnlayers used to
    # unpack (positions, removed, equation, remaining, blas): the steps are the same, so moving off
    # contraction_list changed no arithmetic. Runtime code does not read contraction_list.
    listed = getattr(info, "contraction_list", None)
    if listed and all(isinstance(c, tuple) and len(c) == 5 and isinstance(c[2], str) for c in listed):
        assert steps == tuple((tuple(c[0]), c[2]) for c in listed)


@pytest.mark.parametrize("equation, shapes", CASES + [_random_case(random.Random(seed)) for seed in range(20)])
def test_contraction_equals_one_einsum(equation, shapes):
    gen = torch.Generator().manual_seed(0)
    operands = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    contraction = Contraction(equation, shapes)
    assert contraction.cost > 0
    torch.testing.assert_close(contraction(*operands), torch.einsum(equation, *operands), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("equation, shapes", CASES + [_random_case(random.Random(seed)) for seed in range(20, 40)])
def test_contraction_gradients_equal_one_einsums(equation, shapes):
    """The steps run as permute/reshape/mm (tnlayers/pairwise_step.py): their backward, for a non-contiguous
    upstream gradient too, gives what autograd gives for one torch.einsum. (No zero-size mode here: opt_einsum
    3.3's contract_path fails on one, 0/0 in its speed-up figure; no layer has such a mode.)"""
    gen = torch.Generator().manual_seed(1)
    ours = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    ref = [t.detach().clone().requires_grad_() for t in ours]
    out, expected = Contraction(equation, shapes)(*ours), torch.einsum(equation, *ref)
    # same shape as the output, transposed strides
    upstream = torch.randn(tuple(reversed(out.shape)), generator=gen, dtype=torch.float64).permute(
        tuple(reversed(range(out.dim()))))
    out.backward(upstream)
    expected.backward(upstream)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_pairwise_steps_refuse_what_they_cannot_read():
    with pytest.raises(ValueError, match="explicit equation"):
        pairwise_steps("ab,bc", [(0, 1)])
    with pytest.raises(ValueError, match="leaves 2 operands"):
        pairwise_steps("ab,bc,cd->ad", [(0, 1)])
