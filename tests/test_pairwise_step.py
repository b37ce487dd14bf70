"""A pairwise einsum step run as permutes, reshapes and one matmul (tnlayers/pairwise_step.py): the same values
and gradients as ``torch.einsum`` for any two-operand equation, in fewer ops."""
import string

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnlayers.contract import Contraction
from tnlayers.pairwise_step import PairStep


@st.composite
def pair_equations(draw):
    """Two terms over distinct labels, each label in one or both terms, kept or summed, sizes 0-3."""
    labels = list(string.ascii_letters[:draw(st.integers(0, 6))])
    where = {c: draw(st.sampled_from(["a", "b", "ab"])) for c in labels}
    kept = {c: draw(st.booleans()) or where[c] != "ab" for c in labels}  # a label in one term only is kept
    a = draw(st.permutations([c for c in labels if "a" in where[c]]))
    b = draw(st.permutations([c for c in labels if "b" in where[c]]))
    out = draw(st.permutations([c for c in labels if kept[c]]))
    sizes = {c: draw(st.integers(0 if draw(st.integers(0, 9)) == 0 else 1, 3)) for c in labels}
    return "".join(a) + "," + "".join(b) + "->" + "".join(out), sizes


@settings(max_examples=150, deadline=None)
@given(pair_equations())
def test_equals_einsum_in_values_and_gradients(case):
    equation, sizes = case
    terms = equation.split("->")[0].split(",")
    torch.manual_seed(0)
    x, y = (torch.randn([sizes[c] for c in t], dtype=torch.float64, requires_grad=True) for t in terms)
    step = PairStep(equation)
    assert not step.fallback
    got, want = step(x, y), torch.einsum(equation, x, y)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if want.numel():
        grad = torch.randn_like(want)
        for g, w in zip(torch.autograd.grad(got, (x, y), grad), torch.autograd.grad(want, (x, y), grad)):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_few_ops_and_einsum_where_the_equation_is_not_a_plain_pair():
    x, y = torch.randn(2, 3, 4), torch.randn(4, 5)
    with torch.profiler.profile() as prof:
        PairStep("abc,cd->adb")(x, y)
    ops = [e.name for e in prof.events() if e.name.startswith("aten::")]
    assert "aten::einsum" not in ops and "aten::mm" in ops
    # a label summed within one operand, or repeated in a term: torch.einsum itself
    for equation, shapes in [("abc,cd->ad", ((2, 3, 4), (4, 5))), ("aab,bc->ac", ((3, 3, 4), (4, 5)))]:
        step = PairStep(equation)
        assert step.fallback
        ops_x, ops_y = (torch.randn(s) for s in shapes)
        torch.testing.assert_close(step(ops_x, ops_y), torch.einsum(equation, ops_x, ops_y))


def test_a_contraction_planned_for_one_batch_runs_on_another():
    """Sizes come from the operands at each call: a linear layer's factorized path planned for a nominal batch
    (under torch.compile) runs on the actual one."""
    plan = Contraction("zi,ijr,rk->zjk", ((1024, 4), (4, 3, 2), (2, 5)))
    ops = [torch.randn(7, 4, dtype=torch.float64), torch.randn(4, 3, 2, dtype=torch.float64),
           torch.randn(2, 5, dtype=torch.float64)]
    torch.testing.assert_close(plan(*ops), torch.einsum("zi,ijr,rk->zjk", *ops), rtol=1e-12, atol=1e-12)


def test_complex_and_low_precision_operands():
    x, y = torch.randn(3, 4, dtype=torch.complex64), torch.randn(4, 2, 3, dtype=torch.complex64)
    torch.testing.assert_close(PairStep("ab,bca->ca")(x, y), torch.einsum("ab,bca->ca", x, y))
    xb, yb = x.real.bfloat16(), y.real.bfloat16()
    got = PairStep("ab,bca->ca")(xb, yb)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), torch.einsum("ab,bca->ca", xb.float(), yb.float()), rtol=0.02, atol=0.05)
