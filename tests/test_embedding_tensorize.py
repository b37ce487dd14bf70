"""tensorize and to_dense with embeddings: nn.Embedding is selected by default (the largest layers of language and
recommendation models) except one tied to the classifier (it is the classifier's weight, and the classifier
stays dense by default); a sparse one stays dense with a warning; an output head tied to a tensorized
embedding follows it as a TiedEmbeddingHead on the same cores (a GPT-2 built from GPT2Config); to_dense
inverts it all."""
import warnings

import pytest
import torch
from torch import nn

import tnlayers
from test_embedding import reference_table
from tnlayers import TiedEmbeddingHead, TTEmbedding
from _tiny_lm import tied_gpt2 as gpt2

transformers = pytest.importorskip("transformers")


class Recommender(nn.Module):
    """A table, a tower, a classifier; nothing tied."""

    def __init__(self, sparse=False):
        super().__init__()
        torch.manual_seed(0)
        self.items = nn.Embedding(1000, 16, sparse=sparse)
        self.tower, self.fc = nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, ids):
        return self.fc(torch.relu(self.tower(self.items(ids).mean(1))))


IDS = torch.randint(0, 53, (2, 12), generator=torch.Generator().manual_seed(1))


def test_embeddings_are_selected_by_default_and_summarized():
    model = tnlayers.tensorize(Recommender(), rank=4, progress=False)
    assert isinstance(model.items, TTEmbedding) and isinstance(model.tower, tnlayers.TTLinear)
    assert type(model.fc) is nn.Linear  # the classifier stays dense
    assert model(torch.randint(0, 1000, (3, 5))).shape == (3, 2)
    report = tnlayers.summary(model, print_table=False)
    (row,) = [r for r in report.rows if r["name"] == "items"]
    assert row["dense_params"] == 16_000 and row["params"] == model.items.network.num_params < 16_000


def test_a_sparse_embedding_stays_dense_with_a_warning():
    with pytest.warns(UserWarning, match="items: Embedding with sparse=True"):
        model = tnlayers.tensorize(Recommender(sparse=True), rank=4, progress=False)
    assert type(model.items) is nn.Embedding


@pytest.mark.parametrize("fmt", ["tt", "tr", "cp", "tucker"])
def test_decompose_and_to_dense_round_trip(fmt):
    dense = Recommender()
    model = tnlayers.tensorize(dense, format=fmt, rank={"items": 1.0}, init="decompose", inplace=False,
                               shapes={"items": {"in_shape": (10, 10, 10), "out_shape": (4, 2, 2)}}, progress=False)
    assert model.items.in_shape == (10, 10, 10) and model.items.decomposition_error < 0.9
    assert type(dense.items) is nn.Embedding  # inplace=False
    back = tnlayers.to_dense(model, inplace=False)
    assert type(back.items) is nn.Embedding
    torch.testing.assert_close(back.items.weight, model.items.weight.detach(), atol=1e-6, rtol=0)


def test_by_default_an_embedding_tied_to_the_classifier_stays_dense_and_tied_like_it():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kept dense by choice, as the classifier: nothing to warn about
        model = tnlayers.tensorize(gpt2(), rank=4, progress=False)
    assert type(model.transformer.wte) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.transformer.wpe, TTEmbedding)  # the position table is tied to nothing


def test_gpt2_named_embedding_takes_its_tied_head_along():
    dense = gpt2()
    model = tnlayers.tensorize(dense, rank=4, filter=["transformer.wte", "transformer.wpe"], inplace=False,
                               progress=False)
    wte = model.transformer.wte
    assert isinstance(wte, TTEmbedding) and isinstance(model.transformer.wpe, TTEmbedding)
    assert isinstance(model.lm_head, TiedEmbeddingHead) and model.lm_head.embedding is wte
    assert dense.lm_head.weight is dense.transformer.wte.weight  # the dense model is untouched (inplace=False)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("lm_head") for n in names) and "transformer.wte.cores.0" in names
    # against the dense GPT-2 holding the tensorized tables in its tied wte/lm_head (and in wpe)
    twin = gpt2()
    with torch.no_grad():
        twin.transformer.wte.weight.copy_(reference_table(wte))
        twin.transformer.wpe.weight.copy_(reference_table(model.transformer.wpe))
    out, expected = model(input_ids=IDS, labels=IDS), twin(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-10, rtol=0)
    out.loss.backward()
    expected.loss.backward()
    cores = [c.detach().clone().requires_grad_() for c in wte.cores]
    reference = torch.autograd.grad(reference_table(wte, cores), cores, twin.transformer.wte.weight.grad)
    for core, ref in zip(wte.cores, reference):
        torch.testing.assert_close(core.grad, ref, atol=1e-10, rtol=0)
    back = tnlayers.to_dense(model)
    assert type(back.lm_head) is nn.Linear and back.lm_head.weight is back.transformer.wte.weight
    torch.testing.assert_close(back(input_ids=IDS).logits, out.logits.detach(), atol=1e-10, rtol=0)


def test_a_head_follows_its_embedding_whatever_the_arguments_say_of_the_head():
    model = tnlayers.tensorize(gpt2(), format={"transformer.wte": "cp", "lm_head": "tr"}, rank=4, progress=False)
    assert isinstance(model.transformer.wte, tnlayers.CPEmbedding) and type(model.transformer.wpe) is nn.Embedding
    assert isinstance(model.lm_head, TiedEmbeddingHead) and model.lm_head.embedding is model.transformer.wte


def test_a_head_whose_embedding_stays_dense_stays_tied():
    dense = gpt2()
    with pytest.warns(UserWarning, match="lm_head: tied weights"):
        model = tnlayers.tensorize(dense, rank=4, filter=["lm_head"], progress=False)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight


def test_an_embedding_shared_otherwise_stays_dense():
    model = Recommender()
    model.other = nn.Embedding(1000, 16)
    model.other.weight = model.items.weight  # two embeddings on one table: no head to follow
    with pytest.warns(UserWarning, match="tied weights"):
        tnlayers.tensorize(model, rank=4, filter=["items", "other"], progress=False)
    assert type(model.items) is nn.Embedding and model.other.weight is model.items.weight


def test_an_already_tensorized_embedding_is_left_as_it_is():
    model = tnlayers.tensorize(Recommender(), rank=4, progress=False)
    cores = list(model.items.cores)
    with pytest.warns(UserWarning, match="already tensorized"):
        tnlayers.tensorize(model, rank=8, filter=["items"], progress=False)
    assert list(model.items.cores) == cores
    with pytest.raises(ValueError, match="already tensorized in another format"):
        tnlayers.tensorize(model, format="cp", rank=8, filter=["items"], progress=False)
