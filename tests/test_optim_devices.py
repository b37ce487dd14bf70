"""DAS, BAR and the SAM family over cores of several dtypes in one model (float32 + bfloat16 + float64; complex)
and, where a GPU is present, several devices (device_map-style: some layers on the GPU, the rest on the CPU).

References: the formulas of docs/design.md ('DAS: deviation-aware scaling', 'BAR: balancedness-aware
rescaling', 'The SAM family') written out as plain loops over the cores in float64 (on the CPU), the result
rounded once to each core's dtype; the base step is torch.optim's own, on a copy. Tolerances, per storage dtype:
float64 1e-12, float32 1e-6 (relative, and absolute against the tensor's largest entry: a core the base step
moves near zero keeps the absolute error of the rescale). bfloat16: one unit in the last place (2^-7 relative):
the reference rounds G·(1 + λ) once from float64, the optimizer multiplies in float32 arithmetic by 1 + λ
rounded to float32, so the two agree except where G·(1 + λ) lies within ~2^-24 (relative) of a bfloat16
rounding boundary, one ulp apart then; each such test also checks that most entries are equal bit for bit.
"""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import tnlayers
from test_optim_helpers import one_thread  # noqa: F401 (autouse fixture)
from tnlayers.groups import core_groups, group_of
from tnlayers.optim import BAR, DAS, GSAM, SAM, XSAM, DivergenceWarning, NormDynamics
from tnlayers.optim.das_fused import FusedDASStep

CPU = torch.device("cpu")
GPU = torch.cuda.is_available()
ACCEL = "cuda"  # the second device of the placement tests
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device: layers placed over the GPU and the CPU")
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2.0 ** -7,
             torch.complex64: 1e-6, torch.complex128: 1e-12}


class MixedNet(nn.Module):
    """A TRConv2d in float64, a TTLinear in float32, a TTLinear in bfloat16 and a dense head in float32, each on
    its device of ``devices``; activations are moved and cast at each layer's input. The bfloat16 layer's cores
    are unbalanced (core 0 x0.3, the last x1/0.3: the same weight) so that DAS's λ there is large enough to show
    in bfloat16 storage."""

    def __init__(self, devices=(CPU,) * 4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = tnlayers.TRConv2d(3, 4, 3, rank=2, padding=1, dtype=torch.float64, device=devices[0])
        self.fc1 = tnlayers.TTLinear(64, 16, rank=2, device=devices[1])
        self.fc2 = tnlayers.TTLinear(16, 16, rank=2, dtype=torch.bfloat16, device=devices[2])
        self.head = nn.Linear(16, 1, device=devices[3])
        with torch.no_grad():
            self.fc2.cores[0].mul_(0.3)
            self.fc2.cores[-1].div_(0.3)

    @staticmethod
    def _into(layer, h):
        p = next(layer.parameters())
        return h.to(p.device, p.dtype)

    def forward(self, x):
        h = torch.tanh(self.conv(self._into(self.conv, x))).flatten(1)
        h = torch.tanh(self.fc1(self._into(self.fc1, h)))
        h = torch.tanh(self.fc2(self._into(self.fc2, h)))
        return self.head(self._into(self.head, h))


class ComplexNet(nn.Module):
    """A complex64 TTLinear between two real ones (float32, float64); the loss sees |z|²."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = tnlayers.TTLinear(16, 16, rank=2)
        self.z = tnlayers.TTLinear(16, 16, rank=2, dtype=torch.complex64)
        self.b = tnlayers.TTLinear(16, 4, rank=2, dtype=torch.float64)

    def forward(self, x):
        h = torch.tanh(self.a(x.float()))
        h = self.z(h.to(torch.complex64)).abs()
        return self.b(h.double())


def batch(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(model, ComplexNet):
        return torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen, dtype=torch.float64)
    return torch.randn(8, 3, 4, 4, generator=gen), torch.randn(8, 1, generator=gen)


def loss_of(model, data):
    x, y = data
    out = model(x)
    return nn.functional.mse_loss(out, y.to(out.device, out.dtype))


def backward(model, seed=1):
    model.zero_grad(set_to_none=True)
    loss_of(model, batch(model, seed)).backward()


def twin(model):
    """A copy of ``model`` holding copies of its gradients (deepcopy leaves them out)."""
    other = copy.deepcopy(model)
    for p, q in zip(model.parameters(), other.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return other


def sq(t) -> float:
    """||t||² in float64 on the CPU, |z|² for complex entries."""
    t = t.detach().cpu()
    t = t.to(torch.complex128) if t.is_complex() else t.double()
    return float((t * t.conj()).real.sum())


def assert_matches(actual, expected, rounded_once=True):
    """``actual`` equals ``expected`` to the tolerance of the storage dtype (module docstring); ``rounded_once``:
    both rounded G·(1 + λ) to bfloat16 once, so most bfloat16 entries are equal bit for bit."""
    dtype = actual.dtype
    tol = TOLERANCE[dtype]
    a, e = actual.detach().cpu(), expected.detach().cpu()
    a, e = (a.to(torch.complex128), e.to(torch.complex128)) if a.is_complex() else (a.double(), e.double())
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * float(e.abs().max()))
    if dtype == torch.bfloat16 and rounded_once:
        assert float((actual.cpu() == expected.cpu()).double().mean()) >= 0.9


def groups_of(model):
    return [cores for _, cores in core_groups(model)]


def reference_das_lambdas(groups, lr_of, alpha_of, normalization="global", denominator="squared", max_scale=1e4):
    """λ_k = η α u (γ_k − ḡ)/s_k (or /√s_k), u = (Σ_all γ)^(-1/2) or (K ḡ)^(-1/2), 1 + λ_k kept within
    [1/max_scale, max_scale] (docs/design.md, 'DAS: the max_scale bound'): {core: λ} in float64."""
    gammas = [[sq(c.grad) for c in cores] for cores in groups]
    total = sum(sum(g) for g in gammas)
    out = {}
    for cores, gamma in zip(groups, gammas):
        mean = sum(gamma) / len(gamma)
        u = (len(gamma) * mean) ** -0.5 if normalization == "layer" else total ** -0.5
        for core, g in zip(cores, gamma):
            s = sq(core)
            lam = lr_of(core) * alpha_of(core) * u * (g - mean) / (s if denominator == "squared" else math.sqrt(s))
            out[core] = min(max(lam, 1.0 / max_scale - 1.0), max_scale - 1.0)
    return out


def reference_bar_lambdas(groups, lr_of, alpha, variant):
    """nBAR: σ_k = sign(γ_k − mean γ); oBAR: σ_k = −sign(s_k − mean s); λ_k = α η σ_k."""
    out = {}
    for cores in groups:
        measured = [sq(c.grad) if variant == "nbar" else sq(c) for c in cores]
        mean = sum(measured) / len(measured)
        for core, m in zip(cores, measured):
            sign = (m > mean) - (m < mean)
            out[core] = alpha * lr_of(core) * (sign if variant == "nbar" else -sign)
    return out


def rescaled_reference(model, lambdas_by_position):
    """A twin of ``model`` whose cores are rescaled by 1 + λ computed in float64, rounded once to their dtype."""
    expected = twin(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, q in expected.named_parameters():
            lam = lambdas_by_position.get(params[name])
            if lam is not None:
                wide = q.to(torch.complex128) if q.is_complex() else q.double()
                q.copy_((wide * (1.0 + lam)).to(q.dtype))
    return expected


def check_one_step(model, make_opt, base, base_kwargs, reference):
    """One step of ``make_opt(params)`` on ``model`` against ``reference`` λ (a {core: λ} dict) applied in
    float64 then torch.optim's ``base`` step on a twin."""
    expected = rescaled_reference(model, reference)
    opt = make_opt(model)
    opt.step()
    cores, lambdas = opt.last_lambdas
    want = torch.tensor([reference[c] for c in cores], dtype=torch.float64)
    torch.testing.assert_close(lambdas.detach().cpu().double(), want, rtol=1e-9, atol=1e-15)
    base(expected.parameters(), **base_kwargs).step()
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        assert_matches(p, q)
    return lambdas


BASES = [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
         (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01))]


@pytest.mark.parametrize("base, base_kwargs", BASES, ids=["SGD", "AdamW"])
@pytest.mark.parametrize("alpha", [0.5, 50.0])
@pytest.mark.parametrize("normalization, denominator", [("global", "squared"), ("layer", "norm")])
def test_das_over_float32_bfloat16_float64_cores_matches_the_formulas(base, base_kwargs, alpha, normalization,
                                                                       denominator):
    model = MixedNet()
    backward(model)
    lr = base_kwargs["lr"]
    reference = reference_das_lambdas(groups_of(model), lambda c: lr, lambda c: alpha, normalization, denominator)
    lambdas = check_one_step(model, lambda m: DAS(m.parameters(), base, alpha=alpha, normalization=normalization,
                                                  denominator=denominator, **base_kwargs),
                             base, base_kwargs, reference)
    if alpha == 50.0 and base is torch.optim.SGD:  # the rescale shows in the bfloat16 cores
        assert float(lambdas.abs().max()) > 2.0 ** -6


def test_das_per_group_alpha_and_lr_over_dtypes():
    """Param groups by dtype with their own lr and alpha: η α per core from its group (the table path)."""
    model = MixedNet()
    backward(model)
    settings = {torch.float64: (0.05, 2.0), torch.float32: (0.1, 0.5), torch.bfloat16: (0.2, 40.0)}
    groups = [{"params": [p for p in model.parameters() if p.dtype == d], "lr": lr, "alpha": a}
              for d, (lr, a) in settings.items()]
    reference = reference_das_lambdas(groups_of(model), lambda c: settings[c.dtype][0],
                                      lambda c: settings[c.dtype][1])
    base_groups = lambda m: [{"params": [p for p in m.parameters() if p.dtype == d], "lr": lr}  # noqa: E731
                             for d, (lr, _) in settings.items()]
    expected = rescaled_reference(model, reference)
    opt = DAS(groups, torch.optim.SGD, lr=0.1)
    opt.step()
    cores, lambdas = opt.last_lambdas
    torch.testing.assert_close(lambdas.double(), torch.tensor([reference[c] for c in cores], dtype=torch.float64),
                               rtol=1e-9, atol=1e-15)
    torch.optim.SGD(base_groups(expected), lr=0.1).step()
    for p, q in zip(model.parameters(), expected.parameters()):
        assert_matches(p, q)


@pytest.mark.parametrize("variant", ["nbar", "obar"])
@pytest.mark.parametrize("base, base_kwargs", BASES, ids=["SGD", "AdamW"])
def test_bar_over_float32_bfloat16_float64_cores_matches_the_formulas(variant, base, base_kwargs):
    model = MixedNet()
    backward(model)
    alpha = 0.2 if base is torch.optim.SGD else 20.0  # αη = 0.02: a visible step in bfloat16
    lr = base_kwargs["lr"]
    reference = reference_bar_lambdas(groups_of(model), lambda c: lr, alpha, variant)
    check_one_step(model, lambda m: BAR(m.parameters(), base, alpha=alpha, variant=variant, **base_kwargs),
                   base, base_kwargs, reference)


def _interleaved_group(seed=0):
    """One TTLinear whose cores are float32, bfloat16, float64, ... in turn: a group spread over three buckets,
    next to a float32 layer; gradients set from one float64 draw, cast to each core's dtype."""
    torch.manual_seed(seed)
    model = nn.ModuleDict({"mixed": tnlayers.TTLinear(16, 16, rank=2), "plain": tnlayers.TTLinear(16, 16, rank=2)})
    dtypes = [torch.float32, torch.bfloat16, torch.float64]
    with torch.no_grad():
        for k, core in enumerate(model["mixed"].cores):
            core.data = core.data.to(dtypes[k % 3])
    gen = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
    return model


def test_a_group_spread_over_dtypes_is_one_group():
    model = _interleaved_group()
    assert len({group_of(c) for c in model["mixed"].cores}) == 1
    reference = reference_das_lambdas(groups_of(model), lambda c: 0.1, lambda c: 0.5)
    check_one_step(model, lambda m: DAS(m.parameters(), torch.optim.SGD, alpha=0.5, lr=0.1), torch.optim.SGD,
                   dict(lr=0.1), reference)


@pytest.mark.parametrize("optimizer", ["DAS", "BAR"])
def test_mixed_dtypes_equal_the_float64_model_rounded_per_dtype(optimizer):
    """The same values in one float64 model: the same λ, and each core of the mixed model is the float64 result
    rounded to its own dtype (per-dtype-consistent)."""
    mixed = MixedNet()
    wide = copy.deepcopy(mixed).double()
    gen = torch.Generator().manual_seed(5)
    for p, q in zip(mixed.parameters(), wide.parameters()):
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        q.grad = p.grad.double()  # exact: every value of the narrower dtypes is a float64
    make = (lambda m: DAS(m.parameters(), torch.optim.SGD, alpha=50.0, lr=0.1)) if optimizer == "DAS" else \
        (lambda m: BAR(m.parameters(), torch.optim.SGD, alpha=0.2, lr=0.1))
    opt_mixed, opt_wide = make(mixed), make(wide)
    opt_mixed.step()
    opt_wide.step()
    torch.testing.assert_close(opt_mixed.last_lambdas[1], opt_wide.last_lambdas[1], rtol=1e-12, atol=1e-18)
    for p, q in zip(mixed.parameters(), wide.parameters()):
        # the mixed model rounds twice (after the rescale, after the base step), the float64 one once, at the end
        assert_matches(p, q.to(p.dtype), rounded_once=False)


def test_complex_cores_rescale_by_their_modulus_norms():
    """Complex cores: s_k and γ_k are Σ|z|² (the norms of the cores as pairs of reals), λ real."""
    model = ComplexNet()
    backward(model)
    reference = reference_das_lambdas(groups_of(model), lambda c: 0.1, lambda c: 2.0)
    check_one_step(model, lambda m: DAS(m.parameters(), torch.optim.SGD, alpha=2.0, lr=0.1), torch.optim.SGD,
                   dict(lr=0.1), reference)
    backward(model, seed=2)
    reference = reference_bar_lambdas(groups_of(model), lambda c: 0.1, 0.3, "nbar")
    check_one_step(model, lambda m: BAR(m.parameters(), torch.optim.AdamW, alpha=0.3, lr=0.1),
                   torch.optim.AdamW, dict(lr=0.1), reference)


def reference_perturbation(model, rho):
    """SAM's w̃ = w + ρ g/||g|| with ||g||² = Σ over every parameter of Σ|g|², in float64, rounded once."""
    norm = math.sqrt(sum(sq(p.grad) for p in model.parameters()))
    out = []
    for p in model.parameters():
        wide = (lambda t: t.to(torch.complex128)) if p.is_complex() else (lambda t: t.double())
        out.append((wide(p.detach()) + rho * wide(p.grad) / (norm + 1e-12)).to(p.dtype))
    return out


def second_pass_grads(model, seed=9):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in model.parameters()]


@pytest.mark.parametrize("model_class", [MixedNet, ComplexNet])
def test_sam_perturbs_along_the_norm_over_every_dtype_then_steps_from_w(model_class):
    model = model_class()
    backward(model)
    before = [p.detach().clone() for p in model.parameters()]
    perturbed = reference_perturbation(model, rho=0.05)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.first_step()
    for p, want in zip(model.parameters(), perturbed):
        assert_matches(p, want, rounded_once=False)  # g·ρ/||g|| is rounded, then w + e
    for p, g in zip(model.parameters(), second_pass_grads(model)):
        p.grad = g.clone()
    opt.second_step()
    expected = [w.clone().requires_grad_() for w in before]
    for q, g in zip(expected, second_pass_grads(model)):
        q.grad = g
    torch.optim.SGD(expected, lr=0.1).step()  # the base step from w with the second-pass gradients, exactly
    for p, q in zip(model.parameters(), expected):
        assert torch.equal(p, q)


@pytest.mark.parametrize("model_class", [MixedNet, ComplexNet])
def test_gsam_correction_over_every_dtype_matches_the_formula(model_class):
    """g_GSAM = g̃ − α (g − (g·g̃/||g̃||²) g̃), the inner products real (Re Σ conj(a) b) over all parameters."""
    model = model_class()
    backward(model)
    first = [p.grad.clone() for p in model.parameters()]
    second = second_pass_grads(model)
    wide = [(f.to(torch.complex128), s.to(torch.complex128)) if f.is_complex() else (f.double(), s.double())
            for f, s in zip(first, second)]
    g_dot = sum(float(torch.vdot(f.flatten(), s.flatten()).real) for f, s in wide)
    s_dot = sum(float(torch.vdot(s.flatten(), s.flatten()).real) for _, s in wide)
    alpha = 0.3
    want = [(s - alpha * (f - (g_dot / s_dot) * s)) for f, s in wide]
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=alpha, lr=0.0)
    opt.first_step()
    for p, g in zip(model.parameters(), second):
        p.grad = g.clone()
    opt.second_step()
    for p, w in zip(model.parameters(), want):
        # bfloat16 gradients are rounded three times here (g̃·(1+αr), α·g, their sum): a few ulps of max|g|
        tol = 4 * TOLERANCE[torch.bfloat16] if p.dtype == torch.bfloat16 else TOLERANCE[p.dtype]
        torch.testing.assert_close(p.grad.to(w.dtype), w, rtol=tol, atol=tol * float(w.abs().max()))


def test_xsam_correction_over_every_dtype_matches_the_formula():
    """g_X = g̃ + ξ (g̃·v) v where (g·v)(g̃·v) ≥ 0, with the optimizer's unit eigenvector v over all dtypes."""
    model = MixedNet()
    data = batch(model)
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.05, xi=0.5, eig_iters=3, lr=0.0)
    opt.update_eigenvector(lambda: loss_of(model, data))
    vector = [v.double() for v in opt.eigenvector]
    assert abs(sum(float(v.pow(2).sum()) for v in vector) - 1.0) < 1e-2  # unit norm (bfloat16 parts rounded)
    backward(model)
    first = [p.grad.double() for p in model.parameters()]
    opt.first_step()
    second = second_pass_grads(model)
    for p, g in zip(model.parameters(), second):
        p.grad = g.clone()
    along = sum(float((s.double() * v).sum()) for s, v in zip(second, vector))
    first_along = sum(float((f * v).sum()) for f, v in zip(first, vector))
    assert first_along * along != 0
    coefficient = 0.5 * along if first_along * along >= 0 else 0.0
    opt.second_step()
    for p, s, v in zip(model.parameters(), second, vector):
        want = s.double() + coefficient * v
        tol = 2 * TOLERANCE[p.dtype]
        torch.testing.assert_close(p.grad.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


def test_norm_dynamics_and_norm_report_over_dtypes_and_complex():
    for model in (MixedNet(), ComplexNet()):
        backward(model)
        row = NormDynamics(model).record()
        report = tnlayers.norm_report(model)
        for name, cores in core_groups(model):
            s = [sq(c) for c in cores]
            mean = sum(s) / len(s)
            assert report[name] == pytest.approx(sum((x - mean) ** 2 for x in s), rel=1e-5)
            assert row[f"{name}/Q"] == pytest.approx(report[name], rel=1e-5)
            for k, core in enumerate(cores):
                assert row[f"{name}/s{k}"] == pytest.approx(s[k], rel=1e-6)
                assert row[f"{name}/grad{k}"] == pytest.approx(sq(core.grad), rel=1e-6)


def test_divergence_in_a_bfloat16_core_names_its_layer():
    model = MixedNet()
    backward(model)
    model.fc2.cores[1].grad.fill_(float("nan"))
    opt = DAS(model.named_parameters(), torch.optim.SGD, alpha=0.5, lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, DivergenceWarning)]
    assert len(messages) == 1 and "'fc2'" in messages[0] and "'fc1'" not in messages[0]


def _steps_like_torch(model, make):
    """Two steps of ``make(params)`` (SAM family through a closure, X-SAM with its loss_fn)."""
    data = batch(model)
    opt = make(model.parameters())

    def closure():
        opt.zero_grad()
        loss = loss_of(model, data)
        loss.backward()
        return loss

    for _ in range(2):
        if isinstance(opt, XSAM):
            opt.step(closure, loss_fn=lambda: loss_of(model, data))
        else:
            opt.step(closure)


OPTIMIZERS = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "DAS-SGD": lambda ps: DAS(ps, torch.optim.SGD, alpha=0.5, lr=0.05, momentum=0.9),
    "DAS-AdamW": lambda ps: DAS(ps, torch.optim.AdamW, alpha=0.5, lr=1e-3),
    "DAS-triton-auto": lambda ps: DAS(ps, torch.optim.SGD, alpha=0.5, backend="auto", lr=0.05),
    "BAR": lambda ps: BAR(ps, torch.optim.SGD, alpha=0.2, lr=0.05),
    "SAM": lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, lr=0.05),
    "ASAM": lambda ps: SAM(ps, torch.optim.AdamW, rho=0.5, adaptive=True, lr=1e-3),
    "GSAM": lambda ps: GSAM(ps, torch.optim.SGD, rho=0.05, alpha=0.1, lr=0.05),
    "XSAM": lambda ps: XSAM(ps, torch.optim.SGD, rho=0.05, xi=0.5, eig_every=1, eig_iters=2, lr=0.05),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_class", [MixedNet, ComplexNet])
def test_refuses_nothing_torch_optim_accepts(name, model_class):
    """The parameters torch.optim.SGD/AdamW step (mixed dtypes, complex) every optimizer here steps too."""
    model = model_class()
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        _steps_like_torch(model, OPTIMIZERS[name])
    for p, b in zip(model.parameters(), before):
        assert p.dtype == b.dtype and bool(torch.isfinite(torch.view_as_real(p) if p.is_complex() else p).all())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_the_fused_path_asks_for_one_device_and_one_dtype():
    cpu = [torch.ones(4)]
    assert "one device" in FusedDASStep.unsupported(cpu + [torch.ones(4, device="meta")], cpu * 2, forced=True)
    assert "one dtype" in FusedDASStep.unsupported(cpu + [torch.ones(4, dtype=torch.float64)], cpu * 2, forced=True)


def test_forced_triton_refuses_mixed_dtypes_and_auto_takes_the_torch_path(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = MixedNet()
    backward(model)
    with pytest.raises(RuntimeError, match="one dtype among"):
        DAS(model.parameters(), torch.optim.SGD, alpha=0.5, backend="triton", lr=0.1).step()
    reference = reference_das_lambdas(groups_of(model), lambda c: 0.1, lambda c: 0.5)
    check_one_step(model, lambda m: DAS(m.parameters(), torch.optim.SGD, alpha=0.5, backend="auto", lr=0.1),
                   torch.optim.SGD, dict(lr=0.1), reference)


# ---- several devices: run where a GPU is present -------------------------------------------------------------

def _devices(names):
    return [torch.device(ACCEL if d == "gpu" else d) for d in names]


def _placed(names):
    model = MixedNet(devices=_devices(names))
    backward(model)
    return model


@needs_gpu
@pytest.mark.parametrize("devices", [("gpu", "cpu", "gpu", "cpu"), ("cpu", "gpu", "cpu", "gpu")])
@pytest.mark.parametrize("optimizer", ["DAS", "DAS-layer", "BAR"])
def test_layers_over_gpu_and_cpu_match_the_formulas(devices, optimizer):
    """device_map-style placement: statistics gathered on the first core's device, λ sent back per device."""
    model = _placed(devices)
    if optimizer == "BAR":
        reference = reference_bar_lambdas(groups_of(model), lambda c: 0.1, 0.2, "nbar")
        make = lambda m: BAR(m.parameters(), torch.optim.SGD, alpha=0.2, lr=0.1)  # noqa: E731
    else:
        norm = "layer" if optimizer == "DAS-layer" else "global"
        reference = reference_das_lambdas(groups_of(model), lambda c: 0.1, lambda c: 50.0, norm)
        make = lambda m: DAS(m.parameters(), torch.optim.SGD, alpha=50.0, normalization=norm, lr=0.1)  # noqa: E731
    lambdas = check_one_step(model, make, torch.optim.SGD, dict(lr=0.1), reference)
    assert lambdas.device == next(model.conv.parameters()).device  # the home device: the first core's


@needs_gpu
def test_a_group_split_over_gpu_and_cpu_and_float32_on_two_devices():
    model = _interleaved_group()
    with torch.no_grad():
        for k, core in enumerate(model["mixed"].cores):  # alternate devices inside the group
            if k % 2:
                grad, core.grad = core.grad, None
                core.data = core.data.to(ACCEL)
                core.grad = grad.to(ACCEL)
    reference = reference_das_lambdas(groups_of(model), lambda c: 0.1, lambda c: 0.5)
    check_one_step(model, lambda m: DAS(m.parameters(), torch.optim.SGD, alpha=0.5, lr=0.1), torch.optim.SGD,
                   dict(lr=0.1), reference)
    same_dtype = MixedNet(devices=_devices(("gpu", "cpu", "gpu", "cpu"))).float()
    backward(same_dtype)
    if pytest.importorskip("triton"):
        with pytest.raises(RuntimeError, match="on one device"):
            DAS(same_dtype.parameters(), torch.optim.SGD, alpha=0.5, backend="triton", lr=0.1).step()


@needs_gpu
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_steps_layers_over_gpu_and_cpu(name):
    model = MixedNet(devices=_devices(("gpu", "cpu", "gpu", "cpu")))
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        _steps_like_torch(model, OPTIMIZERS[name])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    backward(model)
    row = NormDynamics(model).record()
    for name_, cores in core_groups(model):
        assert row[f"{name_}/s0"] == pytest.approx(sq(cores[0]), rel=1e-6)


@needs_gpu
def test_sam_over_gpu_and_cpu_matches_the_formula():
    model = _placed(("gpu", "cpu", "gpu", "cpu"))
    perturbed = reference_perturbation(model, rho=0.05)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.first_step()
    for p, want in zip(model.parameters(), perturbed):
        assert_matches(p, want, rounded_once=False)  # g·ρ/||g|| is rounded, then w + e
