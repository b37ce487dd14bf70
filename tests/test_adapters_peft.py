"""tnlayers adapters on a model that already carries Hugging Face PEFT adapters: the layers PEFT did not wrap
are adapted, PEFT's own layers and their insides are refused by name (skipped by patterns), both kinds of
adapter train, the output is the base plus both updates (computed here with plain torch), and each
library saves, loads and merges its own adapters."""
import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from tnlayers.adapters import adapt, load_adapters, merge, named_adapters, save_adapters, unmerge  # noqa: E402


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 8) for _ in range(3))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.q_proj(x)) * torch.tanh(self.k_proj(x)) + self.v_proj(x))


def base_model(seed=0):
    torch.manual_seed(seed)
    return Attention()


def with_peft(model):
    """PEFT LoRA on q_proj, r 2, alpha 4 (scale 2), both factors random so its update is not zero."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, config)


def reference(base, x, q_delta, v_delta):
    """The base model's forward written out, with W_q + q_delta and W_v + v_delta."""
    q = x @ (base.q_proj.weight + q_delta).t() + base.q_proj.bias
    k = x @ base.k_proj.weight.t() + base.k_proj.bias
    v = x @ (base.v_proj.weight + v_delta).t() + base.v_proj.bias
    return (torch.tanh(q) * torch.tanh(k) + v) @ base.out.weight.t() + base.out.bias


def peft_delta(model):
    layer = model.base_model.model.q_proj
    return layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def tucker_delta(adapter):
    g, a, b = adapter.cores  # Tucker-2: ΔW = A G Bᵀ, scale alpha / rank
    return adapter.scale * a @ g @ b.t()


def test_peft_and_tnlayers_adapters_add_their_updates_and_both_train():
    original = base_model()
    model = adapt(with_peft(copy.deepcopy(original)), "tucker", rank=2, alpha=4, target_modules=["v_proj"],
                  init="random")
    v = model.base_model.model.v_proj
    assert [n for n, _ in named_adapters(model)] == ["base_model.model.v_proj"]
    x = torch.randn(5, 8)
    torch.testing.assert_close(model(x), reference(original, x, peft_delta(model), tucker_delta(v)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.q_proj.lora_A.default.weight",
                         "base_model.model.q_proj.lora_B.default.weight", "base_model.model.v_proj.cores.0",
                         "base_model.model.v_proj.cores.1", "base_model.model.v_proj.cores.2"}  # PEFT's kept
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).square().mean().backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable
    torch.testing.assert_close(model(x), reference(original, x, peft_delta(model), tucker_delta(v)))
    # each library merges its own: tnlayers in place, then PEFT's merge_and_unload leaves the tnlayers adapter
    expected = model(x)
    merge(model)
    plain = model.merge_and_unload()
    assert [n for n, _ in named_adapters(plain)] == ["v_proj"] and plain.v_proj.merged
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=0)
    unmerge(plain)
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=0)


TARGETS = [
    ("peft-layer", ["q_proj"], r"'base_model.model.q_proj' is a layer PEFT already adapted "
                               r"\(peft.tuners.lora.layer.Linear\)"),
    ("base-layer", ["q_proj.base_layer"], r"'q_proj.base_layer' names 'base_model.model.q_proj.base_layer', inside "
                                          r"'base_model.model.q_proj', a layer PEFT already adapted"),
    ("lora-factor", ["lora_A.default"], "names 'base_model.model.q_proj.lora_A.default', inside"),
    ("glob-inside-only", ["*.base_layer"], "names 'base_model.model.q_proj.base_layer', inside"),
    ("regex-inside-only", r".*lora_B\.default", "names 'base_model.model.q_proj.lora_B.default', inside"),
    ("regex-peft-layer", r".*_proj", r"'base_model.model.q_proj' is a layer PEFT already adapted"),
]


@pytest.mark.parametrize("targets,match", [t[1:] for t in TARGETS], ids=[t[0] for t in TARGETS])
def test_naming_what_peft_adapted_is_refused_and_changes_nothing(targets, match):
    model = with_peft(base_model())
    kinds = [type(m) for m in model.modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        adapt(model, "lora", rank=2, target_modules=targets)
    assert [type(m) for m in model.modules()] == kinds
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_a_pattern_reaching_inside_peft_layers_adapts_only_the_plain_layers():
    model = with_peft(base_model())
    adapt(model, "lora", rank=2, target_modules=r".*\.(k_proj|v_proj|lora_A\.default|base_layer)")
    assert [n for n, _ in named_adapters(model)] == ["base_model.model.k_proj", "base_model.model.v_proj"]
    assert type(model.base_model.model.q_proj.base_layer) is nn.Linear


def test_each_library_saves_and_loads_its_own_adapters(tmp_path):
    model = adapt(with_peft(base_model()), "tt", rank=2, target_modules=["k_proj", "v_proj"], init="random")
    x = torch.randn(4, 8)
    model.save_pretrained(str(tmp_path / "peft"))
    save_adapters(model, tmp_path / "tnlayers")
    fresh = peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "peft"))
    load_adapters(fresh, tmp_path / "tnlayers")
    assert torch.equal(fresh(x), model(x))
