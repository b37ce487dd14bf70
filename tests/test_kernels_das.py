"""Fused DAS kernels against torch references: CUDA natively when present, else the CPU under
TRITON_INTERPRET=1 (how CI runs them). Sizes deliberately odd and small."""
import math
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

pytest.importorskip("triton")  # conftest.py chose the interpreter when there is no GPU
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

import tnlayers  # noqa: E402
from tnlayers.kernels.das_triton import BLOCK, UPDATE_ADAMW, UPDATE_NONE, UPDATE_SGD, FusedDASPlan  # noqa: E402
from tnlayers.optim import DAS  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [0, 1, 2, 7, 31, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 5]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=1e-3)}


def random_cores(draw_sizes, n_groups, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cores = [torch.randn(n, generator=g).to(DEVICE, dtype) for n in draw_sizes]
    grads = [torch.randn(n, generator=g).to(DEVICE, dtype) for n in draw_sizes]
    segment = torch.tensor([k % n_groups for k in range(len(draw_sizes))])
    segment = segment.sort().values  # group members are contiguous, as in a model
    counts = torch.bincount(segment, minlength=n_groups).float()
    return cores, grads, segment, counts


def reference_lambdas(cores, grads, segment, step_size, normalization, denominator):
    """Algorithm 2 with the guards, by a plain loop over groups, in float64."""
    s = [float(c.double().pow(2).sum()) for c in cores]
    gamma = [float(g.double().pow(2).sum()) for g in grads]
    groups = {}
    for k, grp in enumerate(segment.tolist()):
        groups.setdefault(grp, []).append(k)
    sums = {grp: sum(gamma[k] for k in ks) for grp, ks in groups.items()}
    usable = {grp: math.isfinite(v) and v > 0 for grp, v in sums.items()}
    total = sum(v for grp, v in sums.items() if usable[grp])
    lambdas = [0.0] * len(cores)
    for grp, ks in groups.items():
        if not usable[grp]:
            continue
        u = (total if normalization == "global" else sums[grp]) ** -0.5
        mean = sums[grp] / len(ks)
        for k in ks:
            if s[k] > 0:
                denom = s[k] if denominator == "squared" else math.sqrt(s[k])
                lam = step_size * u * (gamma[k] - mean) / denom
                lambdas[k] = lam if math.isfinite(lam) else 0.0
    return torch.tensor(lambdas, dtype=torch.float64)


@settings(max_examples=12, deadline=None)
@given(sizes=st.lists(st.sampled_from(SIZES), min_size=1, max_size=200), n_groups=st.integers(1, 12),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 1000))
def test_reduction_matches_torch(sizes, n_groups, dtype, seed):
    n_groups = min(n_groups, len(sizes))
    cores, grads, segment, counts = random_cores(sizes, n_groups, dtype, seed)
    s, gamma, group = FusedDASPlan(cores, segment, counts).reduce(cores, grads)
    expected_s = torch.stack([c.float().pow(2).sum() for c in cores])
    expected_gamma = torch.stack([g.float().pow(2).sum() for g in grads])
    expected_group = torch.zeros(n_groups, device=DEVICE).index_add_(0, segment.to(DEVICE), expected_gamma)
    for got, want in ((s, expected_s), (gamma, expected_gamma), (group, expected_group)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(sizes=st.lists(st.sampled_from(SIZES[1:]), min_size=1, max_size=40), n_groups=st.integers(1, 8),
       normalization=st.sampled_from(["global", "layer"]), denominator=st.sampled_from(["squared", "norm"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 1000))
def test_rescale_matches_reference(sizes, n_groups, normalization, denominator, dtype, seed):
    n_groups = min(n_groups, len(sizes))
    cores, grads, segment, counts = random_cores(sizes, n_groups, dtype, seed)
    before = [c.clone() for c in cores]
    step = 0.3
    expected = reference_lambdas(cores, grads, segment, step, normalization, denominator)
    plan = FusedDASPlan(cores, segment, counts)
    lambdas = plan.update(cores, grads, plan.reduce(cores, grads), step, normalization, denominator, UPDATE_NONE)
    torch.testing.assert_close(lambdas.double().cpu(), expected, rtol=1e-4, atol=1e-7)
    for core, old, lam in zip(cores, before, expected.tolist()):
        torch.testing.assert_close(core.float(), (old.double() * (1 + lam)).float(), **TOL[dtype])


def test_guards_single_core_zero_grads_zero_core_and_inf():
    sizes = [5, 9, 3, 4, 4, 6, 6, 7]
    segment = torch.tensor([0, 1, 1, 2, 2, 3, 3, 3])  # group 0 has one core
    counts = torch.bincount(segment).float()
    g = torch.Generator().manual_seed(0)
    cores = [torch.randn(n, generator=g).to(DEVICE) for n in sizes]
    grads = [torch.randn(n, generator=g).to(DEVICE) for n in sizes]
    grads[3].zero_(), grads[4].zero_()  # group 2: zero gradients
    cores[5].zero_()  # a zero-norm core (LoRA-style) in group 3
    grads[1][0] = float("inf")  # group 1: inf gradient
    before = [c.clone() for c in cores]
    expected = reference_lambdas(cores, grads, segment, 0.5, "global", "squared")
    plan = FusedDASPlan(cores, segment, counts)
    lambdas = plan.update(cores, grads, plan.reduce(cores, grads), 0.5, "global", "squared", UPDATE_NONE)
    assert lambdas[:6].abs().max() == 0 and expected[:6].abs().max() == 0
    assert lambdas[6:].abs().min() > 0  # the healthy group still moves, its u ignoring the bad groups
    torch.testing.assert_close(lambdas.double().cpu(), expected, rtol=1e-4, atol=1e-8)
    assert all(torch.isfinite(c).all() for c in cores)
    for k in range(6):
        assert torch.equal(cores[k], before[k])


def small_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(tnlayers.TTConv2d(4, 8, 3, padding=1, rank=3), nn.ReLU(),
                         tnlayers.TuckerConv2d(8, 8, 3, padding=1, rank=[3, 2]), nn.Flatten(),
                         tnlayers.CPLinear(8 * 25, 3, rank=2)).to(DEVICE, dtype)


BASES = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True), UPDATE_SGD),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.8, dampening=0.1), UPDATE_SGD),
    (torch.optim.SGD, dict(lr=0.1), UPDATE_SGD),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05), UPDATE_ADAMW),
    (torch.optim.Adam, dict(lr=0.01), UPDATE_ADAMW),  # no weight decay: AdamW's update
    (torch.optim.Adam, dict(lr=0.01, weight_decay=0.05), UPDATE_NONE),  # coupled weight decay: not fused
    (torch.optim.Adagrad, dict(lr=0.01), UPDATE_NONE),  # not SGD/Adam/AdamW: rescale fused, its own step
]


@pytest.mark.parametrize("base,kwargs,fused_kind", BASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_das_triton_follows_the_torch_path(base, kwargs, fused_kind, dtype, monkeypatch):
    x = torch.randn(4, 4, 5, 5, device=DEVICE, dtype=dtype)
    y = torch.randint(0, 3, (4,), device=DEVICE)
    kinds = []
    real_update = FusedDASPlan.update

    def spy(self, *args, **kw):
        kinds.append(kw.get("update"))
        return real_update(self, *args, **kw)

    monkeypatch.setattr(FusedDASPlan, "update", spy)
    # bf16: rounding once (fused, fp32 math) vs after each op (torch) differs by an ulp per step, and through
    # the next gradients those differences compound at a rate that depends on the CPU's bf16 matmuls. So in
    # bf16 every step is compared at bf16 precision, then the triton model restarts from the torch model's
    # cores: each step is checked from identical cores and gradients (optimizer states keep their own rounding).
    steps = 4
    models = {backend: small_model(dtype) for backend in ("torch", "triton")}
    opts = {backend: DAS(model.parameters(), base, alpha=0.5, backend=backend, **kwargs)
            for backend, model in models.items()}
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-3)
    for _ in range(steps):
        for backend, model in models.items():
            loss = nn.functional.cross_entropy(model(x).float(), y)
            opts[backend].zero_grad()
            loss.backward()
            opts[backend].step()
        a, b = models["torch"], models["triton"]
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pb.float(), pa.float(), **tol)
            if dtype == torch.bfloat16:
                with torch.no_grad():
                    pb.copy_(pa)
    expected_kinds = [fused_kind] * steps
    if fused_kind != UPDATE_NONE and (fused_kind == UPDATE_ADAMW or kwargs.get("momentum", 0) != 0):
        expected_kinds[0] = UPDATE_NONE  # the base optimizer's first step creates its state
    assert kinds == expected_kinds, kinds
    if dtype == torch.float32:  # in bf16, λ ∝ γ_k − ḡ magnifies the rounding differences
        lam_a, lam_b = (opts[backend].last_lambdas[1].double() for backend in ("torch", "triton"))
        torch.testing.assert_close(lam_b, lam_a, rtol=1e-3, atol=1e-7)


def test_auto_backend_keeps_cpu_on_torch_and_forced_triton_rejects_float64(monkeypatch):
    calls = []
    monkeypatch.setattr(FusedDASPlan, "reduce", lambda *a, **k: calls.append(1))
    model = small_model().cpu()
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.5, lr=0.1)
    model(torch.randn(2, 4, 5, 5)).sum().backward()
    opt.step()
    assert calls == []  # auto never picks the interpreter
    model = small_model(torch.float64)
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.5, lr=0.1, backend="triton")
    model(torch.randn(2, 4, 5, 5, dtype=torch.float64, device=DEVICE)).sum().backward()
    with pytest.raises(RuntimeError, match="float32/bfloat16/float16"):
        opt.step()


def test_two_launches_per_step(monkeypatch):
    import tnlayers.kernels.das_triton as kernels
    launches = []
    for name in ("_reduce_kernel", "_update_kernel"):
        kernel = getattr(kernels, name)

        class Counting:
            def __init__(self, k, n):
                self.k, self.n = k, n

            def __getitem__(self, grid):
                launches.append(self.n)
                return self.k[grid]
        monkeypatch.setattr(kernels, name, Counting(kernel, name))
    model = small_model()
    opt = DAS(model.parameters(), torch.optim.SGD, alpha=0.5, lr=0.1, momentum=0.9, backend="triton")
    for _ in range(3):
        model(torch.randn(2, 4, 5, 5, device=DEVICE)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert launches == ["_reduce_kernel", "_update_kernel"] * 3


@pytest.mark.parametrize("max_scale", [2.0, 8.0])
def test_rescale_factor_is_bounded_by_max_scale(max_scale):
    g = torch.Generator().manual_seed(1)
    sizes, segment = [6, 9, 4, 5, 7], torch.tensor([0, 0, 0, 1, 1])
    counts = torch.bincount(segment).float()
    cores = [torch.randn(n, generator=g).to(DEVICE) for n in sizes]
    grads = [torch.randn(n, generator=g).to(DEVICE) for n in sizes]
    cores[1].mul_(1e-4)  # tiny next to its gradient: unbounded λ ≈ 1e7
    grads[1].mul_(10.0)
    cores[3].mul_(1e-4)
    grads[4].mul_(10.0)  # ... and a core whose unbounded factor is < 0
    before = [c.clone() for c in cores]
    raw = reference_lambdas(cores, grads, segment, 0.5, "global", "squared")
    assert raw.max() > max_scale and raw.min() < -1.0
    factors = (1.0 + raw).clamp(1.0 / max_scale, max_scale)
    plan = FusedDASPlan(cores, segment, counts)
    lambdas = plan.update(cores, grads, plan.reduce(cores, grads), 0.5, "global", "squared", UPDATE_NONE,
                          max_scale=max_scale)
    torch.testing.assert_close(1.0 + lambdas.double().cpu(), factors, rtol=1e-5, atol=1e-7)
    for core, old, factor in zip(cores, before, factors.tolist()):
        torch.testing.assert_close(core, old * factor, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("base,kwargs", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                         (torch.optim.AdamW, dict(lr=0.01))])
def test_das_triton_applies_the_same_bound_as_the_torch_path(base, kwargs):
    x = torch.randn(4, 4, 5, 5, device=DEVICE)
    y = torch.randint(0, 3, (4,), device=DEVICE)
    models = {backend: small_model() for backend in ("torch", "triton")}
    for model in models.values():
        with torch.no_grad():
            model[0].core_parameters()[1].mul_(1e-4)  # a core whose unbounded λ is ~1e7
    opts = {backend: DAS(model.parameters(), base, alpha=0.5, backend=backend, max_scale=2.0, **kwargs)
            for backend, model in models.items()}
    largest = {backend: 0.0 for backend in models}
    for _ in range(3):
        for backend, model in models.items():
            opts[backend].zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opts[backend].step()
            largest[backend] = max(largest[backend], float(opts[backend].last_lambdas[1].max()))
    for pa, pb in zip(models["torch"].parameters(), models["triton"].parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
    assert largest == pytest.approx({"torch": 1.0, "triton": 1.0})  # 1 + λ reached max_scale = 2, no further
