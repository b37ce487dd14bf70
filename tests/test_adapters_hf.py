"""Adapters on Hugging Face transformers models built from tiny random configs (nothing is downloaded):
GPT-2 (its c_attn/c_proj/c_fc are ``Conv1D``, weight stored (in, out)) and RoBERTa (nn.Linear query/value,
the paper's FLoRA targets)."""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tnlayers import DAS, SAM, core_groups  # noqa: E402
from tnlayers.adapters import PAPER_PRESETS, LinearAdapter, adapt, merge, named_adapters, trainable_parameters, \
    unadapt, unmerge  # noqa: E402

FORMATS = ["lora", "tucker", "tt", "cp"]


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                     bos_token_id=0, eos_token_id=1)
    return transformers.GPT2Model(config).eval()


def roberta(seed=0):
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=40, max_position_embeddings=24, pad_token_id=1,
                                        bos_token_id=0, eos_token_id=2)
    return transformers.RobertaModel(config).eval()


def tokens(seed=1):
    return torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(seed))


def hidden(model, ids):
    return model(input_ids=ids).last_hidden_state


def train_a_little(model, ids, steps=3):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        hidden(model, ids).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("fmt", FORMATS)
def test_gpt2_conv1d_adapters_equal_base_then_merge_and_unmerge(fmt):
    model, ids = gpt2(), tokens()
    y_base = hidden(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapt(model, fmt, rank=4, target_modules=["c_attn", "mlp.c_proj"])
    names = [n for n, _ in named_adapters(model)]
    assert names == ["h.0.attn.c_attn", "h.0.mlp.c_proj", "h.1.attn.c_attn", "h.1.mlp.c_proj"]
    assert all(a.transposed for _, a in named_adapters(model))
    c_attn = model.h[0].attn.c_attn
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)  # Conv1D(nf=96, nx=32): weight (32, 96)
    assert torch.equal(hidden(model, ids), y_base)
    train_a_little(model, ids)
    y = hidden(model, ids)
    assert not torch.allclose(y, y_base)
    merge(model, keep_original=True)
    torch.testing.assert_close(hidden(model, ids), y, atol=1e-5, rtol=0)
    unmerge(model)
    assert torch.equal(model.h[0].attn.c_attn.base.weight, before["h.0.attn.c_attn.weight"])
    assert torch.equal(model.h[1].mlp.c_proj.base.weight, before["h.1.mlp.c_proj.weight"])
    merge(model)  # in place into the (in, out) Conv1D weight, then out again within round-off
    torch.testing.assert_close(hidden(model, ids), y, atol=1e-5, rtol=0)
    unmerge(model)
    for name in ("h.0.attn.c_attn", "h.1.mlp.c_proj"):
        torch.testing.assert_close(model.get_submodule(name).base.weight, before[f"{name}.weight"], atol=1e-6,
                                   rtol=2 ** -22)


def test_gpt2_conv1d_output_matches_transposed_dense_reference():
    model, x = gpt2(), torch.randn(2, 5, 32)
    conv1d = model.h[0].attn.c_attn
    adapter = LinearAdapter(conv1d, "tucker", rank=3, alpha=3, init="random")
    g, a, b = adapter.cores  # Tucker-2: G (r, r), A (out, r), B (in, r); ΔW = A G Bᵀ (out, in)
    delta = torch.einsum("oa,ab,ib->oi", a, g, b)
    expected = x @ (conv1d.weight + delta.t()) + conv1d.bias  # Conv1D computes x W + b with W (in, out)
    for strategy in ("dense", "factorized"):
        adapter.strategy = strategy
        torch.testing.assert_close(adapter(x), expected, atol=1e-5, rtol=1e-5)
    copied = copy.deepcopy(adapter)
    merged = unadapt(copied, merge=True)  # an adapter given alone: its base layer comes back
    assert type(merged).__name__ == "Conv1D" and copied.merged
    torch.testing.assert_close(merged.weight, conv1d.weight + delta.t(), atol=1e-6, rtol=0)


def test_roberta_flora_preset_targets_query_value():
    model, ids = roberta(), tokens()
    y_base = hidden(model, ids)
    settings = dict(PAPER_PRESETS["flora"]["adapter"], rank=4)
    adapt(model, **settings)
    names = [n for n, _ in named_adapters(model)]
    assert names == [f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    assert torch.equal(hidden(model, ids), y_base)
    # FLoRA rank 4 on 32 x 32: A (32, 4), G (4, 4), B (32, 4), four adapted layers
    assert trainable_parameters(model).trainable == 4 * (32 * 4 + 4 * 4 + 32 * 4)
    same = adapt(roberta(), "tucker", rank=4, target_modules=r".*attention\.self\.(query|value)")
    assert [n for n, _ in named_adapters(same)] == names


def test_roberta_das_and_sam_move_only_the_cores():
    model, ids = roberta(), tokens()
    adapt(model, "tt", rank=4, target_modules=["query", "value"])
    assert len(core_groups(model)) == 4
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for opt in (DAS(model.parameters(), torch.optim.Adam, alpha=1.0, lr=1e-3),
                SAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=1e-3)):
        for _ in range(3):
            opt.zero_grad()
            hidden(model, ids).square().mean().backward()
            if isinstance(opt, SAM):
                opt.first_step()
                hidden(model, ids).square().mean().backward()
            opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    assert all(a.cores[a.zero_core].abs().sum() > 0 for _, a in named_adapters(model))


def test_hf_containers_are_refused_by_name():
    with pytest.raises(TypeError, match="target_modules matched 'h.0.attn', a GPT2Attention"):
        adapt(gpt2(), target_modules=["attn"])
    with pytest.raises(ValueError, match=r"'qeury' matches no module.*close matches: \['query'"):
        adapt(roberta(), target_modules=["qeury"])
