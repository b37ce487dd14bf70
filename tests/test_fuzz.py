"""Fuzzing (hypothesis, bounded): random layers, ranks and shapes; random training steps with random lr, α,
ρ and gradients (zeros, inf included). Asserts: valid arguments (classified by an oracle written from the
docs) build layers that match the dense op, invalid ones raise only the documented exceptions; no
non-finite value in any core after a step with finite inputs; DAS changes each core's norm by exactly
|1 + λ_k| before the base step, with λ_k = η α u (γ_k − ḡ)/s_k
(docs/design.md, 'DAS: deviation-aware scaling')."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tnlayers
from tnlayers import BAR, DAS, SAM, FactorizedTensor, TensorizedConv2d, TensorizedLinear

DOCUMENTED = (ValueError, TypeError, NotImplementedError)
FORMATS = ("tt", "tr", "cp", "tucker")
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# valid values, then (in some examples) one argument replaced by a bad value
ranks = st.one_of(st.integers(1, 5), st.floats(0.01, 1.0), st.lists(st.integers(1, 4), min_size=1, max_size=6))
BAD_VALUES = st.sampled_from([0, -1, 2.5, "4", None, math.nan, True, [0, 3], (2, 2, 2)])
ARGS = ("n_in", "n_out", "kernel", "stride", "padding", "rank", "strategy")
BUILT = []


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


# -- the validity oracle: written from docs/errors.md and the README's layer table, not from the code ------
def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _int_or_pair(v, ok) -> bool:
    return ok(v) or (isinstance(v, (tuple, list)) and len(v) == 2 and all(ok(x) for x in v))


def _valid_padding(padding, stride) -> bool:
    if padding == "same":
        return stride == 1  # PyTorch's rule too: 'same' only for unstrided convs
    non_negative = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    return padding == "valid" or _int_or_pair(padding, non_negative)


def _valid_rank(rank, fmt, kind, bonds) -> bool:
    """An int >= 1, a float in (0, 1], or one entry per bond (``bonds``: how many the format has here); a
    TT rank may also be written with its boundary bonds 1 (two more), a Tucker-2 conv rank over every mode
    (its two spatial modes too)."""
    if isinstance(rank, float):
        return 0.0 < rank <= 1.0  # NaN fails both
    if not isinstance(rank, (list, tuple)):
        return _positive_int(rank)
    lengths = {bonds}
    if fmt == "tt" and len(rank) == bonds + 2 and rank[0] == rank[-1] == 1:
        lengths.add(bonds + 2)
    if fmt == "tucker" and kind == "conv":
        lengths.add(bonds + 2)
    return len(rank) in lengths and all(_positive_int(r) for r in rank)


def _valid(kind, fmt, n_in, n_out, kernel, stride, padding, rank, strategy, bonds) -> bool:
    if not (_positive_int(n_in) and _positive_int(n_out) and _valid_rank(rank, fmt, kind, bonds)):
        return False
    if kind != "tensor" and strategy not in ("auto", "dense", "factorized"):
        return False
    if kind == "conv":  # a linear layer or a tensor takes no kernel/stride/padding: a bad one there is unused
        return (_int_or_pair(kernel, _positive_int) and _positive_int(stride)
                and _valid_padding(padding, stride))
    return True


def _build(kind, fmt, n_in, n_out, kernel, stride, padding, rank, strategy):
    if kind == "conv":
        return TensorizedConv2d(n_in, n_out, kernel, stride=stride, padding=padding, rank=rank, format=fmt,
                                strategy=strategy)
    if kind == "linear":
        return TensorizedLinear(n_in, n_out, rank=rank, format=fmt, strategy=strategy)
    return FactorizedTensor((n_in, n_out), fmt, rank)


def _bonds(kind, fmt, n_in, n_out) -> int:
    """How many rank entries a layer of these sizes takes: read off the same layer built with rank=2 (the
    README: an int rank is uniform, one value per bond). Meaningless (0) when the sizes are invalid."""
    if not (_positive_int(n_in) and _positive_int(n_out)):
        return 0
    return len(_build(kind, fmt, n_in, n_out, 3, 1, 1, 2, "auto").ranks)


@settings(FUZZ, max_examples=100)
@given(kind=st.sampled_from(["conv", "linear", "tensor"]), fmt=st.sampled_from(FORMATS), n_in=st.integers(1, 12),
       n_out=st.integers(1, 12), kernel=st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))),
       stride=st.integers(1, 2), padding=st.one_of(st.integers(0, 2), st.sampled_from(["same", "valid"])),
       rank=ranks, strategy=st.sampled_from(["auto", "dense", "factorized"]), batch=st.integers(1, 2),
       bad_arg=st.sampled_from((None,) * len(ARGS) + ARGS), bad_value=BAD_VALUES)
def test_random_layers_build_or_raise_documented_errors(kind, fmt, n_in, n_out, kernel, stride, padding, rank, strategy,
                                                        batch, bad_arg, bad_value):
    """Valid arguments (by the oracle above) build a layer whose forward matches the dense op on its own
    weight; invalid ones raise a documented exception and nothing else."""
    if bad_arg is not None:
        args = dict(n_in=n_in, n_out=n_out, kernel=kernel, stride=stride, padding=padding, rank=rank,
                    strategy=strategy)
        args[bad_arg] = bad_value
        n_in, n_out, kernel, stride, padding, rank, strategy = (args[a] for a in ARGS)
    ctx = _quiet()
    try:
        valid = _valid(kind, fmt, n_in, n_out, kernel, stride, padding, rank, strategy, _bonds(kind, fmt, n_in, n_out))
        try:
            layer = _build(kind, fmt, n_in, n_out, kernel, stride, padding, rank, strategy)
        except DOCUMENTED as err:
            assert not valid, f"valid arguments refused: {err!r}"
            return
        assert valid, "invalid arguments accepted"
        BUILT.append(kind)
        assert all(torch.isfinite(c).all() for c in layer.cores)
        if kind == "tensor":
            out = layer()
            assert out.shape == (n_in, n_out)
        else:
            x = torch.randn(batch, n_in, 6, 6) if kind == "conv" else torch.randn(batch, n_in)
            out = layer(x)
            with torch.no_grad():  # the dense op on the layer's own (rebuilt) weight
                pad = tuple(padding) if isinstance(padding, list) else padding
                reference = (F.conv2d(x, layer.weight, layer.bias, stride, pad) if kind == "conv"
                             else F.linear(x, layer.weight, layer.bias))
            torch.testing.assert_close(out.detach(), reference, rtol=1e-4, atol=1e-4)
        assert torch.isfinite(out).all()
        out.square().mean().backward()
        assert all(c.grad is not None and torch.isfinite(c.grad).all() for c in layer.cores)
        assert layer.network.num_params == sum(c.numel() for c in layer.cores)
    finally:
        ctx.__exit__(None, None, None)


def _model(fmt, rank, dtype=torch.float32):
    torch.manual_seed(0)
    ctx = _quiet()
    try:
        return nn.Sequential(tnlayers.TensorizedConv2d(3, 4, 3, rank=rank, format=fmt, dtype=dtype), nn.Flatten(),
                             tnlayers.TensorizedLinear(16, 2, rank=rank, format=fmt, dtype=dtype)).to(dtype)
    finally:
        ctx.__exit__(None, None, None)


def _cores(model):
    return [c for _, group in tnlayers.core_groups(model) for c in group]


def _set_grads(model, scale, zero_mask, seed):
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(model.parameters()):
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
        p.grad = torch.zeros_like(p) if zero_mask[i % len(zero_mask)] else g


def _optimizer(name, model, lr, alpha, rho):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "sam":
        return SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    if name == "bar":
        if alpha * lr >= 1:  # documented refusal: a factor 1 - alpha * lr <= 0 would zero or flip a core
            with pytest.raises(ValueError, match=r"alpha \* lr < 1"):
                BAR(model.parameters(), torch.optim.SGD, alpha=alpha, total_steps=5, lr=lr)
            return None
        return BAR(model.parameters(), torch.optim.SGD, alpha=alpha, total_steps=5, lr=lr)
    return DAS(model.parameters(), torch.optim.SGD, alpha=alpha, lr=lr, momentum=0.9, backend="torch",
               normalization=name.split("-")[1])


MAX_SCALE = 1e4  # DAS's documented default bound on the factor 1 + λ of one step (docs/errors.md)
OPTIMIZERS = ["sgd", "sam", "bar", "das-global", "das-layer"]


@FUZZ
@given(fmt=st.sampled_from(FORMATS), rank=st.integers(1, 3), name=st.sampled_from(OPTIMIZERS),
       lr=st.floats(1e-4, 1.0), alpha=st.floats(0.0, 2.0), rho=st.floats(0.0, 0.5),
       scale=st.sampled_from([0.0, 1e-3, 1.0, 1e3]), zero_mask=st.lists(st.booleans(), min_size=1, max_size=4),
       steps=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_steps_with_finite_gradients_keep_every_core_finite(fmt, rank, name, lr, alpha, rho, scale, zero_mask,
                                                            steps, seed):
    model = _model(fmt, rank)
    opt = _optimizer(name, model, lr, alpha, rho)
    if opt is None:
        return
    for step in range(steps):
        _set_grads(model, scale, zero_mask, seed + step)
        if name == "sam":
            opt.first_step(zero_grad=False)
            opt.second_step()
        else:
            opt.step()
        for core in _cores(model):
            assert torch.isfinite(core).all(), (name, step)


@FUZZ
@given(fmt=st.sampled_from(FORMATS), name=st.sampled_from(OPTIMIZERS), lr=st.floats(1e-4, 1.0),
       alpha=st.floats(0.0, 2.0), rho=st.floats(0.0, 0.5), bad=st.sampled_from([math.inf, -math.inf, math.nan]),
       where=st.integers(0, 20), seed=st.integers(0, 2 ** 16))
def test_non_finite_gradients_raise_nothing_and_the_rescale_writes_nothing_non_finite(fmt, name, lr, alpha, rho, bad,
                                                                                       where, seed):
    model = _model(fmt, 2)
    opt = _optimizer(name, model, lr, alpha, rho)
    if opt is None:
        return
    _set_grads(model, 1.0, [False], seed)
    params = list(model.parameters())
    grad = params[where % len(params)].grad
    grad.view(-1)[seed % grad.numel()] = bad
    if name.startswith("das") or name == "bar":
        before = [c.detach().clone() for c in _cores(model)]
        opt._rescale_cores()  # the part of the step that is DAS's/BAR's own: never writes inf/NaN
        for core, old in zip(_cores(model), before):
            assert torch.isfinite(core).all() or not torch.isfinite(old).all()
    if name == "sam":
        opt.first_step(zero_grad=False)  # a non-finite gradient gives no perturbation
        assert all(torch.isfinite(c).all() for c in _cores(model))
        opt.second_step()
    else:
        opt.step()  # the base step itself may take the inf in (as a plain torch optimizer does): no exception


@FUZZ
@given(fmt=st.sampled_from(FORMATS), rank=st.integers(1, 3), lr=st.floats(1e-3, 1.0), alpha=st.floats(0.0, 2.0),
       normalization=st.sampled_from(["global", "layer"]), denominator=st.sampled_from(["squared", "norm"]),
       scale=st.sampled_from([1e-3, 1.0, 1e2]), zero_mask=st.lists(st.booleans(), min_size=1, max_size=5),
       seed=st.integers(0, 2 ** 16))
def test_das_scales_each_core_norm_by_one_plus_lambda(fmt, rank, lr, alpha, normalization, denominator, scale,
                                                      zero_mask, seed):
    model = _model(fmt, rank, torch.float64)
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=alpha, lr=lr, backend="torch",
              normalization=normalization, denominator=denominator)
    _set_grads(model, scale, zero_mask, seed)
    groups = [group for _, group in tnlayers.core_groups(model)]
    norms = [[float(c.detach().norm()) for c in group] for group in groups]
    s = [[n ** 2 for n in group] for group in norms]
    gamma = [[float(c.grad.norm()) ** 2 for c in group] for group in groups]
    opt._rescale_cores()
    # the expected λ, written out independently of the optimizer
    total = sum(sum(g) for g in gamma)
    expected = []
    for s_g, gamma_g in zip(s, gamma):
        mean = sum(gamma_g) / len(gamma_g)
        norm_sum = total if normalization == "global" else sum(gamma_g)
        u = norm_sum ** -0.5 if norm_sum > 0 else 0.0
        for s_k, gamma_k in zip(s_g, gamma_g):
            denom = s_k if denominator == "squared" else math.sqrt(s_k)
            ok = sum(gamma_g) > 0 and s_k > 0 and alpha * lr > 0
            lam = lr * alpha * u * (gamma_k - mean) / denom if ok else 0.0
            expected.append(min(max(lam, 1 / MAX_SCALE - 1), MAX_SCALE - 1))  # 1 + λ kept in [1/MAX_SCALE, MAX_SCALE]
    if opt.last_lambdas is None:  # alpha = 0: nothing rescaled
        lambdas = [0.0] * len(expected)
    else:
        applied_cores, applied = opt.last_lambdas
        assert [id(c) for c in applied_cores] == [id(c) for group in groups for c in group]
        lambdas = applied.tolist()
    assert lambdas == pytest.approx(expected, rel=1e-9, abs=1e-12)
    after = [float(c.detach().norm()) for group in groups for c in group]
    before = [n for group in norms for n in group]
    for lam, n0, n1 in zip(lambdas, before, after):
        assert n1 == pytest.approx(abs(1.0 + lam) * n0, rel=1e-9, abs=1e-300)


def test_the_layer_fuzzer_builds_layers_of_every_kind():
    """Guards the fuzzer itself: most of its examples must get past the constructor."""
    if len(BUILT) == 0:
        pytest.skip("run with the layer fuzz test")
    assert set(BUILT) == {"conv", "linear", "tensor"} and len(BUILT) >= 30, len(BUILT)
