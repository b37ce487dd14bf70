"""TiedEmbeddingHead: a language model's output head tied to a tensorized embedding (logits = x @ table^T + bias,
from the embedding's cores), and the helpers that keep a tie when a model is tensorized or made dense again.

The head holds its embedding by reference, not as a submodule: the cores are registered once, where the
embedding is (one core group for the optimizers, one copy in the state_dict, as a tied ``nn.Linear`` whose
weight is the embedding's Parameter). ``copy.deepcopy`` and pickling of the model keep the head pointing at
the copied embedding.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from ..types import Device, DType
from .embedding import TensorizedEmbedding

__all__ = ["TiedEmbeddingHead", "embedding_heads", "head_to_linear"]


class TiedEmbeddingHead(nn.Module):
    """``nn.Linear(embedding_dim, num_embeddings, bias)`` whose weight is ``embedding``'s table: the output head
    of a language model with tied input/output embeddings. Its forward is ``embedding.logits(x)`` (the cores
    contracted with ``x``, or the table rebuilt, by the embedding's strategy) plus the bias; ``.weight`` is
    the embedding's ``.weight``. A gradient reaches the one set of cores from both uses.

        >>> import torch, tnlayers
        >>> emb = tnlayers.TTEmbedding(50, 16, rank=4)
        >>> head = tnlayers.TiedEmbeddingHead(emb)
        >>> head(emb(torch.tensor([[1, 2, 3]]))).shape, head.embedding is emb
        (torch.Size([1, 3, 50]), True)
    """

    def __init__(self, embedding: TensorizedEmbedding, bias: bool = False, device: Device = None, dtype: DType = None):
        super().__init__()
        if not isinstance(embedding, TensorizedEmbedding):
            raise TypeError(f"TiedEmbeddingHead needs a tnlayers TensorizedEmbedding (TTEmbedding, ...), got "
                            f"{type(embedding).__name__}; a dense nn.Embedding ties to an nn.Linear by sharing its "
                            f"weight Parameter")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False, got {bias!r}")
        object.__setattr__(self, "_embedding", embedding)  # a plain reference: not registered a second time
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        core = embedding.cores[0]
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=device or core.device,
                                                 dtype=dtype or core.dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def embedding(self) -> TensorizedEmbedding:
        """The tensorized embedding whose table this head multiplies by."""
        return self._embedding

    @property
    def weight(self) -> torch.Tensor:
        """The embedding's table, (num_embeddings, embedding_dim): what a tied ``nn.Linear`` holds as weight."""
        return self._embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._embedding.logits(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @classmethod
    def from_dense(cls, module: nn.Linear, embedding: TensorizedEmbedding) -> "TiedEmbeddingHead":
        """The head replacing ``module``, an ``nn.Linear(embedding_dim, num_embeddings)`` tied to the embedding
        that ``embedding`` replaces (its bias, if any, is kept).

            >>> import torch, tnlayers
            >>> dense = torch.nn.Embedding(50, 16)
            >>> lm_head = torch.nn.Linear(16, 50, bias=False)
            >>> lm_head.weight = dense.weight
            >>> head = tnlayers.TiedEmbeddingHead.from_dense(lm_head, tnlayers.TTEmbedding.from_dense(dense, rank=50))
            >>> x = torch.randn(2, 16)
            >>> torch.allclose(head(x), lm_head(x), atol=1e-4)
            True
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(f"TiedEmbeddingHead.from_dense expects an nn.Linear, got {type(module).__name__}")
        if not isinstance(embedding, TensorizedEmbedding):
            raise TypeError(f"TiedEmbeddingHead.from_dense needs a TensorizedEmbedding, got {type(embedding).__name__}")
        if (module.in_features, module.out_features) != (embedding.embedding_dim, embedding.num_embeddings):
            raise ValueError(f"an output head tied to an embedding of {embedding.num_embeddings} x "
                             f"{embedding.embedding_dim} must be nn.Linear({embedding.embedding_dim}, "
                             f"{embedding.num_embeddings}), got nn.Linear({module.in_features}, {module.out_features})")
        head = cls(embedding, module.bias is not None, module.weight.device, module.weight.dtype)
        if module.bias is not None:
            with torch.no_grad():
                head.bias.copy_(module.bias)
        return head.train(module.training)

    def extra_repr(self) -> str:
        e = self._embedding
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tied to {type(e).__name__}({e.num_embeddings}, {e.embedding_dim}, format={e.format!r})")


def embedding_heads(model: nn.Module) -> Dict[int, List[Tuple[nn.Linear, List[str]]]]:
    """{id(embedding): [(head, its names), ...]} for each ``nn.Embedding`` of ``model`` whose weight Parameter is
    also the weight of one or more ``nn.Linear(embedding_dim, num_embeddings)`` and of nothing else: the ties
    that ``tensorize`` keeps by turning those Linears into :class:`TiedEmbeddingHead`. An embedding whose
    weight is shared in any other way is not listed (it stays dense, with the tie warning).

        >>> import torch
        >>> lm = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10)})
        >>> lm["head"].weight = lm["embed"].weight
        >>> [(names, type(head).__name__) for heads in embedding_heads(lm).values() for head, names in heads]
        [(['head'], 'Linear')]
    """
    owners: Dict[int, List[Tuple[str, nn.Module, str]]] = {}  # id(parameter) -> (module name, module, attribute)
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append((name, module, attr))
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding):
            continue
        shape = (module.embedding_dim, module.num_embeddings)
        others = [(n, m, a) for n, m, a in owners[id(module.weight)] if m is not module]
        heads: Dict[int, Tuple[nn.Linear, List[str]]] = {}
        for n, m, attr in others:
            if not (isinstance(m, nn.Linear) and attr == "weight" and (m.in_features, m.out_features) == shape):
                break
            heads.setdefault(id(m), (m, []))[1].append(n)
        else:
            if heads:
                out[id(module)] = list(heads.values())
    return out


def head_to_linear(head: TiedEmbeddingHead, embedding: nn.Embedding) -> nn.Linear:
    """The ``nn.Linear`` that ``to_dense`` puts in place of ``head``, its weight the Parameter of ``embedding``
    (the dense embedding that replaces the head's tensorized one): the tie is kept.

        >>> import torch, tnlayers
        >>> head = tnlayers.TiedEmbeddingHead(tnlayers.TTEmbedding(10, 4, rank=2))
        >>> dense = torch.nn.Embedding(10, 4)
        >>> head_to_linear(head, dense).weight is dense.weight
        True
    """
    weight = embedding.weight
    linear = nn.Linear(head.in_features, head.out_features, head.bias is not None, device=weight.device,
                       dtype=weight.dtype)
    linear.weight = weight
    if head.bias is not None:
        with torch.no_grad():
            linear.bias.copy_(head.bias)
    return linear.train(head.training)
