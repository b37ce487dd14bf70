"""Bad input to the tensorized embeddings and the tied head: each row (id, call, exception, message regex) is a
row of docs/errors.md, named there as ``test_embedding_errors.py::test_bad_input[<id>]``."""
import warnings

import pytest
import torch
from torch import nn

from tnlayers import TensorizedEmbedding, TiedEmbeddingHead, TTEmbedding, TuckerEmbedding


def _emb(**kwargs):
    return TTEmbedding(10, 8, rank=2, **kwargs)


ROWS = [
    ("num-embeddings-zero", lambda: TTEmbedding(0, 8, rank=2), ValueError, "num_embeddings must be a positive int"),
    ("embedding-dim-float", lambda: TTEmbedding(10, 8.0, rank=2), ValueError, "embedding_dim must be a positive int"),
    ("padding-idx-range", lambda: _emb(padding_idx=10), ValueError, r"padding_idx must be within num_embeddings: in "
                                                                    r"\[-10, 10\), got 10"),
    ("padding-idx-str", lambda: _emb(padding_idx="0"), TypeError, "padding_idx must be None or an int"),
    ("max-norm-negative", lambda: _emb(max_norm=-1.0), ValueError, "max_norm must be a finite number > 0"),
    ("norm-type-zero", lambda: _emb(norm_type=0), ValueError, "norm_type must be a finite number > 0"),
    ("scale-grad-not-bool", lambda: _emb(scale_grad_by_freq=1), TypeError, "scale_grad_by_freq must be True or False"),
    ("sparse", lambda: _emb(sparse=True), ValueError, "does not support sparse=True"),
    ("format-missing", lambda: TensorizedEmbedding(10, 8, rank=2), TypeError, "TensorizedEmbedding needs format="),
    ("format-conflict", lambda: TTEmbedding(10, 8, rank=2, format="cp"), ValueError, "TTEmbedding is format 'tt'"),
    ("weight-std-kaiming", lambda: _emb(weight_std="kaiming_normal"), ValueError, "weight_std of an embedding must be"),
    ("in-shape-too-small", lambda: _emb(in_shape=(3, 3)), ValueError, r"in_shape=\(3, 3\) has product 9, fewer than "
                                                                      "num_embeddings=10"),
    ("in-shape-zero", lambda: _emb(in_shape=(10, 0)), ValueError, "in_shape must hold positive ints"),
    ("out-shape-product", lambda: _emb(out_shape=(4, 3)), ValueError, r"out_shape=\(4, 3\) has product 12"),
    ("shapes-lengths", lambda: _emb(in_shape=(5, 2), out_shape=(2, 2, 2)), ValueError, "must have as many modes"),
    ("one-mode", lambda: _emb(in_shape=(10,), out_shape=(8,)), ValueError, "at least 2 modes"),
    ("tucker-rank-length", lambda: TuckerEmbedding(10, 8, rank=[2, 2]), ValueError, "tucker rank"),
    ("rank-too-large", lambda: TTEmbedding(1000, 64, rank=10 ** 6), ValueError, "rank is out of range"),
    ("forward-float-indices", lambda: _emb()(torch.tensor([1.0])), TypeError, r"integer indices \(torch.long or "
                                                                              r"torch.int\), got dtype torch.float32"),
    ("forward-not-tensor", lambda: _emb()([1, 2]), TypeError, "expects a torch.Tensor of indices"),
    ("forward-index-range", lambda: _emb(in_shape=(4, 3))(torch.tensor([11])), IndexError,
     r"index 11 is out of range for num_embeddings=10 \(indices must be in \[0, 10\)\)"),
    ("forward-index-negative", lambda: _emb()(torch.tensor([-1])), IndexError, "index -1 is out of range"),
    ("meta-forward", lambda: _emb(device="meta")(torch.tensor([1])), NotImplementedError, "meta device.*to_empty"),
    ("logits-shape", lambda: _emb().logits(torch.randn(2, 7)), ValueError, r"logits expects input of shape \(\*, 8\)"),
    ("logits-int", lambda: _emb().logits(torch.ones(2, 8, dtype=torch.long)), TypeError,
     "logits expects a floating-point"),
    ("from-dense-wrong-module", lambda: TTEmbedding.from_dense(nn.Linear(8, 10), rank=2), TypeError,
     "expects an nn.Embedding"),
    ("from-dense-sparse", lambda: TTEmbedding.from_dense(nn.Embedding(10, 8, sparse=True), rank=2), ValueError,
     "sparse=True"),
    ("from-dense-option-typo", lambda: TTEmbedding.from_dense(nn.Embedding(10, 8), rank=2, tolerance=1e-3), TypeError,
     "unknown option"),
    ("init-weight-shape", lambda: _emb().init_from_weight(torch.ones(10, 7)), ValueError, "does not fit"),
    ("head-not-tensorized", lambda: TiedEmbeddingHead(nn.Embedding(10, 8)), TypeError,
     "TiedEmbeddingHead needs a tnlayers TensorizedEmbedding"),
    ("head-bias-not-bool", lambda: TiedEmbeddingHead(_emb(), bias=1), TypeError, "bias must be True or False"),
    ("head-from-dense-shape", lambda: TiedEmbeddingHead.from_dense(nn.Linear(8, 11), _emb()), ValueError,
     r"must be nn.Linear\(8, 10\), got nn.Linear\(8, 11\)"),
]


@pytest.mark.parametrize("make,error,match", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input(make, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            make()


def test_a_refused_index_leaves_nothing_half_done():
    emb = _emb()
    before = [c.detach().clone() for c in emb.cores]
    with pytest.raises(IndexError):
        emb(torch.tensor([1, 2, 10]))
    assert all(torch.equal(a, c) for a, c in zip(before, emb.cores)) and all(c.grad is None for c in emb.cores)
