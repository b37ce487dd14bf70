"""PEFT adapters as core groups (issue 20, items 1 and 2): ``core_groups`` finds, per PEFT layer and per adapter,
the LoRA pair, LoHa's four (or six) and LoKr's two to five factors, and nothing else; DAS and BAR act on them
from plain ``model.parameters()`` and follow the formulas of docs/design.md exactly (a reference step written
here with plain torch ops, float64, on tiny random-config GPT-2 and RoBERTa: nothing is downloaded).

The groups are checked against PEFT's own parameter names and by their defining property: rescaling a group's
factors by numbers whose product is 1 leaves the model's output unchanged, and rescaling one factor alone does not.
"""
import math
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import tnlayers  # noqa: E402
from tnlayers import BAR, DAS, SAM, core_groups, norm_report  # noqa: E402
from tnlayers.optim import NormDynamics  # noqa: E402

LR, ALPHA, WD, BETAS, EPS = 1e-2, 0.5, 0.01, (0.9, 0.999), 1e-8


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="peft")
        warnings.filterwarnings("ignore", module="transformers")
        yield


def gpt2(**lora):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=1)
    model = transformers.GPT2LMHeadModel(config)
    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["c_attn"], "fan_in_fan_out": True, **lora}
    return peft.get_peft_model(model, peft.LoraConfig(**lora)).double().eval()


def roberta(**lora):
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=40, max_position_embeddings=24, pad_token_id=1,
                                        bos_token_id=0, eos_token_id=2, num_labels=2)
    model = transformers.RobertaForSequenceClassification(config)
    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "key", "value"], **lora}
    return peft.get_peft_model(model, peft.LoraConfig(**lora)).double().eval()


IDS = torch.randint(3, 50, (3, 10), generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1, 1])


def loss_of(model, seed=0):
    ids = IDS.roll(seed, dims=1)
    if isinstance(model.get_base_model(), transformers.GPT2LMHeadModel):
        return model(input_ids=ids, labels=ids).loss
    return model(input_ids=ids, labels=LABELS).loss


def lora_wrapped(model):
    """The layers PEFT wrapped with LoRA, by PEFT's own class."""
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


# ------------------------------------------------------------------ which parameters are groups

@pytest.mark.parametrize("build", [gpt2, roberta], ids=["gpt2", "roberta"])
def test_one_lora_group_per_wrapped_layer_holding_exactly_its_a_and_b(build):
    model = build()
    groups = core_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(groups) == len(lora_wrapped(model)) == (2 if build is gpt2 else 6)
    for name, cores in groups:
        layer = name[:-len("[default]")]
        assert name.endswith("[default]")
        assert [names[id(c)] for c in cores] == [f"{layer}.lora_A.default.weight", f"{layer}.lora_B.default.weight"]
    # every trainable parameter of a plain LoRA model is in a group, and no frozen base parameter is
    grouped = {id(c) for _, cs in groups for c in cs}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


class Tiny(nn.Module):
    """An embedding, a 3x3 conv and linear layers: the layer kinds PEFT's LoRA, LoHa and LoKr wrap (``wide`` is
    64 x 64, large enough for LoKr to split both Kronecker factors into products)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 64)
        self.wide = nn.Linear(64, 64)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.lin = nn.Linear(64, 6)

    def forward(self, ids, img):
        return self.lin(self.wide(self.emb(ids)).mean(1)) + self.conv(img).mean((2, 3))


TINY_INPUTS = (torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(2)),
               torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64))

# (config, the regex of the parameter names that must form the groups, factors per group)
ADAPTERS = {
    "lora": (lambda: peft.LoraConfig(r=2, target_modules=["emb", "conv", "lin"], init_lora_weights=False),
             r"\.(lora_A\.default\.weight|lora_B\.default\.weight|lora_embedding_[AB]\.default)$", [2, 2, 2]),
    "lora_dora": (lambda: peft.LoraConfig(r=2, target_modules=["conv", "lin"], init_lora_weights=False, use_dora=True),
                  r"\.lora_[AB]\.default\.weight$", [2, 2]),
    "lora_bias": (lambda: peft.LoraConfig(r=2, target_modules=["conv", "lin"], init_lora_weights=False, lora_bias=True),
                  r"\.lora_[AB]\.default\.weight$", [2, 2]),
    "loha": (lambda: peft.LoHaConfig(r=2, target_modules=["conv", "lin"], init_weights=False),
             r"\.hada_", [4, 4]),
    "loha_effective_conv": (lambda: peft.LoHaConfig(r=2, target_modules=["conv", "lin"], init_weights=False,
                                                    use_effective_conv2d=True), r"\.hada_", [6, 4]),
    "lokr": (lambda: peft.LoKrConfig(r=2, target_modules=["conv", "lin"], init_weights=False),
             r"\.lokr_", [2, 3]),  # conv: W1 ⊗ W2; lin: W1 ⊗ W2a W2b
    "lokr_decompose_both_effective": (lambda: peft.LoKrConfig(r=1, target_modules=["conv", "lin", "wide"],
                                                              init_weights=False, decompose_both=True,
                                                              use_effective_conv2d=True),
                                      # wide, lin: W1a W1b ⊗ W2a W2b; conv: W1 ⊗ (t2, W2a, W2b)
                                      r"\.lokr_", [4, 4, 4]),
    "lokr_full": (lambda: peft.LoKrConfig(r=16, target_modules=["conv", "lin"], init_weights=False),
                  r"\.lokr_", [2, 2]),
}


def tiny(kind):
    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), ADAPTERS[kind][0]()).double()
    return model


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_groups_are_the_adapter_factors_and_scale_invariant(kind):
    model, (_, pattern, sizes) = tiny(kind), ADAPTERS[kind]
    groups = core_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = sorted(names[id(c)] for _, cs in groups for c in cs)
    assert grouped == sorted(n for n in names.values() if re.search(pattern, n))  # all factors, nothing else
    assert [len(cs) for _, cs in groups] == sizes
    assert all(len(cs) >= 2 for _, cs in groups)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        reference = model(*TINY_INPUTS)
        for _, cores in groups:
            saved = [c.clone() for c in cores]
            logs = torch.randn(len(cores), generator=gen, dtype=torch.float64)
            factors = (logs - logs.mean()).exp()  # product 1, no factor 1
            for c, f in zip(cores, factors):
                c.mul_(f)
            assert torch.allclose(model(*TINY_INPUTS), reference, rtol=1e-12, atol=1e-12)
            for c, s in zip(cores, saved):
                c.copy_(s)
            cores[0].mul_(2.0)  # one factor alone is not a symmetry
            assert not torch.allclose(model(*TINY_INPUTS), reference, rtol=1e-6, atol=1e-9)
            cores[0].copy_(saved[0])


@pytest.mark.parametrize("kind,extra", [("lora_dora", "lora_magnitude_vector"), ("lora_bias", "lora_B.default.bias")])
def test_dora_magnitude_and_lora_bias_are_not_in_groups(kind, extra):
    model = tiny(kind)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(extra in n for n in trainable)
    grouped = {id(c) for _, cs in core_groups(model) for c in cs}
    assert {n for n, p in trainable.items() if id(p) not in grouped} == {n for n in trainable if extra in n}


def test_adalora_and_ia3_are_not_groups():
    torch.manual_seed(0)
    ada = peft.get_peft_model(Tiny(), peft.AdaLoraConfig(r=2, target_modules=["lin"], total_step=10))
    ia3 = peft.get_peft_model(Tiny(), peft.IA3Config(target_modules=["lin"], feedforward_modules=[]))
    assert core_groups(ada) == [] and core_groups(ia3) == []


def test_tnlayers_does_not_import_peft():
    code = ("import sys, torch, tnlayers; model = torch.nn.Sequential(tnlayers.TTLinear(16, 16, rank=2)); "
            "tnlayers.core_groups(model); tnlayers.norm_report(model); "
            "tnlayers.DAS(model.parameters(), torch.optim.AdamW, lr=1e-3).step(); "
            "assert 'peft' not in sys.modules and 'transformers' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------------ the optimizers find the groups themselves

def lora_params(model):
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def test_das_on_plain_model_parameters_marks_and_rescales_the_lora_groups():
    """No core_groups call first: DAS marks the PEFT groups itself and differs from its base optimizer."""
    model, twin = roberta(init_lora_weights=False), roberta(init_lora_weights=False)
    assert all(tnlayers.groups.group_of(p) is None for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "found no core groups"
        das = DAS(model.parameters(), torch.optim.AdamW, alpha=ALPHA, lr=LR)
    adamw = torch.optim.AdamW(twin.parameters(), lr=LR)
    for m, opt in ((model, das), (twin, adamw)):
        loss_of(m).backward()
        opt.step()
    assert das.last_lambdas is not None and len(das.last_lambdas[0]) == 12
    difference = max((a - b).abs().max().item() for a, b in zip(lora_params(model), lora_params(twin)))
    assert difference > 1e-9  # exactly 0 was the bug: DAS silently equal to AdamW


@pytest.mark.parametrize("cls", [DAS, BAR])
def test_a_peft_model_without_adapters_in_the_optimizer_still_warns(cls):
    model = roberta()
    frozen = [p for p in model.parameters() if not p.requires_grad][:3]
    with pytest.warns(UserWarning, match=f"{cls.__name__} found no core groups among the 3 parameters"):
        cls(frozen, torch.optim.SGD, lr=0.01)


def test_norm_report_and_norm_dynamics_on_lora():
    model = gpt2(init_lora_weights=False)
    report = norm_report(model)
    assert len(report) == 2
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            s_a = module.lora_A["default"].weight.square().sum().item()
            s_b = module.lora_B["default"].weight.square().sum().item()
            assert report[f"{name}[default]"] == pytest.approx((s_a - s_b) ** 2 / 2, rel=1e-12)
    loss_of(model).backward()
    record = NormDynamics(model).record()
    first = next(iter(report))
    assert record[f"{first}/Q"] == pytest.approx(report[first], rel=1e-12) and math.isfinite(record[f"{first}/cov"])


def test_sam_on_lora_changes_only_the_adapters():
    model = gpt2(init_lora_weights=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=LR)
    opt.step(lambda: (opt.zero_grad(), loss_of(model).backward())[-1] or loss_of(model).detach())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad} and changed


# ------------------------------------------------------------------ the reference step, from the formulas

class ReferenceAdamW:
    """torch.optim.AdamW's update written out (decoupled weight decay, bias-corrected moments)."""

    def __init__(self):
        self.m, self.v, self.t = {}, {}, {}

    def step(self, key, p, g, lr):
        t = self.t[key] = self.t.get(key, 0) + 1
        m = self.m[key] = BETAS[0] * self.m.get(key, torch.zeros_like(g)) + (1 - BETAS[0]) * g
        v = self.v[key] = BETAS[1] * self.v.get(key, torch.zeros_like(g)) + (1 - BETAS[1]) * g * g
        m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
        return p * (1 - lr * WD) - lr * m_hat / (v_hat.sqrt() + EPS)


def das_factors(pairs, lr, alpha, normalization):
    """λ of DAS for each (A, B) pair: λ_k = η α u (γ_k − ḡ) / s_k (docs/design.md, Eq. (9) with α)."""
    gammas = [[float(g.square().sum()) for _, g in pair] for pair in pairs]
    total = sum(sum(gs) for gs in gammas)
    out = []
    for pair, gs in zip(pairs, gammas):
        mean = sum(gs) / len(gs)
        u = total ** -0.5 if normalization == "global" else (len(gs) * mean) ** -0.5
        out.append([lr * alpha * u * (gamma - mean) / float(p.square().sum()) for (p, _), gamma in zip(pair, gs)])
    return out


def bar_factors(pairs, lr, alpha, variant):
    """λ of BAR's two-core rule (docs/design.md): nBAR: the core with the larger gradient norm grows by αη, the
    other shrinks by αη; oBAR: the larger core shrinks, the smaller grows."""
    out = []
    for (a, g_a), (b, g_b) in pairs:
        if variant == "nbar":
            a_grows = g_a.norm() > g_b.norm()
        else:
            a_grows = a.norm() < b.norm()
        out.append([lr * alpha, -lr * alpha] if a_grows else [-lr * alpha, lr * alpha])
    return out


def run_against_reference(model, opt, factors_of, steps=4, active=None):
    """``steps`` steps of ``opt``; before each, the reference computes the step from the same parameters and
    gradients: G ← (1 + λ) G for the cores, then AdamW by hand on every trainable parameter."""
    base = ReferenceAdamW()
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    worst = 0.0
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, seed=step).backward()
        with torch.no_grad():
            pairs = [[(p.detach().clone(), p.grad.clone()) for p in (layer.lora_A[name].weight,
                                                                       layer.lora_B[name].weight)]
                     for layer in layers for name in (active or ["default"]) if name in layer.lora_A]
            factors = factors_of(pairs, step)
            expected = {}
            for layer_pairs, lams in zip(pairs, factors):
                for (p, g), lam in zip(layer_pairs, lams):
                    assert abs(lam) < 0.5  # the reference has no max_scale clamp: check it cannot bind
                    expected[len(expected)] = base.step(len(expected), (1 + lam) * p, g, LR)
        opt.step()
        got = [p for layer in layers for name in (active or ["default"]) if name in layer.lora_A
               for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)]
        assert len(got) == len(expected)
        worst = max(worst, max((g - expected[i]).abs().max().item() for i, g in enumerate(got)))
    return worst


@pytest.mark.parametrize("build", [gpt2, roberta], ids=["gpt2", "roberta"])
@pytest.mark.parametrize("normalization", ["global", "layer"])
def test_das_on_lora_equals_the_formula(build, normalization):
    model = build(init_lora_weights=False)  # B random, not 0: every λ is non-trivial
    opt = DAS(model.parameters(), torch.optim.AdamW, alpha=ALPHA, normalization=normalization, lr=LR,
              betas=BETAS, eps=EPS, weight_decay=WD)
    assert len(core_groups(model)) == len(lora_wrapped(model))
    worst = run_against_reference(model, opt, lambda pairs, step: das_factors(pairs, LR, ALPHA, normalization))
    assert worst <= 1e-12


@pytest.mark.parametrize("build", [gpt2, roberta], ids=["gpt2", "roberta"])
@pytest.mark.parametrize("variant,total_steps", [("nbar", None), ("obar", 6)])
def test_bar_on_lora_equals_the_two_core_rule(build, variant, total_steps):
    model = build(init_lora_weights=False)
    # At random init the larger core has the smaller gradient (g_A = s Bᵀ M, g_B = s M Aᵀ), so nBAR and oBAR agree
    # on every pair. In GPT-2's c_attn (B is 96 x 8, A 8 x 32) ‖g_A‖/‖g_B‖ ≈ (‖B‖/√96)/(‖A‖/√32): with
    # ‖B‖ = 1.3 ‖A‖ the larger core B has the larger gradient, and the rules disagree; every other layer is
    # set so, and the rules are checked to differ there (RoBERTa's square projections keep them agreeing).
    with torch.no_grad():
        for layer in lora_wrapped(model)[::2]:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            b.mul_(1.3 * a.norm() / b.norm())
    loss_of(model).backward()
    with torch.no_grad():
        pairs = [[(p, p.grad) for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
                 for m in lora_wrapped(model)]
        n_rule, o_rule = bar_factors(pairs, LR, ALPHA, "nbar"), bar_factors(pairs, LR, ALPHA, "obar")
    if build is gpt2:
        assert sum(n != o for n, o in zip(n_rule, o_rule)) == 1
    opt = BAR(model.parameters(), torch.optim.AdamW, alpha=ALPHA, variant=variant, total_steps=total_steps, lr=LR,
              betas=BETAS, eps=EPS, weight_decay=WD)

    def alpha(step):  # constant without total_steps, else the paper's decreasing α: cosine to 0 at total_steps
        return ALPHA if total_steps is None else ALPHA * 0.5 * (1 + math.cos(math.pi * step / total_steps))

    worst = run_against_reference(model, opt, lambda pairs, step: bar_factors(pairs, LR, alpha(step), variant))
    assert worst <= 1e-12


# ------------------------------------------------------------------ several, disabled and frozen adapters

def two_adapters():
    model = roberta(init_lora_weights=False)
    torch.manual_seed(1)
    model.add_adapter("second", peft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    return model.double()


def test_several_adapters_are_one_group_each():
    model = two_adapters()
    names = [n for n, _ in core_groups(model)]
    assert sum(n.endswith("[default]") for n in names) == 6 and sum(n.endswith("[second]") for n in names) == 4
    assert len(names) == len(set(names)) == 10
    tokens = {tnlayers.groups.group_of(c) for _, cs in core_groups(model) for c in cs}
    assert len(tokens) == 10


def test_inactive_adapter_is_skipped_and_the_active_one_follows_the_formula():
    """The inactive adapter has requires_grad=False and no gradient: DAS leaves it bit for bit, as AdamW does,
    and the active adapter's λ use the global u over the active groups only."""
    model = two_adapters()
    assert model.active_adapter == "default"
    second = {n: p.detach().clone() for n, p in model.named_parameters() if ".second" in n}
    assert second and not any(p.requires_grad for n, p in model.named_parameters() if ".second" in n)
    opt = DAS(model.parameters(), torch.optim.AdamW, alpha=ALPHA, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    worst = run_against_reference(model, opt, lambda pairs, step: das_factors(pairs, LR, ALPHA, "global"))
    assert worst <= 1e-12
    assert all(torch.equal(p, second[n]) for n, p in model.named_parameters() if ".second" in n)


def test_switching_adapters_trains_the_other_one():
    model = two_adapters()
    model.set_adapter("second")
    default = {n: p.detach().clone() for n, p in model.named_parameters() if ".default" in n}
    opt = DAS(model.parameters(), torch.optim.AdamW, alpha=ALPHA, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    worst = run_against_reference(model, opt, lambda pairs, step: das_factors(pairs, LR, ALPHA, "global"),
                                  steps=2, active=["second"])
    assert worst <= 1e-12
    assert all(torch.equal(p, default[n]) for n, p in model.named_parameters() if ".default" in n)


@pytest.mark.parametrize("cls", [DAS, BAR])
def test_disabled_adapters_give_no_gradient_and_the_base_step(cls):
    """Under ``disable_adapter()`` the adapters get no gradient: the step is exactly AdamW's (which moves only the
    trainable classifier bias here), and the adapters are left bit for bit; enabled again, they train."""
    model, twin = roberta(init_lora_weights=False), roberta(init_lora_weights=False)
    for m in (model, twin):
        m.base_model.model.classifier.out_proj.bias.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = cls(model.parameters(), torch.optim.AdamW, alpha=ALPHA, lr=LR)
    adamw = torch.optim.AdamW(twin.parameters(), lr=LR)
    for m, o in ((model, opt), (twin, adamw)):
        with m.disable_adapter():
            loss_of(m).backward()
        assert all(p.grad is None for p in lora_params(m))
        o.step()
    assert opt.last_lambdas is None
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == {
        "base_model.model.classifier.out_proj.bias"}
    opt.zero_grad()
    loss_of(model).backward()  # enabled again: the adapters train
    opt.step()
    assert opt.last_lambdas is not None and all(not torch.equal(p, before[n]) for n, p in model.named_parameters()
                                                if ".lora_" in n)


def test_a_frozen_factor_leaves_its_group_unscaled():
    """LoRA-FA style (A frozen): the group has one core with a gradient, whose λ is 0 for DAS (γ_k = ḡ) and
    BAR (σ = 0), so B takes exactly AdamW's step."""
    for cls in (DAS, BAR):
        model, twin = roberta(init_lora_weights=False), roberta(init_lora_weights=False)
        for m in (model, twin):
            for n, p in m.named_parameters():
                if ".lora_A." in n:
                    p.requires_grad_(False)
        opt, adamw = cls(model.parameters(), torch.optim.AdamW, alpha=ALPHA, lr=LR), torch.optim.AdamW(
            twin.parameters(), lr=LR)
        for m, o in ((model, opt), (twin, adamw)):
            loss_of(m).backward()
            o.step()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


# ------------------------------------------------------------------ the other users of core_groups' names

def test_lr_param_groups_resolves_peft_group_names():
    """A PEFT group is named "<layer>[<adapter>]", no module path: tnlayers.lr finds its layer through
    groups.group_module, and keeps the adapter's lr (per-core lr matching is defined for tnlayers cores only)."""
    model = gpt2(init_lora_weights=False)
    with pytest.warns(UserWarning, match=r"no lr matching for .*c_attn\[default\]"):
        groups = tnlayers.lr.param_groups(model, lr=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and all(g["lr"] == 0.1 for g in groups)
    assert tnlayers.groups.group_module(model, core_groups(model)[0][0]) is lora_wrapped(model)[0]


def test_precondition_core_grads_skips_peft_groups():
    model = gpt2(init_lora_weights=False)
    loss_of(model).backward()
    grads = [p.grad.clone() for p in lora_params(model)]
    tnlayers.precondition_core_grads_(model)
    assert all(torch.equal(p.grad, g) for p, g in zip(lora_params(model), grads))


@pytest.mark.parametrize("make", ["SAM", "GSAM", "XSAM"])
def test_sam_family_marks_the_peft_groups_too(make):
    """Built on plain model.parameters() (no core_groups call first), the SAM family marks each LoRA pair as one
    group, as DAS/BAR do: the pairs are PEFT's own lora_A/lora_B of one layer."""
    model = gpt2(init_lora_weights=False)
    assert all(tnlayers.groups.group_of(p) is None for p in model.parameters())
    opt = {"SAM": lambda ps: tnlayers.SAM(ps, torch.optim.SGD, lr=0.1),
           "GSAM": lambda ps: tnlayers.GSAM(ps, torch.optim.SGD, lr=0.1),
           "XSAM": lambda ps: tnlayers.XSAM(ps, torch.optim.SGD, lr=0.1)}[make]
    opt([p for p in model.parameters() if p.requires_grad])
    names = {id(p): n for n, p in model.named_parameters()}
    tokens = {}
    for p in lora_params(model):
        assert tnlayers.groups.group_of(p) is not None, names[id(p)]
        tokens.setdefault(tnlayers.groups.group_of(p), []).append(names[id(p)].split(".lora_")[0])
    assert len(tokens) == len(lora_wrapped(model))
    assert all(len(v) == 2 and v[0] == v[1] for v in tokens.values())  # A and B of the same layer
