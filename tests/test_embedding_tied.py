"""Tied input/output embeddings: a GPT-2 whose token embedding is tensorized and whose output head is a
TiedEmbeddingHead on the same cores, against the dense GPT-2 holding the same table in its tied wte/lm_head
(float64): logits, loss, every gradient; one core group, one copy of the cores in the state_dict; to_dense
gives back a tied nn.Linear."""
import copy

import pytest
import torch
from torch import nn

import tnlayers
from test_embedding import reference_table
from tnlayers import TiedEmbeddingHead, TTEmbedding
from tnlayers.groups import core_groups
from tnlayers.layers.embedding_head import embedding_heads
from _tiny_lm import tied_gpt2 as gpt2

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 53, (2, 12), generator=torch.Generator().manual_seed(1))


def tensorized(dense, fmt="tt", rank=4, strategy="auto"):
    """``dense`` with wte decomposed into a tensorized embedding and lm_head tied to it."""
    model = copy.deepcopy(dense)
    emb = tnlayers.TensorizedEmbedding.from_dense(model.transformer.wte, format=fmt, rank=rank, strategy=strategy)
    model.transformer.wte = emb
    model.lm_head = TiedEmbeddingHead.from_dense(model.lm_head, emb)
    return model


def dense_twin(dense, model):
    """The dense GPT-2 holding ``model``'s table (rebuilt here from the cores) in its tied wte and lm_head."""
    twin = copy.deepcopy(dense)
    assert twin.lm_head.weight is twin.transformer.wte.weight
    with torch.no_grad():
        twin.transformer.wte.weight.copy_(reference_table(model.transformer.wte))
    return twin


def test_the_dense_gpt2_ties_its_head_and_embedding_heads_finds_it():
    dense = gpt2()
    assert dense.lm_head.weight is dense.transformer.wte.weight
    heads = embedding_heads(dense)
    assert list(heads) == [id(dense.transformer.wte)]
    ((head, names),) = heads[id(dense.transformer.wte)]
    assert head is dense.lm_head and names == ["lm_head"]


@pytest.mark.parametrize("fmt", ["tt", "tr", "cp", "tucker"])
@pytest.mark.parametrize("strategy", ["factorized", "dense"])
def test_tied_gpt2_matches_the_dense_gpt2_with_the_same_table(fmt, strategy):
    dense = gpt2()
    model = tensorized(dense, fmt, 3, strategy)
    twin = dense_twin(dense, model)
    out, expected = model(input_ids=IDS, labels=IDS), twin(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-12, rtol=0)
    assert model.transformer.wte.last_strategy == strategy
    out.loss.backward()
    expected.loss.backward()
    emb = model.transformer.wte
    cores = [c.detach().clone().requires_grad_() for c in emb.cores]
    # nn's table gradient sums both uses (lookup and head): the cores get its vector-Jacobian product
    reference = torch.autograd.grad(reference_table(emb, cores), cores, twin.transformer.wte.weight.grad)
    for core, ref in zip(emb.cores, reference):
        torch.testing.assert_close(core.grad, ref, atol=1e-10, rtol=0)
    ours = dict(model.named_parameters())
    for name, param in twin.named_parameters():
        if not name.startswith(("transformer.wte", "lm_head")):
            torch.testing.assert_close(ours[name].grad, param.grad, atol=1e-10, rtol=0, msg=name)


def test_one_core_group_one_copy_in_the_state_dict_and_optimizers_step_both_uses():
    dense = gpt2()
    model = tensorized(dense)
    groups = dict(core_groups(model))
    assert list(groups) == ["transformer.wte"] and len(groups["transformer.wte"]) == 3
    keys = [k for k in model.state_dict() if k.startswith(("transformer.wte", "lm_head"))]
    assert keys == ["transformer.wte.cores.0", "transformer.wte.cores.1", "transformer.wte.cores.2"]
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and not any(n.startswith("lm_head") for n in names)
    opt = tnlayers.DAS(model.parameters(), torch.optim.SGD, alpha=0.1, lr=0.1)
    before = model.lm_head.weight.detach().clone()
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    torch.testing.assert_close(model.lm_head.weight, model.transformer.wte.weight, atol=0, rtol=0)  # still one table
    assert not torch.equal(model.lm_head.weight, before)
    fresh = tensorized(dense)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=0, rtol=0)


def test_deepcopy_keeps_the_tie_on_the_copy():
    model = tensorized(gpt2())
    clone = copy.deepcopy(model)
    assert clone.lm_head.embedding is clone.transformer.wte
    assert clone.lm_head.embedding is not model.transformer.wte
    with torch.no_grad():
        clone.transformer.wte.cores[0].mul_(2)
    torch.testing.assert_close(clone.lm_head.weight, clone.transformer.wte.weight, atol=0, rtol=0)
    assert not torch.equal(clone.lm_head.weight, model.lm_head.weight)


def test_to_dense_gives_back_a_tied_linear():
    model = tensorized(gpt2())
    expected = model(input_ids=IDS).logits.detach()
    dense = tnlayers.to_dense(model, inplace=False)
    assert type(dense.transformer.wte) is nn.Embedding and type(dense.lm_head) is nn.Linear
    assert dense.lm_head.weight is dense.transformer.wte.weight
    torch.testing.assert_close(dense(input_ids=IDS).logits, expected, atol=1e-10, rtol=0)


def test_to_dense_keeps_a_head_whose_embedding_stays_tensorized():
    emb = TTEmbedding(20, 8, rank=2)
    model = nn.Sequential(TiedEmbeddingHead(emb, bias=True))  # the embedding is not in this model
    with pytest.warns(UserWarning, match=r"to_dense left 1 output head\(s\) tensorized: \['0'\]"):
        tnlayers.to_dense(model)
    assert isinstance(model[0], TiedEmbeddingHead)


def test_head_bias_and_from_dense_checks():
    emb = TTEmbedding(20, 8, rank=2, dtype=torch.float64)
    linear = nn.Linear(8, 20, dtype=torch.float64)
    head = TiedEmbeddingHead.from_dense(linear, emb)
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(head(x), x @ emb.weight.T + linear.bias, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"must be nn.Linear\(8, 20\), got nn.Linear\(8, 21\)"):
        TiedEmbeddingHead.from_dense(nn.Linear(8, 21), emb)
    with pytest.raises(TypeError, match="needs a tnlayers TensorizedEmbedding"):
        TiedEmbeddingHead(nn.Embedding(20, 8))
